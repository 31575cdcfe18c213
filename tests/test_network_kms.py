"""ETSI GS QKD 014 key delivery over real HTTPS with client certificates: status,
enc_keys, dec_keys once to the slave only, replay refused, wrong certificate 401 (or a TLS
refusal), empty pool 503, malformed requests 400, and an audit log without keys."""

from __future__ import annotations

import base64
import glob
import hashlib
import http.client
import json
import os
import pwd
import re
import shutil
import socket
import ssl
import subprocess
import tempfile
import threading
import time
import uuid

import pytest
from network_keys import distilled

from host.network.kms import KeyManager, PeerKME, make_server, open_store, tls_context
from host.network.messaging import unpack_head
from host.network.pki import issue, make_ca
from host.network.pool import SATELLITE, StationPool, fill_pair, pool_path

# micius-2017 with a brighter link for a 0.28 m portable station (2 urad beam, lossless
# optics) at a 20 MHz slot rate: the 16 s around culmination give ~0.8-1.5 million
# detections and 18-73 kbit over Stellenbosch and Beijing, in seconds of CPU per pass
KEY_MAKING_PASSES = (
    "--profile micius-2017 --set link.divergence_full_urad=2 --set link.optics_efficiency=1 "
    "--set source.slot_rate_hz=2e7 --duration-s 16 --ec cascade"
)
MASTER, SLAVE, OTHER, STRANGER = "sae-jinan-1", "sae-beijing-1", "sae-wuhan-1", "sae-unknown"
POOL_BYTES = 4096
SHARE_BYTES = POOL_BYTES // 2  # the half of the pair Jinan's takes (its KME) use


def _postgres_binary(name: str) -> str | None:
    found = shutil.which(name) or sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return found if isinstance(found, str) or not found else found[-1]


@pytest.fixture(scope="module")
def postgres_url():
    """A real PostgreSQL (Debian's package) in a temporary directory, on a Unix socket
    only; run as the `postgres` user when the tests run as root (it refuses root)."""
    initdb, pg_ctl = _postgres_binary("initdb"), _postgres_binary("pg_ctl")
    if not (initdb and pg_ctl):
        pytest.skip("PostgreSQL server binaries (Debian package postgresql) not installed")
    base = tempfile.mkdtemp(prefix="qkdsat-pg-", dir="/tmp")
    prefix = []
    if os.geteuid() == 0:
        user = pwd.getpwnam("postgres")
        os.chown(base, user.pw_uid, user.pw_gid)
        prefix = ["runuser", "-u", "postgres", "--"]
    data = os.path.join(base, "data")
    run = {"check": True, "capture_output": True, "timeout": 120}
    subprocess.run(prefix + [initdb, "-D", data, "-A", "trust", "-U", "postgres", "--no-sync"],
                   **run)  # fmt: skip
    options = f"-k {base} -c listen_addresses='' -F"
    subprocess.run(prefix + [pg_ctl, "-D", data, "-o", options, "-w", "-l",
                             os.path.join(base, "log"), "start"], **run)  # fmt: skip
    try:
        yield f"postgresql://postgres@/postgres?host={base}"
    finally:
        subprocess.run(prefix + [pg_ctl, "-D", data, "-m", "immediate", "stop"], timeout=60)
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def kme(request, tmp_path_factory):
    if request.param == "postgresql":
        database = request.getfixturevalue("postgres_url")
    root = tmp_path_factory.mktemp("kms")
    if request.param == "sqlite":
        database = str(root / "keys.sqlite")
    pki = root / "pki"
    make_ca(pki)
    for name in (MASTER, SLAVE, OTHER, STRANGER):
        issue(pki, name)
    issue(pki, "localhost", server=True)
    make_ca(root / "rogue")  # another CA with a certificate in the master's name
    issue(root / "rogue", MASTER)
    distilled(root / "keys", 8 * POOL_BYTES, "pass-1")
    fill_pair(root / "net", "Jinan", root / "keys")
    pool = pool_path(root / "net", "Jinan", SATELLITE)
    manager = KeyManager(
        "kme-jinan", pool, open_store(database), [MASTER, SLAVE, OTHER],
        root / "audit.jsonl",
    )  # fmt: skip
    context = tls_context(pki / "ca.pem", pki / "localhost.pem", pki / "localhost.key")
    server = make_server(manager, "localhost", 0, context)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield {"root": root, "pki": pki, "port": server.server_address[1], "pool": pool}
    server.shutdown()
    server.server_close()


def _call(kme, sae, method, path, body=None, pki=None):
    pki = pki or kme["pki"]
    context = ssl.create_default_context(cafile=str(kme["pki"] / "ca.pem"))
    context.load_cert_chain(str(pki / f"{sae}.pem"), str(pki / f"{sae}.key"))
    connection = http.client.HTTPSConnection("localhost", kme["port"], context=context, timeout=30)
    try:
        data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"} if data is not None else {}
        connection.request(method, path, body=data, headers=headers)
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def _used(kme) -> int:
    with StationPool(kme["pool"]) as pool:
        return pool.used_bytes


def test_status_enc_keys_then_dec_keys_once_to_the_slave_only(kme):
    status, body = _call(kme, MASTER, "GET", f"/api/v1/keys/{SLAVE}/status")
    assert status == 200
    assert body["master_SAE_ID"] == MASTER and body["slave_SAE_ID"] == SLAVE
    assert body["stored_key_count"] == 8 * (SHARE_BYTES - _used(kme)) // body["key_size"]
    used = _used(kme)
    status, enc = _call(kme, MASTER, "POST", f"/api/v1/keys/{SLAVE}/enc_keys",
                        {"number": 3, "size": 512})  # fmt: skip
    assert status == 200 and len(enc["keys"]) == 3
    assert _used(kme) - used == 3 * 64  # exactly the keys delivered
    keys = {item["key_ID"]: base64.b64decode(item["key"]) for item in enc["keys"]}
    assert all(len(k) == 64 for k in keys.values()) and len(set(keys.values())) == 3
    for key_id in keys:
        uuid.UUID(key_id)
    status, get_enc = _call(kme, MASTER, "GET", f"/api/v1/keys/{SLAVE}/enc_keys?number=1")
    assert status == 200 and len(base64.b64decode(get_enc["keys"][0]["key"])) == 32
    ids = list(keys)
    request = {"key_IDs": [{"key_ID": k} for k in ids[:2]]}
    # Nobody but the slave gets them: another registered SAE is Unauthorized (GS QKD 014
    # 5.4: 401), as is the slave naming another master; nothing is served.
    status, body = _call(kme, OTHER, "POST", f"/api/v1/keys/{MASTER}/dec_keys", request)
    assert status == 401 and body["details"] == [{"detail": ids[0]}]
    status, _ = _call(kme, SLAVE, "POST", f"/api/v1/keys/{OTHER}/dec_keys", request)
    assert status == 401
    status, dec = _call(kme, SLAVE, "POST", f"/api/v1/keys/{MASTER}/dec_keys", request)
    assert status == 200
    assert {item["key_ID"]: base64.b64decode(item["key"]) for item in dec["keys"]} == {
        k: keys[k] for k in ids[:2]
    }
    status, dec = _call(kme, SLAVE, "GET", f"/api/v1/keys/{MASTER}/dec_keys?key_ID={ids[2]}")
    assert status == 200 and base64.b64decode(dec["keys"][0]["key"]) == keys[ids[2]]
    # Replayed: refused, whether alone or with a fresh one (which is then not served either).
    status, body = _call(kme, SLAVE, "POST", f"/api/v1/keys/{MASTER}/dec_keys", request)
    assert status == 400 and "already served" in body["message"]
    fresh = get_enc["keys"][0]["key_ID"]
    mixed = {"key_IDs": [{"key_ID": fresh}, {"key_ID": ids[0]}]}
    assert _call(kme, SLAVE, "POST", f"/api/v1/keys/{MASTER}/dec_keys", mixed)[0] == 400
    status, dec = _call(kme, SLAVE, "GET", f"/api/v1/keys/{MASTER}/dec_keys?key_ID={fresh}")
    assert status == 200
    # The audit log names who got which key_ID, and never a key.
    audit = (kme["root"] / "audit.jsonl").read_text()
    assert ids[0] in audit and SLAVE in audit
    for key in list(keys.values()) + [base64.b64decode(get_enc["keys"][0]["key"])]:
        assert base64.b64encode(key).decode() not in audit and key.hex() not in audit


def test_wrong_certificate_is_401_or_refused_in_the_handshake(kme):
    # Signed by the CA but naming no registered SAE: 401.
    status, body = _call(kme, STRANGER, "GET", f"/api/v1/keys/{SLAVE}/status")
    assert status == 401
    used = _used(kme)
    assert _call(kme, STRANGER, "POST", f"/api/v1/keys/{SLAVE}/enc_keys", {})[0] == 401
    assert _used(kme) == used
    # The master's name on a certificate from another CA: the TLS handshake fails.
    with pytest.raises((ssl.SSLError, ConnectionResetError, BrokenPipeError)):
        _call(kme, MASTER, "GET", f"/api/v1/keys/{SLAVE}/status", pki=kme["root"] / "rogue")
    # No certificate at all: refused as well.
    context = ssl.create_default_context(cafile=str(kme["pki"] / "ca.pem"))
    connection = http.client.HTTPSConnection("localhost", kme["port"], context=context)
    with pytest.raises((ssl.SSLError, ConnectionResetError, BrokenPipeError)):
        connection.request("GET", f"/api/v1/keys/{SLAVE}/status")
        connection.getresponse()


@pytest.mark.parametrize(
    "body, detail",
    [
        (b"{not json", "not JSON"),
        ({"number": 1, "size": 260}, "multiple of 8"),
        ({"number": 129, "size": 256}, "number must be"),
        ({"number": 0}, "number must be"),
        ({"number": "many"}, "integer"),
        ({"number": 1, "additional_slave_SAE_IDs": [MASTER]}, "additional"),
        ({"number": 1, "size": 8200}, "64..8192"),  # above max_key_size
        ({"number": 1, "size": 56}, "64..8192"),  # below min_key_size
        ({"number": 1, "size": 2**70}, "64..8192"),  # not a 64-bit number either
        ({"number": 10**30}, "number must be"),
        ([1, 2], "JSON object"),
        ({"number": 1, "extension_mandatory": [{"x": 1}]}, "extension_mandatory"),
    ],
)
def test_malformed_enc_keys_is_400_and_takes_nothing(kme, body, detail):
    used = _used(kme)
    status, answer = _call(kme, MASTER, "POST", f"/api/v1/keys/{SLAVE}/enc_keys", body)
    assert status == 400 and detail in answer["message"]
    assert _used(kme) == used


def test_a_bad_content_length_is_400(kme):
    context = ssl.create_default_context(cafile=str(kme["pki"] / "ca.pem"))
    context.load_cert_chain(str(kme["pki"] / f"{MASTER}.pem"), str(kme["pki"] / f"{MASTER}.key"))
    connection = http.client.HTTPSConnection("localhost", kme["port"], context=context, timeout=30)
    try:
        connection.putrequest("POST", f"/api/v1/keys/{SLAVE}/enc_keys")
        connection.putheader("Content-Length", "lots")
        connection.endheaders()
        response = connection.getresponse()
        assert response.status == 400 and b"Content-Length" in response.read()
    finally:
        connection.close()


def test_malformed_dec_keys_is_400(kme):
    too_many = {"key_IDs": [{"key_ID": str(uuid.uuid4())} for _ in range(129)]}
    twice = {"key_IDs": [{"key_ID": str(uuid.UUID(int=1))}] * 2}
    for body in ({"key_IDs": "x"}, {"key_IDs": [{"key_ID": "not-a-uuid"}]}, {}, too_many, twice):
        assert _call(kme, SLAVE, "POST", f"/api/v1/keys/{MASTER}/dec_keys", body)[0] == 400
    assert _call(kme, MASTER, "GET", "/api/v1/keys/nobody/status")[0] == 400


def test_a_short_or_empty_pool_is_503_and_nothing_is_taken(kme):
    with StationPool(kme["pool"]) as pool:
        available = pool.available_for("Jinan")
    short = {"number": available // 1024 + 1, "size": 8192}
    status, body = _call(kme, MASTER, "POST", f"/api/v1/keys/{SLAVE}/enc_keys", short)
    assert status == 503 and "short" in body["message"]
    assert SHARE_BYTES - _used(kme) == available
    with StationPool(kme["pool"]) as pool:  # another user (a relay, say) empties it
        pool.take(available, "drain")
    status, body = _call(kme, MASTER, "GET", f"/api/v1/keys/{SLAVE}/status")
    assert status == 200 and body["stored_key_count"] == 0
    status, body = _call(kme, MASTER, "GET", f"/api/v1/keys/{SLAVE}/enc_keys?number=1&size=64")
    assert status == 503 and "0 bits available" in body["message"]
    # The next pass refills it and delivery resumes.
    distilled(kme["root"] / "keys2", 8 * 128, "pass-2")  # 64 bytes for Jinan's takes
    fill_pair(kme["root"] / "net", "Jinan", kme["root"] / "keys2")
    assert _call(kme, MASTER, "GET", f"/api/v1/keys/{SLAVE}/enc_keys?size=512")[0] == 200
    assert _call(kme, MASTER, "GET", f"/api/v1/keys/{SLAVE}/enc_keys?size=64")[0] == 503


def test_kms_command_serves_over_https_until_terminated(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    from host.cli import main as qkdsat

    root = Path(__file__).resolve().parents[1]
    pki = tmp_path / "pki"
    assert qkdsat(["kms", "pki", "--pki", str(pki), "--sae", f"{MASTER},{SLAVE}"]) == 0
    assert qkdsat(["kms", "pki", "--pki", str(pki), "--sae", MASTER]) == 2  # no overwrite
    distilled(tmp_path / "keys", 8 * 256, "pass-1")
    fill_pair(tmp_path / "net", "Hefei", tmp_path / "keys")
    pool = pool_path(tmp_path / "net", "Hefei", SATELLITE)
    server = subprocess.Popen(
        [sys.executable, "-m", "host.cli", "kms", "serve", "--pki", str(pki),
         "--sae", f"{MASTER},{SLAVE}", "--pool", str(pool), "--db", str(tmp_path / "k.db"),
         "--audit", str(tmp_path / "audit.jsonl"), "--listen", "127.0.0.1:0"],
        stdout=subprocess.PIPE, text=True, cwd=root, env={**os.environ, "PYTHONPATH": str(root)},
    )  # fmt: skip
    try:
        line = server.stdout.readline()
        port = int(line.rsplit(":", 1)[1].split("/")[0])
        kme = {"pki": pki, "port": port}
        status, enc = _call(kme, MASTER, "GET", f"/api/v1/keys/{SLAVE}/enc_keys?number=2")
        assert status == 200
        ids = "&".join(f"key_ID={item['key_ID']}" for item in enc["keys"])
        status, dec = _call(kme, SLAVE, "GET", f"/api/v1/keys/{MASTER}/dec_keys?{ids}")
        assert status == 200 and dec["keys"] == enc["keys"]
    finally:
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=30) == 0
    with StationPool(pool) as pool_now:
        assert pool_now.used_bytes == 64


def test_a_store_file_readable_by_others_is_refused_and_left_as_it_is(tmp_path):
    """A store made by someone else (an installer's touch, a restored backup) at 0644
    would leave the slave's pending keys readable: refused, as a pool at that mode is;
    the file is not touched. One the KME creates is 0600."""
    from host.errors import BadInput

    made = tmp_path / "made.sqlite"
    open_store(str(made))
    assert made.stat().st_mode & 0o777 == 0o600
    planted = tmp_path / "planted.sqlite"
    planted.write_bytes(b"")
    planted.chmod(0o644)
    with pytest.raises(BadInput, match=r"readable or writable by group or others \(mode 644\)"):
        open_store(str(planted))
    assert planted.read_bytes() == b"" and planted.stat().st_mode & 0o777 == 0o644


def test_an_application_named_as_a_kme_is_refused_at_issue_and_at_serve(tmp_path, capsys):
    """Client certificates from the one CA are told apart by name: an SAE certificate
    named as the peer KME would pass the peer check of deliver (keys stored for a slave
    under key IDs it chose). The PKI issues no such pair and a KME serves none."""
    from host.cli import main as qkdsat
    from host.errors import BadInput

    pki = tmp_path / "pki"
    for sae in (f"{MASTER},kme-b", "localhost", "ca"):  # a KME's, the server's, the CA's
        argv = ["kms", "pki", "--pki", str(pki), "--sae", sae, "--kme", "kme-a,kme-b"]
        assert qkdsat(argv) == 2, sae
        assert "every name once, SAE or KME" in capsys.readouterr().err
        assert not pki.exists()
    distilled(tmp_path / "keys", 8 * 64, "pass-1")
    fill_pair(tmp_path / "net", "Hefei", tmp_path / "keys")
    pool = pool_path(tmp_path / "net", "Hefei", SATELLITE)
    store = open_store(str(tmp_path / "k.sqlite"))
    assert qkdsat(["kms", "pki", "--pki", str(pki), "--sae", MASTER, "--kme", "kme-a,kme-b"]) == 0
    peer = PeerKME("https://localhost:1", "kme-b", pki / "ca.pem", pki / "kme-a.pem",
                   pki / "kme-a.key", pki / "kme-b.pem", pki / "localhost.pem")  # fmt: skip
    with pytest.raises(BadInput, match=r"SAE IDs \['kme-b'\] are also KME IDs"):
        KeyManager("kme-a", pool, store, [MASTER, "kme-b"], tmp_path / "audit", peer=peer)


def test_an_unreachable_postgresql_is_a_clear_error(tmp_path, capsys):
    from host.cli import main as qkdsat
    from host.errors import BadInput

    url = "postgresql://kme:secret@127.0.0.1:1/keys"
    with pytest.raises(BadInput, match=r"PostgreSQL postgresql://kme:\*\*\*@127.0.0.1:1/keys"):
        open_store(url)
    pki = tmp_path / "pki"
    assert qkdsat(["kms", "pki", "--pki", str(pki), "--sae", f"{MASTER},{SLAVE}"]) == 0
    distilled(tmp_path / "keys", 8 * 64, "pass-1")
    fill_pair(tmp_path / "net", "Hefei", tmp_path / "keys")
    pool = pool_path(tmp_path / "net", "Hefei", SATELLITE)
    code = qkdsat(["kms", "serve", "--pki", str(pki), "--sae", f"{MASTER},{SLAVE}",
                   "--pool", str(pool), "--db", url, "--audit", str(tmp_path / "a"),
                   "--listen", "127.0.0.1:0"])  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err
    assert "PostgreSQL" in err and "secret" not in err


@pytest.mark.slow
def test_two_kmes_serve_the_same_relayed_key_made_from_simulated_passes(tmp_path):
    """Must-show, end to end: a campaign simulates and distils a pass over Beijing and
    one over Stellenbosch (`qkdsat simulate` + `qkdsat distil` of the 16 s around
    culmination, micius-2017 with a brighter link: KEY_MAKING_PASSES), fills the pools, the
    satellite relays a key between them, and each station's own KME serves it: the
    master SAE gets keys from Beijing's KME, the slave SAE the same keys by key_ID from
    Stellenbosch's, once."""
    from pathlib import Path

    from host.cli import main as qkdsat
    from host.network.kms import PEER_DELIVER_PATH, PeerKME

    tle = Path(__file__).parent / "data" / "sso-500km.tle"
    net = tmp_path / "net"
    # The campaign's secret fixed (it keys each pass's pattern; its seed fixes the channel
    # noise): the same photons every run. The distillation keeps the OS's CSPRNG (keys
    # made with --insecure-deterministic-seed never enter a pool), so the QBER sample Cascade
    # is sized from still varies: 0 aborts in 60 such passes since Cascade re-checks the
    # current pass (1 in 50 before; docs/distillation.md "Cascade").
    (tmp_path / "campaign").mkdir()
    secret = tmp_path / "campaign" / "campaign.secret"
    secret.write_bytes(bytes(range(32)))
    secret.chmod(0o600)
    campaign = (
        f"campaign --tle {tle} --stations Beijing,Stellenbosch --start 2024-03-01T00:00:00Z "
        f"--days 1 {KEY_MAKING_PASSES} --workers 1 --out {tmp_path / 'campaign'} "
        f"--network {net} --quiet"
    )
    assert qkdsat(campaign.split()) == 0
    report = json.loads((tmp_path / "campaign" / "report.json").read_text())
    assert [p["station"] for p in report["passes"]] == ["Stellenbosch", "Beijing"]
    # a relay takes the satellite's half of each pass's key (pool.split_fill)
    assert all(p["key_bits"] >= 2 * (2048 + 128) + 15 for p in report["passes"]), report["passes"]
    capacity = report["relay_capacity_bits"]["Beijing-Stellenbosch"]
    assert capacity >= 2048 and report["pool_levels"][-1]["relay_capacity_bits"] == {
        "Beijing-Stellenbosch": capacity
    }
    assert (
        qkdsat(
            [
                "relay",
                "--network",
                str(net),
                "--from",
                "Beijing",
                "--to",
                "Stellenbosch",
                "--bits",
                "2048",
            ]
        )
        == 0
    )
    relayed = pool_path(net, "Beijing", "Stellenbosch").read_bytes()
    assert relayed == pool_path(net, "Stellenbosch", "Beijing").read_bytes()

    beijing, stellenbosch = "sae-beijing", "sae-stellenbosch"
    pki = tmp_path / "pki"
    make_ca(pki)
    issue(pki, "localhost", server=True)
    for name in (beijing, stellenbosch, "kme-beijing", "kme-stellenbosch"):
        issue(pki, name)
    servers, managers = [], {}
    for kme_id, pool in (
        ("kme-beijing", pool_path(net, "Beijing", "Stellenbosch")),
        ("kme-stellenbosch", pool_path(net, "Stellenbosch", "Beijing")),
    ):
        managers[kme_id] = KeyManager(
            kme_id,
            pool,
            open_store(str(tmp_path / f"{kme_id}.sqlite")),
            [beijing, stellenbosch],
            tmp_path / f"{kme_id}-audit.jsonl",
        )
        context = tls_context(pki / "ca.pem", pki / "localhost.pem", pki / "localhost.key")
        servers.append(make_server(managers[kme_id], "localhost", 0, context))
        threading.Thread(target=servers[-1].serve_forever, daemon=True).start()
    at = {
        "kme-beijing": {"pki": pki, "port": servers[0].server_address[1]},
        "kme-stellenbosch": {"pki": pki, "port": servers[1].server_address[1]},
    }
    for own, peer in (("kme-beijing", "kme-stellenbosch"), ("kme-stellenbosch", "kme-beijing")):
        managers[own].peer = PeerKME(
            f"https://localhost:{at[peer]['port']}",
            peer,
            pki / "ca.pem",
            pki / f"{own}.pem",
            pki / f"{own}.key",
            pki / f"{peer}.pem",
            pki / "localhost.pem",
        )
    try:
        status, body = _call(
            at["kme-beijing"], beijing, "GET", f"/api/v1/keys/{stellenbosch}/status"
        )
        assert status == 200 and body["target_KME_ID"] == "kme-stellenbosch"
        assert body["stored_key_count"] == 1024 // 256  # Beijing's half of the relayed key
        status, enc = _call(
            at["kme-beijing"],
            beijing,
            "POST",
            f"/api/v1/keys/{stellenbosch}/enc_keys",
            {"number": 2, "size": 256},
        )
        assert status == 200
        keys = {item["key_ID"]: base64.b64decode(item["key"]) for item in enc["keys"]}
        assert b"".join(keys.values()) == relayed[:64]  # Beijing's share, in pool order
        request = {"key_IDs": [{"key_ID": k} for k in keys]}
        # Not at the master's KME (it kept nothing), and not to the master itself.
        assert (
            _call(
                at["kme-beijing"],
                stellenbosch,
                "POST",
                f"/api/v1/keys/{beijing}/dec_keys",
                request,
            )[0]
            == 400
        )
        assert (
            _call(
                at["kme-stellenbosch"],
                beijing,
                "POST",
                f"/api/v1/keys/{beijing}/dec_keys",
                request,
            )[0]
            == 400
        )
        status, dec = _call(
            at["kme-stellenbosch"],
            stellenbosch,
            "POST",
            f"/api/v1/keys/{beijing}/dec_keys",
            request,
        )
        assert status == 200
        assert {item["key_ID"]: base64.b64decode(item["key"]) for item in dec["keys"]} == keys
        assert (
            _call(
                at["kme-stellenbosch"],
                stellenbosch,
                "POST",
                f"/api/v1/keys/{beijing}/dec_keys",
                request,
            )[0]
            == 400
        )
        # The other direction: Stellenbosch's SAE is the master, at its own KME.
        status, enc = _call(
            at["kme-stellenbosch"],
            stellenbosch,
            "GET",
            f"/api/v1/keys/{beijing}/enc_keys?number=1&size=256",
        )
        ids = enc["keys"][0]["key_ID"]
        status, dec = _call(
            at["kme-beijing"], beijing, "GET", f"/api/v1/keys/{stellenbosch}/dec_keys?key_ID={ids}"
        )
        assert status == 200 and dec["keys"] == enc["keys"]
        # from Stellenbosch's share: the second half (its sends and keys never meet Beijing's)
        assert base64.b64decode(dec["keys"][0]["key"]) == relayed[128:160]
        # Both pools consumed exactly the same bytes; an SAE cannot pose as the peer KME.
        with StationPool(pool_path(net, "Beijing", "Stellenbosch")) as pool_a:
            with StationPool(pool_path(net, "Stellenbosch", "Beijing")) as pool_b:
                assert pool_a.used_bytes == pool_b.used_bytes == 64 + 32
        forged = {
            "master_SAE_ID": beijing,
            "slave_SAE_ID": stellenbosch,
            "key_IDs": [str(uuid.uuid4())],
            "offset": 160,
            "size": 256,
        }
        assert _call(at["kme-stellenbosch"], beijing, "POST", PEER_DELIVER_PATH, forged)[0] == 401
        # The peer KME gone: the master gets nothing, and the pool loses nothing (the
        # peer is reached before the take; before, each such enc_keys burnt its bytes)
        servers[1].shutdown()
        servers[1].server_close()
        status, body = _call(
            at["kme-beijing"], beijing, "GET", f"/api/v1/keys/{stellenbosch}/enc_keys?size=256"
        )
        assert status == 503 and "slave's KME is not reached" in body["message"]
        assert "no key taken" in body["message"]
        with StationPool(pool_path(net, "Beijing", "Stellenbosch")) as pool_a:
            assert pool_a.used_bytes == 64 + 32
        for kme_id in managers:
            audit = (tmp_path / f"{kme_id}-audit.jsonl").read_text()
            assert relayed[:160].hex() not in audit
            for key in keys.values():
                assert base64.b64encode(key).decode() not in audit
    finally:
        for server in servers:
            server.shutdown()
            server.server_close()


def test_peer_delivery_is_refused_without_a_peer_and_peer_options_are_checked(
    kme, tmp_path, capsys
):
    from host.cli import main as qkdsat
    from host.network.kms import PEER_DELIVER_PATH

    used = _used(kme)
    delivery = {"master_SAE_ID": MASTER, "slave_SAE_ID": SLAVE,
                "key_IDs": [str(uuid.uuid4())], "offset": used, "size": 256}  # fmt: skip
    status, body = _call(kme, MASTER, "POST", PEER_DELIVER_PATH, delivery)
    assert status == 401 and "peer KME" in body["message"]
    assert _used(kme) == used  # nothing taken for a caller that is no peer
    pki = tmp_path / "pki"
    assert qkdsat(["kms", "pki", "--pki", str(pki), "--sae", f"{MASTER},{SLAVE}"]) == 0
    serve = ["kms", "serve", "--pki", str(pki), "--sae", f"{MASTER},{SLAVE}", "--pool",
             str(kme["pool"]), "--db", str(tmp_path / "k.db"), "--audit", str(tmp_path / "a"),
             "--listen", "127.0.0.1:0", "--kme-id", "kme-a"]  # fmt: skip
    assert qkdsat(serve + ["--peer-url", "https://localhost:9"]) == 2
    assert "--peer-url and --peer-kme-id go together" in capsys.readouterr().err
    assert qkdsat(serve + ["--peer-url", "https://localhost:9", "--peer-kme-id", "kme-b"]) == 2
    missing = "kme-a.pem missing or not a file (qkdsat kms pki --kme kme-a,kme-b)"
    assert missing in capsys.readouterr().err


def _two_kme_pki(pki):
    """`kms pki` for two KMEs, kme-a and kme-b, and the two SAEs."""
    from host.cli import main as qkdsat

    argv = ["kms", "pki", "--pki", str(pki), "--sae", f"{MASTER},{SLAVE}", "--kme", "kme-a,kme-b"]
    assert qkdsat(argv) == 0
    return pki


def _issued_by_the_same_ca(pki, directory, name, server=False):
    """A certificate for `name` on another key pair, issued with pki's CA key (by hand, as
    whoever holds that key could): directory/name.pem and .key."""
    directory.mkdir()
    for stem in ("ca.pem", "ca.key"):
        shutil.copy(pki / stem, directory / stem)
    issue(directory, name, server=server)
    return directory


def test_a_delivery_from_a_certificate_the_ca_signed_under_the_peers_name_is_refused(
    tmp_path, capsys
):
    """Certificates from the one CA are told apart by name; a second certificate under the
    peer KME's name (issued by hand with the CA's key) was taken for the peer: its
    deliveries took this KME's pool bytes under key_IDs it chose. Now the peer's own
    certificate is pinned (PeerKME, from the PKI that made both)."""
    from host.cli import main as qkdsat
    from host.network.kms import PEER_DELIVER_PATH

    pki = _two_kme_pki(tmp_path / "pki")
    forged = _issued_by_the_same_ca(pki, tmp_path / "forged", "kme-a")  # the peer's name
    distilled(tmp_path / "keys", 8 * POOL_BYTES, "pass-1")
    fill_pair(tmp_path / "net", "Jinan", tmp_path / "keys")
    pool = pool_path(tmp_path / "net", "Jinan", SATELLITE)
    peer = PeerKME("https://localhost:9", "kme-a", pki / "ca.pem", pki / "kme-b.pem",
                   pki / "kme-b.key", pki / "kme-a.pem", pki / "localhost.pem")  # fmt: skip
    manager = KeyManager(
        "kme-b", pool, open_store(str(tmp_path / "k.sqlite")), [MASTER, SLAVE],
        tmp_path / "audit.jsonl", peer=peer,
    )  # fmt: skip
    context = tls_context(pki / "ca.pem", pki / "localhost.pem", pki / "localhost.key")
    server = make_server(manager, "localhost", 0, context)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    kme = {"pki": pki, "port": server.server_address[1], "pool": pool}
    delivery = {"master_SAE_ID": MASTER, "slave_SAE_ID": SLAVE,
                "key_IDs": [str(uuid.uuid4())], "offset": 0, "size": 256}  # fmt: skip
    try:
        used = _used(kme)
        status, body = _call(kme, "kme-a", "POST", PEER_DELIVER_PATH, delivery, pki=forged)
        assert status == 401 and "not the peer KME's pinned one" in body["message"]
        assert _used(kme) == used  # nothing taken
        # refused before its body is read: a malformed one is a 401 too, not a parse error
        for malformed in (b"{not json", b"[]"):
            status, body = _call(kme, "kme-a", "POST", PEER_DELIVER_PATH, malformed, pki=forged)
            assert status == 401 and "not the peer KME's pinned one" in body["message"]
        status, body = _call(kme, "kme-a", "POST", PEER_DELIVER_PATH, delivery)
        assert (status, body["key_IDs"]) == (200, delivery["key_IDs"])
    finally:
        server.shutdown()
        server.server_close()
    # serve needs the peer's certificate to pin, and it must be the peer's
    serve = ["kms", "serve", "--pki", str(pki), "--sae", f"{MASTER},{SLAVE}", "--pool",
             str(pool), "--db", str(tmp_path / "k2.db"), "--audit", str(tmp_path / "a2"),
             "--listen", "127.0.0.1:0", "--kme-id", "kme-b", "--peer-url",
             "https://localhost:9", "--peer-kme-id", "kme-a"]  # fmt: skip
    capsys.readouterr()
    (pki / "kme-a.pem").rename(pki / "kme-a.pem.away")
    assert qkdsat(serve) == 2
    missing = "kme-a.pem missing or not a file (qkdsat kms pki --kme kme-b,kme-a)"
    assert missing in capsys.readouterr().err
    shutil.copy(pki / "kme-b.pem", pki / "kme-a.pem")
    assert qkdsat(serve) == 2
    assert "names ['kme-b'], not the peer KME kme-a" in capsys.readouterr().err
    # a damaged file, or the peer's name from another CA: refused at start, not an
    # internal error, nor a pin no delivery could match
    rogue = tmp_path / "rogue"
    make_ca(rogue)
    issue(rogue, "kme-a")
    damaged = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"
    for planted in (damaged, (rogue / "kme-a.pem").read_text()):
        (pki / "kme-a.pem").write_text(planted)
        assert qkdsat(serve) == 2
        assert "not a certificate of the peer KME kme-a issued by" in capsys.readouterr().err


def test_a_private_key_is_never_written_through_a_file_planted_at_its_temporary_name(
    tmp_path,
):
    """pki wrote each private key to .NAME.PID.tmp opened O_CREAT|O_TRUNC: a symlink
    planted there took the key into any file the attacker reads, and a file planted there
    (the attacker's, mode 0666) was truncated, filled and renamed into place, the key then
    the attacker's file. Now the temporary is created afresh (O_EXCL|O_NOFOLLOW, 0600)."""
    from host.network import pki

    trap = tmp_path / "readable-by-all"
    trap.write_bytes(b"")
    trap.chmod(0o666)
    pki_dir = tmp_path / "pki"
    pki_dir.mkdir()
    (pki_dir / f".ca.key.{os.getpid()}.tmp").symlink_to(trap)
    planted = pki_dir / f".ca.pem.{os.getpid()}.tmp"
    planted.write_bytes(b"")
    planted.chmod(0o666)
    pki.make_ca(pki_dir)
    assert trap.stat().st_size == 0  # (its content not compared: a private key)
    key = pki_dir / "ca.key"
    assert not key.is_symlink() and b"PRIVATE KEY" in key.read_bytes()
    assert os.stat(key).st_mode & 0o777 == 0o600


def _relayed_pair(tmp_path):
    """NET with Beijing's and Stellenbosch's passes filled and 8,192 bits relayed between
    them (NET/Beijing/Stellenbosch.pool and NET/Stellenbosch/Beijing.pool)."""
    from host.network.relay import relay

    net = tmp_path / "net"
    for station in ("Beijing", "Stellenbosch"):
        distilled(tmp_path / station, 8 * 4096, f"pass-{station}")
        fill_pair(net, station, tmp_path / station)
    relay(net, "Beijing", "Stellenbosch", 8 * 1024)
    return net


def _relayed_kmes(tmp_path):
    """Beijing's and Stellenbosch's KMEs serving the two pools of a relayed pair, each the
    other's peer, in this process: (net, pki, ports by KME ID, servers)."""
    from host.network.kms import PeerKME

    net = _relayed_pair(tmp_path)
    pki = tmp_path / "pki"
    make_ca(pki)
    issue(pki, "localhost", server=True)
    for name in (MASTER, SLAVE, "kme-beijing", "kme-stellenbosch"):
        issue(pki, name)
    managers, servers, ports = {}, [], {}
    for kme_id, holder, peer in (("kme-beijing", "Beijing", "Stellenbosch"),
                                 ("kme-stellenbosch", "Stellenbosch", "Beijing")):  # fmt: skip
        managers[kme_id] = KeyManager(
            kme_id, pool_path(net, holder, peer), open_store(str(tmp_path / f"{kme_id}.db")),
            [MASTER, SLAVE], tmp_path / f"{kme_id}.audit",
        )  # fmt: skip
        context = tls_context(pki / "ca.pem", pki / "localhost.pem", pki / "localhost.key")
        servers.append(make_server(managers[kme_id], "localhost", 0, context))
        ports[kme_id] = servers[-1].server_address[1]
        threading.Thread(target=servers[-1].serve_forever, daemon=True).start()
    for own, peer in (("kme-beijing", "kme-stellenbosch"), ("kme-stellenbosch", "kme-beijing")):
        managers[own].peer = PeerKME(f"https://localhost:{ports[peer]}", peer, pki / "ca.pem",
                                     pki / f"{own}.pem", pki / f"{own}.key",
                                     pki / f"{peer}.pem", pki / "localhost.pem")  # fmt: skip
    return net, pki, ports, servers


def _used_pair_bytes(net) -> tuple[int, int]:
    with StationPool(pool_path(net, "Beijing", "Stellenbosch")) as pool_a:
        with StationPool(pool_path(net, "Stellenbosch", "Beijing")) as pool_b:
            return pool_a.used_bytes, pool_b.used_bytes


def test_a_delivery_past_its_deadline_before_the_take_takes_nothing(tmp_path, monkeypatch):
    """The peer is reached before the pool's take, and the deadline runs from there (cold
    review of session 27): a take that waited on the pool's lock past half the deadline
    took the bytes and lost them to a delivery cut short; a connection that outlasted the
    whole deadline before its socket existed (nothing to cut) went on, the peer storing
    keys under key_IDs no master got. Now each is a 503 that takes nothing, at either
    end, and the next enc_keys is served."""
    import http.client

    from host.network import kms
    from host.network.kms import PeerKME

    net, pki, ports, servers = _relayed_kmes(tmp_path)
    beijing = {"pki": pki, "port": ports["kme-beijing"]}
    stellenbosch = {"pki": pki, "port": ports["kme-stellenbosch"]}
    enc_keys = f"/api/v1/keys/{SLAVE}/enc_keys?number=2&size=256"
    monkeypatch.setattr(PeerKME, "DEADLINE_S", 2.0)
    try:
        used = _used_pair_bytes(net)
        holder = StationPool(pool_path(net, "Beijing", "Stellenbosch"))  # its lock, 1.5 s
        threading.Timer(1.5, holder.close).start()
        status, body = _call(beijing, MASTER, "GET", enc_keys)
        assert status == 503, body
        assert re.fullmatch(
            r"\d+\.\d s of the delivery's 2 s were gone at the pool's take \(connecting, "
            r"then waiting for the pool's lock\): nothing sent; no key taken",
            body["message"],
        ), body
        assert _used_pair_bytes(net) == used
        connect = http.client.HTTPSConnection.connect

        def slow_connect(connection):  # slow name resolution, a blackholed first address
            time.sleep(2.5)
            connect(connection)

        monkeypatch.setattr(http.client.HTTPSConnection, "connect", slow_connect)
        status, body = _call(beijing, MASTER, "GET", enc_keys)
        assert status == 503 and "did not answer within 2 s" in body["message"], body
        assert "no key taken" in body["message"]
        assert _used_pair_bytes(net) == used
        monkeypatch.setattr(http.client.HTTPSConnection, "connect", connect)
        # the slave's KME held on its own pool's lock past the master's deadline: it takes
        # nothing and stores no key for the 503'd master (its bytes stay for the next)
        monkeypatch.setattr(kms, "PEER_TAKE_BY_S", 2.5)
        holder = StationPool(pool_path(net, "Stellenbosch", "Beijing"))
        threading.Timer(3.0, holder.close).start()
        status, body = _call(beijing, MASTER, "GET", enc_keys)
        assert status == 503 and "did not answer within 2 s" in body["message"], body
        time.sleep(1.5)  # the slave's KME gets its lock and refuses the late take
        assert open_store(str(tmp_path / "kme-stellenbosch.db")).count() == 0
        assert _used_pair_bytes(net) == (used[0] + 64, used[1])  # the master's taken, lost
        used = _used_pair_bytes(net)
        monkeypatch.setattr(PeerKME, "DEADLINE_S", 30.0)  # a loaded machine's delivery
        status, enc = _call(beijing, MASTER, "GET", enc_keys)
        assert status == 200, enc
        request = {"key_IDs": [{"key_ID": item["key_ID"]} for item in enc["keys"]]}
        status, dec = _call(stellenbosch, SLAVE, "POST", f"/api/v1/keys/{MASTER}/dec_keys",
                            request)  # fmt: skip
        assert status == 200 and dec["keys"] == enc["keys"]
        # the slave's pool skips the 64 bytes the master's lost: both ends used alike
        assert _used_pair_bytes(net) == (used[0] + 64, used[0] + 64)
    finally:
        for server in servers:
            server.shutdown()
            server.server_close()


def test_a_kme_serving_one_pool_alone_and_a_send_to_its_station_never_share_a_key(tmp_path):
    """Stellenbosch's KME serves its pool for Beijing alone (no peer KME) while Beijing
    sends Stellenbosch a message over the same relayed pair: the keys the KME hands its
    master SAE and the message's pad lie apart in the pool (before, both took the pair's
    first bytes: the application's key was the message's pad)."""
    from host.cli import main as qkdsat
    from host.network.relay import AUTH_BYTES

    net = _relayed_pair(tmp_path)
    pki = tmp_path / "pki"
    make_ca(pki)
    issue(pki, "localhost", server=True)
    for name in (MASTER, SLAVE):
        issue(pki, name)
    pool = pool_path(net, "Stellenbosch", "Beijing")
    manager = KeyManager("kme-stellenbosch", pool, open_store(str(tmp_path / "k.sqlite")),
                         [MASTER, SLAVE], tmp_path / "audit.jsonl")  # fmt: skip
    context = tls_context(pki / "ca.pem", pki / "localhost.pem", pki / "localhost.key")
    server = make_server(manager, "localhost", 0, context)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        plain = tmp_path / "image.bin"
        plain.write_bytes(os.urandom(300))
        message = tmp_path / "image.msg"
        assert qkdsat(["send", "--network", str(net), "--from", "Beijing", "--to",
                       "Stellenbosch", str(plain), "--out", str(message)]) == 0  # fmt: skip
        at = {"pki": pki, "port": server.server_address[1]}
        status, enc = _call(at, MASTER, "POST", f"/api/v1/keys/{SLAVE}/enc_keys",
                            {"number": 2, "size": 1024})  # fmt: skip
        assert status == 200
    finally:
        server.shutdown()
        server.server_close()
    data = message.read_bytes()
    _, head_bytes = unpack_head(data)
    ciphertext = data[head_bytes : head_bytes + 300]
    pad = bytes(c ^ p for c, p in zip(ciphertext, plain.read_bytes(), strict=True))
    relayed = pool.read_bytes()
    pad_at = relayed.find(pad)
    key_at = relayed.find(b"".join(base64.b64decode(k["key"]) for k in enc["keys"]))
    assert pad_at >= 0 and key_at >= 0
    first, second = sorted([(pad_at, 300 + AUTH_BYTES), (key_at, 256)])
    assert first[0] + first[1] <= second[0], "one pool byte served as a key and as a pad"


def test_a_message_overtaken_by_a_kme_delivery_is_still_received(tmp_path):
    """Beijing sends Stellenbosch a file, then (before the file arrives) Beijing's master
    SAE asks its KME for keys: Beijing's KME tells Stellenbosch's to take the bytes after
    the message's pad, skipping the pad. The message, received after, must still decrypt
    (once), and the slave SAE gets the master's keys. Before, the delivery's skip used
    the pad's bytes up at Stellenbosch and the message was refused as a replay."""
    from host.cli import main as qkdsat

    net, pki, ports, servers = _relayed_kmes(tmp_path)
    try:
        plain, message, out = (tmp_path / name for name in ("image.bin", "image.msg", "out"))
        plain.write_bytes(os.urandom(300))
        assert qkdsat(["send", "--network", str(net), "--from", "Beijing", "--to",
                       "Stellenbosch", str(plain), "--out", str(message)]) == 0  # fmt: skip
        beijing, stellenbosch = ({"pki": pki, "port": ports[kme_id]} for kme_id in ports)
        status, enc = _call(beijing, MASTER, "POST", f"/api/v1/keys/{SLAVE}/enc_keys",
                            {"number": 2, "size": 256})  # fmt: skip
        assert status == 200, enc
        request = {"key_IDs": [{"key_ID": item["key_ID"]} for item in enc["keys"]]}
        status, dec = _call(stellenbosch, SLAVE, "POST", f"/api/v1/keys/{MASTER}/dec_keys",
                            request)  # fmt: skip
        assert status == 200 and dec["keys"] == enc["keys"]
    finally:
        for server in servers:
            server.shutdown()
            server.server_close()
    assert qkdsat(["receive", "--network", str(net), "--at", "Stellenbosch", str(message),
                   "--out", str(out)]) == 0  # fmt: skip
    assert out.read_bytes() == plain.read_bytes()
    assert qkdsat(["receive", "--network", str(net), "--at", "Stellenbosch", str(message),
                   "--out", str(tmp_path / "again")]) == 2  # fmt: skip
    with StationPool(pool_path(net, "Stellenbosch", "Beijing")) as pool_b:
        with StationPool(pool_path(net, "Beijing", "Stellenbosch")) as pool_a:
            assert pool_a.used_bytes == pool_b.used_bytes == 300 + 16 + 64


def test_a_client_dripping_its_handshake_is_cut_off_at_the_request_deadline(kme, monkeypatch):
    """A stranger (no certificate needed: the TLS handshake is what it drips) sends a TLS
    record header announcing 512 bytes, then a byte every 0.3 s. On main only the
    handler's 30 s idle timeout bounded each wait for a byte, so it held its thread for
    as long as it kept dripping (here it gives up after 18 s), and one thread per
    connection it opened. Now the whole reading of a request is bounded
    (Handler.request_deadline_s, 1 s here): the connection is cut, and the KME still
    answers its SAEs."""
    from host.network.kms import Handler

    monkeypatch.setattr(Handler, "request_deadline_s", 1.0)
    began = time.monotonic()
    closed_after_s = None
    with socket.create_connection(("localhost", kme["port"]), timeout=0.3) as sock:
        sock.sendall(b"\x16\x03\x01\x02\x00")  # a handshake record of 512 bytes follows
        for _ in range(60):  # 18 s at a byte every 0.3 s
            try:
                sock.sendall(b"\x01")
                data = sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:  # reset by the server
                data = b""
            if not data:
                closed_after_s = time.monotonic() - began
                break
    # the deadline, plus a loaded machine's stall: up to 7 s (x8 the deadline in all) at
    # load ~10 on 2 cores, far under the 18 s the stranger would have held it
    assert closed_after_s is not None and closed_after_s < 8.0, closed_after_s
    status, _ = _call(kme, MASTER, "GET", f"/api/v1/keys/{SLAVE}/status")
    assert status == 200


def test_a_peer_kme_answer_dripped_by_a_man_in_the_middle_is_cut_at_the_deadline(
    tmp_path, monkeypatch
):
    """The master's KME tells the slave's (PeerKME.deliver); a man in the middle passes
    the answer on a byte every 0.3 s. On main only each wait had a bound (10 s), so the
    delivery, and with it the master SAE's enc_keys, lasted as long as he liked (here
    the whole answer, ~13 s). Now the delivery has a deadline (PeerKME.DEADLINE_S, 1 s
    here) and fails as the peer's silence does: PeerError, the enc_keys a 503."""
    from host.network.kms import PeerError, PeerKME

    monkeypatch.setattr(PeerKME, "DEADLINE_S", 1.0)
    pki = tmp_path / "pki"
    make_ca(pki)
    issue(pki, "localhost", server=True)
    issue(pki, "kme-a")
    issue(pki, "kme-b")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(str(pki / "localhost.pem"), str(pki / "localhost.key"))
    server = context.wrap_socket(socket.create_server(("localhost", 0)), server_side=True)

    def dripping_peer():
        conn, _ = server.accept()
        with conn:
            conn.settimeout(20)
            request = b""
            while b"\r\n\r\n" not in request:
                request += conn.recv(4096)
            answer = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}"
            try:
                for byte in answer:
                    conn.sendall(bytes([byte]))
                    time.sleep(0.3)
            except OSError:
                pass  # cut by the KME

    thread = threading.Thread(target=dripping_peer, daemon=True)
    thread.start()
    peer = PeerKME(f"https://localhost:{server.getsockname()[1]}", "kme-b", pki / "ca.pem",
                   pki / "kme-a.pem", pki / "kme-a.key", pki / "kme-b.pem",
                   pki / "localhost.pem")  # fmt: skip
    began = time.monotonic()
    with pytest.raises(PeerError, match="did not answer within 1 s"):
        peer.deliver(MASTER, SLAVE, [str(uuid.uuid4())], 0, 256)
    # the deadline, plus a loaded machine's stall: up to 7 s (x8 the deadline in all), far
    # under the ~18 s the whole answer takes dripped
    assert time.monotonic() - began < 8.0
    thread.join(20)
    server.close()


def test_a_delivery_goes_to_no_server_the_ca_signed_for_the_peers_host_but_its_own(
    tmp_path, capsys
):
    """A's deliveries (which key_IDs the pool's offsets became) went to any server whose
    certificate the CA signed for the peer's host: one issued by hand with the CA's key
    took them, answered 200, and the master SAE got keys its slave could never fetch.
    Now the peer's server certificate is pinned too, checked before a byte is sent."""
    from host.cli import main as qkdsat
    from host.errors import BadInput
    from host.network.kms import PeerError

    pki = _two_kme_pki(tmp_path / "pki")
    # the peer's host, another key pair, the same CA
    forged = _issued_by_the_same_ca(pki, tmp_path / "forged", "localhost", server=True)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(str(forged / "localhost.pem"), str(forged / "localhost.key"))
    server = context.wrap_socket(socket.create_server(("localhost", 0)), server_side=True)
    received = []

    def impostor():
        conn, _ = server.accept()  # the handshake completes: the CA signed its certificate
        with conn:
            conn.settimeout(10)
            try:
                while chunk := conn.recv(4096):
                    received.append(chunk)
            except OSError:
                pass
            answer = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}"
            try:
                conn.sendall(answer)
            except OSError:
                pass

    thread = threading.Thread(target=impostor, daemon=True)
    thread.start()
    peer = PeerKME(f"https://localhost:{server.getsockname()[1]}", "kme-b", pki / "ca.pem",
                   pki / "kme-a.pem", pki / "kme-a.key", pki / "kme-b.pem",
                   pki / "localhost.pem")  # fmt: skip
    impostor_sha256 = hashlib.sha256(
        ssl.PEM_cert_to_DER_cert((forged / "localhost.pem").read_text())
    ).hexdigest()
    # the message names the certificate presented: a stale pin is told from an impostor
    with pytest.raises(
        PeerError, match=f"SHA-256 {impostor_sha256[:16]}.*not kme-b's pinned one: nothing sent"
    ):
        peer.deliver(MASTER, SLAVE, [str(uuid.uuid4())], 0, 256)
    thread.join(20)
    server.close()
    assert not thread.is_alive() and received == []
    # the pin must be the peer host's server certificate from this CA, and kms serve
    # needs it: not a KME's, not a client certificate under the host's name, not one of
    # another CA
    client_named_as_host = _issued_by_the_same_ca(pki, tmp_path / "client", "localhost")
    rogue = tmp_path / "rogue"
    make_ca(rogue)
    issue(rogue, "localhost", server=True)
    for pin, refusal in (
        (pki / "kme-b.pem", r"names \['kme-b'\], not the peer KME's server localhost"),
        (client_named_as_host / "localhost.pem", "not a server certificate"),
        (rogue / "localhost.pem", "issued by .*ca.pem \\(its signature is not the CA's\\)"),
    ):
        with pytest.raises(BadInput, match=refusal):
            PeerKME("https://localhost:9", "kme-b", pki / "ca.pem", pki / "kme-a.pem",
                    pki / "kme-a.key", pki / "kme-b.pem", pin)  # fmt: skip
    serve = ["kms", "serve", "--pki", str(pki), "--sae", f"{MASTER},{SLAVE}", "--pool",
             str(tmp_path / "none.pool"), "--db", str(tmp_path / "k.db"), "--audit",
             str(tmp_path / "a"), "--listen", "127.0.0.1:0", "--kme-id", "kme-a",
             "--peer-url", "https://kme-b.example:8443", "--peer-kme-id", "kme-b"]  # fmt: skip
    capsys.readouterr()
    assert qkdsat(serve) == 2
    assert "kme-b.example.pem missing or not a file: the certificate the peer KME serves" in (
        capsys.readouterr().err
    )
    for url in ("kme-b.example:8443", "http://kme-b.example:8443", "https://kme-b.example"):
        serve[serve.index("--peer-url") + 1] = url
        assert qkdsat(serve) == 2
        assert f"--peer-url {url!r}: expected https://HOST:PORT" in capsys.readouterr().err


def test_connections_beyond_the_servers_cap_are_closed_at_once(tmp_path, monkeypatch):
    """Each connection is a thread, and the TLS handshake runs in it: on main a stranger
    (no certificate) could open connections by the thousand and hold a thread each. Now
    past _Server.max_connections (2 here) a new connection is closed at once; once the
    stranger's go, the KME serves its SAEs again."""
    from host.network.kms import _Server

    monkeypatch.setattr(_Server, "max_connections", 2)
    pki = tmp_path / "pki"
    make_ca(pki)
    issue(pki, "localhost", server=True)
    issue(pki, MASTER)
    distilled(tmp_path / "keys", 8 * POOL_BYTES, "pass-1")
    fill_pair(tmp_path / "net", "Jinan", tmp_path / "keys")
    manager = KeyManager(
        "kme-jinan", pool_path(tmp_path / "net", "Jinan", SATELLITE),
        open_store(str(tmp_path / "keys.sqlite")), [MASTER, SLAVE], tmp_path / "audit.jsonl",
    )  # fmt: skip
    context = tls_context(pki / "ca.pem", pki / "localhost.pem", pki / "localhost.key")
    server = make_server(manager, "localhost", 0, context)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    address = ("localhost", server.server_address[1])
    try:
        # both accepted, each holding its thread (its handshake unsent): the server accepts
        # in the listen queue's order, one at a time, so the third comes after them
        strangers = [socket.create_connection(address, timeout=30) for _ in range(2)]
        # closed at once, not held by a thread until request_deadline_s (30 s): a 10 s
        # timeout leaves a loaded machine's accept loop a wide margin
        with socket.create_connection(address, timeout=10) as third:
            assert third.recv(1) == b""
        for stranger in strangers:
            stranger.close()
        # their threads end (the handshake reads its end) and give back their slots: waited
        # for, not slept (a loaded machine may take a while to run them)
        deadline = time.monotonic() + 30.0
        while server._slots._value < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server._slots._value == 2
        kme = {"pki": pki, "port": address[1]}
        assert _call(kme, MASTER, "GET", f"/api/v1/keys/{SLAVE}/status")[0] == 200
    finally:
        server.shutdown()
        server.server_close()

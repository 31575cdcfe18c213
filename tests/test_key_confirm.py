"""Pending keys and `qkdsat keys confirm` (host/distil/keystore.py): split distillations
between real processes over TCP, through a relay in the test that plays the link (it can
lose it at a given message, or change a byte of one), then the confirmation between real
processes over the same authentication pools."""

from __future__ import annotations

import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from distil_passgen import make_pass

from host.distil import channel as ch
from host.distil.keystore import CHECK_BYTES

PY = sys.executable
ENV = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
_LEN = struct.Struct("<I")


def _kind(frame: bytes) -> str | None:
    try:
        return ch.decode(frame[: -ch.TAG_BYTES])[0]
    except Exception:  # the pool-start announcement is not a tagged message
        return None


def _read_frame(sock: socket.socket) -> bytes | None:
    def exact(count):
        data = b""
        while len(data) < count:
            chunk = sock.recv(count - len(data))
            if not chunk:
                return None
            data += chunk
        return data

    head = exact(4)
    if head is None:
        return None
    return exact(_LEN.unpack(head)[0])


class Link:
    """Bob connects here; the relay connects to Alice and forwards whole frames. lose_at:
    (direction "up" = Bob -> Alice, kind) whose frame is swallowed, then the link is gone
    for good (both connections closed). tamper_at: (direction, kind) whose last byte is
    flipped in transit."""

    def __init__(self, alice_port: int, lose_at=None, tamper_at=None):
        self.alice_port, self.lose_at, self.tamper_at = alice_port, lose_at, tamper_at
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.seen = []
        self.frames = []  # (direction, kind, frame) of every frame that crossed the link
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        bob, _ = self.server.accept()
        while True:
            try:
                alice = socket.create_connection(("127.0.0.1", self.alice_port))
                break
            except OSError:
                threading.Event().wait(0.05)
        done = threading.Event()

        def pump(src, dst, direction):
            try:
                while not done.is_set():
                    frame = _read_frame(src)
                    if frame is None:
                        break
                    kind = _kind(frame)
                    self.seen.append((direction, kind))
                    self.frames.append((direction, kind, frame))
                    if (direction, kind) == self.lose_at:
                        break  # swallowed: the link is lost with it in flight
                    if (direction, kind) == self.tamper_at:
                        frame = frame[:-1] + bytes([frame[-1] ^ 1])
                    dst.sendall(_LEN.pack(len(frame)) + frame)
            except OSError:
                pass
            done.set()
            for sock in (alice, bob):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

        pumps = [
            threading.Thread(target=pump, args=(bob, alice, "up"), daemon=True),
            threading.Thread(target=pump, args=(alice, bob, "down"), daemon=True),
        ]
        for thread in pumps:
            thread.start()
        for thread in pumps:
            thread.join()
        alice.close()
        bob.close()
        self.server.close()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _pair(alice_cmd, bob_cmd, **link_options):
    """Alice listens, Bob connects through the Link; returns (alice rc, bob rc, link)."""
    port = _free_port()
    alice = subprocess.Popen(
        alice_cmd + ["--listen", f"127.0.0.1:{port}"], env=ENV, stderr=subprocess.PIPE
    )
    link = Link(port, **link_options)
    bob = subprocess.run(
        bob_cmd + ["--connect", f"127.0.0.1:{link.port}"],
        env=ENV,
        stderr=subprocess.PIPE,
        timeout=300,
    )
    alice_rc = alice.wait(timeout=300)  # as long as Bob's: a loaded CI ran 2x slower
    link.thread.join(timeout=10)
    return (alice_rc, alice.stderr.read().decode()), (bob.returncode, bob.stderr.decode()), link


def _distil(root: Path, pass_dir: Path, outs=("a", "b"), stores=None, **link_options):
    # a copy per run: Alice claims a pass's raw data on her first run and refuses it after
    # (host/distil/raw_data_record.py)
    pass_dir = shutil.copytree(pass_dir, root / f"pass-{outs[0].replace('/', '-')}")
    common = [PY, "-m", "host.cli", "distil", str(pass_dir)]
    if not (root / "alice.pool.used").exists():
        common.append("--new-auth-pool")
    alice, bob = (
        ["--out", str(root / out)]
        + (["--key-store", str(root / stores[i])] if stores and stores[i] else [])
        for i, out in enumerate(outs)
    )
    return _pair(
        common + ["--role", "alice", "--auth-pool", str(root / "alice.pool"), *alice],
        common + ["--role", "bob", "--auth-pool", str(root / "bob.pool"), *bob],
        **link_options,
    )


def _confirm(root: Path, **link_options):
    common = [PY, "-m", "host.cli", "keys", "confirm", "--json"]
    alice, bob, link = _pair(
        common + ["--role", "alice", "--store", str(root / "a"), "--auth-pool",
                  str(root / "alice.pool")],
        common + ["--role", "bob", "--store", str(root / "b"), "--auth-pool",
                  str(root / "bob.pool")],
        **link_options,
    )  # fmt: skip
    return alice, bob, link


def _pools(root: Path) -> None:
    pool = np.random.default_rng(5).bytes(1 << 16)
    for name in ("alice.pool", "bob.pool"):
        (root / name).write_bytes(pool)
        (root / name).chmod(0o600)


def _fill(root: Path, network: Path):
    return subprocess.run(
        [PY, "-m", "host.cli", "pool", "fill", "--network", str(network), "--station",
         "Jinan", "--keys", str(root / "a"), "--bob-keys", str(root / "b")],
        env=ENV, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


@pytest.fixture(scope="module")
def pass_dir(tmp_path_factory):
    return make_pass(tmp_path_factory.mktemp("confirm") / "pass", duration_s=4.0, seed=2)


@pytest.fixture(scope="module")
def both_pending(pass_dir, tmp_path_factory):
    """A normal split run: both keys written, both pending."""
    root = tmp_path_factory.mktemp("normal")
    _pools(root)
    (alice_rc, alice_err), (bob_rc, bob_err), _ = _distil(root, pass_dir)
    assert alice_rc == 0 and bob_rc == 0, (alice_err, bob_err)
    return root


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)  # copy2: modes kept (keys and pools 0600)
    return dst


def _state(root: Path) -> dict:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.name.endswith(".pool.used")
    }


@pytest.mark.slow
def test_a_normal_run_leaves_both_keys_pending_until_confirmed_then_pool_fill_takes_them(
    both_pending, tmp_path
):
    root = _copy(both_pending, tmp_path / "run")
    alice_key, bob_key = root / "a" / "alice.key", root / "b" / "bob.key"
    assert alice_key.read_bytes() == bob_key.read_bytes()
    for key in (alice_key, bob_key):
        assert (Path(f"{key}.pending")).exists()
        assert (key.stat().st_mode & 0o777) == 0o600
    report = json.loads((root / "b" / "report.json").read_text())
    assert report["key_files"]["bob"]["pending"] is True

    # nothing uses a pending key: pool fill refuses it, exit 2, naming the file
    refused = _fill(root, tmp_path / "net")
    assert refused.returncode == 2
    assert "pending" in refused.stderr and "qkdsat keys confirm" in refused.stderr
    assert not (tmp_path / "net" / "satellite" / "Jinan.pool").exists()

    (alice_rc, alice_out), (bob_rc, bob_out), _ = _confirm(root)
    assert (alice_rc, bob_rc) == (0, 0), (alice_out, bob_out)
    for key in (alice_key, bob_key):
        assert not Path(f"{key}.pending").exists()
        # the check value disclosed at confirmation is burnt: the key's usage record
        assert json.loads(Path(f"{key}.used").read_text())["used_bytes"] == CHECK_BYTES

    filled = _fill(root, tmp_path / "net")
    assert filled.returncode == 0, filled.stderr
    bits = report["key_files"]["bob"]["bits"]
    pooled = (tmp_path / "net" / "satellite" / "Jinan.pool").read_bytes()
    assert pooled == alice_key.read_bytes()[CHECK_BYTES : bits // 8]  # never the burnt bytes
    assert (tmp_path / "net" / "Jinan" / "satellite.pool").read_bytes() == pooled

    # a second confirmation (the peer missed our list, say) changes nothing
    assert _confirm(root)[0][0] == 0
    assert json.loads(Path(f"{alice_key}.used").read_text())["pool_fill_into"]


@pytest.mark.slow
def test_link_lost_after_bobs_final_done_leaves_no_key_on_either_side_after_confirm(
    pass_dir, tmp_path
):
    root = tmp_path / "lost"
    root.mkdir()
    _pools(root)
    # Bob sends his final `done` and keeps his key; it never reaches Alice (two generals)
    (alice_rc, _), (bob_rc, bob_err), link = _distil(root, pass_dir, lose_at=("up", "done"))
    assert ("up", "done") in link.seen
    assert alice_rc == 3 and bob_rc == 0, bob_err
    alice_report = json.loads((root / "a" / "report.json").read_text())
    assert alice_report["aborted"] and "connection closed" in alice_report["abort_reason"]
    assert not list((root / "a").glob("*.key"))
    bob_key = root / "b" / "bob.key"
    assert bob_key.exists() and Path(f"{bob_key}.pending").exists()  # one-sided, but pending
    refused = _fill(root, tmp_path / "net")
    assert refused.returncode == 2

    (alice_rc, alice_out), (bob_rc, bob_out), _ = _confirm(root)
    assert (alice_rc, bob_rc) == (0, 0), (alice_out, bob_out)
    assert not list((root / "a").glob("*.key*")) and not list((root / "b").glob("*.key*"))
    bob_report = json.loads((root / "b" / "report.json").read_text())
    assert "bob" not in bob_report["key_files"]
    assert "holds no key" in bob_report["keys_destroyed"]["bob"]


@pytest.mark.slow
def test_a_tampered_confirmation_is_refused_and_changes_nothing(both_pending, tmp_path):
    root = _copy(both_pending, tmp_path / "run")
    before = _state(root)
    (alice_rc, _), (bob_rc, bob_err), link = _confirm(root, tamper_at=("down", "keys_held"))
    assert ("down", "keys_held") in link.seen
    assert bob_rc == 3 and "authentication failed" in bob_err
    assert alice_rc == 3
    after = _state(root)
    # Alice's check value went out: burnt before it was sent (its usage record), nothing else
    burnt = after.pop("a/alice.key.used")
    assert json.loads(burnt)["used_bytes"] == CHECK_BYTES
    assert after == before  # both keys still pending, nothing destroyed
    # an honest confirmation afterwards still works
    (alice_rc, _), (bob_rc, _), _ = _confirm(root)
    assert (alice_rc, bob_rc) == (0, 0)
    assert not list(root.rglob("*.pending"))


def _disclosed_checks(link) -> list[bytes]:
    """Every check value that crossed the link in clear (keys_held bodies are not sealed)."""
    checks = []
    for _, kind, frame in link.frames:
        if kind == "keys_held":
            body = ch.decode(frame[: -ch.TAG_BYTES])[1]["checks"]
            checks += [body[i : i + CHECK_BYTES] for i in range(0, len(body), CHECK_BYTES)]
    return checks


@pytest.mark.slow
def test_check_values_are_burnt_before_sent_and_a_lost_last_message_settles_next_contact(
    both_pending, tmp_path
):
    """The confirmation's own two generals: Bob's keys_held is lost with the link. Bob has
    confirmed his copy, Alice's stays pending (nothing one-sided is usable: pool fill needs
    both). Her check value is on the wire already: it must be burnt, durably, before it was
    sent (on main it was burnt only at confirmation, so a cut exchange left disclosed key
    bytes unburnt). The next contact confirms her copy; nothing is destroyed."""
    root = _copy(both_pending, tmp_path / "run")
    alice_key, bob_key = root / "a" / "alice.key", root / "b" / "bob.key"
    (alice_rc, _), (bob_rc, bob_err), link = _confirm(root, lose_at=("up", "keys_held"))
    assert ("down", "keys_held") in link.seen and ("up", "keys_held") in link.seen
    assert alice_rc == 3 and bob_rc == 0, bob_err
    # both lists were on the wire (Bob's swallowed after Eve saw it), one key's check each
    assert _disclosed_checks(link) == [alice_key.read_bytes()[:CHECK_BYTES]] * 2
    assert Path(f"{alice_key}.pending").exists() and not Path(f"{bob_key}.pending").exists()
    for key in (alice_key, bob_key):
        assert json.loads(Path(f"{key}.used").read_text())["used_bytes"] == CHECK_BYTES
    assert _fill(root, tmp_path / "net").returncode == 2  # Alice's copy still pending

    (alice_rc, alice_out), (bob_rc, bob_out), _ = _confirm(root)
    assert (alice_rc, bob_rc) == (0, 0), (alice_out, bob_out)
    assert not list(root.rglob("*.pending"))
    filled = _fill(root, tmp_path / "net")
    assert filled.returncode == 0, filled.stderr
    bits = json.loads((root / "b" / "report.json").read_text())["key_files"]["bob"]["bits"]
    pooled = (tmp_path / "net" / "satellite" / "Jinan.pool").read_bytes()
    assert pooled == alice_key.read_bytes()[CHECK_BYTES : bits // 8]


@pytest.mark.slow
def test_a_key_never_pending_in_the_store_is_not_listed_and_its_bytes_never_sent(
    both_pending, tmp_path_factory, tmp_path
):
    """Bob's store also holds a local-mode distillation (both keys in one process, never
    pending, usable from byte 0). On main it was listed: its first 16 bytes went out in
    clear and were not burnt ("kept"), and pool fill then put them into both pools."""
    root = _copy(both_pending, tmp_path / "run")
    other_pass = make_pass(tmp_path_factory.mktemp("other") / "pass", duration_s=4.0, seed=3)
    meta = json.loads((other_pass / "pass.json").read_text())  # another pass: a later start
    meta["utc_start"] = "2017-01-02T00:00:00Z"
    (other_pass / "pass.json").write_text(json.dumps(meta))
    local_dir = root / "b" / "local-run"
    made = subprocess.run(
        [PY, "-m", "host.cli", "distil", str(other_pass), "--out", str(local_dir)],
        env=ENV, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    local_key = (local_dir / "bob.key").read_bytes()
    assert not (local_dir / "bob.key.pending").exists()

    (alice_rc, alice_out), (bob_rc, bob_out), link = _confirm(root)
    assert (alice_rc, bob_rc) == (0, 0), (alice_out, bob_out)
    disclosed = _disclosed_checks(link)
    assert local_key[:CHECK_BYTES] not in disclosed
    network = tmp_path / "net"
    filled = subprocess.run(
        [PY, "-m", "host.cli", "pool", "fill", "--network", str(network), "--station",
         "Jinan", "--keys", str(local_dir)],
        env=ENV, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert filled.returncode == 0, filled.stderr
    for pool in (network / "satellite" / "Jinan.pool", network / "Jinan" / "satellite.pool"):
        pooled = pool.read_bytes()
        assert pooled[:CHECK_BYTES] == local_key[:CHECK_BYTES]  # used from byte 0
        assert not any(check in pooled for check in disclosed)  # nothing sent is in a pool


def _later_pass(tmp_path_factory) -> Path:
    """Another pass of the pair, a day later (another key identifier)."""
    later = make_pass(tmp_path_factory.mktemp("later") / "pass", duration_s=4.0, seed=3)
    meta = json.loads((later / "pass.json").read_text())
    meta["utc_start"] = "2017-01-02T00:00:00Z"
    (later / "pass.json").write_text(json.dumps(meta))
    return later


@pytest.mark.slow
def test_a_pending_key_of_the_last_contact_is_settled_at_the_start_of_the_next_distil(
    pass_dir, tmp_path_factory, tmp_path
):
    """Pass 1 loses Bob's final `done` with the link: Bob holds a pending key Alice does not.
    Pass 2's split distil settles it first, over its own authenticated channel, before
    it makes any key (on main nothing did: the one-sided key lingered until somebody ran
    `qkdsat keys confirm`): destroyed on Bob's side, as on Alice's; then pass 2 proceeds
    and both sides hold its key."""
    root = tmp_path / "stores"
    root.mkdir()
    _pools(root)
    (alice_rc, _), (bob_rc, bob_err), link = _distil(
        root, pass_dir, outs=("a/p1", "b/p1"), lose_at=("up", "done")
    )
    assert (alice_rc, bob_rc) == (3, 0), bob_err
    first_key = root / "b" / "p1" / "bob.key"
    assert Path(f"{first_key}.pending").exists() and not list((root / "a").rglob("*.key"))

    (alice_rc, alice_err), (bob_rc, bob_err), link = _distil(
        root, _later_pass(tmp_path_factory), outs=("a/p2", "b/p2"), stores=("a", "b")
    )
    assert (alice_rc, bob_rc) == (0, 0), (alice_err, bob_err)
    # the settling went first on the channel, before the protocol's hello
    kinds = [kind for _, kind in link.seen if kind is not None]
    assert kinds[:3] == ["keys_held", "keys_held", "hello"], kinds[:3]
    assert not first_key.exists() and not list((root / "b" / "p1").glob("bob.key*"))
    first_report = json.loads((root / "b" / "p1" / "report.json").read_text())
    assert "holds no key" in first_report["keys_destroyed"]["bob"]
    reports = {
        role: json.loads((root / side / "p2" / "report.json").read_text())
        for role, side in (("alice", "a"), ("bob", "b"))
    }
    first_id = "pass-sha256:" + first_report["inputs"]["pass_json_sha256"]
    assert [d["key_id"] for d in reports["bob"]["key_confirmation"]["destroyed"]] == [first_id]
    assert reports["alice"]["key_confirmation"]["peer_only"] == [first_id]
    alice_key, bob_key = root / "a" / "p2" / "alice.key", root / "b" / "p2" / "bob.key"
    assert alice_key.read_bytes() == bob_key.read_bytes()
    assert reports["bob"]["key_files"]["bob"]["pending"] is True


@pytest.mark.slow
def test_a_peer_that_names_no_key_store_makes_the_other_side_destroy_nothing(
    both_pending, tmp_path_factory, tmp_path
):
    """Both sides hold pass 1's key pending. At pass 2 Bob (a ground station) leaves out
    --key-store, so his list is of his fresh --out: empty. Before, Alice destroyed her
    pending key for it, and Bob's copy, never listed, stayed pending for good: the pass's
    key was lost at the next contact (adversarial review). Now Bob's list says he named no
    store: Alice keeps her key pending and says why; pass 2 proceeds; a later confirmation
    with both stores keeps the key on both sides."""
    root = _copy(both_pending, tmp_path / "run")
    first_alice, first_bob = root / "a" / "alice.key", root / "b" / "bob.key"
    assert Path(f"{first_alice}.pending").exists() and Path(f"{first_bob}.pending").exists()
    (alice_rc, alice_err), (bob_rc, bob_err), _ = _distil(
        root, _later_pass(tmp_path_factory), outs=("a/p2", "b/p2"), stores=("a", None)
    )
    assert (alice_rc, bob_rc) == (0, 0), (alice_err, bob_err)
    settled = json.loads((root / "a" / "p2" / "report.json").read_text())["key_confirmation"]
    assert settled["destroyed"] == [] and len(settled["kept"]) == 1, settled
    assert "named no key store" in settled["warnings"][0]
    assert first_alice.exists() and Path(f"{first_alice}.pending").exists()
    (alice_rc, alice_out), (bob_rc, _), _ = _confirm(root)
    assert (alice_rc, bob_rc) == (0, 0), alice_out
    assert not Path(f"{first_alice}.pending").exists() and first_alice.exists()
    assert not Path(f"{first_bob}.pending").exists() and first_bob.exists()
    assert first_alice.read_bytes() == first_bob.read_bytes()


@pytest.mark.slow
def test_a_stranger_at_keys_confirm_listen_burns_no_pool_and_the_peer_confirms_after(
    both_pending, tmp_path
):
    """`keys confirm --listen` (and every split listener): a stranger connects first and
    announces a pool position near the end under a guessed tag. On main an untagged
    position was taken on trust: the record jumped to the pool's end (burnt) and the
    listener aborted. Now the stranger is dropped with nothing committed, and the peer
    that connects next confirms as usual."""
    import os

    root = _copy(both_pending, tmp_path / "run")
    record_before = json.loads((root / "alice.pool.used").read_text())["used_bytes"]
    port = _free_port()
    alice = subprocess.Popen(
        [PY, "-m", "host.cli", "keys", "confirm", "--json", "--role", "alice", "--store",
         str(root / "a"), "--auth-pool", str(root / "alice.pool"), "--listen",
         f"127.0.0.1:{port}"],
        env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    # until Alice listens: a CLI process's start took 12 s of wall (0.8 s of CPU) on this
    # machine under load, so 30 s of tries (600 x 0.05 s) were too near; Bob's `_pair`
    # and its Link wait as long as it takes, and so does this, up to the 300 s they allow
    deadline = time.monotonic() + 300
    while True:
        try:
            stranger = socket.create_connection(("127.0.0.1", port))
            break
        except OSError:
            assert time.monotonic() < deadline and alice.poll() is None, "Alice never listened"
            time.sleep(0.05)
    with stranger:
        wire = ch.SocketTransport(stranger)
        wire.send_bytes(ch._START.pack(ch._START_HELLO, ch.CONNECTOR, os.urandom(16)))
        wire.recv_bytes()  # Alice's hello
        near_end = (1 << 16) - ch.MIN_POOL_LEFT_BYTES - ch.ANNOUNCE_BYTES
        wire.send_bytes(ch._ANNOUNCEMENT.pack(ch._ANNOUNCE, near_end, os.urandom(8)))
        with pytest.raises(ch.ChannelClosed):
            wire.recv_bytes()  # dropped
    assert json.loads((root / "alice.pool.used").read_text())["used_bytes"] == record_before
    bob = subprocess.run(
        [PY, "-m", "host.cli", "keys", "confirm", "--json", "--role", "bob", "--store",
         str(root / "b"), "--auth-pool", str(root / "bob.pool"), "--connect",
         f"127.0.0.1:{port}"],
        env=ENV, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    alice_out, alice_err = alice.communicate(timeout=120)
    assert (alice.returncode, bob.returncode) == (0, 0), (alice_err, bob.stderr)
    assert "dropped a peer before the session" in alice_err.decode()
    assert "failed authentication" in alice_err.decode()
    assert not list(root.rglob("*.pending"))  # both keys confirmed
    record_after = json.loads((root / "alice.pool.used").read_text())["used_bytes"]
    assert record_after < record_before + 4096  # one session's reserve, not the pool


@pytest.mark.slow
def test_a_split_run_refuses_an_out_holding_its_key_of_an_earlier_split_run(
    both_pending, tmp_path
):
    """Bob's --out holds his key of an earlier split run, which Alice holds too (confirmed
    at the settling, or earlier). A split run replaces --out's key at its end and removes
    it on an abort: Alice's copy would be left one-sided. Refused before any connection."""
    root = _copy(both_pending, tmp_path / "run")
    bob_key = (root / "b" / "bob.key").read_bytes()
    refused = subprocess.run(
        [PY, "-m", "host.cli", "distil", str(root / "pass-a"), "--role", "bob", "--connect",
         "127.0.0.1:9", "--auth-pool", str(root / "bob.pool"), "--out", str(root / "b")],
        env=ENV, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert refused.returncode == 2, refused.stderr
    assert "holds bob's key of an earlier split run" in refused.stderr
    assert "give each pass its own --out" in refused.stderr
    assert (root / "b" / "bob.key").read_bytes() == bob_key


def test_a_split_run_refuses_copies_of_pass_json_that_differ_in_bytes(pass_dir, tmp_path):
    """The keys' identifier is the SHA-256 of pass.json's bytes (pass-sha256:), the hello
    compared its content only: two copies of one pass in other bytes (re-serialised)
    distilled, and both keys were destroyed at their confirmation, the pass's raw data
    used (a cold review). The hello now refuses them, before Alice claims the raw data,
    and says what to do."""
    _pools(tmp_path)
    alice_dir = shutil.copytree(pass_dir, tmp_path / "alice-pass")
    bob_dir = shutil.copytree(pass_dir, tmp_path / "bob-pass")
    content = json.loads((bob_dir / "pass.json").read_text())
    (bob_dir / "pass.json").write_text(json.dumps(content, indent=1, sort_keys=True))
    assert (bob_dir / "pass.json").read_bytes() != (alice_dir / "pass.json").read_bytes()
    base = [PY, "-m", "host.cli", "distil"]
    (alice_rc, alice_err), (bob_rc, bob_err), _ = _pair(
        base + [str(alice_dir), "--new-auth-pool", "--role", "alice", "--auth-pool",
                str(tmp_path / "alice.pool"), "--out", str(tmp_path / "a")],
        base + [str(bob_dir), "--new-auth-pool", "--role", "bob", "--auth-pool",
                str(tmp_path / "bob.pool"), "--out", str(tmp_path / "b")],
    )  # fmt: skip
    assert bob_rc == 3 and "copy pass.json byte for byte" in bob_err, bob_err
    assert alice_rc == 3, alice_err
    assert not list(alice_dir.rglob("raw-data-used.json"))  # the raw data still unused
    for out in ("a", "b"):
        assert not list((tmp_path / out).glob("*.key")), out

"""Key pools of the network: filled from distilled keys in step on the satellite and at
the station, each byte served once, across restarts and a SIGKILL mid-take."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from network_keys import distilled

from host.cli import main as qkdsat
from host.errors import BadInput
from host.network.messaging import unpack_head
from host.network.pool import (
    SATELLITE,
    PoolShort,
    StationPool,
    fill_pair,
    pool_path,
    read_distilled_key,
)

ROOT = Path(__file__).resolve().parents[1]


def test_fill_puts_the_pass_at_the_same_offset_in_both_pools_once(tmp_path):
    net = tmp_path / "net"
    first = distilled(tmp_path / "k1", 8 * 1000 + 5, "pass-1")  # last 5 bits dropped
    second = distilled(tmp_path / "k2", 8 * 300, "pass-2")
    assert fill_pair(net, "Jinan", tmp_path / "k1")["offset"] == 0
    assert fill_pair(net, "Jinan", tmp_path / "k2")["offset"] == 1000
    for holder, peer in ((SATELLITE, "Jinan"), ("Jinan", SATELLITE)):
        path = pool_path(net, holder, peer)
        assert path.read_bytes() == first + second
        assert path.stat().st_mode & 0o777 == 0o600
    with pytest.raises(BadInput, match="already in both pools"):
        fill_pair(net, "Jinan", tmp_path / "k1")
    # The journal says where each pass went, and holds no key material.
    journal = pool_path(net, "Jinan", SATELLITE).with_suffix(".pool.journal").read_text()
    assert first.hex()[:16] not in journal and '"offset": 1000' in journal


def test_a_fill_cut_between_the_two_pools_is_completed_by_running_it_again(tmp_path):
    net = tmp_path / "net"
    key = distilled(tmp_path / "k", 4096, "pass-1")
    _, source = read_distilled_key(tmp_path / "k", "alice")
    with StationPool(pool_path(net, SATELLITE, "Hefei"), create=True) as pool:
        pool.fill(key, source)  # the station's pool was never reached
    assert not pool_path(net, "Hefei", SATELLITE).exists()
    assert fill_pair(net, "Hefei", tmp_path / "k")["offset"] == 0
    assert pool_path(net, "Hefei", SATELLITE).read_bytes() == key


def test_a_pass_filled_before_a_cut_fill_is_completed_is_refused_and_the_pair_stays_in_step(
    tmp_path,
):
    """A fill cut between the pools (the satellite's filled), then the next pass's fill:
    it must not enter either pool (it would sit at byte 512 on the satellite and 0 at the
    station, then pass-1 completed at 512 / 0 the other way round: two pools of equal
    length, different bytes at every offset, and keys served under one key ID that differ
    at the two ends). It is refused, naming the fill to complete; after that, both go in
    step."""
    net = tmp_path / "net"
    first = distilled(tmp_path / "k1", 4096, "pass-1")
    second = distilled(tmp_path / "k2", 8 * 300, "pass-2")
    _, source = read_distilled_key(tmp_path / "k1", "alice")
    with StationPool(pool_path(net, SATELLITE, "Hefei"), create=True) as pool:
        pool.fill(first, source)  # cut: the station's pool was never reached
    with pytest.raises(BadInput, match=f"out of step.*complete the fill of {source} first"):
        fill_pair(net, "Hefei", tmp_path / "k2")
    assert pool_path(net, SATELLITE, "Hefei").read_bytes() == first  # nothing added
    assert pool_path(net, "Hefei", SATELLITE).read_bytes() == b""
    assert fill_pair(net, "Hefei", tmp_path / "k1")["offset"] == 0
    assert fill_pair(net, "Hefei", tmp_path / "k2")["offset"] == 512
    for holder, peer in ((SATELLITE, "Hefei"), ("Hefei", SATELLITE)):
        assert pool_path(net, holder, peer).read_bytes() == first + second


def test_a_pair_already_out_of_step_takes_no_more_fills(tmp_path):
    """Pools left out of step before the check (two passes at swapped offsets: equal
    lengths, different bytes) are named and take no further pass."""
    net = tmp_path / "net"
    keys = [distilled(tmp_path / f"k{i}", 4096, f"pass-{i}") for i in (1, 2)]
    distilled(tmp_path / "k3", 4096, "pass-3")
    sources = [read_distilled_key(tmp_path / f"k{i}", "alice")[1] for i in (1, 2)]
    for holder, peer, order in ((SATELLITE, "Hefei", (0, 1)), ("Hefei", SATELLITE, (1, 0))):
        with StationPool(pool_path(net, holder, peer), create=True) as pool:
            for i in order:
                pool.fill(keys[i], sources[i])

    def contents():
        return [
            pool_path(net, *ends).read_bytes()
            for ends in ((SATELLITE, "Hefei"), ("Hefei", SATELLITE))
        ]

    before = contents()
    with pytest.raises(BadInput, match="sit at different offsets in the two pools"):
        fill_pair(net, "Hefei", tmp_path / "k3")
    assert contents() == before


def test_bytes_are_served_once_across_restarts_and_never_again(tmp_path):
    net = tmp_path / "net"
    key = distilled(tmp_path / "k", 8 * 2000, "pass-1")
    fill_pair(net, "Wuhan", tmp_path / "k")
    path = pool_path(net, SATELLITE, "Wuhan")  # the satellite's share: the first half
    with StationPool(path) as pool:
        assert pool.take(100, "test") == key[:100]
    with StationPool(path) as pool:  # a restart: the next take starts after the first
        assert pool.used_bytes == 100
        assert pool.take(50, "test") == key[100:150]
        with pytest.raises(BadInput, match="already used"):
            pool.take(10, "replay", offset=120)
        assert pool.take(10, "skip", offset=200) == key[200:210]  # 150..200 skipped, lost
        with pytest.raises(PoolShort, match="800 bytes wanted, 790 available"):
            pool.take(800, "too much")
        level = pool.level()
    assert (level.filled_bytes, level.used_bytes, level.available_bytes) == (2000, 210, 1790)
    assert level.lost_bytes == 0  # every used byte is journalled (taken or skipped)


def test_a_symlink_planted_at_the_usage_records_temporary_name_is_not_followed(tmp_path):
    """The usage record is written through a fresh temporary file (O_EXCL|O_NOFOLLOW): a
    symlink under its predictable name (the pid) neither has its target truncated nor
    replaces the record."""
    net = tmp_path / "net"
    key = distilled(tmp_path / "k", 8 * 200, "pass-1")
    fill_pair(net, "Wuhan", tmp_path / "k")
    path = pool_path(net, SATELLITE, "Wuhan")
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"not yours to truncate")
    planted = Path(f"{path}.used.{os.getpid()}.tmp")
    planted.symlink_to(victim)
    with StationPool(path) as pool:
        assert pool.take(20, "test") == key[:20]
    assert victim.read_bytes() == b"not yours to truncate"
    used = Path(f"{path}.used")
    assert not used.is_symlink() and json.loads(used.read_text())["used_bytes"] == 20
    assert used.stat().st_mode & 0o777 == 0o600 and not planted.exists()


def test_a_pool_killed_mid_take_never_serves_a_byte_twice(tmp_path):
    """A real process takes bytes in a loop and is SIGKILLed; every offset it reported
    served lies below the usage record the next opening finds."""
    net = tmp_path / "net"
    distilled(tmp_path / "k", 8 * 200_000, "pass-1")
    fill_pair(net, "Beijing", tmp_path / "k")
    path = pool_path(net, "Beijing", SATELLITE)
    child = subprocess.Popen(
        [sys.executable, "-c",
         "import sys\n"
         "from host.network.pool import StationPool\n"
         "while True:\n"
         f"    with StationPool({str(path)!r}) as pool:\n"
         "        offset = pool.used_bytes\n"
         "        pool.take(64, 'loop')\n"
         "    print(offset + 64, flush=True)\n"],
        stdout=subprocess.PIPE, text=True, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    served_end = 0
    deadline = time.monotonic() + 60
    while served_end < 64 * 20 and time.monotonic() < deadline:
        served_end = int(child.stdout.readline())
    child.send_signal(signal.SIGKILL)
    child.wait()
    served_end = max([served_end] + [int(line) for line in child.stdout.read().split()])
    assert served_end >= 64 * 20
    with StationPool(path) as pool:
        assert pool.used_bytes >= served_end
        next_offset = pool.used_bytes
        pool.take(64, "after the cut")
    assert next_offset >= served_end


def test_a_fill_cut_before_its_journal_line_is_cut_off_and_refilled(tmp_path):
    net = tmp_path / "net"
    key = distilled(tmp_path / "k", 8 * 100, "pass-1")
    fill_pair(net, "Shanghai", tmp_path / "k")
    path = pool_path(net, "Shanghai", SATELLITE)
    with open(path, "ab") as handle:  # bytes a power cut left without their journal line
        handle.write(b"\x55" * 37)
    with StationPool(path) as pool:
        assert pool.filled_bytes == 100 and pool.available_bytes == 100
    assert path.read_bytes() == key


@pytest.mark.parametrize(
    "change, message",
    [
        ({"aborted": True}, "aborted"),
        ({"deterministic_randomness": True}, "replayed randomness"),
        ({"key_files": {"alice": {"file": "alice.key", "bits": 999}}}, "the report says 999"),
    ],
)
def test_keys_the_report_does_not_vouch_for_are_refused(tmp_path, change, message):
    distilled(tmp_path / "k", 800, "pass-1")
    report_path = tmp_path / "k" / "report.json"
    report_path.write_text(json.dumps({**json.loads(report_path.read_text()), **change}))
    with pytest.raises(BadInput, match=message):
        fill_pair(tmp_path / "net", "Jinan", tmp_path / "k")


def test_unsafe_or_unrecorded_pools_are_refused(tmp_path, capsys):
    net = tmp_path / "net"
    distilled(tmp_path / "k", 800, "pass-1")
    fill_pair(net, "Jinan", tmp_path / "k")
    path = pool_path(net, "Jinan", SATELLITE)
    path.chmod(0o644)
    with pytest.raises(BadInput, match="chmod 600"):
        StationPool(path)
    path.chmod(0o600)
    Path(f"{path}.used").unlink()
    with pytest.raises(BadInput, match="usage record .* is missing"):
        StationPool(path)
    assert qkdsat(["pool", "status", "--network", str(net)]) == 2
    assert "is missing" in capsys.readouterr().err


def test_pool_command_fills_and_reports_levels(tmp_path, capsys):
    net = tmp_path / "net"
    distilled(tmp_path / "k", 8 * 512, "pass-1")
    assert qkdsat(["pool", "fill", "--network", str(net), "--station", "Nanshan",
                   "--keys", str(tmp_path / "k")]) == 0  # fmt: skip
    assert qkdsat(["pool", "status", "--network", str(net), "--json"]) == 0
    out = capsys.readouterr().out
    levels = json.loads(out[out.index("[") :])
    assert {(x["holder"], x["peer"], x["available_bytes"]) for x in levels} == {
        ("Nanshan", SATELLITE, 512),
        (SATELLITE, "Nanshan", 512),
    }
    assert all(x["available_bytes_by_initiator"] == {SATELLITE: 256, "Nanshan": 256}
               for x in levels)  # fmt: skip
    assert qkdsat(["pool", "status", "--network", str(net)]) == 0
    table = capsys.readouterr().out.splitlines()
    row = ["Nanshan", SATELLITE, "4096", "2048", "2048"]  # available, for holder, for peer
    assert "for holder" in table[0] and table[1].split()[:5] == row
    assert qkdsat(["pool", "fill", "--network", str(net), "--station", "Nanshan",
                   "--keys", str(tmp_path / "k")]) == 2  # fmt: skip


def test_a_key_replaced_while_it_is_filled_puts_no_time_transfer_byte_in_the_pools(
    tmp_path, monkeypatch
):
    """The fill read the keys, then locked the files and read their usage records: a
    distillation finishing into the directory in between (new keys, records removed) made
    it fill the OLD keys from byte 0, the 1,000 bytes a time transfer had sealed with
    included. Now the keys are read again once their records are read under the lock,
    and a key replaced meanwhile is refused."""
    import host.network.pool as network_pool
    from host.distil.channel import write_usage_record

    keys, net = tmp_path / "k", tmp_path / "net"
    old = distilled(keys, 8 * 4096, "pass-1")
    for role in ("alice", "bob"):  # a time transfer sealed with the first 1,000 bytes
        write_usage_record(str(keys / f"{role}.key"), 1000)
    real = network_pool.read_distilled_key
    landed = []

    def distillation_lands_meanwhile(keys_dir, role):
        data = real(keys_dir, role)
        if role == "bob" and not landed:
            landed.append(distilled(keys, 8 * 4096, "pass-2"))
        return data

    monkeypatch.setattr(network_pool, "read_distilled_key", distillation_lands_meanwhile)
    try:
        fill_pair(net, "Jinan", keys)
    except BadInput as error:
        assert "replaced" in str(error)
        return
    filled = pool_path(net, SATELLITE, "Jinan").read_bytes()
    fresh = filled in (old[1000:], landed[0])  # (not compared in the output: key bytes)
    assert fresh, "bytes a time transfer used are in the pool"


def test_a_key_filled_once_never_enters_another_network_or_station(tmp_path):
    """The pools' source check is per pool: the same distilled key filled into a second
    network directory, or for a second station, would be served once from each. The key's
    own record says where its fill went; only that fill can be completed."""
    key = distilled(tmp_path / "k", 8 * 1000, "pass-1")
    fill_pair(tmp_path / "net", "Jinan", tmp_path / "k")
    with pytest.raises(BadInput, match="already filled into"):
        fill_pair(tmp_path / "net2", "Jinan", tmp_path / "k")
    with pytest.raises(BadInput, match="already filled into"):
        fill_pair(tmp_path / "net", "Hefei", tmp_path / "k")
    assert not (tmp_path / "net2").exists()
    assert not pool_path(tmp_path / "net", SATELLITE, "Hefei").exists()
    assert pool_path(tmp_path / "net", SATELLITE, "Jinan").read_bytes() == key


def test_each_end_takes_only_its_half_of_every_fill_across_fills(tmp_path):
    """Every fill is cut in two at both ends alike: the satellite's takes use the first
    half of each fill, the station's the second, and a take longer than what is left of
    one fill's half continues in the next fill's half. No byte is in both shares."""
    net = tmp_path / "net"
    first = distilled(tmp_path / "k1", 8 * 101, "pass-1")  # 50 + 51
    second = distilled(tmp_path / "k2", 8 * 40, "pass-2")  # 20 + 20
    fill_pair(net, "Jinan", tmp_path / "k1")
    fill_pair(net, "Jinan", tmp_path / "k2")
    ends = {holder: pool_path(net, *pair) for holder, pair in
            ((SATELLITE, (SATELLITE, "Jinan")), ("Jinan", ("Jinan", SATELLITE)))}  # fmt: skip
    with StationPool(ends[SATELLITE]) as pool:
        assert pool.available_for(SATELLITE) == 70 and pool.available_for("Jinan") == 71
        assert pool.take(60, "satellite's") == first[:50] + second[:10]
    with StationPool(ends["Jinan"]) as pool:
        assert pool.take(60, "Jinan's") == first[50:101] + second[20:29]
        # the satellite's take, received at the station: same bytes, same positions
        assert pool.take(60, "from the satellite", 0, SATELLITE) == first[:50] + second[:10]
        with pytest.raises(PoolShort, match="11 bytes wanted, 10 available for satellite"):
            pool.take(11, "too much", initiator=SATELLITE)
        with pytest.raises(BadInput, match="neither end"):
            pool.take(1, "stranger", initiator="Hefei")
        level = pool.level()
    assert (level.used_bytes, level.available_bytes, level.lost_bytes) == (120, 21, 0)
    journal = Path(f"{ends['Jinan']}.journal").read_text()
    assert '"ranges": [[50, 101], [121, 130]]' in journal  # the pool bytes Jinan's take used


def test_a_pool_used_as_a_distillation_auth_pool_never_serves_those_bytes_again(tmp_path):
    """`qkdsat distil --auth-pool` reads the usage record's used_bytes only (past every
    byte either share used), takes from there and writes used_bytes alone: the pool then
    treats everything below it as gone, in both shares (the satellite's unused half of
    this fill included: the price of sharing a pool with a reader that knows no shares)."""
    from host.distil.channel import KeyPool

    net = tmp_path / "net"
    key = distilled(tmp_path / "k", 8 * 20_000, "pass-1")
    fill_pair(net, "Hefei", tmp_path / "k")
    path = pool_path(net, SATELLITE, "Hefei")
    with StationPool(path) as pool:
        assert pool.take(100, "relay") == key[:100]
        assert pool.take(50, "from Hefei", initiator="Hefei") == key[10_000:10_050]
    auth = KeyPool.from_file(str(path))
    assert auth.take(0, 16) == key[10_050:10_066]  # begins past both shares' takes
    auth.commit()
    floor = json.loads(Path(f"{path}.used").read_text())["used_bytes"]
    assert floor >= 10_066
    with StationPool(path) as pool:
        assert pool.available_for(SATELLITE) == 0  # its half lies below the floor
        assert pool.available_for("Hefei") == 20_000 - floor
        assert pool.take(10, "from Hefei", initiator="Hefei") == key[floor : floor + 10]
        with pytest.raises(BadInput, match="already used"):
            pool.take(10, "an auth pad", offset=10_050 - 10_000, initiator="Hefei")


def _as_before_the_split(path: Path, used_bytes: int) -> None:
    """Rewrite a pool's journal and record as written before pools were split."""
    journal = Path(f"{path}.journal")
    lines = [json.loads(line) for line in journal.read_text().splitlines()]
    for line in lines:
        line.pop("split", None)
    journal.write_text("".join(json.dumps(line) + "\n" for line in lines))
    Path(f"{path}.used").write_text(json.dumps({"used_bytes": used_bytes}))


def test_a_pool_from_before_the_direction_split_serves_none_of_its_old_fills(tmp_path):
    """Before the split both ends took from one sequence, each at its own record: the
    satellite had sent through byte 700 (its record 700) while the station, not having
    received it, still read 0. Each end's record read as a floor let the station begin
    its own sends at byte 500 (its half of the old fill), inside the satellite's pad still
    in flight: one pad, two files. Neither end can know how far the other went, so the
    fills journalled before the split are gone at both ends; new fills serve as usual."""
    net = tmp_path / "net"
    distilled(tmp_path / "k", 8 * 1000, "pass-1")
    fill_pair(net, "Wuhan", tmp_path / "k")
    _as_before_the_split(pool_path(net, SATELLITE, "Wuhan"), 700)  # sent through 700
    _as_before_the_split(pool_path(net, "Wuhan", SATELLITE), 0)  # received nothing yet
    plain, message = tmp_path / "reply.bin", tmp_path / "reply.msg"
    plain.write_bytes(os.urandom(100))
    send = ["send", "--network", str(net), "--from", "Wuhan", "--to", SATELLITE, str(plain),
            "--out", str(message)]  # fmt: skip
    assert qkdsat(send) == 2  # nothing of the old fill for Wuhan's own sends
    for end in ((SATELLITE, "Wuhan"), ("Wuhan", SATELLITE)):
        with StationPool(pool_path(net, *end)) as pool:
            assert pool.available_bytes == 0 and pool.used_bytes == 1000
            with pytest.raises(BadInput, match="already used"):
                pool.take(10, "old offset", offset=100, initiator="Wuhan")
    new_key = distilled(tmp_path / "k2", 8 * 400, "pass-2")
    fill_pair(net, "Wuhan", tmp_path / "k2")
    assert qkdsat(send) == 0
    data = message.read_bytes()
    _, head_bytes = unpack_head(data)
    ciphertext = data[head_bytes : head_bytes + 100]
    pad = bytes(c ^ p for c, p in zip(ciphertext, plain.read_bytes(), strict=True))
    assert pad == new_key[200:300]  # Wuhan's half of the new fill


def test_a_journal_line_torn_by_a_power_cut_leaves_the_pool_usable_and_whole(tmp_path):
    """A power cut can leave the journal's last line half-written (no newline). The next
    line must not be glued onto it: glued, a re-run fill's line became unreadable, its
    bytes were cut off at the next opening (the satellite's pool still held them), and
    once anything followed the garbled line the pool refused to open at all."""
    net = tmp_path / "net"
    first = distilled(tmp_path / "k1", 8 * 1000, "pass-1")
    second = distilled(tmp_path / "k2", 8 * 600, "pass-2")
    fill_pair(net, "Wuhan", tmp_path / "k1")
    fill_pair(net, "Wuhan", tmp_path / "k2")
    path = pool_path(net, "Wuhan", SATELLITE)
    journal = Path(f"{path}.journal")
    whole = journal.read_bytes()
    journal.write_bytes(whole[: len(whole) - 30])  # pass-2's fill line cut mid-write
    with StationPool(path) as pool:  # its bytes were never served: cut off
        assert pool.filled_bytes == 1000
    fill_pair(net, "Wuhan", tmp_path / "k2")  # completes the pair, as after any cut fill
    with StationPool(path) as pool:
        assert pool.filled_bytes == 1600
        assert pool.take(10, "from the satellite", 0, SATELLITE) == first[:10]
    # a take's line torn too, then more operations: the pool keeps opening
    whole = journal.read_bytes()
    journal.write_bytes(whole[: len(whole) - 1])  # only the newline lost
    for round_number in range(3):
        with StationPool(path) as pool:
            assert pool.take(5, f"round {round_number}") == first[500 + 5 * round_number :][:5]
    with StationPool(path) as pool:
        level = pool.level()
        assert (level.filled_bytes, level.used_bytes, level.lost_bytes) == (1600, 25, 0)
    assert path.read_bytes() == first + second


def _flock_waiters(pids) -> int:
    """How many of these processes wait for a flock (/proc/locks: '->' lines)."""
    lines = Path("/proc/locks").read_text().splitlines()
    return sum(1 for line in lines if "->" in line and int(line.split()[5]) in pids)


def test_two_fills_for_one_station_at_once_leave_its_pools_in_step(tmp_path):
    """Two `qkdsat pool fill` of different passes for one station at once, the worst
    interleaving forced: the station's pool held locked until both fills wait, the
    first to fill the satellite's pool stopped, the other let through. Both pools must
    hold the same keys in the same order. Before, the second pass went first into the
    station's pool: opposite orders (every byte differs), both fills then 'out of step'
    with their bytes in, and later fills, at equal offsets again, no longer saw it."""
    net = tmp_path / "net"
    for number in range(3):
        distilled(tmp_path / f"k{number}", 8 * 4000, f"pass-{number}")
    fill_pair(net, "Hefei", tmp_path / "k0")
    station = pool_path(net, "Hefei", SATELLITE)
    fills = []
    with StationPool(station):  # the station's pool busy (a KME's take, say)
        for number in (1, 2):
            fills.append(subprocess.Popen(
                [sys.executable, "-m", "host.cli", "pool", "fill", "--network", str(net),
                 "--station", "Hefei", "--keys", str(tmp_path / f"k{number}")],
                cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            ))  # fmt: skip
            deadline = time.monotonic() + 60
            while _flock_waiters({f.pid for f in fills}) < number:
                assert time.monotonic() < deadline, "the fill never waited for a lock"
                time.sleep(0.01)
        fills[0].send_signal(signal.SIGSTOP)
        stat = Path(f"/proc/{fills[0].pid}/stat")
        while stat.read_text().rsplit(")", 1)[1].split()[0] != "T":
            time.sleep(0.001)  # stopped before the lock is let go, or it may take it
    try:
        # the second fill goes through now, unless it waits for the first: wait for either
        # event, not for a fixed time (a 1.5 s wait let a loaded machine's fill that had
        # not yet run past the pools pass as one waiting, and cost 1.5 s when it waited).
        # The release above unlinks the waiters on the station's lock at once, so a fill
        # listed as a waiter now waits for a lock the stopped first fill holds.
        deadline = time.monotonic() + 120
        while fills[1].poll() is None and not _flock_waiters({fills[1].pid}):
            assert time.monotonic() < deadline, "the second fill neither ended nor waited"
            time.sleep(0.01)
    finally:
        fills[0].send_signal(signal.SIGCONT)
    for process in fills:
        assert process.wait(timeout=120) == 0, process.stderr.read()
    satellite = pool_path(net, SATELLITE, "Hefei").read_bytes()
    assert len(satellite) == 3 * 4000 and satellite == station.read_bytes()


def test_a_pool_shared_with_its_own_holder_is_refused(tmp_path, capsys):
    """`pool fill --station satellite` made NET/satellite/satellite.pool: both ends one
    file, Bob's key silently dropped (the same source), and both halves of every fill
    counted as each end's (pool status showed the same bits for holder and for peer)."""
    net = tmp_path / "net"
    distilled(tmp_path / "k", 8 * 100, "pass-1")
    assert qkdsat(["pool", "fill", "--network", str(net), "--station", SATELLITE,
                   "--keys", str(tmp_path / "k")]) == 2  # fmt: skip
    assert "a pool is shared between two different ends" in capsys.readouterr().err
    assert not list(net.rglob("*.pool"))
    with pytest.raises(BadInput, match="two different ends"):
        StationPool(pool_path(net, "Jinan", "Jinan"), create=True)


def test_a_pool_moved_out_of_its_holders_directory_is_refused(tmp_path):
    """The pair's names come from the pool's path (NET/HOLDER/PEER.pool). A relayed pool
    served by a KME from another directory (`--pool /srv/pools/Stellenbosch.pool`) was
    read as held by 'pools': no share of its own (every enc_keys 503), and for fills
    journalled before pools were split, a split computed with the wrong name: both
    stations' KMEs took the same half and handed out the same keys."""
    import shutil

    net = tmp_path / "net"
    distilled(tmp_path / "a", 8 * 600, "pass-a")
    distilled(tmp_path / "b", 8 * 600, "pass-b")
    fill_pair(net, "Beijing", tmp_path / "a")
    fill_pair(net, "Stellenbosch", tmp_path / "b")
    qkdsat(["relay", "--network", str(net), "--from", "Beijing", "--to", "Stellenbosch",
            "--bits", str(8 * 100)])  # fmt: skip
    moved = tmp_path / "srv" / "pools"
    moved.mkdir(parents=True)
    for suffix in ("", ".used", ".journal"):
        source = Path(f"{pool_path(net, 'Beijing', 'Stellenbosch')}{suffix}")
        shutil.copy2(source, moved / f"Stellenbosch.pool{suffix}")
    with pytest.raises(BadInput, match="NET/HOLDER/PEER.pool"):
        StationPool(moved / "Stellenbosch.pool")

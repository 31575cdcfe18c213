"""Trusted relay through the satellite: A and B end with the same key, every pool
consumes exactly the bits used, a short pool refuses with what is missing, a forged
announcement is rejected."""

from __future__ import annotations

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
from host.network.pool import SATELLITE, StationPool, fill_pair, pool_path
from host.network.relay import (
    AUTH_BYTES,
    RelayAuthenticationFailed,
    _announcement,
    _station_receives,
    relay,
    wegman_carter_tag,
)

sys.path.insert(0, str(Path(__file__).parent))
ROOT = Path(__file__).resolve().parents[1]


def _used(net, holder, peer) -> int:
    with StationPool(pool_path(net, holder, peer)) as pool:
        return pool.used_bytes


def _available(net, holder, peer) -> int:
    with StationPool(pool_path(net, holder, peer)) as pool:
        return pool.available_for(SATELLITE)  # relays take the satellite's share


FOUR = ((SATELLITE, "Beijing"), (SATELLITE, "Stellenbosch"), ("Beijing", SATELLITE),
        ("Stellenbosch", SATELLITE))  # fmt: skip


def _check_relay(net, bits: int, capsys) -> None:
    before = {pair: _used(net, *pair) for pair in FOUR}
    code = qkdsat(["relay", "--network", str(net), "--from", "Beijing", "--to", "Stellenbosch",
                   "--bits", str(bits)])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    relayed_a = pool_path(net, "Beijing", "Stellenbosch").read_bytes()
    relayed_b = pool_path(net, "Stellenbosch", "Beijing").read_bytes()
    assert relayed_a == relayed_b and len(relayed_a) == bits // 8
    for pair in FOUR:  # exact consumption: the key plus one Wegman-Carter tag's key
        assert _used(net, *pair) - before[pair] == bits // 8 + AUTH_BYTES, pair
    # Station A's relayed key is the satellite's K_A: the bytes A used from its own pool.
    assert (
        relayed_a
        == pool_path(net, "Beijing", SATELLITE).read_bytes()[
            before[("Beijing", SATELLITE)] : before[("Beijing", SATELLITE)] + bits // 8
        ]
    )
    # More than the pools hold: refused, saying how much is missing, nothing consumed.
    available = min(_available(net, *pair) for pair in FOUR)
    too_many = 8 * (available - AUTH_BYTES + 1)
    after = {pair: _used(net, *pair) for pair in FOUR}
    code = qkdsat(["relay", "--network", str(net), "--from", "Beijing", "--to", "Stellenbosch",
                   "--bits", str(too_many)])  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err
    assert "refused" in err and "8 missing" in err
    assert {pair: _used(net, *pair) for pair in FOUR} == after


def test_relay_of_random_pool_keys_is_exact_and_refuses_more(tmp_path, capsys):
    net = tmp_path / "net"
    distilled(tmp_path / "a", 8 * 6000, "pass-a")  # relays take the satellite's half
    distilled(tmp_path / "b", 8 * 4000, "pass-b")
    fill_pair(net, "Beijing", tmp_path / "a")
    fill_pair(net, "Stellenbosch", tmp_path / "b")
    _check_relay(net, 8 * 1000, capsys)


def test_forged_announcement_is_rejected_taking_nothing_and_a_replay_is_refused(tmp_path):
    """A forged announcement, even one naming an offset far ahead, moves nothing: the
    tag is checked before the station's pool moves (it burned the bytes up to its offset
    before). The genuine announcement then goes through, and again is a replay."""
    net = tmp_path / "net"
    distilled(tmp_path / "b", 8 * 1000, "pass-b")
    fill_pair(net, "Stellenbosch", tmp_path / "b")
    with StationPool(pool_path(net, SATELLITE, "Stellenbosch")) as pool:
        taken = pool.take(32 + AUTH_BYTES, "test relay")
    message = _announcement({"relay_id": "r", "offset": 0, "bytes": 32}, bytes(32))
    message += wegman_carter_tag(message, taken[32:])
    forged = bytearray(message)
    forged[-TAG_OFFSET] ^= 1
    with pytest.raises(RelayAuthenticationFailed):
        _station_receives(net, "Stellenbosch", bytes(forged), expect_payload=True)
    far = _announcement({"relay_id": "f", "offset": 400, "bytes": 32}, bytes(32)) + bytes(8)
    with pytest.raises(RelayAuthenticationFailed):
        _station_receives(net, "Stellenbosch", far, expect_payload=True)
    assert _used(net, "Stellenbosch", SATELLITE) == 0  # nothing taken, nothing skipped
    share = _station_receives(net, "Stellenbosch", message, expect_payload=True)
    assert share == taken[:32]  # payload zero: the station's own bytes, K_B
    assert _used(net, "Stellenbosch", SATELLITE) == 32 + AUTH_BYTES
    with pytest.raises(Exception, match="already used"):  # the genuine one, now a replay
        _station_receives(net, "Stellenbosch", message, expect_payload=True)


TAG_OFFSET = 12  # a byte inside the payload (the tag is the last 8)


def test_unknown_or_empty_station_is_refused_with_what_is_missing(tmp_path, capsys):
    net = tmp_path / "net"
    distilled(tmp_path / "a", 8 * 200, "pass-a")  # the satellite's half: 800 bits
    fill_pair(net, "Beijing", tmp_path / "a")
    code = qkdsat(["relay", "--network", str(net), "--from", "Beijing", "--to", "Wuhan",
                   "--bits", "512"])  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err
    assert "the satellite's pool for Wuhan holds 0 bits for relays, 640 missing" in err
    assert "Wuhan's pool for satellite holds 0 bits for relays, 640 missing" in err
    assert "Beijing" not in err.split("refused")[1].replace("Beijing -> ", "")
    assert _used(net, SATELLITE, "Beijing") == 0
    assert qkdsat(["relay", "--network", str(net), "--from", "Beijing", "--to", "Beijing",
                   "--bits", "8"]) == 2  # fmt: skip
    assert qkdsat(["relay", "--network", str(net), "--from", "Beijing", "--to", "Wuhan",
                   "--bits", "12"]) == 2  # fmt: skip
    assert "multiple of 8" in capsys.readouterr().err
    with pytest.raises(Exception, match="station name"):
        relay(net, "../etc", "Beijing", 8)


@pytest.mark.slow
def test_relay_between_two_distilled_passes(tmp_path, capsys):
    """Must-show: keys distilled from two simulated passes (A: Beijing, B: Stellenbosch) by
    `qkdsat distil`, filled into the pools, then relayed."""
    from distil_passgen import make_pass

    net = tmp_path / "net"
    for station, seed in (("Beijing", 2), ("Stellenbosch", 3)):
        pass_dir = make_pass(tmp_path / f"pass-{station}", duration_s=4.0, seed=seed)
        assert qkdsat(["distil", str(pass_dir), "--out", str(tmp_path / station), "--quiet"]) == 0
        assert qkdsat(["pool", "fill", "--network", str(net), "--station", station,
                       "--keys", str(tmp_path / station)]) == 0  # fmt: skip
    capsys.readouterr()
    # 4 s passes give ~14-16 kbit each; a relay takes the satellite's half of them
    _check_relay(net, 8 * 512, capsys)


def test_a_relay_into_a_pair_of_pools_out_of_step_is_refused_before_anything_is_taken(
    tmp_path,
):
    """A relay cut between filling A/B.pool and B/A.pool leaves the pair out of step (the
    same offset holds different keys). The next relay must not deepen that, nor spend
    the satellite's key on it: refused before any pool is touched."""
    net = tmp_path / "net"
    distilled(tmp_path / "a", 8 * 600, "pass-a")
    distilled(tmp_path / "b", 8 * 600, "pass-b")
    fill_pair(net, "Beijing", tmp_path / "a")
    fill_pair(net, "Stellenbosch", tmp_path / "b")
    with StationPool(pool_path(net, "Beijing", "Stellenbosch"), create=True) as pool:
        pool.fill(b"\x5a" * 40, "relay:cut-before-the-second-pool")
    before = {pair: _used(net, *pair) for pair in FOUR}
    with pytest.raises(BadInput, match="out of step"):
        relay(net, "Beijing", "Stellenbosch", 8 * 100)
    assert {pair: _used(net, *pair) for pair in FOUR} == before
    assert not pool_path(net, "Stellenbosch", "Beijing").exists()
    assert pool_path(net, "Beijing", "Stellenbosch").stat().st_size == 40


def _journal_size(net, holder, peer) -> int:
    journal = Path(f"{pool_path(net, holder, peer)}.journal")
    return journal.stat().st_size if journal.exists() else 0


def _record_inode(net, holder, peer) -> int:
    return Path(f"{pool_path(net, holder, peer)}.used").stat().st_ino


# Where a relay is SIGKILLed: the first change of each of these, in the order the relay
# makes them (the satellite's takes, the stations' takes, the kept keys, the two fills).
KILL_POINTS = {
    "satellite took K_A": lambda net: _record_inode(net, SATELLITE, "Beijing"),
    "satellite took K_B": lambda net: _record_inode(net, SATELLITE, "Stellenbosch"),
    "A took its bytes": lambda net: _record_inode(net, "Beijing", SATELLITE),
    "B took its bytes": lambda net: _record_inode(net, "Stellenbosch", SATELLITE),
    "A kept its key": lambda net: len(list((net / "Beijing").glob(".*.relay-*.key"))),
    "A/B filled": lambda net: _journal_size(net, "Beijing", "Stellenbosch"),
    "B/A filled": lambda net: _journal_size(net, "Stellenbosch", "Beijing"),
}


@pytest.mark.slow  # ~15 s: seven qkdsat relay processes
def test_a_relay_killed_at_any_step_leaves_the_pair_in_step_and_reuses_nothing(tmp_path):
    """SIGKILL `qkdsat relay` at each of its steps in turn; after each, the next relay
    (which completes a relay cut between its two fills: each station kept its relayed
    key, 0600, until both relayed pools held it) succeeds and the pair holds the same
    bytes at the same offsets; at the end messages both ways arrive. Before, a kill
    between the two fills left the pair out of step for good: every later relay was
    refused, and A's sends over the cut relay's bytes could never be received."""
    net = tmp_path / "net"
    distilled(tmp_path / "a", 8 * 12_000, "pass-a")
    distilled(tmp_path / "b", 8 * 12_000, "pass-b")
    fill_pair(net, "Beijing", tmp_path / "a")
    fill_pair(net, "Stellenbosch", tmp_path / "b")
    relay(net, "Beijing", "Stellenbosch", 8 * 100)
    a_b, b_a = (pool_path(net, *pair) for pair in (("Beijing", "Stellenbosch"),
                                                  ("Stellenbosch", "Beijing")))  # fmt: skip
    for point, watched in KILL_POINTS.items():
        before = watched(net)
        killed = subprocess.Popen(
            [sys.executable, "-m", "host.cli", "relay", "--network", str(net), "--from",
             "Beijing", "--to", "Stellenbosch", "--bits", str(8 * 500)],
            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
        )  # fmt: skip
        deadline = time.monotonic() + 60
        while watched(net) == before and killed.poll() is None and time.monotonic() < deadline:
            time.sleep(0.0002)
        killed.send_signal(signal.SIGKILL)
        killed.wait()
        assert watched(net) != before, f"the relay never reached: {point}"
        assert qkdsat(["relay", "--network", str(net), "--from", "Beijing", "--to",
                       "Stellenbosch", "--bits", str(8 * 50)]) == 0, point  # fmt: skip
        assert a_b.read_bytes() == b_a.read_bytes(), point
        assert not list(net.rglob("*relay-*.key*")), point  # kept keys gone once filled
    for sender, receiver in (("Beijing", "Stellenbosch"), ("Stellenbosch", "Beijing")):
        plain, message, out = (tmp_path / f"{sender}.{kind}" for kind in ("in", "msg", "out"))
        plain.write_bytes(os.urandom(400))  # past the first relay: a completed one
        assert qkdsat(["send", "--network", str(net), "--from", sender, "--to", receiver,
                       str(plain), "--out", str(message)]) == 0  # fmt: skip
        assert qkdsat(["receive", "--network", str(net), "--at", receiver, str(message),
                       "--out", str(out)]) == 0  # fmt: skip
        assert out.read_bytes() == plain.read_bytes()


@pytest.mark.slow  # ~8 s: four qkdsat relay processes
def test_relays_run_at_once_into_one_pair_leave_it_in_step(tmp_path):
    """Two `qkdsat relay` for the same pair at once, two rounds: each relayed pool must
    hold the same keys in the same order at both stations. Interleaved fills (relay 1
    into A/B, relay 2 into A/B and B/A, relay 1 into B/A) put two keys in opposite orders:
    the same length (so no later check saw it) and different bytes at every offset."""
    net = tmp_path / "net"
    distilled(tmp_path / "a", 8 * 30_000, "pass-a")
    distilled(tmp_path / "b", 8 * 30_000, "pass-b")
    fill_pair(net, "Beijing", tmp_path / "a")
    fill_pair(net, "Stellenbosch", tmp_path / "b")
    for _ in range(2):
        running = [
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "host.cli",
                    "relay",
                    "--network",
                    str(net),
                    "--from",
                    source,
                    "--to",
                    target,
                    "--bits",
                    str(8 * 2000),
                ],
                cwd=ROOT,
                env={**os.environ, "PYTHONPATH": str(ROOT)},
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )  # fmt: skip
            for source, target in (("Beijing", "Stellenbosch"), ("Stellenbosch", "Beijing"))
        ]
        for process in running:
            assert process.wait(timeout=120) == 0, process.stderr.read()
    a_b = pool_path(net, "Beijing", "Stellenbosch").read_bytes()
    assert len(a_b) == 4 * 2000
    assert a_b == pool_path(net, "Stellenbosch", "Beijing").read_bytes()

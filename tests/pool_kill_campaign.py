"""SIGKILL campaign on the authentication pool (tests/test_distil_security.py, a short one;
benchmarks/bench_auth_pool.py, >= 200 kills).

Each session runs the real split mode, `qkdsat distil --role alice --listen` and
`--role bob --connect`, as two processes with their own copy of the pool, through a TCP
relay that records every frame. One side, chosen at random, is SIGKILLed at a random
instant; the survivor is given a few seconds to notice and is SIGKILLed if it has not
exited. The relay then replays what went over the wire: from the two announced pool
positions it derives the session start S, and checks every tag against the pool with the
hash key at S and the pad at S + 8 + 8 (2 seq + direction) (so the offsets it charges are
the ones really used, not assumed). Across all sessions no pool byte may serve twice, and
after each session the later of the two usage records must lie beyond every byte used.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

from host.distil.gf64 import poly_hash

ROOT = Path(__file__).resolve().parents[1]
_LEN = struct.Struct("<I")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Relay:
    """Bob -> relay -> Alice, both directions copied and recorded frame by frame."""

    def __init__(self, alice_port: int):
        self.alice_port = alice_port
        self.server = socket.create_server(("127.0.0.1", 0))
        self.server.settimeout(60)
        self.port = self.server.getsockname()[1]
        self.streams = {0: bytearray(), 1: bytearray()}  # 0: Alice -> Bob, 1: Bob -> Alice
        self.sockets = []
        self.seen = threading.Condition()
        self.frames_seen = 0
        self.connected = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _pump(self, src, dst, direction):
        while True:
            try:
                data = src.recv(1 << 16)
            except OSError:
                data = b""
            if not data:
                break
            with self.seen:
                self.streams[direction] += data
                self.frames_seen = sum(len(_frames(self.streams[d])) for d in (0, 1))
                self.seen.notify_all()
            try:
                dst.sendall(data)
            except OSError:
                break
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _run(self):
        try:
            bob, _ = self.server.accept()
        except OSError:
            return
        deadline = time.monotonic() + 30
        while True:
            try:
                alice = socket.create_connection(("127.0.0.1", self.alice_port), timeout=5)
                break
            except OSError:
                if time.monotonic() > deadline:
                    bob.close()
                    return
                time.sleep(0.05)
        self.connected.set()
        alice.settimeout(None)
        bob.settimeout(None)
        self.sockets = [alice, bob]
        pumps = [
            threading.Thread(target=self._pump, args=(alice, bob, 0), daemon=True),
            threading.Thread(target=self._pump, args=(bob, alice, 1), daemon=True),
        ]
        for p in pumps:
            p.start()
        for p in pumps:
            p.join()

    def wait_frames(self, count: int, timeout_s: float) -> bool:
        with self.seen:
            return self.seen.wait_for(lambda: self.frames_seen >= count, timeout_s)

    def close(self):
        try:
            # wakes an accept() still waiting for Bob (a close alone does not, on Linux:
            # the join below then waited its whole 5 s whenever Bob died before connecting)
            self.server.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.server.close()
        for s in self.sockets:
            try:
                s.close()
            except OSError:
                pass
        self.thread.join(5)


def _frames(stream: bytes) -> list[bytes]:
    out, pos = [], 0
    while pos + 4 <= len(stream):
        (length,) = _LEN.unpack_from(stream, pos)
        if pos + 4 + length > len(stream):
            break  # cut by the kill
        out.append(bytes(stream[pos + 4 : pos + 4 + length]))
        pos += 4 + length
    return out


def used_ranges(streams: dict, pool: bytes) -> tuple[list[tuple[int, int]], int]:
    """Pool byte ranges the session's tags used, checked tag by tag; the tag count; and
    who sent each range's tag (0: Alice, 1: Bob, None: the hash key, used by both)."""
    frames = {d: _frames(streams[d]) for d in (0, 1)}
    # the pool-start exchange (channel.exchange_pool_start): each side's hello (mode, nonce),
    # then Bob's tagged position (he connects: he proves first), then Alice's, then Bob's
    # confirmation (protocol 5)
    if len(frames[1]) < 2:
        return [], 0, []  # Bob's announcement never crossed: nothing tagged was sent
    hellos = [frames[d][0] for d in (0, 1)]
    assert all(len(h) == 25 and h[:8] == b"QKDPOOL5" for h in hellos), hellos
    nonce_a, nonce_b = hellos[0][9:], hellos[1][9:]

    def announcement_tag(offset: int, body: bytes) -> bytes:
        key = int.from_bytes(pool[offset : offset + 8], "little")
        pad = int.from_bytes(pool[offset + 8 : offset + 16], "little")
        return (poly_hash(body, key) ^ pad).to_bytes(8, "little")

    magic, p_bob, tag = struct.unpack("<8sQ8s", frames[1][1])
    assert magic == b"QKDPANN5"
    body = magic + struct.pack("<BQQ", 0, p_bob, 0) + nonce_b + nonce_a
    assert tag == announcement_tag(p_bob, body), "Bob's announcement not from his position"
    ranges, senders = [(p_bob, p_bob + 8), (p_bob + 8, p_bob + 16)], [1, 1]
    if len(frames[0]) < 2:
        return ranges, 1, senders  # Alice never answered: no session
    magic, p_alice, tag = struct.unpack("<8sQ8s", frames[0][1])
    at = max(p_bob + 16, p_alice)
    at += (0 - at) % 32  # Alice's lane (channel.announcement_slot)
    body = magic + struct.pack("<BQQ", 1, p_bob, p_alice) + nonce_a + nonce_b
    body += struct.pack("<Q", 0)  # the session's budget: a distillation declares none
    assert tag == announcement_tag(at, body), "Alice's announcement not from its place"
    ranges += [(at, at + 8), (at + 8, at + 16)]
    senders += [0, 0]
    if len(frames[1]) < 3:
        return ranges, 2, senders  # Bob never confirmed: no session
    magic, confirm_at, tag = struct.unpack("<8sQ8s", frames[1][2])
    assert confirm_at == at + 16  # Bob's lane, right after Alice's answer
    body = magic + struct.pack("<BQQ", 2, p_bob, p_alice) + nonce_b + nonce_a
    body += struct.pack("<Q", 0)
    assert tag == announcement_tag(confirm_at, body), "Bob's confirmation not from its place"
    ranges += [(confirm_at, confirm_at + 8), (confirm_at + 8, confirm_at + 16)]
    senders += [1, 1]
    start = confirm_at + 16
    session = min(nonce_a, nonce_b) + max(nonce_a, nonce_b)  # every tag covers both
    key = int.from_bytes(pool[start : start + 8], "little")
    tags = 3
    for d in (0, 1):
        for seq, frame in enumerate(frames[d][2 + d :]):
            offset = start + 8 + 8 * (2 * seq + d)
            pad = int.from_bytes(pool[offset : offset + 8], "little")
            body, tag = frame[:-8], frame[-8:]
            expect = poly_hash(struct.pack("<BQ", d, seq) + session + body, key) ^ pad
            assert tag == expect.to_bytes(8, "little"), f"tag {d}/{seq} not from offset {offset}"
            ranges.append((offset, offset + 8))
            senders.append(d)
            tags += 1
    if tags > 3:
        ranges.append((start, start + 8))  # the hash key: both sides' tags used it
        senders.append(None)
    return ranges, tags, senders


# what a listener (Alice) says when it drops a peer before the session: it then listens
# for the next one (host/distil/channel.py, ListeningTransport._drop), committing nothing
# more, and no next one ever comes in a session here
_BACK_TO_LISTENING = "waiting for the next"


def _watch_listener(stderr, back_to_listening: threading.Event) -> None:
    for line in stderr:
        if _BACK_TO_LISTENING in line:
            back_to_listening.set()


def _record(path: Path) -> int:
    return json.loads(Path(str(path) + ".used").read_text())["used_bytes"]


def run_campaign(
    pass_dir: Path,
    work: Path,
    kills: int,
    *,
    seed: int = 1,
    max_frames: int = 14,
    max_kill_s: float = 0.3,
    grace_s: float = 5.0,
    extra_args: tuple = ("--qber-threshold", "0.001"),
    log=None,
) -> dict:
    """Sessions until `kills` random SIGKILLs hit a live process. Raises AssertionError on
    any pool byte used twice. extra_args default: abort right after the error estimate,
    so that a session is a few seconds (hello, sync, sifting, disclosure, abort). A
    surviving Alice that dropped her peer before the session and went back to listening
    (she says so on stderr) is SIGKILLed at once rather than after grace_s: she waits there
    for a connection that never comes (about half the sessions at seed 16 waited 5 s)."""
    work.mkdir(parents=True, exist_ok=True)
    pool = os.urandom(1 << 20)
    pools = {}
    for role in ("alice", "bob"):
        path = work / f"{role}.pool"
        path.write_bytes(pool)
        path.chmod(0o600)
        used = Path(str(path) + ".used")
        used.write_text('{"used_bytes": 0}')
        used.chmod(0o600)
        pools[role] = path
    chooser = random.Random(seed)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    owner: dict[int, int] = {}  # pool byte offset (8-aligned) -> session that used it
    stats = {"sessions": 0, "kills": 0, "kills_alice": 0, "kills_bob": 0, "survivor_kills": 0}
    stats.update({"tags_checked": 0, "bytes_used": 0, "clean_exits": 0})
    while stats["kills"] < kills:
        session = stats["sessions"]
        alice_port = _free_port()
        relay = Relay(alice_port)
        # a copy per session: Alice claims a pass's raw data on her first run and refuses
        # it after (host/distil/raw_data_record.py); every session must reach the protocol
        session_pass = work / "pass"
        shutil.rmtree(session_pass, ignore_errors=True)
        shutil.copytree(pass_dir, session_pass)
        common = [sys.executable, "-m", "host.cli", "distil", str(session_pass), *extra_args]
        procs = {
            "alice": subprocess.Popen(
                [*common, "--role", "alice", "--listen", f"127.0.0.1:{alice_port}"]
                + ["--auth-pool", str(pools["alice"]), "--out", str(work / "a")],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            ),
            "bob": subprocess.Popen(
                [*common, "--role", "bob", "--connect", f"127.0.0.1:{relay.port}"]
                + ["--auth-pool", str(pools["bob"]), "--out", str(work / "b")],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            ),
        }
        back_to_listening = threading.Event()
        watcher = threading.Thread(
            target=_watch_listener, args=(procs["alice"].stderr, back_to_listening), daemon=True
        )
        watcher.start()
        victim = chooser.choice(("alice", "bob"))
        # the kill point: after a random number of frames on the wire (0: during start-up,
        # pool opening, locking, the position exchange), then a random fraction of a second
        relay.wait_frames(chooser.randrange(0, max_frames + 1), timeout_s=120)
        time.sleep(chooser.uniform(0.0, max_kill_s))
        killed = procs[victim].poll() is None
        if killed:
            procs[victim].send_signal(signal.SIGKILL)
            stats["kills"] += 1
            stats[f"kills_{victim}"] += 1
        survivor = procs["bob" if victim == "alice" else "alice"]
        if not relay.connected.is_set() and victim == "bob":
            grace_s_now = 0.5  # Alice would wait for a connection that never comes
        else:
            grace_s_now = grace_s
        deadline = time.monotonic() + grace_s_now
        while survivor.poll() is None:
            listening = survivor is procs["alice"] and back_to_listening.is_set()
            if listening or time.monotonic() > deadline:
                survivor.send_signal(signal.SIGKILL)  # e.g. Alice waiting for a connection
                stats["survivor_kills"] += 1
                break
            time.sleep(0.02)
        for p in procs.values():
            p.wait()
        watcher.join(10)  # Alice has exited: her stderr ends
        procs["alice"].stderr.close()
        if all(p.returncode in (0, 3) for p in procs.values()):
            stats["clean_exits"] += 1
        relay.close()
        ranges, tags, senders = used_ranges(relay.streams, pool)
        for lo, _hi in ranges:
            assert lo not in owner, (
                f"pool bytes {lo}..{lo + 8} used in session {owner[lo]} and again in {session}"
            )
            owner[lo] = session
        records = {role: _record(path) for role, path in pools.items()}
        latest = max(records.values())
        assert all(hi <= latest for _, hi in ranges), (session, latest, max(ranges))
        # and each side's own record lies beyond every pad it put on the wire (and so
        # beyond the hash key before them): a man in the middle who lowers the peer's
        # announcement leaves a side its own record only
        for (_, hi), sender in zip(ranges, senders, strict=True):
            if sender is not None:
                role = ("alice", "bob")[sender]
                assert hi <= records[role], (session, role, hi, records[role])
        stats["tags_checked"] += tags
        stats["bytes_used"] += 8 * len(ranges)
        stats["sessions"] += 1
        if log is not None:
            what = "SIGKILLed" if killed else "had already exited"
            log(f"session {session}: {victim} {what}, {tags} tags, record {latest}")
    stats["records"] = {r: _record(p) for r, p in pools.items()}
    return stats

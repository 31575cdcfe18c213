"""The pool-start exchange (host/distil/channel.py exchange_pool_start) under an attacker who
hears every frame and drops the one he likes: no 16 pool bytes may key two announcement
tags. Two tags h_k(m1) xor r and h_k(m2) xor r under one (k, r) give k as a root of a
known polynomial, then r: the attacker can then tag any announcement at that offset, and
the verifier, which accepts a position below its own record, commits and drops its
listening socket for it, run after run (the burn protocol 3 was made to stop)."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from host.distil import channel as ch


def _pools(tmp_path, seed: int = 21, size_bytes: int = 8192, suffix: str = ".pool"):
    """Alice's and Bob's copies of one new pool (a.pool and b.pool by default)."""
    data = np.random.default_rng(seed).bytes(size_bytes)
    paths = []
    for name in (f"a{suffix}", f"b{suffix}"):
        path = tmp_path / name
        path.write_bytes(data)
        path.chmod(0o600)
        paths.append(path)
        ch.KeyPool.from_file(str(path), new=True).close()
    return paths


def _spy_tags(monkeypatch) -> list:
    """(offset, tag) of every announcement tag computed, sent or checked."""
    computed = []
    real = ch._announcement_tag

    def spy(pool, offset, body):
        tag = real(pool, offset, body)
        computed.append((offset, tag))
        return tag

    monkeypatch.setattr(ch, "_announcement_tag", spy)
    return computed


def _exchange(
    path_listener, role_listener, path_connector, role_connector, lose=None, starts=None
):
    """One pool-start exchange over an in-process pipe (queue_pair's first end listens).
    `lose`: "listener" or "connector", whose announcement the link loses (heard, then
    replaced by garbage of its size). Returns the frames each side put on the wire (as
    sent) and each side's outcome. `starts`: a dict; a side that gets a session puts its
    start there by role, and Alice then speaks first, as every protocol does (her first
    message goes on the wire, tagged under the session's hash key and first pad)."""
    wire, outcome = [], {}
    t_l, t_c = ch.queue_pair(timeout_s=5)

    def tap(sender):
        def tamper(frame):
            wire.append(frame)
            if sender == lose and frame[:8] == ch._ANNOUNCE:
                return frame[:-8] + bytes(8)
            return frame

        return tamper

    t_l.tamper, t_c.tamper = tap("listener"), tap("connector")

    def side(name, transport, path, role):
        pool = ch.KeyPool.from_file(str(path))
        try:
            session = ch.exchange_pool_start(transport, pool, role)
            outcome[name] = "session"
            if starts is not None:
                starts[role] = pool.start_byte
                if role == ch.ALICE:
                    ch.AuthChannel(transport, pool, role, session=session).send("hello")
        except ch.ProtocolAborted as error:
            outcome[name] = str(error)
        finally:
            pool.close()
            transport.close()

    thread = threading.Thread(
        target=side, args=("listener", t_l, path_listener, role_listener), daemon=True
    )
    thread.start()
    side("connector", t_c, path_connector, role_connector)
    thread.join(10)
    return wire, outcome


@pytest.mark.parametrize("lost", ["answer, same roles", "announcement, roles reversed"])
def test_no_pool_bytes_key_two_announcement_tags_when_the_link_loses_one(
    tmp_path, monkeypatch, lost
):
    """Answer lost: Bob connects to a listening Alice, Alice verifies his announcement and
    answers under the 16 bytes after it, and the link loses that answer; at the next
    contact (same roles) Bob's record stood just past his own 16 bytes, and on main his
    new announcement was tagged under the very bytes of Alice's lost answer.
    Announcement lost: Alice connects to a listening Bob and her announcement is lost;
    at the next contact Bob connects to a listening Alice, and on main tagged his
    announcement under the bytes of Alice's (his record never saw them). Every 16-byte
    run of the pool must key at most one tag that went on the wire."""
    path_a, path_b = _pools(tmp_path)
    computed = _spy_tags(monkeypatch)
    if lost.startswith("answer"):
        wire, outcome = _exchange(path_a, ch.ALICE, path_b, ch.BOB, lose="listener")
        assert outcome["connector"].startswith("the peer's pool position failed")
        # protocol 5: no confirmation from Bob, so no session for Alice either
        assert outcome["listener"] == "peer closed the channel"
    else:
        wire, outcome = _exchange(path_b, ch.BOB, path_a, ch.ALICE, lose="connector")
        assert outcome["listener"].startswith("the peer's pool position failed")
    more, outcome = _exchange(path_a, ch.ALICE, path_b, ch.BOB)
    assert outcome == {"listener": "session", "connector": "session"}
    wire_tags = {frame[-8:] for frame in wire + more if frame[:8] == ch._ANNOUNCE}
    assert len(wire_tags) == len([f for f in wire + more if f[:8] == ch._ANNOUNCE])
    offsets = sorted({offset for offset, tag in computed if tag in wire_tags})
    assert len(offsets) == len(wire_tags), f"two tags on the wire under one key: {offsets}"
    overlapping = [
        (a, b) for a, b in zip(offsets, offsets[1:], strict=False) if b - a < ch.ANNOUNCE_BYTES
    ]
    assert not overlapping, f"tags on the wire under overlapping pool bytes: {offsets}"


def test_a_position_off_the_provers_lane_is_refused_before_anything_is_committed(tmp_path):
    """The verifier takes the prover's tag only from the prover's own lane of the pool (a
    position the peer's role could have announced): one off it fails, nothing moves."""
    path_a, _ = _pools(tmp_path)
    pool = ch.KeyPool.from_file(str(path_a))
    t_l, t_c = ch.queue_pair(timeout_s=5)
    t_c.send_bytes(ch._START.pack(ch._START_HELLO, ch.CONNECTOR, bytes(16)))
    off_lane = ch.announcement_slot(64, ch.ALICE)  # Alice's lane, announced by a "Bob"
    t_c.send_bytes(ch._ANNOUNCEMENT.pack(ch._ANNOUNCE, off_lane, bytes(8)))
    with pytest.raises(ch.AuthenticationFailed, match="pool position"):
        ch._exchange_pool_start(t_l, pool, ch.ALICE)
    assert pool.start_byte == 0 and pool.reserved_byte == 0
    pool.close()


def test_no_announcement_is_tagged_under_the_session_bytes_of_a_verifier_whose_answer_was_lost(
    tmp_path,
):
    """Alice listens and verifies; Bob's answer from her is lost (a man in the middle hears
    it and drops it). On main (protocol 4) Alice had her session at once: she spoke first,
    tagging her first message under the session's hash key and first pad, the 16 bytes
    right after her answer, which Bob's record never covered. At the next contact Bob's
    announcement on his lane was tagged under those very 16 bytes (offset 48): two tags
    under one (k, r), which give both away, and the forged announcements the verifier then
    accepts. Now Alice takes no session byte before Bob's confirmation, which he sends
    only once his record is past them."""
    path_a, path_b = _pools(tmp_path)
    lost_starts, starts = {}, {}
    wire, outcome = _exchange(
        path_a, ch.ALICE, path_b, ch.BOB, lose="listener", starts=lost_starts
    )
    assert outcome["connector"].startswith("the peer's pool position failed")
    more, outcome = _exchange(path_a, ch.ALICE, path_b, ch.BOB, starts=starts)
    assert outcome == {"listener": "session", "connector": "session"}
    assert starts[ch.ALICE] == starts[ch.BOB]
    # every tag put on the wire, as the pool bytes it was keyed by: each announcement the
    # prover's 16 at its position; Alice's first message of a session k = [S, S + 8) and
    # its pad [S + 8, S + 16)
    keyed = []
    for frames in (wire, more):
        first = next(f for f in frames if f[:8] == ch._ANNOUNCE)
        position = ch._ANNOUNCEMENT.unpack(first)[1]
        keyed.append(("Bob's announcement", range(position, position + ch.ANNOUNCE_BYTES)))
    for start in (lost_starts.get(ch.ALICE), starts[ch.ALICE]):
        if start is not None:
            keyed.append(("Alice's first message", range(start, start + 16)))
    for i, (what, used) in enumerate(keyed):
        for other, again in keyed[i + 1 :]:
            shared = set(used) & set(again)
            assert not shared, f"{what} and {other} both keyed by pool bytes {sorted(shared)}"


def _used(path) -> int:
    return json.loads(Path(f"{path}.used").read_text())["used_bytes"]


def _forge(address, data: bytes, position: int) -> bytes:
    """A stranger who knows the 16 pool bytes at `position` (Bob's lane) tags an
    announcement of it over the listener's fresh nonce; returns what the listener sent back
    before it hung up."""
    with socket.create_connection(address, timeout=30) as sock:
        stranger = ch.SocketTransport(sock)
        nonce = os.urandom(ch.SESSION_NONCE_BYTES)
        stranger.send_bytes(ch._START.pack(ch._START_HELLO, ch.CONNECTOR, nonce))
        peer_nonce = ch._START.unpack(stranger.recv_bytes())[2]
        body = ch._announcement_body(0, position, 0, nonce + peer_nonce)
        tag = ch._announcement_tag(ch.KeyPool(data), position, body)
        stranger.send_bytes(ch._ANNOUNCEMENT.pack(ch._ANNOUNCE, position, tag))
        try:
            return stranger.recv_bytes()
        except ch.ChannelClosed:
            return b""


def test_a_listener_commits_nothing_to_an_announcement_tagged_under_bytes_already_used(tmp_path):
    """The pool-start denial of service with known pool bytes. After a session, an
    eavesdropper may know some of the bytes it used (a one-time pad over a predictable
    plaintext, as the time transfer seals its headers; two tags under one key) or Bob's
    earlier announcement bytes. On main the verifier accepted a tag at any position of
    Bob's lane below its own record: such a stranger made a listening Alice commit a
    session start and its reserve (~560 bytes) and then hung up, every run. Now Alice
    refuses a position below the floor she keeps for Bob (past every byte she used in a
    session, and past his last verified tag): she commits nothing, drops the stranger, and
    Bob, whose record is past them, gets his session."""
    path_a, path_b = _pools(tmp_path)
    data = path_a.read_bytes()

    def alice_listens(result, ready, messages):
        pool = ch.KeyPool.from_file(str(path_a))
        try:
            transport = ch.listen("127.0.0.1:0", timeout_s=60, ready=ready)
            session = ch.exchange_pool_start(transport, pool, ch.ALICE)
            result["dropped"] = list(transport.dropped)
            result["start"] = pool.start_byte
            chan = ch.AuthChannel(transport, pool, ch.ALICE, session=session)
            for i in range(messages):  # she speaks first, a few messages
                chan.send("data", i=i)
            chan.recv("ok")
            chan.close()
            result["high_water"] = pool.high_water_byte
        except BaseException as error:  # re-raised below
            result["error"] = error
        finally:
            pool.close()

    def bob_connects(port):
        pool = ch.KeyPool.from_file(str(path_b))
        try:
            transport = ch.connect(f"127.0.0.1:{port}")
            session = ch.exchange_pool_start(transport, pool, ch.BOB)
            chan = ch.AuthChannel(transport, pool, ch.BOB, session=session)
            while True:
                if chan.recv("data")["i"] == 3:
                    break
            chan.send("ok")
            chan.close()
        finally:
            pool.close()

    def contact(forged_positions=()):
        result, ready = {}, threading.Event()
        thread = threading.Thread(target=alice_listens, args=(result, ready, 4), daemon=True)
        thread.start()
        assert ready.wait(10)
        replies = []
        for position in forged_positions:
            record = _used(path_a)
            replies.append(_forge(("127.0.0.1", ready.port), data, position))
            time.sleep(0.2)  # the listener drops it before the next connects
            assert _used(path_a) == record, f"committed for a forgery at {position}"
        bob_connects(ready.port)
        thread.join(30)
        assert "error" not in result, result.get("error")
        return result, replies

    first, _ = contact()
    session_start, used_end = first["start"], first["high_water"]
    old_announcement = ch.announcement_slot(0, ch.BOB)  # Bob's in contact 1 (pools new)
    used_by_alice = ch.announcement_slot(session_start + 16, ch.BOB)  # her pads, Bob's lane
    assert used_by_alice + ch.ANNOUNCE_BYTES <= used_end
    second, replies = contact([old_announcement, used_by_alice])
    assert len(second["dropped"]) == 2
    assert all("below" in reason for reason in second["dropped"]), second["dropped"]
    assert all(reply[:8] == ch._REFUSE for reply in replies)
    assert second["start"] > used_end  # Bob's session begins past everything used


def _sealed_session(path, role, transport, budget_bytes: int, exchange, start=None) -> str:
    """One side of a time-transfer-like session over `transport`: the pool start under the
    session's key budget (its tags, then up to `budget_bytes` of sealed data), then
    `exchange(chan, sealed)`, the session's messages, with time data sealed with the key
    (endpoints.SealedChannel: one-time pads after the authentication region, as the
    satellite's tt_uplink). `start`: a dict; the side's session start goes there by role.
    Returns "session", or the reason the protocol aborted."""
    from host.timetransfer import endpoints
    from host.timetransfer.endpoints import AUTH_REGION_BYTES, SealedChannel

    pool = ch.KeyPool.from_file(str(path))
    try:
        budget = endpoints.key_budget(pool, {}, fit_bytes=budget_bytes, header_bytes=0)
        chan = endpoints._session(transport, pool, role, budget)
        if start is not None:
            start[role] = pool.start_byte
        exchange(chan, SealedChannel(chan, {"file": path.name}, AUTH_REGION_BYTES))
        return "session"
    except ch.ProtocolAborted as error:
        return str(error)
    finally:
        pool.close()
        transport.close()


def _time_session(path, role, transport, sealed_bytes: int, lost: list):
    """Bob's first message, then Alice's reply carrying `sealed_bytes` of time data sealed
    with the key. `lost`: Bob never reads that reply (the pass ended with it in flight, or
    his process was killed), as the link or a man in the middle makes it."""

    def exchange(chan, sealed):
        if role == ch.BOB:
            chan.send("tt_sift")
            if not lost:
                sealed.open_bytes(bytes.fromhex(chan.recv("tt_uplink")["sealed"]))
        else:
            chan.recv("tt_sift")
            chan.send("tt_uplink", sealed=sealed.seal_bytes(bytes(sealed_bytes)).hex())

    return _sealed_session(path, role, transport, sealed_bytes, exchange)


def _time_contact(path_a, path_b, sealed_bytes: int, lost: bool) -> dict:
    """Alice listens, Bob connects (queue_pair's first end listens)."""
    t_l, t_c = ch.queue_pair(timeout_s=5)
    outcome = {}
    thread = threading.Thread(
        target=lambda: outcome.update(
            alice=_time_session(path_a, ch.ALICE, t_l, sealed_bytes, [lost] if lost else [])
        ),
        daemon=True,
    )
    thread.start()
    outcome["bob"] = _time_session(path_b, ch.BOB, t_c, sealed_bytes, [lost] if lost else [])
    thread.join(10)
    return outcome


@pytest.mark.parametrize("sealed_bytes", [600, 3000])
def test_a_sealed_message_the_link_lost_does_not_lock_the_prover_out(tmp_path, sealed_bytes):
    """Alice (verifier) seals time data with one-time pads of the key after the session's
    authentication region and sends it; the link loses it (the pass ends, or Bob's process
    is killed) before Bob opened it. Her peer floor then stands past those pads, which
    Bob never took: on main his record (his tags' reserve, RESERVE_AHEAD_BYTES, or one
    RESERVE_STEP_BYTES step) lay below it whenever the sealed data ran past it, and at
    every later contact Alice refused his announcement, 32 bytes further each time (here
    2,640 against 3,120: 15 refusals), telling the operator to edit a record that was never
    restored from a backup. Each side's record must cover every pad the peer may take in
    the session before the peer can take it: the time transfer's sessions record their
    key budget with their start (endpoints._session)."""
    path_a, path_b = _pools(tmp_path, seed=22, size_bytes=1 << 15, suffix=".key")
    first = _time_contact(path_a, path_b, sealed_bytes, lost=True)
    assert first["alice"] == "session" and first["bob"] == "session", first
    again = _time_contact(path_a, path_b, sealed_bytes, lost=False)
    assert again == {"alice": "session", "bob": "session"}, again


def _bob_seals(path, role, transport, sealed_bytes: int, budget_bytes: int, start: dict):
    """A session in which Alice speaks, then Bob answers with `sealed_bytes` zero bytes
    sealed (a predictable plaintext: the ciphertext on the wire is the pad), which Alice
    never reads: the link lost it."""

    def exchange(chan, sealed):
        if role == ch.ALICE:
            chan.send("tt_bases")
        else:
            chan.recv("tt_bases")
            chan.send("tt_uplink", sealed=sealed.seal_bytes(bytes(sealed_bytes)).hex())

    return _sealed_session(path, role, transport, budget_bytes, exchange, start)


def test_a_listener_commits_nothing_to_a_tag_under_pads_of_a_sealed_message_it_never_read(
    tmp_path,
):
    """Bob seals 1,000 bytes of time data whose plaintext an eavesdropper can guess, and
    the link loses them on the way to Alice: he knows the pads, which Alice never took, so
    her floor (past the pads she took) stood below them. On main a stranger tagged an
    announcement at a Bob-lane slot of those pads, and a listening Alice committed a
    session start and its reserve (the session's whole key budget) for it, once per 16
    known bytes: the time key burnt by strangers. Once Bob's confirmation verified, Alice
    knows his record covers the session's budget (he records it before confirming), and
    her floor stands there."""
    path_a, path_b = _pools(tmp_path, seed=23, size_bytes=1 << 15, suffix=".key")
    data = path_a.read_bytes()
    budget_bytes = 2000  # the sessions' sealed data at most
    t_l, t_c = ch.queue_pair(timeout_s=5)
    start, outcome = {}, {}
    thread = threading.Thread(
        target=lambda: outcome.update(
            alice=_bob_seals(path_a, ch.ALICE, t_l, 1000, budget_bytes, start)
        ),
        daemon=True,
    )
    thread.start()
    outcome["bob"] = _bob_seals(path_b, ch.BOB, t_c, 1000, budget_bytes, start)
    thread.join(10)
    assert outcome == {"alice": "session", "bob": "session"}, outcome
    from host.timetransfer.endpoints import AUTH_REGION_BYTES

    known = ch.announcement_slot(start[ch.BOB] + AUTH_REGION_BYTES, ch.BOB)  # in Bob's pads

    def alice_listens(result, ready):
        pool = ch.KeyPool.from_file(str(path_a))
        try:
            transport = ch.listen("127.0.0.1:0", timeout_s=60, ready=ready)
            ch.exchange_pool_start(transport, pool, ch.ALICE, 2000)
            result["dropped"] = list(transport.dropped)
            transport.close()
        except BaseException as error:  # re-raised below
            result["error"] = error
        finally:
            pool.close()

    result, ready = {}, threading.Event()
    listener = threading.Thread(target=alice_listens, args=(result, ready), daemon=True)
    listener.start()
    assert ready.wait(10)
    record = _used(path_a)
    reply = _forge(("127.0.0.1", ready.port), data, known)
    time.sleep(0.2)  # the listener drops the stranger before Bob connects
    assert _used(path_a) == record, f"committed for a forgery at {known}"
    assert reply[:8] == ch._REFUSE
    pool = ch.KeyPool.from_file(str(path_b))
    try:
        ch.exchange_pool_start(ch.connect(f"127.0.0.1:{ready.port}"), pool, ch.BOB, 2000)
    finally:
        pool.close()
    listener.join(30)
    assert "error" not in result, result.get("error")
    assert len(result["dropped"]) == 1 and "below" in result["dropped"][0]

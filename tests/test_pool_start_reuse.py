"""The pool-start exchange (host/distil/channel.py exchange_pool_start) under an attacker who
hears every frame and drops the one he likes: no 16 pool bytes may key two announcement
tags. Two tags h_k(m1) xor r and h_k(m2) xor r under one (k, r) give k as a root of a
known polynomial, then r: the attacker can then tag any announcement at that offset, and
the verifier, which accepts a position below its own record, commits and drops its
listening socket for it, run after run (the burn protocol 3 was made to stop)."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from host.distil import channel as ch


def _pools(tmp_path):
    data = np.random.default_rng(21).bytes(8192)
    paths = []
    for name in ("a.pool", "b.pool"):
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


def _exchange(path_listener, role_listener, path_connector, role_connector, lose=None):
    """One pool-start exchange over an in-process pipe (queue_pair's first end listens).
    `lose`: "listener" or "connector", whose announcement the link loses (heard, then
    replaced by garbage of its size). Returns the frames each side put on the wire (as
    sent) and each side's outcome."""
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
            ch.exchange_pool_start(transport, pool, role)
            outcome[name] = "session"
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
        assert outcome["listener"] == "session"
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

"""The time transfer's tags stay in their region of the key: the hash key and one pad per
message each way, MAX_MESSAGES_EACH_WAY of them (the last kept for an abort), with the
sealing pads right after (host/timetransfer/endpoints.py SealedChannel). A session longer
than its region is refused and aborted with the reason; no tag is ever made with a pad
of the sealing region, which a sealed message also uses."""

import threading

import pytest

from host.distil import channel as ch
from host.errors import ProtocolAborted
from host.timetransfer import endpoints
from tests.network_keys import distilled

REGION = endpoints.AUTH_REGION_BYTES
MESSAGES = endpoints.MAX_MESSAGES_EACH_WAY


@pytest.fixture
def session(tmp_path, monkeypatch):
    """Both sides' time-transfer session on a fresh distilled key pair, as the endpoints
    open it (the pool start, each side's AuthChannel and SealedChannel), and every byte
    each side took from its key: {role: set of offsets from the session's start}."""
    distilled(tmp_path, 64_000, "a pass")
    taken = {ch.ALICE: set(), ch.BOB: set()}
    take = ch.KeyPool.take

    def spy(pool, offset_byte, count):
        role = ch.ALICE if pool.path.endswith("alice.key") else ch.BOB
        taken[role].update(range(offset_byte, offset_byte + count))
        return take(pool, offset_byte, count)

    monkeypatch.setattr(ch.KeyPool, "take", spy)
    pools = {
        ch.ALICE: endpoints.open_time_key(tmp_path, "satellite"),
        ch.BOB: endpoints.open_time_key(tmp_path, "ground"),
    }
    transports = dict(zip((ch.ALICE, ch.BOB), ch.queue_pair(timeout_s=20.0), strict=True))
    started = {}

    def start(role):
        pool, _ = pools[role]
        started[role] = ch.exchange_pool_start(transports[role], pool, role, 4000)

    threads = [threading.Thread(target=start, args=(role,)) for role in pools]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    sides = {}
    for role, (pool, key_info) in pools.items():
        chan = ch.AuthChannel(transports[role], pool, role, session=started[role])
        sides[role] = (chan, endpoints.SealedChannel(chan, key_info))
    yield sides, taken
    for pool, _ in pools.values():
        pool.close()


def _in_thread(target):
    outcome = {}

    def body():
        try:
            outcome["result"] = target()
        except BaseException as error:  # checked by the test
            outcome["error"] = error

    thread = threading.Thread(target=body, daemon=True)
    thread.start()
    return thread, outcome


def _ground_listening(chan, sealed, report):
    """The ground receiving the satellite's messages until the session stops, as its
    endpoint does (endpoints.run_session: report marked aborted with the reason)."""

    def body():
        while True:
            chan.recv("tt_step")

    return _in_thread(lambda: endpoints.run_session(chan, sealed, body, report))


def test_a_session_past_its_tag_region_is_refused_and_aborted_with_the_reason(session):
    """The satellite's protocol runs one message longer than its region: its fourth
    message is refused before it takes a pad, its abort (the region's last pad) tells the
    ground why. Before, nothing bounded the tags: the fourth went out and the fifth was
    tagged with the first sealing pad, which the sealed uplink fit also took."""
    (sat, sat_sealed), (ground, ground_sealed) = session[0][ch.ALICE], session[0][ch.BOB]
    taken = session[1]
    report = {"aborted": False}
    listening, heard = _ground_listening(ground, ground_sealed, report)

    def satellite():
        sealed_fit = sat_sealed.seal_bytes(bytes(16))  # pads from the region's end on
        for k in range(MESSAGES + 1):
            sat.send("tt_step", k=k, sealed=sealed_fit)

    with pytest.raises(ProtocolAborted, match="tag region holds 3 messages each way and an"):
        endpoints.run_session(sat, sat_sealed, satellite)
    listening.join(20)
    assert sat.sent == MESSAGES  # three messages and the abort
    assert isinstance(heard["error"], ch.PeerAborted)
    assert report["aborted"] and "tag region holds 3 messages" in report["abort_reason"]
    # the satellite's tags took their pads in the region; the sealing pads follow it
    assert max(taken[ch.ALICE] - set(range(REGION, REGION + 16))) < REGION
    assert set(range(REGION, REGION + 16)) <= taken[ch.ALICE]
    assert max(taken[ch.BOB]) < REGION  # the ground verified in the region only


def test_a_peer_sending_past_the_tag_region_is_refused_before_its_pad(session):
    """A satellite whose channel has no bound (a peer running a longer protocol) sends on
    past the region: the ground refuses its fourth message (the region's last pad is an
    abort's) and would never take the fifth's pad, the first sealing pad. Before, the
    ground verified all five, the fifth under a pad its own sealing would use."""
    (sat, _), (ground, ground_sealed) = session[0][ch.ALICE], session[0][ch.BOB]
    taken = session[1]
    sat.tag_region_messages = None  # the unbounded peer
    report = {"aborted": False}
    listening, heard = _ground_listening(ground, ground_sealed, report)
    for k in range(MESSAGES + 1):
        sat.send("tt_step", k=k)
    listening.join(20)
    assert isinstance(heard.get("error"), ProtocolAborted), heard
    assert "the peer sent more than the 3 messages each way" in report["abort_reason"]
    assert ground.received == MESSAGES
    assert max(taken[ch.BOB]) < REGION
    # and the ground's abort reached the satellite: its next receive says why
    with pytest.raises(ch.PeerAborted, match="the peer sent more than the 3 messages"):
        sat.recv("tt_step")

"""Fault injection between the ground tools and the real firmware (emulator.link_proxy):
dropped bytes, flipped bits, truncated and lost frames, and a link cut mid-transfer.
Every download either completes byte for byte or stops with a clear error; a corrupted
file is never accepted; an interrupted download resumes from its last verified chunk."""

import zlib

import pytest
from linkhelpers import KEY, product_set, qemu_payload, unix_payload

from emulator.link_proxy import LinkFaults, LinkProxy
from host.link.client import (
    CorruptDownload,
    LinkError,
    LinkFailed,
    PayloadClient,
    read_counter_state,
    write_counter_state,
)
from host.link.framed_serial import LinkTimeout

NOISY = LinkFaults(drop_rate=2e-4, flip_rate=2e-4, truncate_rate=0.02, frame_loss_rate=0.02)


def test_download_through_a_noisy_link_completes_byte_for_byte(tmp_path):
    products = product_set(10, {"stream.qrec": 60_000, "tdc.qrec": 7_000})
    satellite = tmp_path / "satellite"
    with unix_payload(tmp_path, products) as target:
        with LinkProxy(target.ground_port, down=NOISY, up=NOISY, seed=7) as proxy:
            with PayloadClient(proxy.port, KEY, timeout_s=1.0) as payload:
                entries = _list_with_retries(payload)
                results = [payload.download(e, satellite, request_timeout_s=0.3) for e in entries]
    for name, data in products.items():
        assert (satellite / name).read_bytes() == data
    faults = proxy.stats.down
    assert faults.flipped_bits + faults.dropped_bytes + faults.truncated_frames > 10
    assert sum(r.retransmissions for r in results) > 0


@pytest.mark.timeout(60)
def test_a_read_whose_replies_are_all_lost_is_sent_retries_plus_one_times_then_fails(tmp_path):
    """A line that passes the 49-byte acceptance reports and loses every long frame (the
    housekeeping reply, ~1 kB): the read is accepted and sent again after each lost
    reply, retries + 1 sends in all, then fails saying what was lost. (Before, each lost
    reply began a new round of retries, without end.) A short reply still gets through."""
    long_frames_lost = LinkFaults(loss_above_bytes=200)
    with unix_payload(tmp_path, {}) as target:
        with LinkProxy(target.ground_port, down=long_frames_lost) as proxy:
            with PayloadClient(proxy.port, KEY, timeout_s=1.0, retries=3) as payload:
                assert payload.ping().startswith("qkdsat-fw")  # a 65-byte reply
                counter = payload.counter  # one a telecommand sent
                lost = "accepted .* its reply did not come .*sent 4 times"
                with pytest.raises(LinkFailed, match=lost):
                    payload.housekeeping()
                assert payload.counter - counter == 4
    assert proxy.stats.down.lost_frames == 4


def _list_with_retries(payload, attempts=10):
    for _ in range(attempts - 1):
        try:
            return payload.list_products()
        except LinkError:
            continue
    return payload.list_products()


def test_cut_link_fails_clearly_and_the_download_resumes_where_it_stopped(tmp_path):
    data = product_set(11, {"stream.qrec": 80_000})["stream.qrec"]
    satellite = tmp_path / "satellite"
    with unix_payload(tmp_path, {"stream.qrec": data}) as target:
        with LinkProxy(target.ground_port, seed=3) as proxy:
            with PayloadClient(proxy.port, KEY, timeout_s=1.0) as payload:
                (entry,) = payload.list_products()
                proxy.cut_after(30_000)
                with pytest.raises(LinkError, match="resume"):
                    payload.download(entry, satellite, stall_timeout_s=1.0)
                part = (satellite / "stream.qrec.part").read_bytes()
                assert 0 < len(part) <= 30_000 and data.startswith(part)
                assert not (satellite / "stream.qrec").exists()
                proxy.restore()
                result = payload.download(entry, satellite)
    assert result.resumed_from == len(part)
    assert (satellite / "stream.qrec").read_bytes() == data


def test_a_resumed_download_rechecks_what_is_on_disk(tmp_path):
    """A .part file damaged on the ground is not trusted: the download starts over."""
    data = product_set(12, {"a.qrec": 5000})["a.qrec"]
    satellite = tmp_path / "satellite"
    with unix_payload(tmp_path, {"a.qrec": data}) as target:
        with LinkProxy(target.ground_port, seed=4) as proxy:
            with PayloadClient(proxy.port, KEY, timeout_s=1.0) as payload:
                (entry,) = payload.list_products()
                proxy.cut_after(3000)
                with pytest.raises(LinkError):
                    payload.download(entry, satellite, stall_timeout_s=1.0)
                part = satellite / "a.qrec.part"
                damaged = bytearray(part.read_bytes())
                damaged[0] ^= 0xFF
                part.write_bytes(damaged)
                proxy.restore()
                result = payload.download(entry, satellite)
    assert result.resumed_from == 0
    assert (satellite / "a.qrec").read_bytes() == data


def test_a_product_that_does_not_match_its_listed_crc_is_not_kept(tmp_path):
    data = product_set(13, {"a.qrec": 4000})["a.qrec"]
    satellite = tmp_path / "satellite"
    with unix_payload(tmp_path, {"a.qrec": data}) as target:
        with PayloadClient(target.ground_port, KEY) as payload:
            (entry,) = payload.list_products()
            # the payload's copy changes after listing (same size): the bytes that arrive
            # are each intact but are not the product that was listed
            changed = bytes([data[0] ^ 1]) + data[1:]
            (target.storage_dir / "products" / "a.qrec").write_bytes(changed)
            with pytest.raises(CorruptDownload, match="not kept"):
                payload.download(entry, satellite)
    assert not (satellite / "a.qrec").exists()
    assert not list(satellite.glob("a.qrec.part*"))
    assert zlib.crc32(changed) != entry.crc32


@pytest.mark.qemu
def test_qemu_noisy_link_with_a_cut_resumes_and_completes(tmp_path):
    data = product_set(14, {"stream.qrec": 12_000})["stream.qrec"]
    satellite = tmp_path / "satellite"
    with qemu_payload({"stream.qrec": data}) as target:
        with LinkProxy(target.ground_port, down=NOISY, up=NOISY, seed=5) as proxy:
            with PayloadClient(proxy.port, KEY, timeout_s=1.0) as payload:
                (entry,) = _list_with_retries(payload)
                proxy.cut_after(6_000)
                with pytest.raises(LinkError, match="resume"):
                    payload.download(entry, satellite, stall_timeout_s=1.0)
                part = (satellite / "stream.qrec.part").read_bytes()
                assert data.startswith(part)
                proxy.restore()
                result = payload.download(entry, satellite, request_timeout_s=0.5)
    assert result.resumed_from == len(part)
    assert (satellite / "stream.qrec").read_bytes() == data


def test_telemetry_recorded_in_an_earlier_session_is_refused_in_a_later_one(tmp_path):
    """The ground's last accepted telemetry counter outlives the session (the station's
    counter file, beside the telecommand counter): an acceptance recorded off the link in
    one session and injected at the start of the next, before any genuine packet, is
    refused, so it cannot pass for the answer to a new command (a cold review made a stop
    or a rekey look accepted that way while each session started afresh)."""
    counter_file = tmp_path / "station" / "counter"
    with unix_payload(tmp_path, {}) as target:
        with LinkProxy(target.ground_port, seed=1, capture=True) as proxy:
            with PayloadClient(proxy.port, KEY, counter_file=counter_file) as payload:
                version = payload.ping()
                recorded = bytes(proxy.captured["down"])  # the ping's acceptance and reply
                last_accepted = payload.tm_counter.last
            telecommand, telemetry = read_counter_state(counter_file)
            assert telecommand == payload.counter and telemetry == last_accepted
            with PayloadClient(proxy.port, KEY, counter_file=counter_file) as later:
                proxy.inject("down", recorded)
                with pytest.raises(LinkTimeout, match="replayed or reordered"):
                    later.receive_tm(1.0)
                assert later.replayed_packets == recorded.count(b"\x00") >= 2
                assert later.ping() == version  # genuine telemetry still accepted
                assert later.tm_counter.last > last_accepted
            # a station that heard a payload further on (another board given this key):
            # nothing is believed, and the error says where the operator's record is
            write_counter_state(counter_file, 0, 2**31)
            with PayloadClient(proxy.port, KEY, counter_file=counter_file, timeout_s=1.0) as new:
                with pytest.raises(
                    LinkFailed, match="if this payload is new, remove the second number"
                ):
                    new.ping()


def test_replayed_telemetry_is_refused_and_counted(tmp_path):
    """Telemetry recorded off the link and sent again by an intruder is authentic (its tag
    checks) but its security counter is not above the last the ground accepted: refused,
    counted, and said so; fresh telemetry is still accepted afterwards."""
    with unix_payload(tmp_path, {}) as target:
        with LinkProxy(target.ground_port, seed=1, capture=True) as proxy:
            with PayloadClient(proxy.port, KEY, timeout_s=3.0) as payload:
                version = payload.ping()
                recorded = bytes(proxy.captured["down"])  # the ping's acceptance and reply
                frames = recorded.count(b"\x00")
                assert frames >= 1 and payload.replayed_packets == 0
                proxy.inject("down", recorded)
                with pytest.raises(LinkTimeout, match="replayed or reordered"):
                    payload.receive_tm(1.0)
                assert payload.replayed_packets == frames
                assert payload.ping() == version
                assert payload.replayed_packets == frames

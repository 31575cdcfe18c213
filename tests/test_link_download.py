"""Ground link end to end: the real firmware (unix port and QEMU) answers authenticated
telecommands from host.link.client over its pty; every product downloads byte for byte
into PASS_DIR/satellite/ and matches the CRC-32 the payload listed."""

import zlib

import pytest
from linkhelpers import KEY, product_set, qemu_payload, unix_payload

from emulator.targets import UnixTarget
from host.link.client import CommandRejected, LinkError, PayloadClient, read_counter_state
from host.protocol import ccsds

SIZES = {"empty.qrec": 0, "one.qrec": 1, "exact.qrec": 1024, "tdc.qrec": 1025}


def _download_all_and_check(port, products, tmp_path, counter_file):
    satellite = tmp_path / "pass" / "satellite"
    with PayloadClient(port, KEY, counter_file=counter_file) as payload:
        listed = {e.name: e for e in payload.list_products()}
        assert sorted(listed) == sorted(products)
        for name, data in products.items():
            assert (listed[name].size, listed[name].crc32) == (len(data), zlib.crc32(data))
            result = payload.download(listed[name], satellite)
            assert result.path == satellite / name
        hk = payload.housekeeping()
    for name, data in products.items():
        assert (satellite / name).read_bytes() == data
    assert not list(satellite.glob("*.part*"))
    return hk


def test_unix_download_every_product_byte_for_byte(tmp_path):
    products = product_set(1, {**SIZES, "stream.qrec": 70_000})
    with unix_payload(tmp_path, products) as target:
        hk = _download_all_and_check(target.ground_port, products, tmp_path, tmp_path / "ctr")
    assert hk["key"] == "provisioned"
    assert hk["link"]["tc_rejected"] == {}


@pytest.mark.qemu
def test_qemu_download_every_product_byte_for_byte(tmp_path):
    products = product_set(2, {**SIZES, "stream.qrec": 12_000})
    with qemu_payload(products) as target:
        hk = _download_all_and_check(target.ground_port, products, tmp_path, tmp_path / "ctr")
    assert hk["version"].endswith(" qemu") and hk["key"] == "provisioned"


def test_commands_are_acknowledged_and_rejections_say_why(tmp_path):
    products = product_set(3, {"a.qrec": 100})
    with unix_payload(tmp_path, products) as target:
        with PayloadClient(target.ground_port, KEY) as payload:
            assert payload.ping().startswith("qkdsat-fw ")
            payload.set_time(1_700_000_000_000_000)
            tm = payload.command("ping", ccsds.SVC_TEST, 1, reply=2)
            assert abs(tm.time_s - 1_700_000_000) < 5
            with pytest.raises(CommandRejected, match="state: not configured"):
                payload.start()  # the data path (payload/mission.py) says why
            with pytest.raises(CommandRejected, match="product"):
                payload.delete("missing.qrec")
            payload.delete("a.qrec")
            assert payload.list_products() == []
            hk = payload.housekeeping()
    assert hk["time_set"] is True
    assert hk["link"]["tc_rejected"] == {"state": 1, "product": 1}
    assert not (target.storage_dir / "products" / "a.qrec").exists()


def test_a_station_behind_on_counters_resyncs_but_replays_stay_rejected(tmp_path):
    with unix_payload(tmp_path, {}) as target:
        with PayloadClient(target.ground_port, KEY) as first:
            first.counter = 5000
            first.ping()
        with PayloadClient(target.ground_port, KEY) as second:  # counter starts at 0
            second.ping()  # rejected as a replay once, then jumps past 5000
            assert second.counter > 5000
            request = ccsds.build_tc(KEY, 5001, ccsds.SVC_TEST, 1)
            second.link.send(request)  # a recorded telecommand played again
            verification = second._await_verification("replay", ccsds.request_id(request))
            assert not verification.accepted and verification.reason == "replay"
            hk = second.housekeeping()
    assert hk["link"]["tc_rejected"]["replay"] == 2


def test_after_a_storage_format_replays_stay_rejected_and_the_ground_resyncs(tmp_path):
    # A format (what a board does when littlefs will not mount) loses link/counter and
    # link/tm_counter but not <storage>/.keyregion: the key and the counters' coarse
    # ceilings. Recorded telecommands stay refused; the ground's counter file, now behind
    # the payload's, resyncs on the first replay report, and telemetry counts on above it.
    counter_file = tmp_path / "ctr"
    with unix_payload(tmp_path, {}) as target:
        with PayloadClient(target.ground_port, KEY, counter_file=counter_file) as payload:
            for _ in range(3):
                payload.ping()
            recorded = ccsds.build_tc(KEY, payload.counter + 1, ccsds.SVC_TEST, 1)
            payload.link.send(recorded)
            payload._await_verification("ping", ccsds.request_id(recorded))
            payload.counter += 1
            payload._save_counter()
            tm_before = payload.housekeeping()["link"]["tm_counter"]
    storage = target.storage_dir
    for folder in ("link", "products"):  # the format: littlefs empty, the region kept
        for path in (storage / folder).iterdir():
            path.unlink()
    assert (storage / ".keyregion").exists()
    with UnixTarget(storage_dir=storage) as target:
        with PayloadClient(target.ground_port, KEY, counter_file=counter_file) as payload:
            payload.link.send(recorded)  # played again after the format
            verification = payload._await_verification("replay", ccsds.request_id(recorded))
            assert not verification.accepted and verification.reason == "replay"
            payload.ping()  # behind: one replay report, the jump, accepted
            hk = payload.housekeeping()
    assert hk["key"] == "provisioned"
    assert hk["link"]["tc_rejected"] == {"replay": 2}
    assert hk["link"]["tm_counter"] > tm_before
    assert read_counter_state(counter_file)[0] > 4096


def test_a_wrong_key_gets_nothing_done(tmp_path):
    with unix_payload(tmp_path, product_set(4, {"a.qrec": 10})) as target:
        with PayloadClient(target.ground_port, ccsds.DEVELOPMENT_KEY, timeout_s=1.0) as intruder:
            # the payload rejects it ("auth"), and tags that rejection with its own key:
            # the intruder cannot even authenticate the answer, and is told so
            with pytest.raises(LinkError, match="no answer") as refused:
                intruder.delete("a.qrec")
            assert "the last packet refused: " in str(refused.value), refused.value
            assert intruder.unauthenticated_packets >= 1
        assert (target.storage_dir / "products" / "a.qrec").exists()
        with PayloadClient(target.ground_port, KEY) as payload:
            assert payload.housekeeping()["link"]["tc_rejected"]["auth"] >= 1


def test_reboot_is_acknowledged_before_the_controller_restarts(tmp_path):
    with unix_payload(tmp_path, {}) as target:
        with PayloadClient(target.ground_port, KEY) as payload:
            payload.reboot()  # raises unless the acceptance report came back first
        target.process.wait(timeout=5.0)  # the unix board's reset ends the process
        assert target.process.returncode == 0


def test_a_long_product_list_comes_in_pages(tmp_path):
    products = product_set(5, {f"tdc-{i:03d}.qrec": i for i in range(90)})
    with unix_payload(tmp_path, products) as target:
        with PayloadClient(target.ground_port, KEY) as payload:
            entries = payload.list_products()
    assert [e.name for e in entries] == sorted(products)
    assert all(e.size == len(products[e.name]) for e in entries)
    assert all(e.crc32 == zlib.crc32(products[e.name]) for e in entries)

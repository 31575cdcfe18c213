"""A store that fills up during a pass (docs/storage.md): the real unix firmware against the
emulated optical head, with the product quota set small. The commit that does not fit is
refused and counted, the frame the head already accepted is counted unlogged, the laser
is stopped (no frame goes out that nobody can sift), nothing torn reaches a product, and
the controller keeps answering telecommands."""

import tempfile
import time
from pathlib import Path

import pytest

from emulator.optical_head import HeadServer, OpticalHead, TdcSources
from emulator.payload_run import download_products, payload_session
from host.formats import qrec
from host.link.client import CommandRejected
from host.protocol import payload_bus as pb

QUOTA_BYTES = 60_000
CONFIG = {
    "intensity_probabilities": [0.5, 0.25, 0.25],
    "basis_probability_z": 0.7,
    "slot_rate_hz": 100_000_000,
    "frame_slots": 1024,
    "pps_period_ps": 100_000_000,
    "tdc": {"bursts_per_step": 1},
}


def _until(condition, timeout_s):
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        time.sleep(0.02)


def test_a_full_store_stops_the_laser_and_counts_the_unlogged_frame():
    head = OpticalHead(
        seed=9,
        fifo_depth=2048,
        sources=TdcSources(sync_rate_hz=1e5, beacon_rate_hz=1e3, uplink_rate_hz=(1e5,) * 4),
        pps_period_ps=CONFIG["pps_period_ps"],
    )
    env = {"QKDSAT_STORAGE_QUOTA": str(QUOTA_BYTES)}
    with (
        HeadServer(head) as server,
        tempfile.TemporaryDirectory() as downloads,
        payload_session("unix", server.address, unix_env=env) as (_target, payload),
    ):
        payload.configure(CONFIG)
        payload.start()

        def stopped():
            mission = payload.housekeeping()["mission"]
            return mission["storage"].get("full") and not mission["sequencer"]["running"]

        _until(stopped, 120)
        mission = payload.housekeeping()["mission"]
        # the laser is switched off: the frame accepted before the refusal is the last one
        assert head.regs[pb.REG_LASER_CTRL] == 0
        seq = mission["sequencer"]
        assert seq["frames_unlogged"] == 1 and not seq["running"], seq
        store = mission["storage"]
        assert store["full"] and store["refused"] >= 1, store
        assert "failed" not in store and store["used"] <= QUOTA_BYTES, store
        assert head.regs[pb.REG_LASER_CTRL] == 0  # (and stays off)
        # still serving telecommands: a stop, the products list and download, housekeeping
        payload.stop()
        _, files = download_products(payload, Path(downloads))
        mission = payload.housekeeping()["mission"]
        assert mission["storage"]["full"]
        # TDC events the full store refused are lost and counted, not silently dropped
        tdc = mission["tdc"]
        assert tdc["unstored"] > 0 and tdc["lost"] >= tdc["unstored"], tdc
    tdc_log = qrec.parse_records(files["tdc.qrec"])
    stored = sum(len(qrec.decode_tdc_block(r.payload)) for r in tdc_log.records)
    assert stored == tdc["events_spooled"]
    assert tdc["events_accepted"] == tdc["events_spooled"] + tdc["unstored"], tdc
    assert not head.blank_frames
    log = qrec.parse_records(files["patterns.qrec"])
    assert log.complete, log.problem
    frames = [
        qrec.PatternFrame.decode(r.payload)
        for r in log.records
        if r.kind == qrec.Kind.PATTERN_FRAME  # not the start's PATTERN_CONFIG record
    ]
    # every emitted frame but the unlogged last one is logged, symbol for symbol
    assert len(frames) == len(head.emitted) - 1 >= 3, (len(frames), len(head.emitted))
    for logged, sent in zip(frames, head.emitted, strict=False):
        assert logged.frame_number == sent.frame_number
        assert logged.packed_symbols == sent.nibbles
    for name, data in files.items():
        assert qrec.parse_records(data).complete, name


def test_a_pass_does_not_start_on_a_full_store_in_either_generation_mode():
    head = OpticalHead(seed=9, fifo_depth=2048, pps_period_ps=CONFIG["pps_period_ps"])
    env = {"QKDSAT_STORAGE_QUOTA": "0"}
    with (
        HeadServer(head) as server,
        payload_session("unix", server.address, unix_env=env) as (_target, payload),
    ):
        for generation in ("controller", "head"):
            payload.configure(dict(CONFIG, pattern_generation=generation))
            with pytest.raises(CommandRejected, match="storage full"):
                payload.start()
            mission = payload.housekeeping()["mission"]
            assert not mission["pass_running"] and mission["storage"]["full"]
    assert not head.emitted and not head.blank_frames

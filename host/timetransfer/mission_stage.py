"""The time-transfer stage of `qkdsat mission --timetransfer`, sealed with the key the
mission just distilled; outputs in OUT/timetransfer/.

With the head generating the pass (the mission's default) the two-way pass is the
mission's own (docs/time-transfer.md, "In the mission"):

    prepare()       before the firmware runs: the two-way orbit and clocks of the segment
                    (the ground simulation of the segment flies them too) and the uplink
                    detections, simulated on them
    tdc_feed()      those detections as TDC events on the satellite clock, which the
                    emulated head puts on its uplink channels while the pass goes by, and
                    the laser's sync marks (one every slots-per-mark slots, on the same
                    clock): the real firmware takes them into its ring, spools them to
                    tdc.qrec and logs the marks' epochs to epochs.qrec
    run_stage(...)  after the distillation: the satellite endpoint reads its uplink tags
                    from the downloaded satellite/tdc.qrec and its downlink emissions
                    for the slots the ground names: their epochs from the downloaded
                    satellite/epochs.qrec (the firmware's emission epochs), their symbols
                    from the head's pattern memory; the ground endpoint
                    reads its own records (its uplink emissions, its detections with the
                    slots its time synchronisation gave), written to OUT/ground/

Without it (`--generation controller`) the stage simulates a two-way pass of its own
over the segment's length (`simulate.simulate`), as before.

Post-pass (run_stage), sealed with the pass's own key; and during the pass
(beside_the_distillation: `--timetransfer-keys`, an earlier key), on the optical link's
second stream beside the streaming distillation, the satellite endpoint reading the
controller's TDC and emission-epoch logs as they are written when the pass goes by at its
pace (live_satellite_records; docs/time-transfer.md, "The pass at its pace").
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from emulator.optical_head import CH_SYNC, CH_UPLINK0
from host.errors import BadInput, ProtocolAborted
from host.simulate import passgen
from host.timetransfer import files, simulate
from host.timetransfer.command import time_transfer
from host.timetransfer.tdc_feed import uplink_of

OUT_NAME = "timetransfer"


@dataclass
class MissionTwoWay:
    """The segment's two-way pass: orbit, clocks and the uplink detections (ground's
    emission record, the satellite's reception tags)."""

    two_way: simulate.TwoWayPass
    uplink_tx: tuple
    uplink_rx: tuple
    sync_marks_ps: np.ndarray  # the laser's sync marks, satellite clock (slot 0, M, 2M...)

    @property
    def geometry(self):
        return self.two_way.geometry

    @property
    def satellite(self):
        return self.two_way.satellite

    @property
    def ground(self):
        return self.two_way.ground

    def tdc_feed(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(seconds after the segment's start, TDC channel, satellite clock ps) of every
        uplink detection, for the emulated head's TDC (host/mission/run.py feed_uplink)."""
        tag_ps, basis, bit = self.uplink_rx
        tag_ps = np.concatenate([np.asarray(tag_ps, dtype=np.int64), self.sync_marks_ps])
        channel = np.concatenate([
            CH_UPLINK0 + 2 * basis.astype(np.int64) + bit.astype(np.int64),
            np.full(self.sync_marks_ps.size, CH_SYNC, dtype=np.int64),
        ])  # fmt: skip
        return self.satellite.true_time_s(tag_ps), channel.astype(np.uint8), tag_ps


def prepare(qkd_profile: dict, seed: int, slot_count: int,
            uplink_key: bytes | None = None) -> MissionTwoWay:  # fmt: skip
    """The two-way pass of a mission segment of `slot_count` slots (before the firmware
    runs: its uplink goes through the controller). `uplink_key`: the ground transmitter's
    pattern key (os.urandom by default, the station's QRNG stand-in; a test fixes it)."""
    from host.simulate.profiles import station as pick_station

    profile = simulate.load_profile(simulate.profile_for(qkd_profile["name"]))
    duration_s = slot_count / float(qkd_profile["source"]["slot_rate_hz"])
    two_way = simulate.prepare_beside_qkd(
        profile, qkd_profile, pick_station(qkd_profile, None), seed, duration_s,
        qkd_profile["orbit"]["utc_start"], uplink_key=uplink_key,
    )  # fmt: skip
    tx, rx = two_way.uplink_events()
    period_ps, slots_per_mark = slot_period_ps(qkd_profile), slots_per_sync_mark(qkd_profile)
    first = passgen.first_slot_ps(two_way.satellite, period_ps)  # the segment's slot clock
    marks = first + np.arange(0, slot_count, slots_per_mark, dtype=np.int64) * period_ps
    return MissionTwoWay(two_way, tx, rx, marks)


def slot_period_ps(qkd_profile: dict) -> int:
    return int(round(1e12 / float(qkd_profile["source"]["slot_rate_hz"])))


def slots_per_sync_mark(qkd_profile: dict) -> int:
    """Slots between two of the laser's sync marks (the slot rate over the sync rate)."""
    rate = float(qkd_profile["source"]["slot_rate_hz"]) / float(qkd_profile["sync"]["rate_hz"])
    return int(round(rate))


EPOCH_AGREEMENT_PS = 100  # the marks and the slot clock share an oscillator: TDC jitter only


def emission_epochs(path: Path, qkd_profile: dict):
    """The satellite's epoch of any slot, from the firmware's emission epochs (the
    downloaded epochs.qrec): mark i is slot i * slots-per-mark, and the laser's slot
    clock and the TDC run on one oscillator, so slot k left at record's local_ps +
    (k - i * slots-per-mark) * period. Every record must give the same slot clock (within
    EPOCH_AGREEMENT_PS), else the epochs cannot be vouched for. Returns slots -> epoch_ps."""
    from host.formats.qrec import read_emission_epochs

    if not path.is_file():
        raise BadInput(f"{path}: missing (the controller's emission epochs, downloaded)")
    index, local_ps, _ = read_emission_epochs(path)
    if index.size == 0:
        raise BadInput(f"{path}: no EMISSION_EPOCH record (no sync mark logged)")
    period_ps, slots_per_mark = slot_period_ps(qkd_profile), slots_per_sync_mark(qkd_profile)
    first_slot_ps = local_ps - index * slots_per_mark * period_ps
    spread = int(np.abs(first_slot_ps - first_slot_ps[0]).max())
    if spread > EPOCH_AGREEMENT_PS:
        raise BadInput(
            f"{path}: the laser's sync marks disagree with one slot clock by {spread} ps "
            f"(mark indices {int(index[0])}..{int(index[-1])}): no emission epoch to vouch for"
        )
    first = int(first_slot_ps[0])
    return lambda slots: first + np.asarray(slots, dtype=np.int64) * period_ps


def uplink_from_tdc_log(path: Path) -> tuple[tuple, dict]:
    """The satellite's uplink record from the controller's downloaded TDC log: the tags of
    channels UPLINK0..3 in log order, basis and bit from the detector; and what the log
    says about loss (records skipped or missing)."""
    from host.formats.qrec import read_tdc_events

    if not path.is_file():
        raise BadInput(f"{path}: missing (the controller's TDC log, downloaded)")
    channel, time_ps, log = read_tdc_events(path)
    record = uplink_of(channel, time_ps)
    losses = {
        "events": int(record[0].size),
        "records_missing": log.missing_records,
        "bytes_skipped": sum(n for _, n, _ in log.skipped),
    }
    return record, losses


def write_ground_records(out: Path, mission: MissionTwoWay, qkd_scenario) -> None:
    """OUT/ground/ (the station's uplink transmitter: its pattern source; its downlink
    detections with their slots), OUT/truth/ (tt_truth.npz; tt_uplink_tx.npz, which
    pulses were detected: no endpoint reads it) and OUT/timetransfer.json (with the
    transmitter's slot clock); nothing in satellite/: the satellite's records are the
    firmware's and the head's."""
    two_way = mission.two_way
    _, downlink_rx = simulate.downlink_from_detections(out, qkd_scenario)
    up = simulate.values(two_way.profile["uplink"])
    wavelengths = {"uplink": up["wavelength_nm"], "downlink": two_way.geometry.wavelength_nm}
    scenario = simulate.scenario_json(
        two_way.profile, two_way.predicted_orbit, two_way.duration_s, two_way.seed,
        two_way.ground, wavelengths,
        downlink="the mission's detections (ground/detections.qdet) inside the coincidence "
        "window, each with the slot its tag points to; the satellite's record of those "
        "slots is read on board (slot clock, head pattern memory)",
        uplink="the satellite's tags from the controller's TDC log (satellite/tdc.qrec)",
        qkd_profile=qkd_scenario.profile["name"],
        **two_way.uplink_scenario(),
    )  # fmt: skip
    truth = simulate.truth_series(two_way.duration_s, two_way.satellite, two_way.ground, {})
    events = {"uplink_tx": mission.uplink_tx, "downlink_rx": downlink_rx}
    files.write_pass(out, scenario, events, truth, two_way.transmitter.pattern)


def satellite_records(out: Path, qkd_scenario, memory) -> tuple[dict, dict]:
    """The satellite endpoint's records in a mission: uplink tags from the downloaded
    TDC log; downlink emissions of any slot: the epoch from the downloaded emission
    epochs (epochs.qrec), basis and bit from the head's pattern memory (`memory.symbols`,
    the port Alice reads on board)."""
    from host.protocol.symbols import decode_symbols

    uplink, losses = uplink_from_tdc_log(out / "satellite" / "tdc.qrec")
    epoch_of = emission_epochs(out / "satellite" / "epochs.qrec", qkd_scenario.profile)

    def downlink_source(slots):
        basis, bit, _ = decode_symbols(memory.symbols(slots))
        return epoch_of(slots), basis.astype(np.uint8), bit.astype(np.uint8)

    return {"uplink_rx": uplink, "downlink_source": downlink_source}, losses


def live_satellite_records(products: Path, qkd_scenario, memory, pass_ended) -> dict:
    """The satellite endpoint's records while the controller writes them (the pass at its
    pace, host/mission/run.py PassAtItsPace): the uplink from its TDC log as it grows
    (tdc_feed.LiveTdcUplink, ended by the controller's end of pass `pass_ended`); each
    block's downlink epochs from its emission-epoch log as it is then (every record so far
    must give the same slot clock), the symbols from the head's pattern memory."""
    from host.protocol.symbols import decode_symbols
    from host.timetransfer.tdc_feed import LiveTdcUplink

    feed = LiveTdcUplink(products / "tdc.qrec", idle_s=LIVE_IDLE_S, ending=pass_ended)

    def downlink_source(slots):
        epoch_of = emission_epochs(products / "epochs.qrec", qkd_scenario.profile)
        basis, bit, _ = decode_symbols(memory.symbols(slots))
        return epoch_of(slots), basis.astype(np.uint8), bit.astype(np.uint8)

    return {"uplink_feed": feed, "downlink_source": downlink_source}


LIVE_IDLE_S = 60.0  # the controller's log silent this long ends the pass (no notice came)


def stream_during_pass(out: Path, mission: MissionTwoWay, qkd_scenario, memory,
                       keys_dir: Path, block_s: float = 1.0, speedup: float = 1.0,
                       transports=None, live_logs=None) -> tuple[dict, dict]:  # fmt: skip
    """The mission's records streamed block by block (host/timetransfer/stream.py): the
    satellite's uplink tags from the downloaded TDC log, its downlink symbols read on
    board for the slots the ground names each block; sealed with `keys_dir`'s key (an
    earlier distillation's: the pass's own exists only at its end). `live_logs` (a
    host/mission/run.py PassAtItsPace): the satellite's records from the controller's logs
    as they are written instead (live_satellite_records). Returns (the ground's report,
    the satellite's result)."""
    from host.timetransfer import stream

    write_ground_records(out, mission, qkd_scenario)
    clock = None
    if live_logs is None:
        satellite, _ = satellite_records(out, qkd_scenario, memory)
    else:
        satellite = live_satellite_records(
            live_logs.products, qkd_scenario, memory, live_logs.pass_ended
        )
        clock = live_logs.clock  # the pass's own: its first slot is pass time 0
    return stream.run_streaming(
        out, keys_dir, block_s, speedup, transports=transports, satellite=satellite,
        clock=clock,
    )  # fmt: skip


DURING_NAME = "timetransfer-during-pass"


def beside_the_distillation(out: Path, mission: MissionTwoWay, qkd_scenario, head,
                            slot_count: int, keys_dir: Path, speedup: float,
                            block_s: float = 1.0, live_logs=None):  # fmt: skip
    """(beside(link), outcome): `beside` starts the streamed time transfer on the link's
    time-transfer stream while the distillation streams on its own (host/mission/run.py
    passes it to emulator/link_session.py), and returns the callable that waits for it;
    `outcome` receives the ground's report and the satellite's result, or the error.
    The satellite endpoint reads the head's pattern memory through a port of its own (the
    payload processor's Alice holds the other). `live_logs` (host/mission/run.py
    PassAtItsPace): the pass goes by at its pace from the ground's stream_start and the
    satellite reads the controller's TDC and emission-epoch logs as they are written
    (live_satellite_records); None: the downloaded ones."""
    from emulator.endpoint import FrameEndpoint
    from host.distil import channel as ch
    from host.link.pattern_memory import PatternMemoryClient
    from host.protocol import payload_bus as pb

    outcome: dict = {"started": time.process_time()}

    def beside(link):
        if live_logs is not None:  # the pass goes by from the ground's pass clock's start
            from emulator.optical_link import UP

            link.on_message(UP, "stream_start", lambda _link: live_logs.go())
        port = FrameEndpoint(
            head.handle_pattern_port, max_body_bytes=pb.PATTERN_PORT_MAX_BODY_BYTES
        )
        port.start()
        satellite = ch.connect(f"127.0.0.1:{link.port('time_transfer', 'satellite')}")
        ground = ch.connect(f"127.0.0.1:{link.port('time_transfer', 'ground')}")

        def body():
            try:
                with PatternMemoryClient(port.address, slot_count) as memory:
                    outcome["report"], outcome["satellite"] = stream_during_pass(
                        out, mission, qkd_scenario, memory, keys_dir, block_s, speedup,
                        transports=(satellite, ground), live_logs=live_logs,
                    )  # fmt: skip
            except BaseException as error:  # reported in the mission's figures
                outcome["error"] = error
                outcome["report"] = getattr(error, "report", None)

        thread = threading.Thread(target=body, name="timetransfer-during-pass", daemon=True)
        thread.start()

        def join():
            thread.join()
            port.stop()

        return join

    return beside, outcome


def during_pass_figures(out: Path, outcome: dict) -> dict:
    """OUT/timetransfer-during-pass/ (the outputs of `qkdsat timetransfer --during-pass`)
    and the stage's figures for mission.json."""
    from host.timetransfer.command import finish

    scenario = files.read_scenario(out)
    error, report = outcome.get("error"), outcome.get("report")
    if error is not None and not isinstance(error, ProtocolAborted):
        return {"aborted": True, "abort_reason": f"{type(error).__name__}: {error}"}
    if report is None:
        return {"aborted": True, "abort_reason": "the streamed time transfer did not run"}
    if error is None:
        report["satellite"] = outcome["satellite"]
    try:
        report = finish(out / DURING_NAME, out, scenario, outcome["started"], report, error)
    except ProtocolAborted:
        report = json.loads((out / DURING_NAME / "report.json").read_text())
    figures = {
        "aborted": bool(report["aborted"]),
        "abort_reason": report.get("abort_reason"),
        "out": f"{DURING_NAME}/",
    }
    if "key_budget" in report:  # what the streamed time data needs of the earlier key
        figures["key_budget"] = report["key_budget"]
    if "qber_check" in report:  # each direction's vouch: vouched / above the limit / undecided
        figures["qber_check"] = report["qber_check"]
    if not report["aborted"]:
        figures.update(
            bins=report["bins"],
            streaming=report["streaming"],
            time_data_rate_hz=report["time_data_rate_hz"],
            qber=report["qber"],
            offset_bias_ps=report.get("truth", {}).get("offset_bias_ps"),
            key_bits_used={"pad": report["key"]["pad_bits"], "auth": report["key"]["auth_bits"]},
            classical_bytes=report.get("classical_bytes"),
        )
        # the satellite's uplink read from the controller's TDC log as it was written
        feed = (outcome.get("satellite") or {}).get("uplink_feed")
        if feed is not None:
            figures["uplink_feed"] = {k: v for k, v in feed.items() if k != "events_when_taken"}
            figures["uplink_feed"]["blocks_taken_before_the_log_ended"] = sum(
                n < feed["events"] for n in feed["events_when_taken"]
            )
    return figures


def run_stage(out: Path, qkd_profile: str, seed: int, window_s: float | None,
              key_made: bool, satellite_keys: Path | None = None, mission=None,
              qkd_scenario=None, memory=None,
              uplink_key: bytes | None = None) -> dict:  # fmt: skip
    """The stage's figures for mission.json; `aborted` with the reason when there is no
    time transfer to vouch for (no key to seal with, or the protocol aborted). Bob's key
    is in OUT, Alice's in `satellite_keys` (the on-board key store's pass directory after
    a distillation over the optical link; OUT after a local one). `mission` (prepare's),
    `qkd_scenario` (the segment's ground scenario) and `memory` (the head's pattern
    memory client): the mission's own two-way pass; otherwise a simulated one, its ground
    transmitter's pattern keyed by `uplink_key` (os.urandom when None, as simulate's)."""
    if not key_made:
        return {
            "aborted": True,
            "abort_reason": "no key from the distillation: nothing to seal the time data with",
        }
    satellite, figures = None, {}
    if mission is not None:
        write_ground_records(out, mission, qkd_scenario)
        satellite, losses = satellite_records(out, qkd_scenario, memory)
        figures["uplink_from_firmware"] = losses
        profile_name = mission.two_way.profile["name"]
    else:
        profile = simulate.load_profile(simulate.profile_for(qkd_profile))
        simulate.simulate(profile, out, seed, window_s, uplink_key=uplink_key)
        profile_name = profile["name"]
    try:
        report = time_transfer(
            out, out / OUT_NAME, out, satellite_keys_dir=satellite_keys, satellite=satellite
        )
    except ProtocolAborted:
        report = json.loads((out / OUT_NAME / "report.json").read_text())
    figures.update(
        aborted=bool(report["aborted"]),
        abort_reason=report.get("abort_reason"),
        profile=profile_name,
        out=f"{OUT_NAME}/",
    )
    if "key_budget" in report:  # what the time data needs of the key, part by part
        figures["key_budget"] = report["key_budget"]
    if "qber_check" in report:  # each direction's vouch: vouched / above the limit / undecided
        figures["qber_check"] = report["qber_check"]
    if "uplink_sync" in report:  # the firmware's uplink tags matched to the emissions
        figures["uplink_sync"] = report["uplink_sync"]
    if "key" in report:
        figures["key_bits_used"] = {
            "pad": report["key"]["pad_bits"],
            "auth": report["key"]["auth_bits"],
        }
    if not report["aborted"]:
        figures.update(
            bins=report["bins"],
            time_data_rate_hz=report["time_data_rate_hz"],
            qber=report["qber"],
            tdev_ps=report["stability"]["tdev_ps"],
            offset_bias_ps=report.get("truth", {}).get("offset_bias_ps"),
            precision_1s_ps=report.get("truth", {}).get("precision_1s_ps"),
            range_check_violation=report["range_check"]["violation"],
        )
    return figures

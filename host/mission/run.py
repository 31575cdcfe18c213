"""The main job (docs/mission.md): one emulated pass end to end.

orbit    the simulator's scenario for the profile (synthetic pass), culmination
firmware the real firmware on the target, the emulated optical head on its payload
         bus, driven over the authenticated ground link: configure, start, run, stop;
         by default the head generates the pass from its QRNG into its pattern memory
download every product into OUT/satellite/, CRC-verified, as an operator would
ground   Bob's detections from the slots the head emitted
distil   by default Alice on the payload processor (its own process, reading the head's
         pattern memory on board, key store OUT/onboard/) and Bob at the ground station
         (its own process, OUT/report.json and OUT/bob.key) over the emulated optical link
         (emulator/optical_link.py); `--distil local`: both endpoints in this process;
         the controller-driven segment: local, from the sealed pattern product
report   OUT/mission.json (with the timeline over the pass), OUT/mission.png, a summary
"""

from __future__ import annotations

import json
import shutil
import time
import zlib
from pathlib import Path

import numpy as np

from emulator import pattern_generator
from emulator.optical_head import HeadServer, OpticalHead, TdcSources
from emulator.payload_run import payload_session
from host.errors import BadInput, ProtocolAborted
from host.formats.patterns import PatternLog, pattern_runs_from_log
from host.link.pattern_memory import PatternMemoryClient

FRAME_SLOTS = 4096  # the sequencer's largest frame: fewest bus round trips per slot
# Ground-link goodput the budget plans the download with (docs/ground-link.md: bare pty
# ~500 kB/s from the unix target, ~70 kB/s from QEMU; ~1 MB/s measured for large products)
PLANNED_GOODPUT_BYTES_S = {"unix": 500_000, "qemu": 40_000}
PATTERN_BYTES_PER_SLOT = 0.5
RUN_POLL_S = 0.05
DEFAULT_BUDGET_S = 40.0
DISTIL_MODES = ("link", "local")


class StageFailed(RuntimeError):
    """A stage did not work as designed (exit 1); the message names the stage."""


class _DiscardQrngLog:
    """The head keeps every QRNG byte it handed out for the tests' checks (4 bytes/slot:
    160 MB for a 40 M-slot run); the mission compares the pattern log with the emitted
    frames instead, so it does not keep them."""

    def __iadd__(self, data):
        return self


def scenario_summary(profile: dict, seed: int) -> dict:
    """Stage 1: the whole pass's geometry and link, and where the segment goes."""
    from host.simulate import passgen

    scenario = passgen.build_scenario(profile, seed=seed)
    geometry = scenario.geometry
    culmination_s = float(geometry.events.get("culmination", geometry.duration_s / 2))
    t = np.linspace(0.0, geometry.duration_s, 200)
    link = scenario.channel.link
    pointing_factor = link.mean_pointing_efficiency(
        profile["link"]["pointing_jitter_urad_rms_per_axis"], profile["link"]["pointing_bias_urad"]
    )
    # channel loss with the mean pointing loss, without the detectors (docs/simulator.md)
    loss_db = link.link_loss_db(
        geometry.range_at(t), geometry.elevation_at(t), 1.0, pointing_factor
    )
    return {
        "profile": profile["name"],
        "station": scenario.station["name"],
        "utc_start": geometry.utc_start.isoformat().replace("+00:00", "Z"),
        "pass_seconds": round(geometry.duration_s, 3),
        "pass_slots": scenario.slot_count,
        "culmination_s": round(culmination_s, 3),
        "culmination_range_km": round(float(geometry.range_at(culmination_s)), 2),
        "culmination_elevation_deg": round(float(geometry.elevation_at(culmination_s)), 3),
        "link_loss_db_min": round(float(loss_db.min()), 2),
        "link_loss_db_max": round(float(loss_db.max()), 2),
        "_curve": {"t_s": t.tolist(), "loss_db": loss_db.tolist()},
    }


def sequencer_config(profile: dict, generation: str = "controller") -> dict:
    source = profile["source"]
    classes = list(source["intensities"])
    return {
        "intensity_names": classes,
        "intensity_probabilities": {c: source["intensity_probabilities"][c] for c in classes},
        # the laser's mean photon numbers, logged in PATTERN_CONFIG: Alice's own record,
        # which the distillation checks pass.json against
        "intensities": {c: source["intensities"][c] for c in classes},
        "basis_probability_z": source["basis_probability_z"],
        "slot_rate_hz": int(source["slot_rate_hz"]),
        "frame_slots": FRAME_SLOTS,
        # the head's PPS every second of its clock (docs/scheduling.md)
        "pps_period_ps": 10**12,
        "pattern_generation": generation,
    }


def run_firmware(
    target: str,
    profile: dict,
    seed: int,
    budget_s: float,
    satellite: Path,
    generation: str = "controller",
    pass_slots: int = 0,
    uplink=None,
    qrng_key: bytes | None = None,
    at_its_pace=None,
):
    """Stages 2 and 3: pass mode on the real firmware, then every product downloaded.

    generation "head": the head's generator emits the whole pass (`pass_slots`, whole
    frames); the emulated pass goes by at once (emulator.pattern_generator.fast_forward).
    `uplink`: the two-way pass's uplink detections as (seconds after the segment's first
    slot, TDC channel, satellite clock ps), fed to the head's TDC as the pass goes by, a
    FIFO's worth at a time, so the controller takes them into its ring as on a pass.
    `qrng_key`: the head's QRNG stand-in's key (a test's fixed key; None: os.urandom).
    `at_its_pace` (a PassAtItsPace, head generation on the unix target): the pass goes by
    at its pace instead, while `at_its_pace.during` runs (the ground, the distillation and
    the time transfer during the pass, reading the controller's logs as it writes them);
    the controller is stopped at the pass's end, then the products are downloaded."""
    if generation == "head":
        head = OpticalHead(seed=seed, fifo_depth=2048, pps_period_ps=10**12, qrng_key=qrng_key)
        generator = pattern_generator.attach(head)
    else:
        generator = None
        head = OpticalHead(
            seed=seed,
            fifo_depth=2048,
            # satellite TDC: the sync laser's emissions and the beacon seen by the tracking
            # camera's timing channel; uplink detectors dark (downlink-only pass)
            sources=TdcSources(sync_rate_hz=float(profile["sync"]["rate_hz"]), beacon_rate_hz=1e3),
            pps_period_ps=10**12,
        )
    head.qrng_log = _DiscardQrngLog()
    config = sequencer_config(profile, generation)
    goodput = PLANNED_GOODPUT_BYTES_S[target]
    stages: dict = {}
    with HeadServer(head) as server:
        t0 = time.monotonic()
        with payload_session(target, server.address, track_address=server.track_address) as (
            controller,
            payload,
        ):
            boot_s = time.monotonic() - t0
            version = payload.ping()
            payload.configure(config)
            payload.start()
            started = time.monotonic()
            stopped = False
            if generator is not None and at_its_pace is not None:
                frames = pass_slots // FRAME_SLOTS
                stages["at_its_pace"] = at_its_pace.run(
                    head, generator, payload, frames, uplink, controller.storage_dir
                )
                stopped = True
            elif generator is not None:
                frames = pass_slots // FRAME_SLOTS
                end_ps = head.boundary_ps(generator.first_frame + frames - 1)
                if uplink is not None:
                    first_ps = head.boundary_ps(generator.first_frame)
                    end_ps = max(end_ps, feed_uplink(head, first_ps, uplink))
                pattern_generator.fast_forward(head, end_ps)
                deadline = time.monotonic() + 60.0
                while head.fifo and time.monotonic() < deadline:
                    time.sleep(RUN_POLL_S)  # the controller drains the pass's TDC events
            # as many slots as fit the budget: run until the time spent plus the planned
            # download of what was emitted so far reaches it
            while generator is None:
                time.sleep(RUN_POLL_S)
                elapsed = time.monotonic() - started
                slots = (len(head.emitted) + len(head.blank_frames)) * FRAME_SLOTS
                planned = boot_s + elapsed + slots * PATTERN_BYTES_PER_SLOT / goodput
                if planned >= budget_s:
                    break
            if not stopped:
                payload.stop()
            run_s = time.monotonic() - started
            housekeeping = payload.housekeeping()
            t_dl = time.monotonic()
            satellite.mkdir(parents=True, exist_ok=True)
            entries = payload.list_products()
            downloads = []
            for entry in entries:
                result = payload.download(entry, satellite)
                data = result.path.read_bytes()
                # a sealed (pattern) product is listed without a CRC: every chunk of it
                # authenticated (AES-256-GCM) at its offset instead
                crc_ok = result.sealed or zlib.crc32(data) == entry.crc32
                if not crc_ok or len(data) != entry.size:
                    raise StageFailed(f"download: {entry.name} does not match its listing")
                downloads.append(
                    {
                        "name": entry.name,
                        "bytes": entry.size,
                        "crc32": result.crc32,  # of the file kept (opened, if sealed)
                        "seconds": round(result.seconds, 3),
                        "retransmissions": result.retransmissions,
                        "sealed": result.sealed,
                    }
                )
            download_s = time.monotonic() - t_dl
    (satellite / "products.json").write_text(
        json.dumps(
            {"products": [{k: d[k] for k in ("name", "bytes", "crc32")} for d in downloads]},
            indent=1,
        )
        + "\n"
    )
    mission_tm = housekeeping.get("mission", {})
    seq = mission_tm.get("sequencer", {})
    tdc = mission_tm.get("tdc", {})
    emitted_slots = sum(f.slot_count for f in head.emitted)
    if generator is not None:
        emitted_slots = generator.frames() * FRAME_SLOTS
    stages["firmware"] = {
        "target": target,
        "generation": generation,
        "firmware": version,
        "config": config,
        "boot_seconds": round(boot_s, 3),
        "run_seconds": round(run_s, 3),
        "frames_emitted": len(head.emitted),
        "frames_blank": len(head.blank_frames),
        "slots_emitted": emitted_slots,
        "slots_per_s_wall": round(emitted_slots / run_s),
        "frames_sent": seq.get("frames_sent"),
        "frames_missed": seq.get("frames_missed"),
        "frames_unlogged": seq.get("frames_unlogged", 0),
        "refused_commits": seq.get("refused_commits", 0),
        "behind": seq.get("behind"),
        "tdc_events_logged": tdc.get("events_accepted"),
        "tdc_lost": tdc.get("lost"),
        "tdc_fifo_overflow": tdc.get("fifo_overflow"),
        "duty_errors": mission_tm.get("duty_errors", {}),
        "housekeeping": mission_tm,
    }
    if "at_its_pace" in stages:  # the pass went by at its pace (PassAtItsPace)
        stages["firmware"]["at_its_pace"] = stages.pop("at_its_pace")
    total = sum(d["bytes"] for d in downloads)
    stages["download"] = {
        "products": downloads,
        "bytes": total,
        "seconds": round(download_s, 3),
        "goodput_bytes_per_s": round(total / download_s) if download_s > 0 else None,
    }
    # controller mode: the sealed product is Alice's pattern, the key rests on AES-256;
    # head mode: it holds only the run's description, the pattern never left the head
    if generator is None and any(d["sealed"] for d in downloads):
        stages["download"]["pattern_product_security"] = (
            "AES-256-GCM with a provisioned product key: computationally secure only (whoever "
            "breaks AES-256 or obtains the product key reads Alice's pattern, and the key "
            "distilled from it)"
        )
    if generator is not None:
        stages["firmware"]["generator"] = {
            "first_frame": generator.first_frame,
            "frames": generator.frames(),
            # real hardware: the QRNG's bits; the emulator: AES-256-CTR keyed inside the
            # head from os.urandom (emulator/head_qrng.py), a key no product or message holds
            "source": "head QRNG",
            "telemetry": mission_tm.get("generator"),
        }
    return head, generator, stages


def uplink_head_ps(first_slot_ps: int, after_s) -> np.ndarray:
    """The head's time of each uplink event (seconds after the segment's first slot)."""
    return first_slot_ps + np.rint(np.asarray(after_s) * 1e12).astype(np.int64)


def feed_uplink(
    head: OpticalHead, first_slot_ps: int, uplink, wait_s: float = 60.0, not_before=None
) -> int:
    """Let the pass go by with the uplink detections on the head's TDC: the head's clock
    moves on by half a FIFO of events at a time and waits for the controller to drain
    the FIFO below a quarter (the pattern banks stay idle: the head's generator emits
    arithmetically). `not_before(t_ps)`: waits until the pass may reach head time t_ps
    (a pass at its pace, PassAtItsPace); None: at once. Returns the head time just after
    the last event."""
    after_s, channel, tdc_ps = uplink
    true_ps = uplink_head_ps(first_slot_ps, after_s)
    order = np.argsort(true_ps, kind="stable")
    true_ps = true_ps[order]
    head.sources.scheduled = (true_ps, np.asarray(channel)[order], np.asarray(tdc_ps)[order])
    step = max(1, head.fifo_depth // 2)
    deadline = time.monotonic() + wait_s
    for at in range(step, true_ps.size + step, step):
        to_ps = int(true_ps[min(at, true_ps.size) - 1])
        if not_before is not None:
            not_before(to_ps)
        pattern_generator.fast_forward(head, to_ps)
        while len(head.fifo) > head.fifo_depth // 4 and time.monotonic() < deadline:
            time.sleep(0.002)
    return int(true_ps[-1]) + 1 if true_ps.size else first_slot_ps


class PassAtItsPace:
    """The emulated pass at its pace, for the time transfer during the pass in the mission
    (`--timetransfer --timetransfer-keys`, head generation, the unix target): instead of
    letting the pass go by at once before the ground and the distillation, the head's
    clock follows the wall clock at `speedup` pass seconds per wall second from `go()` (the
    ground's stream_start on the link: its pass clock starts), LEAD_S ahead (the pattern
    memory must hold every slot Alice is asked for), with the uplink detections and the
    laser's sync marks on its TDC (feed_uplink), while `during(pace)` runs in the calling
    thread: the ground, the distillation and the time transfer, whose satellite endpoint
    reads the controller's TDC and emission-epoch logs in `products` as the controller
    writes them (the unix target's storage folder stands in for the processor link, which
    is not emulated). At the pass's end the controller is stopped (it drains the TDC and
    flushes every log) and `pass_ended` is set: the controller's end-of-pass notice.
    `slot_count`: the run's, planned before it goes by (to the last uplink event, as at
    once), for the ground simulation."""

    LEAD_S = 0.5

    def __init__(self, speedup: float, during):
        import threading

        self.speedup, self.during = float(speedup), during
        self.result = None
        self.pass_ended, self._go, self._cancel = (threading.Event() for _ in range(3))
        self.head = self.generator = self.products = None
        self.slot_count = 0
        from host.distil.stream import PassClock

        self.clock = PassClock(speedup)  # its epoch set by go()

    def go(self) -> None:
        """The pass starts now (its first slot LEAD_S ago): `clock` reads its pass time."""
        self.clock.epoch_unix_s = time.time() - self.LEAD_S / self.speedup
        self._go.set()

    def run(self, head, generator, payload, frames: int, uplink, storage_dir) -> dict:
        import threading

        first_ps = head.boundary_ps(generator.first_frame)
        end_ps = head.boundary_ps(generator.first_frame + frames - 1)
        if uplink is not None and len(uplink[0]):  # the pass lasts to its last event
            end_ps = max(end_ps, int(uplink_head_ps(first_ps, uplink[0]).max()) + 1)
        last_frame = generator.first_frame + frames - 1
        while head.boundary_ps(last_frame + 1) <= end_ps:
            last_frame += 1
        self.slot_count = (last_frame + 1 - generator.first_frame) * FRAME_SLOTS
        self.head, self.generator = head, generator
        self.products = Path(storage_dir) / "products"
        failure: list = []
        figures = {"speedup": self.speedup, "lead_s": self.LEAD_S}
        started = []

        def not_before(t_ps: int) -> None:
            wall = started[0] + ((t_ps - first_ps) / 1e12 - self.LEAD_S) / self.speedup
            while not self._cancel.is_set():
                delay = wall - time.monotonic()
                if delay <= 0:
                    return
                self._cancel.wait(min(delay, 0.1))

        def feed() -> None:
            try:
                while not (self._go.wait(0.1) or self._cancel.is_set()):
                    pass
                started.append(time.monotonic())
                if uplink is not None:
                    span_s = (end_ps - first_ps) / 1e12 / self.speedup
                    feed_uplink(head, first_ps, uplink, 60.0 + span_s, not_before)
                not_before(end_ps)
                pattern_generator.fast_forward(head, end_ps)
                deadline = time.monotonic() + 60.0
                while head.fifo and time.monotonic() < deadline:
                    time.sleep(RUN_POLL_S)  # the controller drains the pass's TDC events
                figures["pass_wall_s"] = round(time.monotonic() - started[0], 3)
            except BaseException as error:  # raised in the calling thread below
                failure.append(error)
            finally:
                try:
                    payload.stop()  # drains the TDC and flushes every log
                except BaseException as error:
                    failure.append(error)
                self.pass_ended.set()

        head.pattern_wait_s = PATTERN_WAIT_S  # the head's clock may lag under load
        thread = threading.Thread(target=feed, name="pass-at-its-pace", daemon=True)
        thread.start()
        try:
            self.result = self.during(self)
        except BaseException:
            self._cancel.set()  # the rest of the pass at once: the controller is stopped
            thread.join()
            raise
        self._cancel.set()  # a pass the ground never started: at once, to its end
        thread.join()
        head.pattern_wait_s = 0.0
        if failure:
            raise failure[0]
        return figures


PATTERN_WAIT_S = 5.0  # a pattern read waits this long for the paced head (the client: 10 s)


def check_pattern_log(head: OpticalHead, log: PatternLog) -> dict:
    """The downloaded pattern log against what the head's laser driver emitted."""
    emitted_first = np.array([f.first_slot for f in head.emitted], dtype=np.int64)
    same_frames = np.array_equal(emitted_first, log.frame_first_slot)
    same_symbols = same_frames
    if same_frames and head.emitted:
        from host.protocol.symbols import pack_nibbles

        logged = pack_nibbles(log._nibbles)
        same_symbols = logged == b"".join(f.nibbles for f in head.emitted)
    return {"frames": int(log.frame_first_slot.size), "equals_emitted": bool(same_symbols)}


def distil_over_optical_link(
    out: Path,
    head: OpticalHead,
    scenario,
    slot_count: int,
    profile_name: str,
    seed: int,
    stream_speedup: float | None = None,
    tail: str = "hoeffding",
    beside=None,
) -> tuple[dict, dict, dict]:
    """Alice on the payload processor and Bob at the ground station, separate processes
    over the emulated optical link (emulator/link_session.py).

    stream_speedup given: streaming (`qkdsat distil --stream`, docs/streaming.md): Bob
    replays the detections at the pass's pace (that many pass seconds per wall second) and
    Alice answers as the pass runs; the link's clock starts at the first detection.
    None: post-pass: the link's clock starts at the end of the emitted pass (loss of
    signal of the quantum downlink) and the link lasts until the satellite sets below the
    station's mask.

    `beside(link)`: the time transfer on the same link's second stream, during the pass
    (emulator/link_session.py distil_over_link).

    Returns (the merged report for the summary, the link's figures, the timeline)."""
    from emulator.link_session import distil_over_link
    from emulator.optical_link import link_for_pass
    from host.mission import timeline as tl

    pass_end_s = slot_count / scenario.slot_rate_hz
    detections_s = tl.detection_times_s(out, scenario)
    streaming = stream_speedup is not None
    first_detection_s = float(detections_s[0]) if detections_s.size else 0.0
    start_s = first_detection_s if streaming else pass_end_s
    streams = ("distil", "time_transfer") if beside is not None else ("distil",)
    link = link_for_pass(out, profile_name, start_s=start_s, seed=seed, streams=streams)
    station = scenario.station["name"]
    options = ["--tail", tail]
    options += ["--stream", "--stream-speedup", f"{stream_speedup:g}"] if streaming else []
    with HeadServer(head) as server:
        host, port = server.pattern_address
        memory = ["--pattern-memory", f"{host}:{port}", "--slot-count", str(slot_count)]
        run = distil_over_link(
            out, out, link, station=station, distil_options=options, alice_options=memory,
            ground_dir=out, logs=True, beside=beside,
        )  # fmt: skip
    processor_json = run.alice_dir / "processor.json"
    processor = json.loads(processor_json.read_text()) if processor_json.exists() else {}
    if any(code not in (0, 3) for code in run.codes) or len(set(run.codes)) != 1:
        tails = []
        for name in ("processor", "ground"):
            lines = (out / f"{name}.log").read_text(errors="replace").strip().splitlines()
            tails.append(f"{name}: {lines[-1] if lines else '(no output)'}")
        raise StageFailed(
            f"distil over the optical link: exit codes (payload processor, ground) = "
            f"{run.codes}; " + "; ".join(tails)
        )
    # the next contact, stood in for right after the pass: the two sides confirm the keys
    # both hold and destroy a key only one holds (Bob's final `done` lost with the link);
    # until then both keys are pending and nothing uses them (host/distil/keystore.py)
    from host.distil.keys_command import confirm_in_process

    onboard_station = run.alice_dir.parent.parent
    confirmation = confirm_in_process(
        onboard_station, onboard_station / "auth.pool", out, out / "ground.pool"
    )
    alice, bob = run.alice, run.bob
    key_written = [p.stat().st_mtime for p in (*run.alice_dir.glob("*.key"), *out.glob("*.key"))]
    last_detection_s = float(detections_s[-1]) if detections_s.size else pass_end_s
    key_latency_s = None
    if run.codes == (0, 0) and len(key_written) == 2:
        if streaming:  # each side timed its own key from the last detection's arrival
            sides = [alice.get("key_latency_s"), bob.get("key_latency_s")]
            key_latency_s = round(max(sides), 3) if None not in sides else None
        else:
            key_latency_s = round(
                (pass_end_s - last_detection_s) + max(key_written) - run.started_unix_s, 3
            )
    link_report = run.link
    directions = link_report["directions"]
    classical = {
        "down": link_report["bytes"]["satellite_to_ground"],
        "up": link_report["bytes"]["ground_to_satellite"],
    }
    pipeline = "streaming" if streaming else "post-pass"
    figures = {
        "station": station,
        "pipeline": pipeline,
        "stream_speedup": stream_speedup,
        "start_s": round(start_s, 3),
        "pass_visibility_s": link_report["pass_visibility_s"],
        "codes": {"payload_processor": run.codes[0], "ground": run.codes[1]},
        "wall_s": round(run.wall_s, 3),
        "classical_bytes": classical,
        "stream_bytes": link_report.get("stream_bytes"),
        "air_bytes": {d: directions[d]["air_bytes"] for d in ("down", "up")},
        "frames_retransmitted": {d: directions[d]["frames_retransmitted"] for d in ("down", "up")},
        "max_backlog_s": {d: directions[d]["max_backlog_s"] for d in ("down", "up")},
        "outages": link_report["outages"],
        "too_slow": link_report["too_slow"],
        "lost_for_good": link_report["lost_for_good"],
        "lost_reason": link_report["lost_reason"],
        "processor": processor,
        "pattern_memory_reads": processor.get("pattern_memory_reads", 0),
        "onboard_report": str(run.alice_dir.relative_to(out) / "report.json"),
        "key_confirmation": confirmation,
        "logs": ["processor.log", "ground.log", "link.json"],
    }
    if streaming:
        # the ground's rows (docs/streaming.md), pass time from the first detection; the
        # link's column from the link's own record (emulator/link_session.py)
        rows = bob.get("timeline") or []
        timeline = {
            "pipeline": pipeline,
            "rows": rows,
            "key_latency_s": key_latency_s,
            "lag_s_max": bob.get("lag_s_max"),
            "lag_s_median": bob.get("lag_s_median"),
            "loss_of_signal_s": round(last_detection_s - first_detection_s, 3),
            "classical_bytes": classical,
            # the pass closed early for the optical link's end (docs/streaming.md "The
            # link's end"): where, and the detections discarded after it; null without
            "stream_cut": bob.get("stream_cut"),
        }
    else:
        # bits error correction left in agreement (Bob's EC blocks; discarded frames not)
        blocks = (bob.get("ec") or {}).get("blocks") or []
        reconciled = (
            sum(b["bits"] - b.get("bits_discarded", 0) for b in blocks) if blocks else None
        )
        rows = tl.post_pass_timeline(
            detections_s,
            pass_end_s,
            lambda t_s: link.schedule.down_cause(t_s) is None,
            distil_start_s=pass_end_s,
            key_latency_s=key_latency_s,
            stage_seconds=bob.get("stage_seconds") or {},
            sifted_bits=alice.get("sifted_bits"),
            reconciled_bits=reconciled,
        )
        timeline = {
            "pipeline": pipeline,
            "rows": rows,
            "key_latency_s": key_latency_s,
            **tl.lag_figures(rows),
            "loss_of_signal_s": round(pass_end_s, 3),
            "classical_bytes": classical,
        }
    merged = {**alice, **bob}
    for name in ("counts", "sifted_bits", "pa"):
        if merged.get(name) is None and alice.get(name) is not None:
            merged[name] = alice[name]
    if run.codes != (0, 0):
        merged["aborted"] = True
        merged["abort_reason"] = bob.get("abort_reason") or alice.get("abort_reason")
        if link_report["lost_for_good"]:  # the endpoints only saw their channel close
            merged["abort_reason"] = f"{merged['abort_reason']} ({link_report['lost_reason']})"
    return merged, figures, timeline


def link_key_files(out: Path, link_figures: dict) -> list[str]:
    """The keys a link run left: the ground station's (OUT) and the on-board key store's,
    as paths relative to OUT."""
    onboard = out / Path(link_figures["onboard_report"]).parent
    return sorted(str(p.relative_to(out)) for p in (*out.glob("*.key"), *onboard.glob("*.key")))


def run_mission(
    out: Path,
    *,
    target: str = "unix",
    profile_name: str = "micius-2017",
    seed: int = 1,
    budget_s: float = DEFAULT_BUDGET_S,
    generation: str = "head",
    segment_s: float | None = None,
    distil: str | None = None,
    stream_speedup: float | None = 1.0,
    timetransfer: bool = False,
    timetransfer_keys: Path | None = None,
    qrng_key: bytes | None = None,
    tail: str | None = None,
    progress=None,
    uplink_key: bytes | None = None,
) -> dict:
    """Every stage; returns the mission summary (also written to OUT/mission.json).
    `qrng_key`: the emulated head's QRNG key (a test's fixed key: the same pass every run;
    None: os.urandom, as the command line runs). `uplink_key`: the time transfer's ground
    transmitter's pattern key, likewise (its pulses' intensities decide which are
    detected: a test's fixed key fixes the uplink's detections)."""
    from host.distil.protocol import Config
    from host.distil.run import REPORT_NAME, run_local
    from host.mission import ground, report
    from host.simulate import profiles

    if target not in PLANNED_GOODPUT_BYTES_S:
        raise BadInput(f"--target {target!r}: choose unix or qemu")
    if generation not in ("controller", "head"):
        raise BadInput(f"--generation {generation!r}: choose controller or head")
    if distil is None:
        distil = "link" if generation == "head" else "local"
    if distil not in DISTIL_MODES:
        raise BadInput(f"--distil {distil!r}: choose link or local")
    if stream_speedup is not None and not 0 < stream_speedup <= 1000:
        raise BadInput(f"--stream-speedup {stream_speedup}: pass seconds per wall second, >0")
    if generation == "controller" and distil == "link":
        raise BadInput(
            "--distil link needs --generation head: the controller-driven segment's pattern"
            " is downloaded (sealed) and distilled post-pass on the ground (--distil local)"
        )
    if segment_s is not None and (generation != "head" or not segment_s > 0):
        raise BadInput("--segment-s: a positive number of seconds, with --generation head")
    if not budget_s > 0:
        raise BadInput(f"--budget-s {budget_s}: must be positive")
    if out.exists() and not out.is_dir():
        raise BadInput(f"--out {out}: exists and is not a directory")
    if out.exists() and any(out.iterdir()) and not (out / "mission.json").exists():
        raise BadInput(f"--out {out}: not empty and not a previous mission's output")
    profile = profiles.load(profile_name, {})
    # the finite-key tail: the command line's, else the profile's (jinan-1: chernoff)
    tail = tail or profiles.distillation_tail(profile)
    if tail not in profiles.TAILS:
        raise BadInput(f"--tail {tail!r}: choose {' or '.join(profiles.TAILS)}")
    if timetransfer:
        from host.timetransfer.simulate import profile_for

        profile_for(profile["name"])  # bad input now, not after the pass
    if timetransfer_keys is not None and not (
        timetransfer and generation == "head" and distil == "link" and stream_speedup
    ):
        raise BadInput(
            "--timetransfer-keys: the time transfer during the pass needs --timetransfer, "
            "head generation and the streaming distillation over the optical link"
        )
    for stale in ("satellite", "ground", "truth", "onboard"):
        shutil.rmtree(out / stale, ignore_errors=True)
    for stale in (
        "pass.json", "report.json", "mission.json", "mission.png", "link.json",
        "ground.pool", "ground.pool.used", "processor.log", "ground.log", "timetransfer.json",
    ):  # fmt: skip
        (out / stale).unlink(missing_ok=True)
    for stale in [*out.glob("*.key"), *out.glob("*.key.used")] if out.is_dir() else ():
        stale.unlink()
    shutil.rmtree(out / "timetransfer", ignore_errors=True)
    shutil.rmtree(out / "timetransfer-during-pass", ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)

    summary: dict = {
        "format_version": 1,
        "target": target,
        "profile": profile["name"],
        "seed": seed,
        "budget_s": budget_s,
        "generation": generation,
        "distil": distil,
        "stream_speedup": stream_speedup if distil == "link" else None,
        "segment_s": segment_s,
        "stages": {},
        "stage_seconds": {},
    }
    seconds = summary["stage_seconds"]
    stages = summary["stages"]

    say = progress or (lambda message: None)  # stage lines (host/console.py)
    say("orbit: the pass geometry")
    t = time.perf_counter()
    orbit = scenario_summary(profile, seed)
    curve = orbit.pop("_curve")
    pass_slots = orbit["pass_slots"]
    if segment_s is not None:
        if segment_s > orbit["pass_seconds"]:
            raise BadInput(f"--segment-s {segment_s}: the pass lasts {orbit['pass_seconds']} s")
        pass_slots = int(segment_s * float(profile["source"]["slot_rate_hz"]))
    stages["orbit"] = orbit
    seconds["orbit"] = round(time.perf_counter() - t, 3)

    two_way = None
    if timetransfer and generation == "head":  # the uplink goes through the firmware
        from host.timetransfer import mission_stage

        say("timetransfer: the segment's two-way orbit, clocks and uplink")
        t = time.perf_counter()
        two_way = mission_stage.prepare(
            profile, seed, pass_slots // FRAME_SLOTS * FRAME_SLOTS, uplink_key=uplink_key
        )
        seconds["timetransfer_uplink"] = round(time.perf_counter() - t, 3)

    def ground_stage(log, slot_count: int):
        """Bob's detections of the emitted slots (OUT/ground/); the segment's scenario."""
        say("ground: Bob's detections of the emitted slots")
        t = time.perf_counter()
        scenario = ground.make_segment_scenario(profile, seed, slot_count, two_way)
        truth = ground.write_ground(out, scenario, log)
        rate = scenario.slot_rate_hz
        begin_s = float(scenario.geometry.source.get("cropped_from_s", [0.0])[0])
        stages["ground"] = {
            "segment_start_s": round(begin_s, 6),
            "segment_seconds": slot_count / rate,
            "segment_utc_start": scenario.geometry.utc_start.isoformat().replace("+00:00", "Z"),
            "slots": slot_count,
            "detections": truth["detections"],
            "detections_by_kind": truth["detections_by_kind"],
            "link_loss_db": {k: v["link_loss_db"] for k, v in truth["events"].items()},
            "single_photon_sifted": truth.get("single_photon_sifted"),
        }
        seconds["ground"] = round(time.perf_counter() - t, 3)
        return scenario

    def distil_link(head, scenario, slot_count: int, live_logs=None):
        """Alice on the payload processor, Bob at the station, over the optical link; the
        time transfer during the pass beside them (`live_logs`: the PassAtItsPace going by
        while they run, whose controller's logs the time transfer reads as written)."""
        say(
            f"distil: Alice on the payload processor, Bob at {scenario.station['name']},"
            " over the optical link"
        )
        beside = during = None
        if two_way is not None and timetransfer_keys is not None:
            from host.timetransfer import mission_stage

            say("timetransfer: during the pass, on the optical link's second stream")
            beside, during = mission_stage.beside_the_distillation(
                out, two_way, scenario, head, slot_count, Path(timetransfer_keys),
                stream_speedup, live_logs=live_logs,
            )  # fmt: skip
        distilled, stages["link"], timeline = distil_over_optical_link(
            out, head, scenario, slot_count, profile_name, seed, stream_speedup, tail,
            beside=beside,
        )  # fmt: skip
        if during is not None:
            stages["timetransfer_during_pass"] = mission_stage.during_pass_figures(out, during)
        return distilled, timeline

    def guarded(distillation):
        """(report or None, outcome, timeline or None): an abort by design is an outcome."""
        try:
            distilled, timeline = distillation()
            outcome = {
                "aborted": bool(distilled["aborted"]),
                "abort_reason": distilled.get("abort_reason"),
            }
        except ProtocolAborted as error:
            distilled, timeline = None, None
            outcome = {"aborted": True, "abort_reason": str(error)}
        return distilled, outcome, timeline

    at_its_pace = None
    if two_way is not None and timetransfer_keys is not None and target == "unix":
        # the time transfer during the pass reads the controller's logs as they are
        # written: the pass goes by at its pace while the ground, the distillation and the
        # time transfer run (PassAtItsPace); the QEMU target's storage is inside the
        # emulator, so there the pass goes by at once and the logs are downloaded first
        from emulator.pattern_generator import PlannedTruth

        def during(pace):
            slot_count = pace.slot_count
            scenario = ground_stage(PlannedTruth(pace.generator.memory, slot_count), slot_count)
            t = time.perf_counter()
            result = guarded(lambda: distil_link(pace.head, scenario, slot_count, pace))
            seconds["distil"] = round(time.perf_counter() - t, 3)
            return scenario, slot_count, result

        at_its_pace = PassAtItsPace(stream_speedup, during)

    say(f"firmware on {target}: boot, pass mode, download (budget {budget_s:g} s)")
    t = time.perf_counter()
    try:
        head, generator, fw = run_firmware(
            target, profile, seed, budget_s, out / "satellite", generation, pass_slots,
            uplink=two_way.tdc_feed() if two_way is not None else None, qrng_key=qrng_key,
            at_its_pace=at_its_pace,
        )  # fmt: skip
    except Exception as error:  # the link's and the target's errors alike
        summary["failed"] = f"firmware/download: {type(error).__name__}: {error}"
        summary["exit_code"] = 1
        report.write(out, summary, curve, None)
        raise StageFailed(summary["failed"]) from error
    stages.update(fw)
    seconds["firmware_and_download"] = round(time.perf_counter() - t, 3)

    product = out / "satellite" / "patterns.qrec"
    if generator is not None:
        runs = pattern_runs_from_log(product)
        if not runs:
            raise StageFailed("firmware: head generation logged no PATTERN_RUN record")
        last = runs[-1]
        # the controller's record of the run against what the head generated
        same = (
            last["first_frame"] == generator.first_frame
            and last["frames"] == generator.frames()
            and last["frame_slots"] == generator.run.frame_slots
            and last["thresholds"] == generator.thresholds
        )
        stages["firmware"]["pattern_log"] = {"records": "PATTERN_RUN", "equals_emitted": same}
        slot_count = last["frames"] * last["frame_slots"]
    else:
        log = PatternLog(product)
        stages["firmware"]["pattern_log"] = check_pattern_log(head, log)
        slot_count = int(log.frame_first_slot[-1] + log.frame_slot_count[-1])
        del head

    timeline = None
    t = time.perf_counter()
    if at_its_pace is not None:
        scenario, planned_slots, (distilled, outcome, timeline) = at_its_pace.result
        if slot_count != planned_slots:  # the ground simulated the run the head planned
            raise StageFailed(
                f"firmware: the controller logged a run of {slot_count} slots, the pass at "
                f"its pace planned {planned_slots}"
            )
        stages["firmware"]["pattern_memory_reads"] = stages["link"]["pattern_memory_reads"]
    else:
        # the photons carry the emitted symbols (ground simulation)
        scenario = ground_stage(generator.truth() if generator is not None else log, slot_count)
        t = time.perf_counter()  # the distillation's seconds from here
        if generator is None:
            say("distil: Alice and Bob on the ground, post-pass, from the sealed product")
            distilled, outcome, _ = guarded(
                lambda: (run_local(out, out, Config(tail=tail), progress=progress), None)
            )
        elif distil == "local":
            say("distil: Alice and Bob in this process (reference mode)")
            # Alice reads the head's pattern memory over its port, on board; the pattern
            # never reached satellite/ or the ground link
            with HeadServer(head) as server:
                with PatternMemoryClient(server.pattern_address, slot_count) as memory:
                    distilled, outcome, _ = guarded(
                        lambda: (
                            run_local(
                                out, out, Config(tail=tail), alice_patterns=memory,
                                progress=progress,
                            ),
                            None,
                        )
                    )  # fmt: skip
                    stages["firmware"]["pattern_memory_reads"] = memory.requests
        else:
            distilled, outcome, timeline = guarded(lambda: distil_link(head, scenario, slot_count))
            if "link" in stages:
                reads = stages["link"]["pattern_memory_reads"]
                stages["firmware"]["pattern_memory_reads"] = reads
    if distil == "local" and (out / REPORT_NAME).exists():
        distilled = json.loads((out / REPORT_NAME).read_text())
    stages["distil"] = report.distil_figures(distilled, outcome, out)
    if distil == "link":
        stages["distil"]["key_files"] = link_key_files(out, stages["link"])
    # at its pace, the distillation's own seconds were counted while the pass went by
    seconds["distil"] = round(seconds.get("distil", 0.0) + time.perf_counter() - t, 3)
    if timeline is not None:
        summary["timeline"] = timeline["rows"]
        summary.update({k: v for k, v in timeline.items() if k != "rows"})

    if timetransfer:  # post-pass, sealed with the key just made (docs/time-transfer.md)
        from host.timetransfer.mission_stage import run_stage

        say("timetransfer: satellite and ground endpoints")
        t = time.perf_counter()
        onboard = out  # Alice's key: the on-board key store after a link distillation
        if "link" in stages:
            onboard = out / Path(stages["link"]["onboard_report"]).parent
        if two_way is None:
            stages["timetransfer"] = run_stage(
                out, profile["name"], seed, stages["ground"]["segment_seconds"],
                key_made=not stages["distil"]["aborted"], satellite_keys=onboard,
                uplink_key=uplink_key,
            )  # fmt: skip
        else:  # the satellite reads its symbols on board, over the pattern-memory port
            with HeadServer(head) as server:
                with PatternMemoryClient(server.pattern_address, slot_count) as memory:
                    stages["timetransfer"] = run_stage(
                        out, profile["name"], seed, stages["ground"]["segment_seconds"],
                        key_made=not stages["distil"]["aborted"], satellite_keys=onboard,
                        mission=two_way, qkd_scenario=scenario, memory=memory,
                    )  # fmt: skip
        seconds["timetransfer"] = round(time.perf_counter() - t, 3)

    t = time.perf_counter()
    seconds["report"] = 0.0
    # like distil: no key is exit 3 (the reason is in the summary and report.json), and so
    # is a time transfer asked for and not vouched for
    aborted = (
        stages["distil"]["aborted"]
        or stages.get("timetransfer", {}).get("aborted")
        or stages.get("timetransfer_during_pass", {}).get("aborted")
    )
    summary["exit_code"] = 3 if aborted else 0
    report.write(out, summary, curve, scenario)
    seconds["report"] = round(time.perf_counter() - t, 3)
    seconds["total"] = round(sum(v for k, v in seconds.items() if k != "total"), 3)
    report.write_json(out, summary)
    return summary

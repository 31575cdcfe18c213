# The payload data path behind the ground link's mission hook (docs/ground-link.md,
# "Contract with the data path"): configure / start / stop / status, and the duties the
# main loop's scheduler runs (docs/scheduling.md):
#   bus        unsolicited payload-bus frames (the link's bus loopback test)
#   sequencer  refill the laser driver's back pattern bank, log each frame (sequencer.py)
#   tdc        drain the TDC FIFO into the ring, spool blocks (tdc.py)
#   clock      PPS discipline of the local clock (tdc.py)
#   hk         housekeeping records (every HK_PERIOD_US during a pass)
#   sync       syncs the low-rate logs (clock, epochs, housekeeping, tracking), one a pass
#              when its oldest unsynced record is the store's sync age old (storage.py)
#   trk, trk-tm the pointing loop and its telemetry product, added when a pass
#              configuration carries a "tracking" section (docs/tracking.md)
# Bad parameters raise ValueError (sequencer.ConfigError), a command that does not fit
# the state raises RuntimeError; the link sends the message to the ground.
import gc
import json

from micropython import const

from payload import bus as busmod
from payload import headgen, sequencer, storage, tdc
from payload.waits import TIMER_LOOP_STOP_US

HK_PERIOD_US = const(100_000)
CONFIG_KEYS = (
    "intensity_probabilities",
    "intensity_names",
    "intensities",  # the laser's mean photon numbers, logged in PATTERN_CONFIG
    "basis_probability_z",
    "slot_rate_hz",
    "frame_slots",
    "pps_period_ps",
    "tdc",
    "tracking",
    "pattern_generation",
    "tracking_predictions",  # a chunk of a full-pass prediction, sent alone (below)
)
# A whole pass's uploaded prediction, in storage beside the products (not one of them): the
# tracking loop pages it into a window (docs/tracking.md "Full-pass prediction upload")
PREDICTION_FILE = "/prediction.bin"
GENERATION_MODES = ("controller", "head")  # who maps QRNG words to symbols (headgen.py)


class Housekeeping:
    """Reads the head's sensors and appends a HOUSEKEEPING record (JSON object)."""

    def __init__(self, mission):
        self.mission = mission
        self.bus = mission.bus
        # deferred: synced by the store's sync duty, not per record (docs/storage.md)
        # (its record buffer shared with the tracking product's: each fills and commits
        # in one call)
        self.log = mission.store.open_log(
            "housekeeping", storage.KIND_HOUSEKEEPING, 1024, deferred=True, shared=True
        )
        self.running = False
        self.records = 0

    def step(self):
        if not self.running:
            return False
        mission = self.mission
        if mission.generation == "head":
            mission.generator.check()  # the head QRNG's health tests (headgen.py)
        return self.record()

    def record(self):
        mission = self.mission
        mission.tdc.read_overflow()
        if self.bus.read(busmod.REG_HK_LASER_POWER_UW, busmod.HK_REGS) != busmod.OK:
            return False
        w = self.bus.words
        temps = [w[1], w[2], w[3]]
        for i in range(3):  # registers hold two's complement milli-degrees
            if temps[i] & 0x80000000:
                temps[i] -= 1 << 32
        entry = {
            "t_us": mission.board.clock.now_us(),
            "laser_power_uw": w[0],
            "temp_laser_mc": temps[0],
            "temp_tdc_mc": temps[1],
            "temp_board_mc": temps[2],
            "frames_sent": mission.sequencer.frames_sent,
            "tdc_lost": mission.tdc.telemetry()["lost"],
        }
        self.log.append(json.dumps(entry).encode())
        self.records += 1
        return True


class Mission:
    def __init__(self, board, storage_root):
        self.board = board
        self.store = storage.Storage(
            storage_root,
            getattr(board, "STORAGE_QUOTA_BYTES", -1),
            getattr(board, "STORAGE_RECORDS_PER_SYNC", storage.RECORDS_PER_SYNC),
            board.clock,  # the low-rate logs are synced by age on it (sync_step)
            getattr(board, "STORAGE_SYNC_AGE_US", storage.SYNC_AGE_US),
            (PREDICTION_FILE[1:],),  # the uploaded prediction shares the products' quota
            board.STORAGE_MEDIUM,  # the reserve kept out of the quota follows it
        )
        self.bus = busmod.Bus(board.payload_bus, board.clock, timeout_us=board.BUS_TIMEOUT_US)
        self.sequencer = sequencer.Sequencer(self.bus, self.store)
        # the ring between the TDC FIFO and storage: a board with little RAM sets a
        # smaller one (netduino2: 512 events, docs/targets.md)
        ring_events = getattr(board, "TDC_RING_EVENTS", tdc.RING_EVENTS)
        self.tdc = tdc.TdcDrain(self.bus, self.store, ring_events=ring_events)
        self.discipline = tdc.ClockDiscipline(self.tdc, self.store)
        self.epochs = tdc.EmissionEpochs(self.tdc, self.store)
        self.hk = Housekeeping(self)
        self.generator = headgen.HeadGenerator(self.bus, self.sequencer)
        self.generation = "controller"
        self.pass_running = False
        self.time_scale_ppm = None
        self.scheduler = None  # set by duties(): the loop that runs them, for telemetry
        self.tracking = None  # tracking_duty.TrackingDuty once a pass tracks
        self.tracking_product = None

    def duties(self, sched):
        """Add the data path's duties to the main loop's scheduler."""
        self.scheduler = sched
        sched.add("bus", self.bus.poll)
        sched.add("sequencer", self.sequencer.step)
        sched.add("tdc", self.tdc.step)
        sched.add("clock", self.discipline.step)
        sched.add("epochs", self.epochs.step)
        sched.add("hk", self.hk.step, HK_PERIOD_US)
        # the low-rate logs' syncs, one log a pass when its oldest record is due
        sched.add("sync", self.store.sync_step)

    def configure(self, config):
        """Validate and apply a pass configuration (ValueError names the bad field)."""
        if self.pass_running:
            raise RuntimeError("a pass is running: stop it first")
        for key in config:
            if key not in CONFIG_KEYS:
                raise sequencer.ConfigError("config: unknown key %r" % (key,))
        # Configuring allocates what the pass keeps (the tracker's state, the prediction
        # table). Collect first, while no pass runs: the blocks then go to the low,
        # compacted end of the heap instead of between the survivors of the last automatic
        # collection, which the link's traffic leaves scattered (docs/targets.md, "RAM
        # budget": 258 KB free in blocks of at most 9.4 KB after a full-pass upload).
        gc.collect()
        if "tracking_predictions" in config:
            self._stage_predictions(config)
            return
        scale = self.bus.read1(busmod.REG_TIME_SCALE_PPM)
        if scale < 0:
            raise RuntimeError("optical head does not answer on the payload bus")
        # everything is checked before anything is applied: a refused configuration
        # leaves the previous one in force
        tdc_cfg = config.get("tdc", {})
        if not isinstance(tdc_cfg, dict):
            raise sequencer.ConfigError("tdc: need an object")
        bursts = tdc_cfg.get("bursts_per_step", 1)
        if not isinstance(bursts, int) or not 1 <= bursts <= 64:
            raise sequencer.ConfigError("tdc.bursts_per_step: need an integer in [1, 64]")
        pps = config.get("pps_period_ps", tdc.PS_PER_S)
        if not isinstance(pps, int) or pps <= 0:
            raise sequencer.ConfigError("pps_period_ps: need a positive integer")
        generation = config.get("pattern_generation", "controller")
        if generation not in GENERATION_MODES:
            raise sequencer.ConfigError(
                "pattern_generation: %r is not controller or head" % (generation,)
            )
        tracker = None
        if "tracking" in config:
            rate_limit_hz = getattr(self.board, "TRACKING_LOOP_RATE_HZ", 0)
            tracker = _tracker_from(
                config["tracking"],
                getattr(self, "_predictions", None),
                rate_limit_hz,
                getattr(self.board, "TRACKING_TELEMETRY_SLOTS", 256),
                getattr(self.board, "TRACKING_PREDICTION_WINDOW_NODES", 16),
            )
            from payload import tracking_duty

            # a rate that needs the loop's fast path is refused when it is off
            tracking_duty.TrackingDuty.check_loop_rate(self.bus, tracker, rate_limit_hz)
        # head generation: the FPGA maps at the slot clock, the controller's capacity does
        # not bound the slot rate
        self.sequencer.keep_controller_buffers(generation == "controller")
        try:
            self.sequencer.configure(config, 0 if generation == "head" else scale)
        except BaseException:
            # refused: the previous configuration stays in force, with its buffers (a
            # refused head configuration had freed a configured controller pass's)
            self.sequencer.keep_controller_buffers(self.generation == "controller")
            raise
        self.generation = generation
        if tracker is not None:
            self._attach_tracking(tracker)
        self.tdc.bursts_per_step = bursts
        self.discipline.pps_period_ps = pps
        self.time_scale_ppm = scale

    def _stage_predictions(self, config):
        # A full pass's prediction does not fit one configure telecommand: it arrives as
        # configure telecommands holding only {"tracking_predictions": {"first", "total",
        # "hex"}} (docs/tracking.md "Full-pass prediction upload"); the configuration's
        # tracking section then names it by node count and CRC-32.
        from payload import tracking

        if len(config) != 1:
            raise tracking.ConfigError("tracking_predictions: send it alone")
        chunk = config["tracking_predictions"]
        if not isinstance(chunk, dict) or not isinstance(chunk.get("hex"), str):
            raise tracking.ConfigError("tracking_predictions: need first, total and hex")
        try:
            packed = bytes.fromhex(chunk["hex"])
        except ValueError:
            raise tracking.ConfigError("tracking_predictions.hex: not hexadecimal") from None
        if getattr(self, "_predictions", None) is None:
            self._predictions = tracking.PredictionUpload(
                self.store.root + PREDICTION_FILE, self.store
            )
        if chunk.get("first") == 0 and self.tracking is not None:
            # a new upload overwrites the file the configured loop pages from: that
            # configuration no longer has its prediction (a start is refused until the
            # pass is configured again, naming the new upload)
            self.tracking.tracker.release_predictions()
        self._predictions.add(chunk.get("first"), chunk.get("total"), packed)

    def _attach_tracking(self, tracker):
        from payload import tracking_duty

        if self.tracking is not None:
            self.tracking.tracker.release_predictions()  # the loop it replaces
        if self.tracking is None:
            self.tracking = tracking_duty.TrackingDuty(self.bus, tracker)
            self.tracking_product = tracking_duty.TrackingProduct(tracker, self.store)
            # The loop's period from the board's timer interrupt over its own tracking
            # link where the board has both (the MCU images with the link wired: the
            # period preempts any duty, docs/scheduling.md "The loop on a timer
            # interrupt"), else the scheduler's paced duty (unix; no link)
            link = getattr(self.board, "tracking_link", None)
            irqtimer = tracking_duty.timer_interrupt() if link is not None else None
            if irqtimer is not None and self.tracking.path() == 1:
                self.tracking.timer_loop = tracking_duty.TimerLoop(
                    self.tracking, link, irqtimer, _reply_wait_us(self.board)
                )
            if self.scheduler is not None:
                # short names: the status travels in one housekeeping packet. The loop is
                # the scheduler's paced duty: one period every loop period, before any
                # other duty once due (docs/scheduling.md "The paced loop")
                if self.tracking.timer_loop is None:
                    period, period_arg = self.tracking.paced_step()
                    self.tracking.pacer = self.scheduler.set_loop(
                        "trk", period, tracker.cfg[0], period_arg
                    )
                    self.scheduler.add("trk-tm", self._tracking_background)
                else:  # the same duty, which also restarts a timer its callback stopped
                    self.scheduler.add("trk-tm", self._tracking_product_and_timer)
        else:  # a new pass configuration: same duties, new loop
            self.tracking.attach(tracker)
            self.tracking_product.attach(tracker)
            if self.tracking.pacer is not None:
                self.tracking.pacer.period_us = tracker.cfg[0]

    def _tracking_product_and_timer(self):
        # (not a duty of its own: each duty's name and worst call go into the housekeeping
        # report, which is near its packet's length in a pass)
        restarted = self.tracking.timer_loop.supervise()
        return self._tracking_background() or restarted

    def _tracking_background(self):
        # the prediction's pager first (the window ahead of the loop), then the product
        paged = self.tracking.tracker.page()
        return self.tracking_product.step() or paged

    def start(self):
        if self.pass_running:
            raise RuntimeError("a pass is already running")
        if self.sequencer.config is None:
            raise RuntimeError("not configured")
        if self.tracking is not None:
            # the loop's window from the pass's first node, before anything starts: a
            # prediction replaced or unreadable refuses the start
            from payload import tracking

            try:
                self.tracking.tracker.fill_window(0)
            except tracking.ConfigError as error:
                raise RuntimeError(str(error)) from None
        for log in self.store.logs.values():
            if log.foreign:
                raise RuntimeError("%s is not a record log: delete it first" % log.path)
        if self.tdc.start() != busmod.OK:
            raise RuntimeError("optical head: TDC_CTRL failed (see bus counters)")
        self.epochs.start()
        try:
            if self.generation == "head":
                self.generator.start()
            else:
                self.sequencer.start()
        except sequencer.ConfigError as error:
            self.tdc.stop()
            raise RuntimeError(str(error)) from None
        self.hk.running = True
        self.hk.record()
        if self.tracking is not None:
            self.tracking.tracker.start()
            if self.tracking.timer_loop is not None:
                self.tracking.timer_loop.start(self.tracking.tracker.cfg[0])
        self.pass_running = True

    def stop(self):
        """Let the last committed frame go out, drain the TDC, flush every log."""
        if not self.pass_running:
            raise RuntimeError("no pass is running")
        if self.generation == "head":
            self.generator.stop()
        else:
            self.sequencer.stop()
        self.tdc.stop()
        if self.tracking is not None:
            self.tracking.tracker.stop()
            timer_loop = self.tracking.timer_loop
            if timer_loop is not None:  # the interrupt's next periods act on the stop
                ticks, ticks_arg = self.board.clock.ticks_source()
                timer_loop.stop(ticks, ticks_arg, TIMER_LOOP_STOP_US)
            else:
                self.tracking.step()  # the loop acts on the stop at its next period
            self.tracking_product.flush()
        self.discipline.step()
        self.epochs.step()
        self.hk.record()
        self.store.sync()  # the batched logs' last records: durable before stop reports
        self.hk.running = False
        self.pass_running = False

    def status(self):
        """Compact telemetry (it travels in one housekeeping packet)."""
        bus = self.bus
        seq = self.sequencer.telemetry()
        seq.pop("next_frame", None)
        out = {
            "pass_running": self.pass_running,
            "time_scale_ppm": self.time_scale_ppm,
            "sequencer": seq,
            "tdc": self.tdc.telemetry(),
            "clock": self.discipline.telemetry(),
            "bus": {
                "transactions": bus.transactions,
                "timeouts": bus.timeouts,
                "retransmissions": bus.retransmissions,
                "bad_replies": bus.bad_replies,
                "error_status": bus.error_status,
                # TRACK replies of the paced loop (Bus.counters' track_replies; not
                # counted in frames): a short name, the report is near its packet's limit
                "track": bus.track_replies,
                "frames_dropped": bus.rx.dropped(),
            },
            "storage": self.store.status(),
        }
        if bus.skipped:  # transactions not tried: the head timed out earlier in the pass
            out["bus"]["skipped"] = bus.skipped
        if self.generation == "head":
            out["generator"] = self.generator.telemetry()
        if self.tracking is not None:
            out["tracking"] = self.tracking.status()
        if self.scheduler is not None:
            duties = list(self.scheduler.duties)
            if self.scheduler.loop is not None:
                duties.append(self.scheduler.loop)
            out["worst_us"] = {d.name: d.worst_us for d in duties}
            if self.tracking is not None and self.tracking.timer_loop is not None:
                # the loop's jitter: the interrupt's latest entry after its period's expiry
                out["worst_us"]["trk"] = self.tracking.timer_loop.irqtimer.counters()[3]
            errors = {d.name: d.last_error for d in duties if d.errors}
            if self.tracking is not None and self.tracking.timer_loop is not None:
                # the interrupt's callback raised (the timer stopped; restarted by the
                # trk-tm duty at most 3 times a pass): kept for the pass
                error = self.tracking.timer_loop.error_text()
                if error is not None:
                    errors["trk"] = error
            if errors:
                out["duty_errors"] = errors
        return out


def _reply_wait_us(board):
    """How long into its period the timer interrupt's loop polls for a TRACK reply on its
    way: board.TRACKING_REPLY_WAIT_US, unless mission.REPLY_WAIT_US is set (a benchmark's
    instrumentation compares values)."""
    if REPLY_WAIT_US is not None:
        return REPLY_WAIT_US
    return getattr(board, "TRACKING_REPLY_WAIT_US", 0)


REPLY_WAIT_US = None


def _tracker_from(section, upload=None, rate_limit_hz=0, telemetry_slots=256, window_nodes=16):
    """A Tracker from a configuration's "tracking" section: {"parameters": {...},
    "predictions": [[x, y, vx, vy, ax, ay, pa_x, pa_y], ...]} or, for a full pass
    uploaded beforehand, "predictions": {"nodes": N, "crc32": C} (docs/tracking.md).
    The parameters go over the gain set of the loop's rate: the rate they name, else the
    rate the board's pass-mode loop sustains (board.TRACKING_LOOP_RATE_HZ; a rate above it
    is refused), else 2 kHz (tracking.parameters_for_rate).
    telemetry_slots: the loop's telemetry ring (board.TRACKING_TELEMETRY_SLOTS);
    window_nodes: the uploaded prediction's nodes kept resident (tracking.WINDOW_NODES).
    Raises ValueError (tracking.ConfigError) naming the field. Imported only when a pass
    tracks: the loop's code costs RAM on the unix target."""
    from payload import tracking

    if not isinstance(section, dict) or "predictions" not in section:
        raise tracking.ConfigError("tracking: need an object with 'predictions'")
    try:
        changes = section.get("parameters") or {}
        if not isinstance(changes, dict):
            raise tracking.ConfigError("tracking.parameters: need an object")
        tracker = tracking.Tracker(
            tracking.parameters_for_rate(changes, rate_limit_hz), None, telemetry_slots
        )
        predictions = section["predictions"]
        if isinstance(predictions, dict):
            if upload is None or upload.received != predictions.get("nodes"):
                raise tracking.ConfigError(
                    "tracking.predictions: %r nodes named, %d uploaded"
                    % (predictions.get("nodes"), upload.received if upload else 0)
                )
            if upload.crc32() != predictions.get("crc32"):
                raise tracking.ConfigError("tracking.predictions: CRC-32 of the upload differs")
            tracker.load_table(upload, window_nodes)
        else:
            tracker.load_predictions(predictions)
    except TypeError as error:  # a non-numeric value where a number belongs
        raise tracking.ConfigError("tracking: %s" % error) from None
    return tracker

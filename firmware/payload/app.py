# The payload controller's main program: one scheduler loop (scheduler.py) running the
# duties as step functions (docs/scheduling.md):
#   ground     service the ground link (diagnostic service below)
#   bus        unsolicited payload-bus frames (diagnostic echo)
#   sequencer  refill the laser driver's back pattern bank, log each frame (sequencer.py)
#   tdc        drain the TDC FIFO into the ring, spool blocks (tdc.py)
#   clock      PPS discipline of the local clock (tdc.py)
#   hk         housekeeping records (every HK_PERIOD_US during a pass)
# More duties (tracking) join with one `scheduler.add(name, step)` in Controller.__init__.
#
# Diagnostic service on the ground link (docs/framing.md), one frame body per request,
# reply kind = request kind | 0x80:
#   0x01                 version query  -> "qkdsat-fw <version> <board>"
#   0x02 <data>          bus echo       -> <data> goes out as a payload-bus frame; the
#                                          frame that comes back is returned as 0x82 <data>
#   0x03 <json>          configure pass -> JSON {"ok": bool, "reason": str|null, ...}
#   0x04                 start pass     -> JSON {"ok", "reason"}
#   0x05                 stop pass      -> JSON {"ok", "reason"} (after draining and flushing)
#   0x06                 status         -> JSON telemetry
#   0x07                 product list   -> JSON [[name, bytes, crc32], ...]
#   0x08 name_len:u8 name offset:u32 max:u16  read product bytes -> offset:u32 data
# The CCSDS telecommand service (docs/ground-link) calls the same Controller methods.
import json

from micropython import const

from payload import bus as busmod
from payload import framing, scheduler, sequencer, storage, tdc
from payload.version import FIRMWARE_VERSION

MAX_FRAME_BODY_BYTES = const(2048)
HK_PERIOD_US = const(100_000)
_DIAG_VERSION = const(0x01)
_DIAG_BUS_ECHO = const(0x02)
_DIAG_CONFIGURE = const(0x03)
_DIAG_START = const(0x04)
_DIAG_STOP = const(0x05)
_DIAG_STATUS = const(0x06)
_DIAG_PRODUCTS = const(0x07)
_DIAG_READ = const(0x08)
_REPLY_FLAG = const(0x80)
_READ_MAX = const(900)


class Housekeeping:
    """Reads the head's sensors and appends a HOUSEKEEPING record (JSON object)."""

    def __init__(self, bus, store, controller):
        self.bus = bus
        self.controller = controller
        self.log = store.open_log("housekeeping", storage.KIND_HOUSEKEEPING, 1024)
        self.running = False
        self.records = 0

    def step(self):
        if not self.running:
            return False
        return self.record()

    def record(self):
        self.controller.tdc.read_overflow()
        if self.bus.read(busmod.REG_HK_LASER_POWER_UW, busmod.HK_REGS) != busmod.OK:
            return False
        w = self.bus.words
        temps = [w[1], w[2], w[3]]
        for i in range(3):  # registers hold two's complement milli-degrees
            if temps[i] & 0x80000000:
                temps[i] -= 1 << 32
        entry = {
            "t_us": self.controller.board.clock.now_us(),
            "laser_power_uw": w[0],
            "temp_laser_mc": temps[0],
            "temp_tdc_mc": temps[1],
            "temp_board_mc": temps[2],
            "frames_sent": self.controller.sequencer.frames_sent,
            "tdc_lost": self.controller.tdc.telemetry()["lost"],
        }
        self.log.append(json.dumps(entry).encode())
        self.records += 1
        return True


class Controller:
    def __init__(self, board, storage_root=None):
        self.board = board
        root = storage_root or board.mount_storage()
        self.store = storage.Storage(root)
        self.ground_rx = framing.FrameReader(MAX_FRAME_BODY_BYTES)
        self.ground_tx = framing.FrameWriter(MAX_FRAME_BODY_BYTES)
        self.bus = busmod.Bus(board.payload_bus, board.clock)
        self.bus.on_unsolicited = self.on_bus_frame
        self.sequencer = sequencer.Sequencer(self.bus, self.store)
        self.tdc = tdc.TdcDrain(self.bus, self.store)
        self.discipline = tdc.ClockDiscipline(self.tdc, self.store)
        self.hk = Housekeeping(self.bus, self.store, self)
        self.pass_running = False
        self.time_scale_ppm = None
        self._chunk = bytearray(256)
        self._reply = bytearray(MAX_FRAME_BODY_BYTES)
        self.version_text = ("qkdsat-fw %s %s" % (FIRMWARE_VERSION, board.NAME)).encode()
        self.scheduler = scheduler.Scheduler(board.clock)
        self.scheduler.add("ground", self.poll_ground)
        self.scheduler.add("bus", self.bus.poll)
        self.scheduler.add("sequencer", self.sequencer.step)
        self.scheduler.add("tdc", self.tdc.step)
        self.scheduler.add("clock", self.discipline.step)
        self.scheduler.add("hk", self.hk.step, HK_PERIOD_US)
        # Tracking joins when a configuration carries a "tracking" section (docs/tracking.md).
        self.tracking = None
        self.tracking_product = None

    # ---------------------------------------------------------------- pass control

    def configure(self, config):
        """Validate and apply a pass configuration; returns (ok, reason)."""
        if self.pass_running:
            return False, "a pass is running: stop it first"
        scale = self.bus.read1(busmod.REG_TIME_SCALE_PPM)
        if scale < 0:
            return False, "optical head does not answer on the payload bus"
        tracker = None
        if "tracking" in config:  # validated first: a refusal leaves everything unchanged
            tracker, reason = _tracker_from(config["tracking"])
            if tracker is None:
                return False, reason
        try:
            self.sequencer.configure(config, scale)
            tdc_cfg = config.get("tdc", {})
            bursts = tdc_cfg.get("bursts_per_step", 1)
            if not isinstance(bursts, int) or not 1 <= bursts <= 64:
                raise sequencer.ConfigError("tdc.bursts_per_step: need an integer in [1, 64]")
            pps = config.get("pps_period_ps", tdc.PS_PER_S)
            if not isinstance(pps, int) or pps <= 0:
                raise sequencer.ConfigError("pps_period_ps: need a positive integer")
        except sequencer.ConfigError as error:
            return False, str(error)
        if tracker is not None:
            self._attach_tracking(tracker)
        self.tdc.bursts_per_step = bursts
        self.discipline.pps_period_ps = pps
        self.time_scale_ppm = scale
        return True, None

    def _attach_tracking(self, tracker):
        from payload import tracking_duty

        if self.tracking is None:
            self.tracking = tracking_duty.TrackingDuty(self.bus, tracker)
            self.tracking_product = tracking_duty.TrackingProduct(tracker, self.store)
            self.scheduler.add("tracking", self.tracking.step)
            self.scheduler.add("tracking-telemetry", self.tracking_product.step)
        else:  # a new pass configuration: same duties, new loop
            self.tracking.attach(tracker)
            self.tracking_product.attach(tracker)

    def start_pass(self):
        if self.pass_running:
            return False, "a pass is already running"
        if self.sequencer.config is None:
            return False, "not configured"
        if self.tracking is not None:
            self.tracking.tracker.start()
        self.tdc.start()
        self.sequencer.start()
        self.hk.running = True
        self.hk.record()
        self.pass_running = True
        return True, None

    def stop_pass(self):
        if not self.pass_running:
            return False, "no pass is running"
        self.sequencer.stop()
        self.tdc.stop()
        if self.tracking is not None:
            self.tracking.tracker.stop()
            self.tracking.step()  # the loop acts on the stop at its next period
            self.tracking_product.flush()
        self.discipline.step()
        self.hk.record()
        self.hk.running = False
        self.pass_running = False
        return True, None

    def telemetry(self):
        return {
            "pass_running": self.pass_running,
            "time_scale_ppm": self.time_scale_ppm,
            "sequencer": self.sequencer.telemetry(),
            "tdc": self.tdc.telemetry(),
            "clock": self.discipline.telemetry(),
            "bus": self.bus.counters(),
            "ground_frames_dropped": self.ground_rx.dropped(),
            "duties": self.scheduler.telemetry(),
            "tracking": self.tracking.telemetry() if self.tracking is not None else None,
            "storage_recovery": {
                name: log.recovery.as_dict() for name, log in self.store.logs.items()
            },
        }

    # ---------------------------------------------------------------- ground link

    def send_ground(self, body, length):
        _write_all(self.board.ground_link, self.ground_tx.encode(body, length))

    def send_bus(self, body, length):
        _write_all(self.board.payload_bus, self.bus.tx.encode(body, length))

    def _reply_json(self, kind, obj):
        text = json.dumps(obj).encode()
        if len(text) + 1 > MAX_FRAME_BODY_BYTES:
            text = json.dumps({"ok": False, "reason": "reply too long"}).encode()
        reply = self._reply
        reply[0] = kind | _REPLY_FLAG
        reply[1 : 1 + len(text)] = text
        self.send_ground(reply, 1 + len(text))

    def on_ground_frame(self, body):
        if len(body) == 0:
            return
        kind = body[0]
        reply = self._reply
        if kind == _DIAG_VERSION:
            reply[0] = _DIAG_VERSION | _REPLY_FLAG
            text = self.version_text
            reply[1 : 1 + len(text)] = text
            self.send_ground(reply, 1 + len(text))
        elif kind == _DIAG_BUS_ECHO:
            self.send_bus(body[1:], len(body) - 1)
        elif kind == _DIAG_CONFIGURE:
            try:
                config = json.loads(bytes(body[1:]))
                if not isinstance(config, dict):
                    raise ValueError("not a JSON object")
            except ValueError as error:
                self._reply_json(kind, {"ok": False, "reason": "config: bad JSON: %s" % error})
                return
            ok, reason = self.configure(config)
            self._reply_json(kind, {"ok": ok, "reason": reason})
        elif kind == _DIAG_START:
            ok, reason = self.start_pass()
            self._reply_json(kind, {"ok": ok, "reason": reason})
        elif kind == _DIAG_STOP:
            ok, reason = self.stop_pass()
            self._reply_json(kind, {"ok": ok, "reason": reason})
        elif kind == _DIAG_STATUS:
            self._reply_json(kind, self.telemetry())
        elif kind == _DIAG_PRODUCTS:
            self._reply_json(kind, [list(p) for p in self.store.products()])
        elif kind == _DIAG_READ:
            self._read_product(body)

    def _read_product(self, body):
        reply = self._reply
        reply[0] = _DIAG_READ | _REPLY_FLAG
        n = body[1] if len(body) > 1 else 0
        if len(body) != 2 + n + 6:
            self.send_ground(reply, 1)
            return
        name = bytes(body[2 : 2 + n]).decode()
        offset = int.from_bytes(bytes(body[2 + n : 6 + n]), "little")
        length = min(int.from_bytes(bytes(body[6 + n : 8 + n]), "little"), _READ_MAX)
        reply[1:5] = body[2 + n : 6 + n]
        count = 0
        if "/" not in name:
            try:
                stem = name[:-5] if name.endswith(".qrec") else name
                with open(self.store.path(stem), "rb") as f:
                    f.seek(offset)
                    count = f.readinto(memoryview(reply)[5 : 5 + length]) or 0
            except OSError:
                count = 0
        self.send_ground(reply, 5 + count)

    def on_bus_frame(self, body):
        reply = self._reply
        reply[0] = _DIAG_BUS_ECHO | _REPLY_FLAG
        reply[1 : 1 + len(body)] = body
        self.send_ground(reply, 1 + len(body))

    def poll_ground(self):
        count = self.board.ground_link.readinto(self._chunk)
        if not count:
            return False
        start = 0
        view = memoryview(self._chunk)
        reader = self.ground_rx
        while start < count:
            start += reader.feed(view[start:], count - start)
            if reader.ready:
                self.on_ground_frame(reader.body)
        return True

    def poll(self):
        """One pass of the main loop; returns True if any duty did work."""
        self.board.clock.update()
        return self.scheduler.run_once()


def _tracker_from(section):
    """A Tracker from a configuration's "tracking" section: {"parameters": {...},
    "predictions": [[x, y, vx, vy, ax, ay, pa_x, pa_y], ...]} (docs/tracking.md).
    Returns (tracker, None) or (None, reason). Imported only when a pass tracks: the
    loop's code costs RAM on the unix target."""
    from payload import tracking

    if not isinstance(section, dict) or "predictions" not in section:
        return None, "tracking: need an object with 'predictions'"
    try:
        tracker = tracking.Tracker(section.get("parameters") or {})
        tracker.load_predictions(section["predictions"])
    except (tracking.ConfigError, TypeError) as error:  # TypeError: a non-numeric value
        return None, "tracking: %s" % error
    return tracker, None


def _write_all(link, data):
    sent = 0
    total = len(data)
    while sent < total:
        sent += link.write(data[sent:])


def run(board):
    controller = Controller(board)
    while True:
        if not controller.poll():
            board.idle()

# Lockstep link between the tracking loop and the emulated optical plant, over the
# payload bus (docs/tracking.md "Lockstep link"). Emulation only: on a board the
# sensors and actuators are registers and a timer calls Tracker.step().
#
# Per step: the plant's measurement frame 'M' fills tracker.io, Tracker.step() runs,
# the command frame 'C' goes back; the plant advances one loop period only when it has
# the command, so emulated time is exact however slow either side is. Telemetry ('T')
# and the transition log ('R') travel as record payloads; 'E' ends the run.
import micropython
from micropython import const

from payload import framing, tracking

_MAX_BODY = const(1024)
_MEAS_BYTES = const(42)  # "<cIHHHHBiiiiiii"
_CMD_BYTES = const(31)  # "<cIiiiiiiBB"
_SAMPLES_PER_RECORD = const(40)  # 12 + 40 * 24 bytes fits one bus frame


@micropython.viper
def _unpack_measurement(buf: ptr8, io: ptr32) -> int:
    """Measurement body -> io words; returns the plant's step number (low 30 bits)."""
    for i in range(4):
        io[i] = buf[5 + 2 * i] | (buf[6 + 2 * i] << 8)
    io[4] = buf[13]  # IO_CAM_NEW
    for i in range(7):
        at = 14 + 4 * i
        # IO_CAM_X .. IO_ENC_Y, IO_ARS_X, IO_ARS_Y
        io[5 + i] = buf[at] | (buf[at + 1] << 8) | (buf[at + 2] << 16) | (buf[at + 3] << 24)
    return (buf[1] | (buf[2] << 8) | (buf[3] << 16) | (buf[4] << 24)) & 0x3FFFFFFF


@micropython.viper
def _pack_command(buf: ptr8, io: ptr32, step: int):
    buf[0] = 0x43  # 'C'
    for k in range(4):
        buf[1 + k] = (step >> (8 * k)) & 0xFF
    for i in range(6):
        v = io[12 + i]  # IO_FSM_X .. IO_PA_Y
        for k in range(4):
            buf[5 + 4 * i + k] = (v >> (8 * k)) & 0xFF
    buf[29] = io[18]  # IO_STATE
    buf[30] = 0


class PlantLink:
    def __init__(self, bus, tracker, idle=None):
        self.bus = bus
        self.tracker = tracker
        self.idle = idle
        self.reader = framing.FrameReader(_MAX_BODY)
        self.writer = framing.FrameWriter(_MAX_BODY)
        self._chunk = bytearray(64)
        self._view = memoryview(self._chunk)
        self._cmd = bytearray(_CMD_BYTES)
        self._samples = tracking.array.array("i", bytes(4 * 7 * _SAMPLES_PER_RECORD))
        self.records_sent = 0

    def _send(self, body, length):
        data = self.writer.encode(body, length)
        sent = 0
        total = len(data)
        while sent < total:
            sent += self.bus.write(data[sent:])

    def _receive(self):
        """Block until one frame arrives; returns its body (a view, valid until next)."""
        reader = self.reader
        while True:
            count = self.bus.readinto(self._chunk)
            if not count:
                if self.idle:
                    self.idle()
                continue
            start = 0
            while start < count:
                start += reader.feed(self._view[start:], count - start)
                if reader.ready:
                    if start != count:
                        raise RuntimeError("plant link: bytes after a reply frame")
                    return reader.body

    def _measure(self, expected_step):
        body = self._receive()
        if len(body) != _MEAS_BYTES or body[0] != 0x4D:
            raise RuntimeError("plant link: bad measurement frame (%d bytes)" % len(body))
        step = _unpack_measurement(body, self.tracker.io)
        if step != expected_step:
            raise RuntimeError("plant link: plant at step %d, loop at %d" % (step, expected_step))

    def flush_telemetry(self, force=False):
        tracker = self.tracker
        while tracker.telemetry_pending() >= (1 if force else _SAMPLES_PER_RECORD):
            count = tracker.drain_telemetry(self._samples, _SAMPLES_PER_RECORD)
            payload = tracking.pack_samples(
                self._samples, count, tracker.cfg[0], tracker.config["telemetry_decimation"]
            )
            self._send(b"T" + payload, len(payload) + 1)
            self.records_sent += 1

    def run(self, steps, start_at=0, stop_at=-1, clock=None):
        """Run `steps` loop periods against the plant; start tracking at step `start_at`,
        stop it at `stop_at`. Returns (step time total, max) in clock ticks if a clock
        (ticks_us-like callable) is given."""
        tracker = self.tracker
        self._cmd[0] = 0x53  # 'S': give me the first measurement
        self._send(self._cmd, _CMD_BYTES)
        self._measure(0)
        total = 0
        worst = 0
        for k in range(steps):
            if k == start_at:
                tracker.start()
            if k == stop_at:
                tracker.stop()
            if clock:
                t0 = clock()
                tracker.step()
                dt = (clock() - t0) & 0x3FFFFFFF
                total += dt
                if dt > worst:
                    worst = dt
            else:
                tracker.step()
            _pack_command(self._cmd, tracker.io, k)
            self._send(self._cmd, _CMD_BYTES)
            self._measure(k + 1)
            if tracker.telemetry_pending() >= _SAMPLES_PER_RECORD:
                self.flush_telemetry()
        self.flush_telemetry(force=True)
        transitions = tracker.transitions()
        for first in range(0, len(transitions), 100):
            payload = tracking.pack_transitions(transitions[first : first + 100], tracker.cfg[0])
            self._send(b"R" + payload, len(payload) + 1)
        end = ("E%d %d %d %d" % (steps, total, worst, tracker.telemetry_lost())).encode()
        self._send(end, len(end))
        return total, worst

# Tracking over the payload bus: the scheduler duty that reads the optical head's sensor
# block, steps the loop and writes the command block (docs/tracking.md "Payload-bus
# registers"). The register blocks mirror Tracker.io word for word, so one READ and one
# WRITE per loop period carry everything; on a board a timer interrupt would do the same
# with register reads instead of bus frames.
import micropython
from micropython import const

from payload import tracking

REG_TRK_SENSORS = const(0x0500)  # read, 10 words: QA..QD, CAM_NEW, CAM_X, CAM_Y, CAM_SIGNAL,
#                                  ENC_X, ENC_Y (Tracker.io words 0..9)
REG_TRK_COMMANDS = const(0x0510)  # write, 7 words: FSM_X, FSM_Y, RATE_X, RATE_Y, PA_X, PA_Y,
#                                   STATE (io words 10..16); writing STATE latches the set
SENSOR_WORDS = const(10)
COMMAND_WORDS = const(7)


@micropython.viper
def _copy_words(src: ptr32, dst: ptr32, count: int):
    for i in range(count):
        dst[i] = src[i]


class TrackingDuty:
    """`step()` for the scheduler: one loop period. A failed bus transaction skips the
    period (the head holds the last commands) and is counted, never raised."""

    def __init__(self, bus, tracker):
        self.bus = bus
        self.tracker = tracker
        self._commands = memoryview(tracker.io)[tracking.IO_FSM_X : tracking.IO_FSM_X + 7]
        self.steps = 0
        self.bus_errors = 0

    def step(self):
        bus = self.bus
        if bus.read(REG_TRK_SENSORS, SENSOR_WORDS) != 0:
            self.bus_errors += 1
            return False
        _copy_words(bus.words, self.tracker.io, SENSOR_WORDS)
        self.tracker.step()
        if bus.write(REG_TRK_COMMANDS, self._commands, COMMAND_WORDS) != 0:
            self.bus_errors += 1
        self.steps += 1
        return True

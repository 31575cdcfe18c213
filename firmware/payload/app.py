# The payload controller's main program: one scheduler loop (payload/scheduler.py,
# docs/scheduling.md) calling the duties as step functions: `ground` here, then the data
# path's (payload/mission.py: bus, sequencer, tdc, clock, hk). More duties (tracking)
# join with one `self.scheduler.add(name, step)`.
#
# Ground link (UART0): CCSDS telecommands and telemetry in frames, handled by
# payload.telecommands (docs/ground-link.md). The version query is the PUS "are you
# alive" test (TC 17,1 -> TM 17,2 "qkdsat-fw <version> <board>").
# Payload-bus loopback test: TC 17,128 <data> sends <data> as a bus frame; the frame that
# comes back is reported as TM 17,129 <data>.
import gc

import micropython
from micropython import const

from payload import framing, scheduler, telecommands
from payload.ccsds import FN_REBOOT
from payload.telecommands import refill_reject_credit as _refill_reject_credit
from payload.waits import (
    GROUND_RX_WAIT_US,
    GROUND_TX_FLUSH_US,
    GROUND_TX_FULL_WAIT_US,
    GROUND_TX_SLICE_US,
)

MAX_FRAME_BODY_BYTES = const(1024)
# Ground frames carry a 1 KiB product chunk plus packet headers (docs/ground-link.md).
GROUND_MAX_BODY_BYTES = const(1200)  # a 1 KiB chunk sealed, or housekeeping JSON


class TxQueue:
    """Whole frames queued for a link that takes bytes at its own pace; `pump` (a
    scheduler duty) writes for at most slice_us per pass, so a long send never blocks
    the loop. Frames are never cut: one that finds no room after full_wait_us is dropped
    and counted (`dropped_frames`)."""

    def __init__(self, link, clock, capacity, slice_us, full_wait_us):
        self.link = link
        self.clock = clock
        self._buf = bytearray(capacity)
        self._view = memoryview(self._buf)
        self._capacity = capacity
        self._head = 0
        self._count = 0
        self.slice_us = slice_us
        self.full_wait_us = full_wait_us
        self.dropped_frames = 0
        self.bytes_sent = 0

    def pending(self):
        return self._count

    def push(self, frame):
        n = len(frame)
        if n > self._capacity - self._count:
            self.drain(self.full_wait_us)
            if n > self._capacity - self._count:
                self.dropped_frames += 1
                return False
        tail = (self._head + self._count) % self._capacity
        first = min(n, self._capacity - tail)
        self._buf[tail : tail + first] = frame[:first]
        if first < n:
            self._buf[: n - first] = frame[first:]
        self._count += n
        return True

    def pump(self):
        return self.drain(self.slice_us)

    def drain(self, budget_us):
        """Write until empty or budget_us has passed; True if anything went out."""
        clock = self.clock
        start = clock.ticks_us()
        wrote = False
        while self._count:
            first = min(self._count, self._capacity - self._head)
            n = self.link.write(self._view[self._head : self._head + first])
            if n:
                self._head = (self._head + n) % self._capacity
                self._count -= n
                self.bytes_sent += n
                wrote = True
            if ((clock.ticks_us() - start) & 0x3FFFFFFF) > budget_us:
                break
        return wrote


class Controller:
    def __init__(self, board, storage_root, mission=None):
        self.board = board
        self.ground_rx = framing.FrameReader(GROUND_MAX_BODY_BYTES)
        self.ground_tx = framing.FrameWriter(GROUND_MAX_BODY_BYTES)
        self.bus_rx = None  # the controller's own bus framing, only without a data path
        self._bus = None  # the data path's bus client, whose down flag each pass resets
        self._chunk = bytearray(256)
        # how long a ground poll that got bytes reads on for the rest of the frame (the
        # board's, where its emulation states one: boards/netduino2 EMULATION_OVERRIDES)
        self.ground_rx_wait_us = getattr(board, "GROUND_RX_WAIT_US", GROUND_RX_WAIT_US)
        self.ground_queue = TxQueue(
            board.ground_link,
            board.clock,
            2 * framing.encoded_capacity(GROUND_MAX_BODY_BYTES),
            GROUND_TX_SLICE_US,
            GROUND_TX_FULL_WAIT_US,
        )
        self.link = telecommands.GroundLink(
            board, storage_root, self.send_ground, mission, GROUND_MAX_BODY_BYTES
        )
        self.link.frame_reader = self.ground_rx
        # a housekeeping report in slices, one a pass (poll_ground): no call of the ground
        # duty holds the tracking loop's periods for the whole request
        self.link.sliced = True
        # TM 1,2 for frames that consumed no counter: bounded per time (docs/ground-link.md
        # "Verification and reason codes"); poll_ground refills the buckets
        self.link.reports_bounded = True
        # the clock's ticks_us in one native call (boardkit.ExtendedClock.ticks_source), for
        # the refills
        self._ticks, self._ticks_arg = board.clock.ticks_source()
        self.link.tx_queue = self.ground_queue
        self.link.bus_send = self.send_bus
        self.mission = mission
        self.scheduler = scheduler.Scheduler(board.clock)
        # bound once: each pass's `self.scheduler.run_once()` looked the method up (~250
        # instructions on the M3, more or less with the image's layout), and with the
        # tracking loop paced every pass carries loop periods (docs/scheduling.md)
        self._run_once = self.scheduler.run_once
        # bound once, kept under the method's own name (the instance's attribute is found
        # first): `self.on_ground_frame` in each poll's call made a bound method, a heap
        # object every pass (mptest_reject_bound_cost: an empty poll allocates nothing)
        self.on_ground_frame = self.on_ground_frame
        self.scheduler.add("ground", self.poll_ground)
        self.scheduler.add("gtx", self.ground_queue.pump)
        if mission is not None and hasattr(mission, "duties"):
            # The data path's bus client owns the payload bus; frames it did not ask for
            # (the loopback test's) come back through on_unsolicited.
            mission.bus.on_unsolicited = self.on_bus_frame
            self._bus_tx = mission.bus.tx
            self._bus = mission.bus
            mission.duties(self.scheduler)
        else:
            # 4 kB of buffers a data path (with its own bus client) does not need
            self.bus_rx = framing.FrameReader(MAX_FRAME_BODY_BYTES)
            self._bus_tx = framing.FrameWriter(MAX_FRAME_BODY_BYTES)
            self.on_bus_frame = self.on_bus_frame  # bound once, as on_ground_frame
            self.scheduler.add("bus", self.poll_bus)
        # Last: a board whose littlefs sits on NOR through EraseAhead erases one sector ahead
        # per pass while one is owed (boardkit.FlashStore), after every other duty's work.
        background = getattr(board, "storage_background", None)
        if background is not None:
            self.scheduler.add("flash", background)

    def send_ground(self, body, length):
        self.ground_queue.push(self.ground_tx.encode(body, length))

    def send_bus(self, body, length):
        _write_bounded(
            self.board.payload_bus,
            self._bus_tx.encode(body, length),
            self.board.clock,
            self.board.BUS_TIMEOUT_US,
        )

    def on_ground_frame(self, body):
        self.link.handle(body)

    def on_bus_frame(self, body):
        self.link.bus_reply(body)  # the bus loopback test (TC 17,128); the data path
        # takes the bus over with its own client

    def poll_ground(self):
        link = self.link
        if link.housekeeping_stage:  # a report's next slice, before any new frame
            return link.step()
        if link.reject_credit_low:  # refilled every pass until full (a read, when full)
            link.reject_credit_low = _refill_reject_credit(
                link.reject_credit, self._ticks(self._ticks_arg)
            )
        return _pump_frame(
            self.board.ground_link,
            self.ground_rx,
            self._chunk,
            self.on_ground_frame,
            self.board.clock,
            self.ground_rx_wait_us,
        )

    def poll_bus(self):
        return _pump(self.board.payload_bus, self.bus_rx, self._chunk, self.on_bus_frame)

    def poll(self):
        """One pass of the main loop; returns True if any duty did work. The watchdog is
        fed here and only here: after a whole pass of the scheduler, every duty returned."""
        self.board.clock.update()
        bus = self._bus
        if bus is not None:
            bus.down = 0  # the head gets its tries again, until one times out (bus.Bus.down)
        busy = self._run_once()
        self.board.watchdog_feed()
        action = self.link.pending_action
        if action is not None:
            self.link.pending_action = None
            if self.mission is not None and hasattr(self.mission, "store"):
                self.mission.store.sync()  # the batched logs' records, before a reset
            self.ground_queue.drain(GROUND_TX_FLUSH_US)  # the acceptance report first
            if action == FN_REBOOT:
                self.board.reset()
        return busy


def _feed(reader, chunk, count, handler):
    """Hand on every frame chunk[:count] completes (a chunk of small frames is many); a
    frame the chunk ends inside stays in the reader. True if one was handed on. No
    allocation but the reader's for a frame (feed_from, no slices: mptest_framing)."""
    index = 0
    handled = False
    while index < count:
        index = reader.feed_from(chunk, index, count)
        if reader.ready:
            handler(reader.body)
            handled = True
    return handled


def _pump(link, reader, chunk, handler):
    count = link.readinto(chunk)
    if not count:
        return False
    _feed(reader, chunk, count, handler)
    return True


def _pump_frame(link, reader, chunk, handler, clock, wait_us):
    """Read what the link has; once bytes came, read on until a frame has been handed on
    or wait_us has passed since the first byte. Polled once a pass, a link whose next byte
    comes later than the board's read waits for it (a USART whose bytes QEMU hands on at
    the host's pace, ms apart on a loaded host) gave a telecommand a byte or two a pass:
    the stop of an emulated pass took 4-7 passes to arrive, one frame each (docs/
    targets.md). Returns after the read in which a frame was handed on: every frame of
    that chunk is handed on (_feed, as _pump's), a frame the chunk ends inside stays in the
    reader for the next pass. No allocation but the reader's for a frame it hands on."""
    count = link.readinto(chunk)
    if not count:
        return False
    start_us = clock.ticks_us()
    while True:
        if _feed(reader, chunk, count, handler):
            return True
        count = 0
        while not count:
            if ((clock.ticks_us() - start_us) & 0x3FFFFFFF) > wait_us:
                return True
            count = link.readinto(chunk)


def _write_bounded(link, data, clock, timeout_us):
    """Write data unless the link takes nothing for timeout_us; returns bytes written."""
    sent = 0
    total = len(data)
    start = clock.ticks_us()
    while sent < total:
        sent += link.write(data[sent:])
        if ((clock.ticks_us() - start) & 0x3FFFFFFF) > timeout_us:
            break
    return sent


def _import_mission():
    # The data path provides payload/mission.py (configure/start/stop/status); until then
    # those telecommands are rejected as "unavailable".
    try:
        from payload import mission
    except ImportError:
        return None
    return mission


def _load_mission(board, storage_root):
    mission = _import_mission()
    if mission is None:
        return None
    try:
        return mission.Mission(board, storage_root)
    except Exception as error:  # noqa: BLE001 - the ground link must come up regardless
        # A data path that cannot start (no RAM, storage fault) must not take the ground
        # link down with it: the mission telecommands then answer "unavailable". (No
        # print: stdout is the ground link.)
        del error
        return None


def lock_console():
    """The ground link is the application's alone: no Ctrl-C (0x03 would raise
    KeyboardInterrupt on a board whose REPL shares the UART) and no terminal duplicated
    onto it."""
    micropython.kbd_intr(-1)
    import os

    dupterm = getattr(os, "dupterm", None)
    if dupterm is not None:
        try:
            dupterm(None)
        except (OSError, ValueError, TypeError):
            pass


def run(board):
    """The application; never returns. No telecommand hands the ground link to the REPL
    (maintenance in flight is a code-update session, docs/ground-link.md); the REPL is
    reached only through the maintenance strap at boot. An exception of any kind is
    counted and the loop goes on."""
    try:
        lock_console()
        # The ground link's receive interrupt, where the board has one (netduino2: USART1
        # into a ring): from here no byte waits for the loop's poll. First, so its ring
        # is low in the heap and the boot's own telecommands are kept.
        start_receiving = getattr(board.ground_link, "start_receiving", None)
        if start_receiving is not None:
            start_receiving()
        board.watchdog_start()  # (a machine.WDT refuses a timeout with ValueError)
        controller = _start(board)
    except BaseException:  # noqa: BLE001 - never a way to the REPL
        # An application that cannot come up (storage that raises, no heap for the data
        # path's buffers, a KeyboardInterrupt) resets the board, as its watchdog would:
        # an exception out of here ended main.py, and the port opened the REPL on the
        # ground link without any telecommand. A board that keeps failing its boot is
        # reached through the maintenance strap (docs/ground-link.md).
        board.reset()
        raise  # (the unix board's reset() raises SystemExit first)
    while True:
        try:
            if not controller.poll():
                board.idle()
        except SystemExit:  # the unix board's reset()
            raise
        except BaseException as error:  # noqa: BLE001 - counted, never a way to the REPL
            controller.link.loop_errors += 1
            # (never raises: a constant when the heap has no room for the text)
            controller.link.last_loop_error = scheduler.error_text(error)


def _start(board):
    """The application's objects, made at boot; returns the Controller."""
    # Boot in phases with a collection between them, the data path's modules imported
    # first: each phase's long-lived buffers then fill the holes the last one's garbage
    # (file reads, littlefs mounts, recovery scans) left low in the heap, instead of
    # landing above garbage that dies later. MicroPython's heap does not compact; on the
    # STM32 board at 85 % of its heap the largest free block after boot is about half as
    # large again with the collections as without (docs/targets.md "Margins").
    _import_mission()
    gc.collect()
    storage_root = board.mount_storage()
    gc.collect()
    mission = _load_mission(board, storage_root)
    gc.collect()
    controller = Controller(board, storage_root, mission)
    gc.collect()
    return controller

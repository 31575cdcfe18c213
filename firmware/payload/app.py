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
from micropython import const

from payload import framing, scheduler, telecommands
from payload.ccsds import FN_MAINTENANCE, FN_REBOOT

MAX_FRAME_BODY_BYTES = const(1024)
# Ground frames carry a 1 KiB product chunk plus packet headers (docs/ground-link.md).
GROUND_MAX_BODY_BYTES = const(1200)  # a 1 KiB chunk sealed, or housekeeping JSON


class Controller:
    def __init__(self, board, storage_root, mission=None):
        self.board = board
        self.ground_rx = framing.FrameReader(GROUND_MAX_BODY_BYTES)
        self.bus_rx = framing.FrameReader(MAX_FRAME_BODY_BYTES)
        self.ground_tx = framing.FrameWriter(GROUND_MAX_BODY_BYTES)
        self.bus_tx = framing.FrameWriter(MAX_FRAME_BODY_BYTES)
        self._chunk = bytearray(256)
        self.link = telecommands.GroundLink(
            board, storage_root, self.send_ground, mission, GROUND_MAX_BODY_BYTES
        )
        self.link.frame_reader = self.ground_rx
        self.link.bus_send = self.send_bus
        self.mission = mission
        self.scheduler = scheduler.Scheduler(board.clock)
        self.scheduler.add("ground", self.poll_ground)
        if mission is not None and hasattr(mission, "duties"):
            # The data path's bus client owns the payload bus; frames it did not ask for
            # (the loopback test's) come back through on_unsolicited.
            mission.bus.on_unsolicited = self.on_bus_frame
            self._bus_tx = mission.bus.tx
            mission.duties(self.scheduler)
        else:
            self._bus_tx = self.bus_tx
            self.scheduler.add("bus", self.poll_bus)

    def send_ground(self, body, length):
        _write_all(self.board.ground_link, self.ground_tx.encode(body, length))

    def send_bus(self, body, length):
        _write_all(self.board.payload_bus, self._bus_tx.encode(body, length))

    def on_ground_frame(self, body):
        self.link.handle(body)

    def on_bus_frame(self, body):
        self.link.bus_reply(body)  # the bus loopback test (TC 17,128); the data path
        # takes the bus over with its own client

    def poll_ground(self):
        return _pump(self.board.ground_link, self.ground_rx, self._chunk, self.on_ground_frame)

    def poll_bus(self):
        return _pump(self.board.payload_bus, self.bus_rx, self._chunk, self.on_bus_frame)

    def poll(self):
        """One pass of the main loop; returns True if any duty did work."""
        self.board.clock.update()
        busy = self.scheduler.run_once()
        action = self.link.pending_action
        if action is not None:
            self.link.pending_action = None
            if action == FN_REBOOT:
                self.board.reset()
            elif action == FN_MAINTENANCE:
                raise telecommands.EnterMaintenance()
        return busy


def _pump(link, reader, chunk, handler):
    count = link.readinto(chunk)
    if not count:
        return False
    start = 0
    view = memoryview(chunk)
    while start < count:
        start += reader.feed(view[start:], count - start)
        if reader.ready:
            handler(reader.body)
    return True


def _write_all(link, data):
    sent = 0
    total = len(data)
    while sent < total:
        sent += link.write(data[sent:])


def _load_mission(board, storage_root):
    # The data path provides payload/mission.py (configure/start/stop/status); until then
    # those telecommands are rejected as "unavailable".
    try:
        from payload import mission
    except ImportError:
        return None
    try:
        return mission.Mission(board, storage_root)
    except Exception as error:  # noqa: BLE001 - the ground link must come up regardless
        # A data path that cannot start (no RAM, storage fault) must not take the ground
        # link down with it: the mission telecommands then answer "unavailable". (No
        # print: stdout is the ground link.)
        del error
        return None


def run(board):
    """The application; returns only when a maintenance telecommand asks for the REPL."""
    storage_root = board.mount_storage()
    controller = Controller(board, storage_root, _load_mission(board, storage_root))
    try:
        while True:
            if not controller.poll():
                board.idle()
    except telecommands.EnterMaintenance:
        print("qkdsat firmware: maintenance telecommand, REPL on the ground link")

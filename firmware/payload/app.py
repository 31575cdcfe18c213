# The payload controller's main program: one loop that services the ground link and the
# payload bus. Later duties (sequencer, TDC drain, tracking) join as step functions.
#
# Diagnostic service on the ground link (docs/framing.md), one frame body per request:
#   0x01                 version query  -> 0x81 "qkdsat-fw <version> <board>"
#   0x02 <data>          bus echo       -> <data> goes out as a payload-bus frame; the
#                                          frame that comes back is returned as 0x82 <data>
from micropython import const

from payload import framing
from payload.version import FIRMWARE_VERSION

MAX_FRAME_BODY_BYTES = const(1024)
_DIAG_VERSION = const(0x01)
_DIAG_BUS_ECHO = const(0x02)
_REPLY_FLAG = const(0x80)


class Controller:
    def __init__(self, board):
        self.board = board
        self.ground_rx = framing.FrameReader(MAX_FRAME_BODY_BYTES)
        self.bus_rx = framing.FrameReader(MAX_FRAME_BODY_BYTES)
        self.ground_tx = framing.FrameWriter(MAX_FRAME_BODY_BYTES)
        self.bus_tx = framing.FrameWriter(MAX_FRAME_BODY_BYTES)
        self._chunk = bytearray(256)
        self._reply = bytearray(MAX_FRAME_BODY_BYTES)
        self.version_text = ("qkdsat-fw %s %s" % (FIRMWARE_VERSION, board.NAME)).encode()

    def send_ground(self, body, length):
        _write_all(self.board.ground_link, self.ground_tx.encode(body, length))

    def send_bus(self, body, length):
        _write_all(self.board.payload_bus, self.bus_tx.encode(body, length))

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

    def on_bus_frame(self, body):
        reply = self._reply
        reply[0] = _DIAG_BUS_ECHO | _REPLY_FLAG
        reply[1 : 1 + len(body)] = body
        self.send_ground(reply, 1 + len(body))

    def poll(self):
        """One pass of the main loop; returns True if any input was handled."""
        self.board.clock.update()
        busy = _pump(self.board.ground_link, self.ground_rx, self._chunk, self.on_ground_frame)
        busy |= _pump(self.board.payload_bus, self.bus_rx, self._chunk, self.on_bus_frame)
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


def run(board):
    board.mount_storage()
    controller = Controller(board)
    while True:
        if not controller.poll():
            board.idle()

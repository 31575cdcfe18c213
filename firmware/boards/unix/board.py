# Board support for the unix target: the same interface as boards/qemu/board.py, over
# the host's file descriptors and sockets. The launcher (emulator/targets.py) sets:
#   stdin/stdout          the ground link: the master side of a pty (the host opens the
#                         slave with pyserial, as it would a board's USB or UART port)
#   QKDSAT_BUS=host:port  the payload bus: a TCP connection to the emulated optical head
#   QKDSAT_STORAGE=dir    the storage root (a directory stands in for flash)
#   QKDSAT_STORAGE_QUOTA=bytes  cap the product bytes (default: free space less a reserve)
#   QKDSAT_BOOT=maintenance  stay at the REPL instead of starting the application
import os
import select
import socket
import sys
import time

from payload import keystore

NAME = "unix"

# The optical head on this target is emulated by a host process on a shared machine, not
# an FPGA that answers in microseconds: a reply can be seconds late under load without
# anything being wrong. A flight board uses 500 ms; tests of the retry path set it short.
BUS_TIMEOUT_US = int(os.getenv("QKDSAT_BUS_TIMEOUT_US") or 10_000_000)

STORAGE_ROOT = os.getenv("QKDSAT_STORAGE") or "flash"
# Product bytes the storage may hold (payload/storage.py): -1 = the free space at boot less
# a reserve. A host directory has a disk's worth; tests of a full store set it small.
STORAGE_QUOTA_BYTES = int(os.getenv("QKDSAT_STORAGE_QUOTA") or -1)
# A directory on the host's disk, not littlefs: the store keeps the minimum reserve only
# (payload/storage.py, docs/storage.md "Quota").
STORAGE_MEDIUM = "host directory"
_CPU_HZ = 0  # not meaningful on the host


class StdioLink:
    """Ground link over fds 0/1; never blocks (the launcher set O_NONBLOCK on the pty)."""

    def __init__(self):
        self._in = sys.stdin.buffer
        self._out = sys.stdout.buffer
        self._poll = select.poll()
        self._poll.register(sys.stdin, select.POLLIN)

    def readinto(self, buf):
        if not self._poll.poll(0):
            return 0
        try:
            count = self._in.readinto(buf)
        except OSError:  # EAGAIN: nothing after all
            return 0
        return count or 0

    def write(self, buf):
        try:
            count = self._out.write(buf)
        except OSError:  # EAGAIN: the pty is full, nobody reads the other side
            return 0
        return count or 0


class SocketLink:
    """Payload bus (or ground link) over a TCP connection, non-blocking."""

    def __init__(self, address):
        host, port = address.rsplit(":", 1)
        self._sock = socket.socket()
        self._sock.connect(socket.getaddrinfo(host, int(port))[0][-1])
        self._sock.setblocking(False)

    def readinto(self, buf):
        try:
            count = self._sock.readinto(buf)
        except OSError:
            return 0
        return count or 0

    def write(self, buf):
        try:
            count = self._sock.write(buf)
        except OSError:
            return 0
        return count or 0


class NoLink:
    """Placeholder when a launcher wires no bus: reads nothing, drops writes."""

    def readinto(self, buf):
        return 0

    def write(self, buf):
        return len(buf)


class Clock:
    """Microsecond clock; on a 64-bit host every count is a small int already."""

    def __init__(self):
        self._last_ticks = time.ticks_us()
        self._us = 0

    def update(self):
        now = time.ticks_us()
        self._us += time.ticks_diff(now, self._last_ticks)
        self._last_ticks = now

    def ticks_us(self):
        self.update()
        return self._us & 0x3FFFFFFF

    def ticks_source(self):
        """(function, argument): function(argument) is ticks_us() (boardkit.ExtendedClock's
        one-native-call path on the MCU boards)."""
        return Clock.ticks_us, self

    def stamp_into(self, buf, offset):
        self.update()
        value = self._us
        for i in range(8):
            buf[offset + i] = (value >> (8 * i)) & 0xFF

    def now_us(self):
        self.update()
        return self._us


ground_link = StdioLink()
_bus_address = os.getenv("QKDSAT_BUS")
payload_bus = SocketLink(_bus_address) if _bus_address else NoLink()
clock = Clock()
# The link key's region: a file of its own beside the products and logs (the unix target
# never formats its storage; the boards keep the region outside the filesystem).
key_region = keystore.FileRegion(STORAGE_ROOT + "/.keyregion")


def boot_mode():
    return "maintenance" if os.getenv("QKDSAT_BOOT") == "maintenance" else "app"


def mount_storage():
    try:
        os.mkdir(STORAGE_ROOT)
    except OSError:
        pass  # exists
    return STORAGE_ROOT


# No watchdog on the host: the launcher supervises the process. The calls are the same
# as on the boards, so the application's feeding path runs here too. No limit, so the
# emulated head's 10 s bus timeout is held to none (payload/waits.py check).
WATCHDOG_LIMIT_US = None
watchdog_feeds = 0


def watchdog_start():
    pass


def watchdog_feed():
    global watchdog_feeds
    watchdog_feeds += 1


def watchdog_stop():
    pass


def idle():
    time.sleep_us(50)


def reset():
    sys.exit(0)


def cpu_hz():
    return _CPU_HZ

# What the MCU board modules (boards/qemu, boards/netduino2) share, written once: the
# polled UART's interface, the microsecond clock's interface over a 64-bit extension kept
# in a preallocated state array, littlefs on a block device over a fixed RAM address, and
# mounting it (formatting a device that does not mount). Touches no `machine`: the
# registers stay in the boards.
import array

import micropython
import vfs


class PolledUart:
    """A UART driven by register polling through the board's two viper functions,
    readinto(base, buf, n) and write(base, buf, n): each returns the bytes moved now."""

    def __init__(self, base, readinto, write):
        self._base = base
        self._readinto = readinto
        self._write = write

    def readinto(self, buf):
        return self._readinto(self._base, buf, len(buf))

    def write(self, buf):
        return self._write(self._base, buf, len(buf))


class ExtendedClock:
    """Microsecond clock extended to 64 bits without allocating. The board gives two viper
    functions over its timer: update(state) and stamp(state, buf, offset).

    State: [active copy, then two copies of (last timer value, leftover, microseconds low
    word, high word)]. Single writer, lock-free readers: only the main loop calls
    `update()` (and `ticks_us` / `now_us`, which update); it writes the inactive copy and
    then publishes it with one word store. `stamp_into()` may run in an interrupt handler:
    it reads the active copy and the timer and writes nothing, so an interrupt that lands
    in the middle of an update still sees a whole, consistent copy (mptest_board_qemu.py).
    """

    def __init__(self, update, stamp, timer_now):
        self._state = array.array("I", bytes(36))
        self._update = update
        self._stamp = stamp
        self._state[1] = timer_now

    def update(self):
        self._update(self._state)

    def ticks_us(self):
        """Low 30 bits of the microsecond count: a small int, for short intervals."""
        self._update(self._state)
        return _clock_low30(self._state)

    def stamp_into(self, buf, offset):
        """Write the 64-bit microsecond count little-endian into buf[offset:offset+8]
        (interrupt-safe: reads only)."""
        self._stamp(self._state, buf, offset)

    def now_us(self):
        """The full microsecond count as a Python int (allocates on 32-bit: not in IRQs)."""
        self._update(self._state)
        base = 1 + 4 * self._state[0]
        return (self._state[base + 3] << 32) | self._state[base + 2]


@micropython.viper
def _clock_low30(state: ptr32) -> int:
    return state[1 + 4 * state[0] + 2] & 0x3FFFFFFF


class RamBlockDevice:
    """littlefs block device over RAM at a fixed address (uctypes: outside the heap),
    standing in for the board's flash."""

    def __init__(self, address, block_bytes, blocks):
        import uctypes

        self._mem = uctypes.bytearray_at(address, block_bytes * blocks)
        # through a memoryview: slicing the bytearray itself would copy every read into a
        # new heap object (measured: most of a pattern record's commit time)
        self._view = memoryview(self._mem)
        self._block_bytes = block_bytes
        self._blocks = blocks

    def readblocks(self, block, buf, offset=0):
        start = block * self._block_bytes + offset
        buf[:] = self._view[start : start + len(buf)]

    def writeblocks(self, block, buf, offset=None):
        if offset is None:
            offset = 0
        start = block * self._block_bytes + offset
        self._view[start : start + len(buf)] = buf

    def ioctl(self, op, arg):
        if op == 4:  # block count
            return self._blocks
        if op == 5:  # block size
            return self._block_bytes
        if op == 6:  # erase: RAM needs none
            return 0
        return None

    def blank(self):
        """True if the device looks never written (its first 64 bytes are zero)."""
        return not any(self._mem[0:64])


def mount_littlefs(device, root, io_bytes=32):
    """Mount littlefs from `device` at `root` (mtime off: no wall clock), formatting a
    device that does not mount. Returns True if an existing filesystem was formatted
    (products and logs lost: housekeeping reports it), False otherwise; a root already
    mounted (from the maintenance REPL) is never formatted."""
    import os

    try:
        os.stat(root)
        return False
    except OSError:
        pass
    try:
        vfs.mount(_lfs(device, io_bytes), root)
        return False
    except OSError:
        formatted = not device.blank()  # not on a blank (first-boot) device
        vfs.VfsLfs2.mkfs(device, readsize=io_bytes, progsize=io_bytes)
        vfs.mount(_lfs(device, io_bytes), root)
        return formatted


def _lfs(device, io_bytes):
    return vfs.VfsLfs2(device, readsize=io_bytes, progsize=io_bytes, lookahead=32, mtime=False)

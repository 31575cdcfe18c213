# What the MCU board modules (boards/qemu, boards/netduino2) share, written once: the
# polled UART's interface, the microsecond clock's interface over a 64-bit extension kept
# in a preallocated state array, a NOR flash chip's block device over a fixed RAM address,
# littlefs mounted on it through eraseahead.EraseAhead (no commit waits for a sector
# erase), formatting a device that does not mount. Touches no `machine`: the registers
# stay in the boards.
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
        return self._update(self._state)  # the board's update returns them

    def ticks_source(self):
        """(function, argument): function(argument) is ticks_us() in one native call, for a
        caller that reads the clock every loop period (a method call in bytecode costs
        ~1k instructions on the M3)."""
        return self._update, self._state

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
def _fill_words(address: int, words: int, value: int):
    p = ptr32(address)
    for i in range(words):
        p[i] = value


@micropython.viper
def _copy_in(address: int, src: ptr8, n: int):
    dst = ptr8(address)
    for i in range(n):
        dst[i] = src[i]


@micropython.viper
def _copy_out(dst: ptr8, address: int, n: int):
    src = ptr8(address)
    for i in range(n):
        dst[i] = src[i]


class RamNorDevice:
    """A NOR flash chip's raw block device over RAM at a fixed address (uctypes: outside
    the heap), standing in for the board's flash: one block is one erase sector, and an
    erase sets it to 0xFF as the chip's does (EraseAhead's blank checks and journal rely
    on that). `erases` counts sector erases, so a test can see where they happen."""

    def __init__(self, address, block_bytes, blocks):
        import uctypes

        self._address = address
        self.erases = 0
        self._mem = uctypes.bytearray_at(address, block_bytes * blocks)
        self._block_bytes = block_bytes
        self._blocks = blocks

    def readblocks(self, block, buf, offset=0):
        # no slice of the device (a new memoryview on the heap): littlefs reads from a
        # file's finaliser too, where the heap is locked
        _copy_out(buf, self._address + block * self._block_bytes + offset, len(buf))

    def writeblocks(self, block, buf, offset=None):
        if offset is None:
            offset = 0
        # Not a slice assignment into the device's memoryview: MicroPython moves the whole
        # tail of the destination on every slice store (mp_seq_replace_slice_no_grow), so
        # a 16-byte write cost 2.6 M instructions on the 2 MiB device (-icount).
        _copy_in(self._address + block * self._block_bytes + offset, buf, len(buf))

    def ioctl(self, op, arg):
        if op == 4:  # block count
            return self._blocks
        if op == 5:  # block size
            return self._block_bytes
        if op == 6:  # erase one sector
            words = self._block_bytes // 4
            _fill_words(self._address + arg * self._block_bytes, words, -1)
            self.erases += 1
            return 0
        return None

    def blank(self):
        """True if the device looks never written: its first 64 bytes all zero (the
        emulator's RAM at power-on) or all 0xFF (a factory-fresh chip)."""
        head = self._mem[0:64]
        return not any(head) or all(b == 0xFF for b in head)


class FlashStore:
    """littlefs at `root` on a NOR chip's raw device, through eraseahead.EraseAhead
    (docs/storage.md "Erase ahead"): littlefs's erases become remaps to sectors erased
    ahead, and `background()` (the scheduler's lowest duty) erases the freed ones in idle
    time, so no commit waits for a sector erase. One per board: mounted once per boot."""

    def __init__(
        self, raw, root, io_bytes, spares, journal_sectors, read_bytes=None, lookahead_bytes=32
    ):
        self.raw = raw
        self.root = root
        self.io_bytes = io_bytes
        self.read_bytes = read_bytes
        self.lookahead_bytes = lookahead_bytes
        self.spares = spares
        self.journal_sectors = journal_sectors
        self.device = None  # the EraseAhead, once mounted

    def mount(self):
        """Mount (formatting a device that does not mount); True if an existing
        filesystem was formatted. The EraseAhead is made once per boot (it holds the map
        in RAM); a root still mounted (the maintenance REPL's) is left as it is, one
        unmounted since (provisioning unmounts) is mounted again on the same device."""
        fresh = False
        if self.device is None:
            from payload import eraseahead

            fresh = self.raw.blank()  # before the journal's first write makes it not blank
            self.device = eraseahead.EraseAhead(self.raw, self.spares, 0, self.journal_sectors)
        return mount_littlefs(
            self.device, self.root, self.io_bytes, fresh, self.read_bytes, self.lookahead_bytes
        )

    def background(self):
        """Erase one sector ahead if one is owed; True if it did (the loop then does not
        idle, and the next pass erases the next)."""
        device = self.device
        return device is not None and device.background()

    def status(self):
        """EraseAhead.status(): [spares erased, sectors owed an erase, erases waited for,
        erases in the background, remaps]; None before mounting."""
        return None if self.device is None else self.device.status()


def mount_littlefs(device, root, io_bytes=32, fresh=None, read_bytes=None, lookahead_bytes=32):
    """Mount littlefs from `device` at `root` (mtime off: no wall clock), formatting a
    device that does not mount. Returns True if an existing filesystem was formatted
    (products and logs lost: housekeeping reports it), False otherwise; a root already
    mounted (from the maintenance REPL) is never formatted. `fresh`: whether the device
    looked never written (default: its own blank()). io_bytes: littlefs's program size
    (its caches are 4 of it); read_bytes: its read size (default io_bytes); lookahead_bytes:
    its allocator's window, 8 blocks a byte (docs/storage.md "littlefs's mount
    parameters")."""
    import os

    try:
        os.stat(root)
        return False
    except OSError:
        pass
    try:
        vfs.mount(_lfs(device, io_bytes, read_bytes, lookahead_bytes), root)
        return False
    except OSError:
        if fresh is None:
            fresh = device.blank()
        vfs.VfsLfs2.mkfs(device, readsize=read_bytes or io_bytes, progsize=io_bytes)
        vfs.mount(_lfs(device, io_bytes, read_bytes, lookahead_bytes), root)
        return not fresh  # not on a blank (first-boot) device


def _lfs(device, io_bytes, read_bytes=None, lookahead_bytes=32):
    return vfs.VfsLfs2(
        device,
        readsize=read_bytes or io_bytes,
        progsize=io_bytes,
        lookahead=lookahead_bytes,
        mtime=False,
    )

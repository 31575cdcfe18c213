# Storage as flash fails: the firmware's record logs on littlefs (vfs.VfsLfs2, mounted as the
# boards mount it) over a NOR flash model that erases to 0xFF, programs only 1 -> 0, takes
# program and erase time, and fails on command: power cut at the Nth program/erase
# operation (a torn program leaves part of the data, 0xFF, or garbage; a torn erase leaves
# a half-erased sector), I/O errors, and bit flips in stored records. After each cut the
# "controller" boots again: a fresh littlefs mount, Storage, RecordLog recovery, and the
# check that every committed record came back intact and no torn record is served.
#
# CAMPAIGN_CUTS is the test's campaign; benchmarks/bench_storage.py runs >= 1000 cuts. Runs
# on unix and on QEMU (littlefs is the same C code; QEMU adds the 32-bit MCU's small ints).
import gc
import os
import random
import sys

import micropython
import vfs
from micropython import const
from payload import eraseahead, storage

# The chip model lives in the heap (up to 160 KiB, in 4 KiB sector buffers): a target with
# a smaller heap (the 96 KiB STM32 board) does not run this file.
TARGETS = ("unix", "qemu")
TARGETS_REASON = "the NOR chip model needs 160 KiB of heap beside the firmware"
# The chip model takes a third of the heap: on unix the file runs with 80 % of it, so that
# the rest keeps a margin (its floor is 60-70 %; with a 96 KiB snapshot beside the chip it
# was 80-85 %, docs/targets.md "RAM budget")
UNIX_HEAP_PERCENT = 80

# QEMU (the 32-bit MCU) runs a shorter campaign on a smaller chip, so it also fills it
CAMPAIGN_CUTS = 250 if sys.platform == "linux" else 60
CAMPAIGN_BLOCKS = 40 if sys.platform == "linux" else 20
CAMPAIGN_SEED = 15
# Erase ahead (eraseahead.EraseAhead between littlefs and the chip): its campaign on a chip
# with room for the journal and the spares beside the same littlefs data
EA_CUTS = 250 if sys.platform == "linux" else 40
EA_BLOCKS = 40 if sys.platform == "linux" else 26
EA_SPARES = 4
FRAME_PERIOD_US = const(41_000)  # 4096 slots at 100 MHz (docs/sequencer.md)
CUT_WITHIN = 300  # operations after power-on (mount, recovery, then ~10-30 per record)
MOUNT = "/flt"
_EIO = const(5)


class PowerCut(Exception):
    """The supply went away: nothing after this operation reaches the flash."""


@micropython.viper
def _program(mem: ptr8, start: int, src: ptr8, src_at: int, n: int) -> int:
    # NOR program: bits only go 1 -> 0. Returns bytes that asked for a 0 -> 1 change.
    wrong = 0
    for i in range(n):
        old = mem[start + i]
        new = src[src_at + i]
        if new & (old ^ 0xFF):
            wrong += 1
        mem[start + i] = old & new
    return wrong


@micropython.viper
def _read(mem: ptr8, start: int, dst: ptr8, dst_at: int, n: int):
    for i in range(n):
        dst[dst_at + i] = mem[start + i]


@micropython.viper
def _fill(mem: ptr8, start: int, n: int, value: int):
    for i in range(n):
        mem[start + i] = value


@micropython.viper
def _find(mem: ptr8, size: int, pattern: ptr8, n: int, start: int) -> int:
    i = start
    while i + n <= size:
        j = 0
        while j < n and mem[i + j] == pattern[j]:
            j += 1
        if j == n:
            return i
        i += 1
    return -1


# The chip's cells are kept in buffers of one 4 KiB sector each, not one buffer for the
# chip: the 160 KiB chip then needs forty 4 KiB holes in the heap, not one 160 KiB block
# (on QEMU at 85 % of the controller's heap no such block was left after the raw REPL had
# compiled this file: docs/targets.md "Margins"). Smaller sectors (512 B) share a buffer;
# an address range may span buffers, so the cells are reached through the chip's methods.
CELL_BUFFER_BYTES = const(4096)


class NorFlash:
    """The flash chip: its cells survive power cuts; `port()` is one power-on session."""

    def __init__(self, blocks=40, block_bytes=4096, page_bytes=256, rng=None, reuse=None):
        self.blocks = blocks
        self.block_bytes = block_bytes
        self.page_bytes = page_bytes
        size = blocks * block_bytes
        if reuse is None:
            buffers = (size + CELL_BUFFER_BYTES - 1) // CELL_BUFFER_BYTES
            reuse = [bytearray(CELL_BUFFER_BYTES) for _ in range(buffers)]
        assert len(reuse) * CELL_BUFFER_BYTES >= size, (blocks, block_bytes)
        self.cells = reuse  # one bytearray per CELL_BUFFER_BYTES of the address space
        self.size = size
        self.rng = rng or random
        self.blank()
        # Typical serial NOR figures (e.g. W25Q-class datasheets): 0.7 ms per 256 B page
        # program, 45 ms per 4 KiB sector erase; reads are free in this model.
        self.program_us_per_page = 700
        self.erase_us = 45_000
        self.busy_us = 0
        self.operations = 0  # programs + erases since the chip was made
        self.programs = 0
        self.programmed_bytes = 0
        self.erases = 0
        self.wrong_programs = 0  # programs that asked for a 0 -> 1 change (must stay 0)
        self.cut_at = -1  # cut the power during this operation
        self.tear_at = -1  # bytes a torn program gets in (-1: random)
        self.eio_at = -1  # this operation fails with EIO (the chip reports a failure)
        self.eio_from = -1  # every operation from this one fails with EIO
        self.cuts = 0
        self.torn_programs = 0
        self.torn_erases = 0
        self._session = None

    def blank(self):
        """A factory-fresh chip: every cell erased."""
        self.formatted = False
        self.fill(0, self.size, 0xFF)

    # The cells, by chip address (a range may span cell buffers). No method allocates:
    # readblocks runs in littlefs finalisers with the heap locked.

    def read(self, address, dst, n):
        done = 0
        while done < n:
            buf = (address + done) // CELL_BUFFER_BYTES
            at = (address + done) % CELL_BUFFER_BYTES
            k = min(n - done, CELL_BUFFER_BYTES - at)
            _read(self.cells[buf], at, dst, done, k)
            done += k

    def _program_cells(self, address, src, n):
        wrong = 0
        done = 0
        while done < n:
            buf = (address + done) // CELL_BUFFER_BYTES
            at = (address + done) % CELL_BUFFER_BYTES
            k = min(n - done, CELL_BUFFER_BYTES - at)
            wrong += _program(self.cells[buf], at, src, done, k)
            done += k
        return wrong

    def fill(self, address, n, value):
        done = 0
        while done < n:
            buf = (address + done) // CELL_BUFFER_BYTES
            at = (address + done) % CELL_BUFFER_BYTES
            k = min(n - done, CELL_BUFFER_BYTES - at)
            _fill(self.cells[buf], at, k, value)
            done += k

    def byte(self, address):
        return self.cells[address // CELL_BUFFER_BYTES][address % CELL_BUFFER_BYTES]

    def set_byte(self, address, value):
        self.cells[address // CELL_BUFFER_BYTES][address % CELL_BUFFER_BYTES] = value

    def find(self, pattern, start):
        """The first chip address >= start where the cells hold `pattern` (as if the chip
        were one buffer: a match may span two cell buffers), or -1."""
        n = len(pattern)
        size = self.size
        seam = bytearray(2 * n)  # the last n - 1 bytes of a buffer and the next one's first
        while start + n <= size:
            buf = start // CELL_BUFFER_BYTES
            at = start % CELL_BUFFER_BYTES
            end = min(CELL_BUFFER_BYTES, size - buf * CELL_BUFFER_BYTES)
            hit = _find(self.cells[buf], end, pattern, n, at)
            if hit >= 0:
                return buf * CELL_BUFFER_BYTES + hit
            # matches that start in this buffer's last n - 1 bytes and end in the next
            base = buf * CELL_BUFFER_BYTES + max(at, end - n + 1)
            count = min(size, (buf + 1) * CELL_BUFFER_BYTES + n - 1) - base
            if count >= n:
                self.read(base, seam, count)
                hit = _find(seam, count, pattern, n, 0)
                if hit >= 0:
                    return base + hit
            start = (buf + 1) * CELL_BUFFER_BYTES
        return -1

    def port(self):
        """Power on: a new session; the last one's objects can never reach the cells."""
        if self._session is not None:
            self._session.alive = False
        self._session = FlashPort(self)
        return self._session

    def _operation(self):
        self.operations += 1
        n = self.operations
        if n == self.eio_at or (self.eio_from >= 0 and n >= self.eio_from):
            return -_EIO
        if n == self.cut_at:
            return 1
        return 0

    def program(self, block, offset, buf):
        verdict = self._operation()
        if verdict < 0:
            return verdict
        start = block * self.block_bytes + offset
        n = len(buf)
        pages = (n + self.page_bytes - 1) // self.page_bytes
        if verdict:
            # Torn program: a prefix made it, then the cells under program are left erased
            # (0xFF, nothing more programmed) or half-programmed (garbage).
            done = self.rng.getrandbits(16) % (n + 1) if self.tear_at < 0 else self.tear_at
            self.wrong_programs += 1 if self._program_cells(start, buf, done) else 0
            if done < n and self.rng.getrandbits(1):
                junk = bytearray(self.rng.getrandbits(8) for _ in range(min(n - done, 32)))
                self._program_cells(start + done, junk, len(junk))
            self.busy_us += self.program_us_per_page * pages // 2
            self.torn_programs += 1
            self._cut()
        self.wrong_programs += 1 if self._program_cells(start, buf, n) else 0
        self.programs += 1
        self.programmed_bytes += n
        self.busy_us += self.program_us_per_page * pages

    def erase(self, block):
        verdict = self._operation()
        if verdict < 0:
            return verdict
        start = block * self.block_bytes
        if verdict:
            # Torn erase: part of the sector reads 0xFF, the rest anything.
            done = self.rng.getrandbits(16) % (self.block_bytes + 1)
            self.fill(start, done, 0xFF)
            for i in range(start + done, min(start + done + 64, start + self.block_bytes)):
                self.set_byte(i, self.rng.getrandbits(8))
            self.busy_us += self.erase_us // 2
            self.torn_erases += 1
            self._cut()
        self.fill(start, self.block_bytes, 0xFF)
        self.erases += 1
        self.busy_us += self.erase_us
        return 0

    def _cut(self):
        self.cuts += 1
        self._session.alive = False
        raise PowerCut()

    def flip_bit(self, address, bit):
        self.set_byte(address, self.byte(address) ^ (1 << bit))


class FlashPort:
    """The block device littlefs sees (MicroPython's extended interface with offsets)."""

    def __init__(self, chip):
        self.chip = chip
        self.alive = True

    # After the cut, the old session's objects may still run (closing files, littlefs
    # finalisers at a later garbage collection): they read, but no write or erase reaches
    # the cells.

    def readblocks(self, block, buf, offset=0):
        chip = self.chip
        # allocation-free: littlefs may read from a file's finaliser, with the heap locked
        chip.read(block * chip.block_bytes + offset, buf, len(buf))
        return 0

    def writeblocks(self, block, buf, offset=None):
        if not self.alive:
            return 0
        return self.chip.program(block, 0 if offset is None else offset, buf)

    def ioctl(self, op, arg):
        if op == 4:  # block count
            return self.chip.blocks
        if op == 5:  # block size
            return self.chip.block_bytes
        if op == 6:  # erase
            if not self.alive:
                return 0
            return self.chip.erase(arg)
        return 0  # init, deinit, sync


_CHIP = None
_DEVICE = None  # what littlefs is mounted on: the chip's port, or EraseAhead over it
_ERASED_PAGE = b"\xff" * 256


class _Snapshot:
    """The chip's first sectors as they are now, kept as the 256-byte pages that are not
    erased (a sweep starts from 12 records), so no block of the heap has to hold 24 sectors
    at once (96 KiB, made beside the 160 KiB chip, was the first thing to find no hole: on
    unix below ~85 % of the heap, docs/targets.md "RAM budget")."""

    def __init__(self, chip, blocks):
        self.chip = chip
        self.size = blocks * chip.block_bytes
        page = bytearray(256)
        self.pages = []
        for at in range(0, self.size, 256):
            chip.read(at, page, 256)
            if page != _ERASED_PAGE:
                self.pages.append((at, bytes(page)))

    def restore(self):
        chip = self.chip
        chip.fill(0, self.size, 0xFF)
        for at, page in self.pages:
            chip._program_cells(at, page, 256)


def _chip(blocks=40, block_bytes=4096):
    """One chip for the whole file (the heap is the controller's: 160 KiB of buffers made
    per test would fragment it), made factory-fresh with `blocks` sectors of `block_bytes`
    in use."""
    global _CHIP
    if _CHIP is None:
        _CHIP = NorFlash(blocks=40)
    chip = _CHIP
    chip.__init__(blocks, block_bytes, reuse=chip.cells)
    return chip


# littlefs's program size on NOR: MicroPython's VfsLfs2 caches 4 x progsize, so 64 gives a
# 256-byte cache and littlefs programs whole 256-byte pages (one page-program time each);
# the default 32 (128-byte programs) costs ~15 % more flash time per record, measured
# with steady_state (docs/storage.md).
NOR_PROG_BYTES = const(64)


def _power_on(chip, format_first=False, erase_ahead=False):
    """Boot as a NOR board does: mount littlefs (mtime off, progsize NOR_PROG_BYTES),
    straight on the chip or through eraseahead.EraseAhead (sectors erased ahead):
    erase_ahead False, True (the flight journal), "short-journal" or "multi-sector-journal"
    (short too, each journal copy spanning three sectors: a board whose map does not fit
    one sector's slots)."""
    global _DEVICE
    try:
        vfs.umount(MOUNT)  # still mounted if a test failed before its power-off
    except OSError:
        pass
    port = chip.port()
    device = port
    if erase_ahead:
        # "short-journal": blocks + 8 slots, compacted every ~8 remaps, so that cuts land
        # in compactions too; otherwise the flight journal (a sector's 256 slots)
        slots = 0
        journal_sectors = 1
        if erase_ahead == "short-journal":
            slots = chip.blocks - eraseahead.JOURNAL_SECTORS - EA_SPARES + 8
        elif erase_ahead == "multi-sector-journal":
            journal_sectors = 3
            slots = chip.blocks - 2 * journal_sectors - EA_SPARES + 8
        device = eraseahead.EraseAhead(port, EA_SPARES, slots, journal_sectors)
    _DEVICE = device
    if format_first:
        chip.formatted = False
        vfs.VfsLfs2.mkfs(device, progsize=NOR_PROG_BYTES)
        chip.formatted = True  # a cut before this: the next boot formats again
    vfs.mount(vfs.VfsLfs2(device, mtime=False, progsize=NOR_PROG_BYTES), MOUNT)
    return device


def _idle_time(until_done=False):
    """Between frames: the scheduler's idle slice erases one sector ahead (EraseAhead);
    until_done: the idle time between boot and a pass (every owed sector erased)."""
    if isinstance(_DEVICE, eraseahead.EraseAhead):
        while _DEVICE.background() and until_done:
            pass


def _power_off():
    try:
        vfs.umount(MOUNT)
    except OSError:
        pass
    # Power is off: a file object nobody closed (a batched log's, with records not yet
    # synced) must not reach the cells when its finaliser runs at the next collection.
    if _CHIP is not None and _CHIP._session is not None:
        _CHIP._session.alive = False
    gc.collect()


# ------------------------------------------------------------------ records under test

# name, kind, max payload, batched: "frames" is synced as the firmware's pattern log is
# (once per storage.RECORDS_PER_SYNC records, a group commit), "events" per record
LOGS = (
    ("frames", storage.KIND_PATTERN_FRAME, 1100, True),
    ("events", storage.KIND_TDC_BLOCK, 300, False),
)
_FILL = bytes(range(256)) * 5


def _payload_length(name, seq):
    if name == "frames":
        return 40 + (seq * 389) % 1060
    return 8 + (seq * 53) % 290


def _fill_payload(log, name, seq):
    n = _payload_length(name, seq)
    p = log.payload
    p[:n] = memoryview(_FILL)[(seq * 7) & 0xFF : ((seq * 7) & 0xFF) + n]
    p[0] = seq & 0xFF
    p[1] = (seq >> 8) & 0xFF
    p[2] = ord(name[0])
    return n


def _expected(name, seq):
    n = _payload_length(name, seq)
    out = bytearray(_FILL[(seq * 7) & 0xFF : ((seq * 7) & 0xFF) + n])
    out[0] = seq & 0xFF
    out[1] = (seq >> 8) & 0xFF
    out[2] = ord(name[0])
    return out


def _served(path, max_payload):
    """Every record a reader gets from the file: {seq: payload}."""
    out = {}
    with open(path, "rb") as f:

        def visit(offset, seq, kind, length):
            f.seek(offset + storage.HEADER_BYTES)
            out[seq] = f.read(length)

        result = storage.scan(path, max_payload, visit=visit)
    return out, result


def _served_after_the_cut(chip, name, kind, max_payload, cut):
    """Power back on with no cut armed, read what the log serves, power off; every served
    record must be the one written (the cut index in the message)."""
    _power_off()
    chip.cut_at = -1
    _power_on(chip)
    log = storage.Storage(MOUNT).open_log(name, kind, max_payload)
    served, result = _served(log.path, max_payload)
    _power_off()
    assert all(served[s] == _expected(name, s) for s in served), cut
    return served, result


def _served_checked(path, name, max_payload):
    """The sequence numbers a reader gets from the file, and how many of those records
    differ from what was written (compared as read: the payloads are not kept, so a
    chip's worth of records fits beside the chip in the controller's heap)."""
    seqs = set()
    wrong = [0]
    with open(path, "rb") as f:

        def visit(offset, seq, kind, length):
            f.seek(offset + storage.HEADER_BYTES)
            if f.read(length) != _expected(name, seq):
                wrong[0] += 1
            seqs.add(seq)

        result = storage.scan(path, max_payload, visit=visit)
    return seqs, wrong[0], result


class Ledger:
    """What the controller knows it committed, per log, and what the campaign saw."""

    def __init__(self):
        self.lost = 0
        self.window_lost = 0  # committed, not yet synced at the cut: the loss window
        self.worst_window = 0  # most records one cut took from one log's window
        self.torn_served = 0
        self.torn_skipped = 0  # torn records found and skipped at recovery (not flips)
        self.flipped_skipped = 0  # records a bit flip corrupted, skipped at recovery
        self.boots = 0
        self.records = 0
        self.record_bytes = 0  # committed, as they are in the file
        self.worst_commit_us = 0  # modelled flash time of the slowest commit
        self.commit_erases = 0  # sector erases a commit waited for
        self.new_device()

    def new_device(self):
        self.committed = {name: set() for name, *_ in LOGS}  # durable (synced)
        self.unsynced = {name: set() for name, *_ in LOGS}  # committed, not yet synced
        self.in_flight = {name: -1 for name, *_ in LOGS}
        self.corrupted = {name: set() for name, *_ in LOGS}
        self.skipped = {name: 0 for name, *_ in LOGS}
        self.flips_pending = {name: 0 for name, *_ in LOGS}

    def committed_now(self, name, log, seq):
        """commit() returned seq: durable once the log's durable_seq reaches it."""
        self.unsynced[name].add(seq)
        self.synced(name, log)

    def synced(self, name, log):
        pending = self.unsynced[name]
        for s in [s for s in pending if s <= log.durable_seq]:
            pending.discard(s)
            self.committed[name].add(s)

    def check_boot(self, store):
        """After a power-on: every durable record is served intact, nothing torn is, and a
        cut took at most the records of one group commit (records_per_sync - 1 committed
        since the last sync)."""
        self.boots += 1
        for name, kind, max_payload, batched in LOGS:
            log = store.open_log(name, kind, max_payload, batched)
            new = log.recovery.skipped_regions - self.skipped[name]
            self.skipped[name] = log.recovery.skipped_regions
            flips = min(new, self.flips_pending[name])
            self.flips_pending[name] = 0
            self.flipped_skipped += flips
            self.torn_skipped += new - flips
            served, wrong, _ = (
                _served_checked(log.path, name, max_payload)
                if log.size_bytes
                else (set(), 0, None)
            )
            self.torn_served += wrong
            for seq in self.committed[name]:
                if seq not in served and seq not in self.corrupted[name]:
                    self.lost += 1
            window = 0
            for seq in self.unsynced[name]:
                if seq in served:
                    self.committed[name].add(seq)  # made it to the medium after all
                else:
                    window += 1
            self.unsynced[name] = set()
            assert window <= log.records_per_sync - 1, (name, window)
            self.window_lost += window
            self.worst_window = max(self.worst_window, window)
            # a record in flight at the cut may have made it: then it is committed
            flying = self.in_flight[name]
            if flying >= 0 and flying in served:
                self.committed[name].add(flying)
            self.in_flight[name] = -1
            assert log.next_seq > max(self.committed[name] or (-1,)), log.recovery.as_dict()
            assert log.durable_seq == log.next_seq - 1


def _run_until_cut(chip, ledger, rng, cut_in, format_first=False, erase_ahead=False):
    """Power on, recover, append records until the power cut `cut_in` operations ahead.
    Returns False when the store is full (time for a fresh device)."""
    chip.cut_at = chip.operations + cut_in
    store = None
    try:
        _power_on(chip, format_first, erase_ahead)
        store = storage.Storage(MOUNT)
        ledger.check_boot(store)
        while True:
            name = LOGS[rng.getrandbits(2) % 3 // 2][0]
            log = store.logs[name]
            seq = log.next_seq
            ledger.in_flight[name] = seq
            n = _fill_payload(log, name, seq)
            busy_us = chip.busy_us
            erases = chip.erases
            got = log.commit(n)
            busy_us = chip.busy_us - busy_us
            ledger.commit_erases += chip.erases - erases
            if got < 0:
                assert store.full and log.commits_failed == 0, store.status()
                chip.cut_at = -1
                logs = dict(store.logs)
                store.close()  # a full store still syncs what it took (the controller's stop)
                for name, log in logs.items():
                    ledger.synced(name, log)
                return False
            assert got == seq
            ledger.committed_now(name, log, seq)
            ledger.in_flight[name] = -1
            ledger.records += 1
            ledger.record_bytes += storage.HEADER_BYTES + n + storage.CRC_BYTES
            if busy_us > ledger.worst_commit_us:
                ledger.worst_commit_us = busy_us
            _idle_time()
    except PowerCut:
        if store is not None:
            for log in store.logs.values():
                try:
                    log.close()  # the dead session takes it nowhere (see FlashPort)
                except OSError:
                    pass
        return True
    finally:
        _power_off()


def _flip_a_stored_record(chip, ledger, rng):
    """Flip one bit inside a committed record on the chip (every copy littlefs left)."""
    name = "frames"
    seqs = sorted(ledger.committed[name])
    if len(seqs) < 8:
        return False
    seq = seqs[len(seqs) // 2 + rng.getrandbits(8) % (len(seqs) // 2)]
    if seq < 4:
        return False  # early records may sit inline in littlefs metadata: not record data
    head = bytearray(12)
    head[0:3] = b"QR\x01"
    head[3] = storage.KIND_PATTERN_FRAME
    for i in range(4):
        head[4 + i] = (seq >> (8 * i)) & 0xFF
        head[8 + i] = (_payload_length(name, seq) >> (8 * i)) & 0xFF
    at = chip.find(head, 0)
    hit = 0
    while at >= 0:
        block_end = (at // chip.block_bytes + 1) * chip.block_bytes
        span = min(at + 12 + _payload_length(name, seq), block_end) - (at + 4)
        if span > 0:
            chip.flip_bit(at + 4 + rng.getrandbits(16) % span, rng.getrandbits(3))
            hit += 1
        at = chip.find(head, at + 1)
    if hit:
        ledger.committed[name].discard(seq)
        ledger.corrupted[name].add(seq)
        ledger.flips_pending[name] += 1
    return hit > 0


def run_campaign(cuts, seed, flip_every=7, blocks=40, erase_ahead=False):
    """`cuts` random power cuts; returns the campaign's figures."""
    rng = random
    rng.seed(seed)
    chip = _chip(blocks)
    chip.rng = rng
    ledger = Ledger()
    devices = 1
    flips = 0
    fresh = True
    done = 0
    while done < cuts:
        if done and done % flip_every == 0 and not fresh:
            flips += _flip_a_stored_record(chip, ledger, rng)
        # cut anywhere from the mount to a few records later (a record is ~4-20 operations)
        cut_in = 1 + rng.getrandbits(16) % CUT_WITHIN
        cut = _run_until_cut(chip, ledger, rng, cut_in, fresh, erase_ahead)
        if cut:
            done += 1
            fresh = not chip.formatted  # the cut tore the first format: format again
        else:
            # full: a reported state. Check the full store once more, then a fresh device.
            _power_on(chip, False, erase_ahead)
            ledger.check_boot(storage.Storage(MOUNT))
            _power_off()
            chip.blank()
            ledger.new_device()
            devices += 1
            fresh = True
    # the last boot's check (formatting first if the last cut tore the first format)
    _power_on(chip, not chip.formatted, erase_ahead)
    ledger.check_boot(storage.Storage(MOUNT))
    _power_off()
    return {
        "cuts": chip.cuts,
        "devices": devices,
        "records": ledger.records,
        "lost": ledger.lost,
        "window_lost": ledger.window_lost,
        "worst_window": ledger.worst_window,
        "records_per_sync": storage.RECORDS_PER_SYNC,
        "torn_served": ledger.torn_served,
        "boots": ledger.boots,
        "torn_skipped": ledger.torn_skipped,
        "flipped_skipped": ledger.flipped_skipped,
        "torn_programs": chip.torn_programs,
        "torn_erases": chip.torn_erases,
        "flash_busy_ms": chip.busy_us // 1000,
        "record_bytes": ledger.record_bytes,
        "programmed_bytes": chip.programmed_bytes,
        "erases": chip.erases,
        "worst_commit_us": ledger.worst_commit_us,
        "commit_erases": ledger.commit_erases,
        "bit_flips": flips,
        "wrong_programs": chip.wrong_programs,
    }


def steady_state(payload_bytes, records, blocks=40, records_per_sync=1, erase_ahead=False):
    """Modelled flash cost of logging `records` records of `payload_bytes` each, no faults
    (benchmarks/bench_storage.py), through RecordLog.commit: one sync per record, or with
    records_per_sync > 1 the batched log's group commit (the firmware's pattern and TDC
    logs). worst_commit_us is the slowest single commit; worst_window_us the slowest run
    of records_per_sync commits ending in a sync (what one window costs). With
    erase_ahead, one background erase slice runs after each record (a frame's idle time):
    its flash time is counted apart (background_us), not in the commits."""
    chip = _chip(blocks)
    _power_on(chip, True, erase_ahead)
    store = storage.Storage(MOUNT, -1, records_per_sync)
    log = store.open_log("frames", storage.KIND_PATTERN_FRAME, payload_bytes, batched=True)
    record_bytes = storage.HEADER_BYTES + payload_bytes + storage.CRC_BYTES
    _idle_time(until_done=True)  # boot to pass: the format's and mount's erases owed
    busy0, erases0, programmed0 = chip.busy_us, chip.erases, chip.programmed_bytes
    worst_us = 0
    worst_window_us = 0
    window_us = 0
    commit_us = 0
    commit_erases = 0
    done = 0
    for seq in range(records):
        before, erases = chip.busy_us, chip.erases
        if log.commit(payload_bytes) != seq:
            break  # full
        spent = chip.busy_us - before
        commit_us += spent
        commit_erases += chip.erases - erases
        worst_us = max(worst_us, spent)
        window_us += spent
        if log.durable_seq == seq:
            worst_window_us = max(worst_window_us, window_us)
            window_us = 0
        done += 1
        _idle_time()
    _power_off()
    return {
        "records": done,
        "record_bytes": done * record_bytes,
        "busy_us": chip.busy_us - busy0,
        "commit_us": commit_us,
        "background_us": chip.busy_us - busy0 - commit_us,
        "worst_commit_us": worst_us,
        "worst_window_us": worst_window_us,
        "erases": chip.erases - erases0,
        "commit_erases": commit_erases,
        "programmed_bytes": chip.programmed_bytes - programmed0,
    }


def steady_state_frames(
    frames, pattern_bytes, tdc_bytes, records_per_sync, blocks=40, erase_ahead=False
):
    """Modelled flash time per frame when every frame logs a pattern record and a TDC
    block, both batched logs on one chip (benchmarks/bench_storage.py); with erase_ahead,
    one background erase slice per frame, counted apart."""
    chip = _chip(blocks)
    _power_on(chip, True, erase_ahead)
    store = storage.Storage(MOUNT, -1, records_per_sync)
    patterns = store.open_log("patterns", storage.KIND_PATTERN_FRAME, pattern_bytes, True)
    events = store.open_log("tdc", storage.KIND_TDC_BLOCK, tdc_bytes, True) if tdc_bytes else None
    _idle_time(until_done=True)  # boot to pass: the format's and mount's erases owed
    busy0 = chip.busy_us
    worst_frame_us = 0
    commit_us = 0
    commit_erases = 0
    done = 0
    for frame in range(frames):
        before, erases = chip.busy_us, chip.erases
        if patterns.commit(pattern_bytes) != frame:
            break
        if events is not None and events.commit(tdc_bytes) != frame:
            break
        worst_frame_us = max(worst_frame_us, chip.busy_us - before)
        commit_us += chip.busy_us - before
        commit_erases += chip.erases - erases
        done += 1
        _idle_time()
    _power_off()
    return {
        "frames": done,
        "busy_us": chip.busy_us - busy0,
        "commit_us": commit_us,
        "worst_frame_us": worst_frame_us,
        "commit_erases": commit_erases,
    }


def flips_anywhere(trials, seed, records=25):
    """One bit flipped in a random programmed byte anywhere on the chip (record data,
    stale copies, or littlefs's own structures), after `records` committed records;
    returns {records lost: trials} and the trials that served a wrong record
    (benchmarks/bench_storage.py: the limit of the record-level defence)."""
    rng = random
    rng.seed(seed)
    lost = {}
    wrong = 0
    for _ in range(trials):
        chip = _chip(24)
        store = _fresh_store(chip)
        log = store.open_log("frames", storage.KIND_PATTERN_FRAME, 1100)
        for seq in range(records):
            log.commit(_fill_payload(log, "frames", seq))
        _power_off()
        while True:
            address = rng.getrandbits(20) % (24 * chip.block_bytes)
            if chip.byte(address) != 0xFF:
                break
        chip.flip_bit(address, rng.getrandbits(3))
        try:
            _power_on(chip)
            log = storage.Storage(MOUNT).open_log("frames", storage.KIND_PATTERN_FRAME, 1100)
            served, _ = _served(log.path, 1100) if log.size_bytes else ({}, None)
            wrong += sum(1 for seq in served if served[seq] != _expected("frames", seq))
            n = records - len(served)
        except OSError:
            n = records  # littlefs would not mount or open: everything unreadable
        _power_off()
        lost[n] = lost.get(n, 0) + 1
    return lost, wrong


# ------------------------------------------------------------------ tests


def test_erase_ahead_power_cuts_lose_no_committed_record_and_serve_no_torn_one():
    # The same campaign through EraseAhead: cuts also land in journal programs, journal
    # compactions (a short journal) and background erases.
    figures = run_campaign(EA_CUTS, CAMPAIGN_SEED, blocks=EA_BLOCKS, erase_ahead="short-journal")
    print("erase-ahead campaign", sorted(figures.items()))
    assert figures["cuts"] >= EA_CUTS and figures["records"] > 5 * EA_CUTS, figures
    assert figures["lost"] == 0 and figures["torn_served"] == 0, figures
    assert figures["wrong_programs"] == 0 and figures["worst_window"] <= 7, figures


def test_erase_ahead_no_commit_waits_for_a_sector_erase():
    # The pattern log's 2 kB frame records, one sync per 8 (the firmware's): littlefs
    # straight on NOR waits a 45 ms sector erase inside about one commit in two (longer
    # than the 41 ms frame period); through EraseAhead, with one background erase per
    # frame's idle time, no commit erases and the slowest takes page programs only.
    plain = steady_state(2048, 30, blocks=40, records_per_sync=8)
    ahead = steady_state(2048, 30, blocks=40, records_per_sync=8, erase_ahead=True)
    print("erase ahead", sorted(ahead.items()), "plain", sorted(plain.items()))
    assert plain["commit_erases"] > 0 and plain["worst_commit_us"] > FRAME_PERIOD_US, plain
    assert ahead["records"] == plain["records"] == 30
    assert ahead["commit_erases"] == 0, ahead
    assert ahead["worst_commit_us"] < FRAME_PERIOD_US // 4, ahead
    # the erases still happen, in the background, and fit the frames' idle time
    assert ahead["erases"] > 0
    assert ahead["commit_us"] + ahead["background_us"] < 30 * FRAME_PERIOD_US, ahead


def test_erase_ahead_journal_survives_torn_slots_and_compactions():
    # Remaps enough to compact a short journal several times, then a cut at every
    # operation of one remap + compaction: each boot finds a consistent map (littlefs
    # mounts, every committed record is served).
    _journal_cut_sweep(_chip(EA_BLOCKS), "short-journal", 40)


def test_erase_ahead_journal_spanning_sectors_survives_torn_slots_and_compactions():
    # The boards' journal: a copy spans several sectors (the QEMU board's 500-block map
    # needs 4). Here 512-byte sectors of 32 slots, three per copy, a short journal of 78
    # slots over 70 blocks: a compaction writes entries across the copy's three sectors,
    # remaps land in its third, both copies' sectors are erased (in the background or,
    # when behind, in the commit), and a cut at every operation still finds the map.
    # (QEMU: 25 commits and 15 cuts, ~15 s; the whole sweep there took ~75 s)
    if sys.platform == "linux":
        _journal_cut_sweep(_chip(80, 512), "multi-sector-journal", 40)
    else:
        _journal_cut_sweep(_chip(80, 512), "multi-sector-journal", 25, 16)


def _journal_cut_sweep(chip, mode, commits, cuts=60):
    ledger = Ledger()
    store = None
    _power_on(chip, True, mode)
    store = storage.Storage(MOUNT)
    ledger.check_boot(store)
    log = store.logs["events"]
    for _ in range(commits):
        seq = log.next_seq
        n = _fill_payload(log, "events", seq)
        assert log.commit(n) == seq, (seq, log.status(), _DEVICE.status(), _DEVICE.epoch)
        ledger.committed_now("events", log, seq)
        _idle_time()
    device = _DEVICE
    assert device.epoch >= 3, device.status()  # compacted at least twice
    store.close()
    _power_off()
    start = chip.operations
    for cut in range(1, cuts):
        chip.cut_at = start + cut
        try:
            _power_on(chip, False, mode)
            store = storage.Storage(MOUNT)
            ledger.check_boot(store)
            log = store.logs["events"]
            for _ in range(6):
                seq = log.next_seq
                ledger.in_flight["events"] = seq
                n = _fill_payload(log, "events", seq)
                assert log.commit(n) == seq
                ledger.committed_now("events", log, seq)
                ledger.in_flight["events"] = -1
            chip.cut_at = -1
            store.close()
        except PowerCut:
            pass
        finally:
            _power_off()
        start = chip.operations
    chip.cut_at = -1
    _power_on(chip, False, mode)
    ledger.check_boot(storage.Storage(MOUNT))
    _power_off()
    assert ledger.lost == 0 and ledger.torn_served == 0, (ledger.lost, ledger.torn_served)


def test_random_power_cuts_lose_no_committed_record_and_serve_no_torn_one():
    figures = run_campaign(CAMPAIGN_CUTS, CAMPAIGN_SEED, blocks=CAMPAIGN_BLOCKS)
    print("campaign", sorted(figures.items()))
    assert figures["cuts"] >= CAMPAIGN_CUTS
    assert figures["lost"] == 0 and figures["torn_served"] == 0, figures
    assert figures["wrong_programs"] == 0, figures  # littlefs never reprograms a 0 to 1
    assert figures["bit_flips"] > 0 and figures["devices"] >= 2, figures
    # the group commit's window was cut into, and never cost more than its records
    assert 0 < figures["worst_window"] <= figures["records_per_sync"] - 1, figures


def _sweep_every_cut(batched, commits, seed, check):
    """Not random: from one start state (12 records, synced), cut at operation 1, 2, ...
    of a boot and `commits` more commits of the "frames" log (batched: the group commit)
    until a run completes. After each cut the next boot reads the log: every record
    served must be what was written, and check(cut, served, result, returned, durable,
    flying) gets the rest (the last seq commit() returned, the log's durable_seq then, the
    seq in flight at the cut or -1). Returns the number of cuts."""
    chip = _chip(24)
    store = _fresh_store(chip)
    log = store.open_log("frames", storage.KIND_PATTERN_FRAME, 1100, batched)
    for seq in range(12):
        assert log.commit(_fill_payload(log, "frames", seq)) == seq
    assert log.durable_seq == (storage.RECORDS_PER_SYNC - 1 if batched else 11)
    assert log.sync() and log.durable_seq == 11
    _power_off()
    start = _Snapshot(chip, 24)
    rng = random
    rng.seed(seed)
    chip.rng = rng
    cut = 0
    while True:
        cut += 1
        start.restore()
        chip.cut_at = chip.operations + cut
        returned = durable = 11
        flying = -1
        try:
            _power_on(chip)
            log = storage.Storage(MOUNT).open_log(
                "frames", storage.KIND_PATTERN_FRAME, 1100, batched
            )
            for seq in range(12, 12 + commits):
                flying = seq
                assert log.commit(_fill_payload(log, "frames", seq)) == seq
                returned, durable, flying = seq, log.durable_seq, -1
            finished = True
        except PowerCut:
            finished = False
        served, result = _served_after_the_cut(
            chip, "frames", storage.KIND_PATTERN_FRAME, 1100, cut
        )
        check(cut, served, result, returned, durable, flying)
        if finished:
            return cut


def test_a_power_cut_at_every_operation_of_a_boot_and_five_commits():
    # Synced per record: every record whose commit returned comes back, and the one in
    # flight at the cut only whole.
    def check(cut, served, result, returned, durable, flying):
        want = list(range(returned + 1)) + ([flying] if flying in served else [])
        assert sorted(served) == want, (cut, sorted(served), returned)

    cuts = _sweep_every_cut(False, 5, 99, check)
    print("cut at each of", cuts, "operations")
    assert cuts > 20, cuts  # every program and erase of the boot and the five commits


def test_a_power_cut_at_every_operation_of_a_group_commit_loses_only_its_window():
    # A batched log (the pattern log's group commit), RECORDS_PER_SYNC + 3 commits after
    # the boot. What comes back is every record up to the last sync that completed, whole,
    # and at most the window (records committed since that sync) is gone: never a torn or
    # a reordered record.
    per_sync = storage.RECORDS_PER_SYNC
    assert per_sync > 1
    windows = set()

    def check(cut, served, result, returned, durable, flying):
        last = max(served)
        assert sorted(served) == list(range(last + 1)), (cut, sorted(served))
        assert durable <= last <= returned + 1, (cut, durable, last, returned)
        assert returned - last <= per_sync - 1, (cut, returned, last)
        assert result.dropped_bytes == 0, (cut, result.as_dict())
        windows.add(returned - last if returned > last else 0)

    cuts = _sweep_every_cut(True, per_sync + 3, 98, check)
    print("cut at each of", cuts, "operations; records lost per cut:", sorted(windows))
    assert cuts > 20 and max(windows) == per_sync - 1, (cuts, windows)


class _PassClock:
    """The time the deferred-log sweep's passes see: it moves by the housekeeping period
    between two records (deterministic, so every run of the sweep cuts the same
    operations; the age rule itself is tested on the boards' clocks in
    mptest_log_sync.py)."""

    def __init__(self):
        self.now_us = 0

    def ticks_us(self):
        return self.now_us & 0x3FFFFFFF


def test_a_power_cut_at_every_operation_of_a_deferred_log_loses_only_its_age_window():
    # A deferred log (the low-rate logs: clock, epochs, housekeeping, tracking): commits
    # never sync; the store's sync duty (sync_step, once a pass, here once a record) syncs
    # when the oldest unsynced record is the sync age old. A record every 250 ms and a
    # 1 s age: a sync after each 5th record, so a cut loses at most the 5 records of the
    # last second, whole, and every record before the last completed sync comes back.
    age_us = 1_000_000
    every_us = 250_000
    window = age_us // every_us + 1  # records committed within one age, both ends counted
    commits = 2 * window + 2
    chip = _chip(24)
    store = _fresh_store(chip)
    log = store.open_log("hk", storage.KIND_HOUSEKEEPING, 300)
    for seq in range(12):
        assert log.commit(_fill_payload(log, "hk", seq)) == seq
    _power_off()
    start = _Snapshot(chip, 24)
    random.seed(97)
    chip.rng = random
    cut = 0
    losses = set()
    while True:
        cut += 1
        start.restore()
        chip.cut_at = chip.operations + cut
        returned = durable = 11
        clock = _PassClock()
        syncs = 0
        try:
            _power_on(chip)
            store = storage.Storage(MOUNT, -1, storage.RECORDS_PER_SYNC, clock, age_us)
            log = store.open_log("hk", storage.KIND_HOUSEKEEPING, 300, deferred=True)
            assert log.records_per_sync == 0
            for seq in range(12, 12 + commits):
                clock.now_us += every_us
                assert log.commit(_fill_payload(log, "hk", seq)) == seq
                returned = seq
                assert log.durable_seq == durable  # a commit never synced it
                if store.sync_step():
                    syncs += 1
                durable = log.durable_seq
            finished = True
        except PowerCut:
            finished = False
        served, result = _served_after_the_cut(chip, "hk", storage.KIND_HOUSEKEEPING, 300, cut)
        last = max(served)
        assert sorted(served) == list(range(last + 1)), (cut, sorted(served))
        assert durable <= last <= returned + 1, (cut, durable, last, returned)
        assert returned - last <= window, (cut, returned, last)
        assert result.dropped_bytes == 0, (cut, result.as_dict())
        losses.add(returned - last if returned > last else 0)
        if finished:
            break
    print("cut at each of", cut, "operations; records lost per cut:", sorted(losses))
    assert syncs == commits // window, syncs  # by age only: one per `window` records
    assert cut > 20 and max(losses) == window, (cut, losses)


def test_an_io_error_in_a_group_commit_counts_the_window_it_took():
    per_sync = storage.RECORDS_PER_SYNC
    chip = _chip()
    store = _fresh_store(chip)
    log = store.open_log("frames", storage.KIND_PATTERN_FRAME, 1100, batched=True)
    for seq in range(per_sync + 2):  # one sync done, two records in the next window
        assert log.commit(_fill_payload(log, "frames", seq)) == seq
    assert log.durable_seq == per_sync - 1
    chip.eio_from = chip.operations + 1  # the chip fails from here on
    assert not log.sync()
    assert log.unsynced_lost == 2 and log.commits_failed == 0, log.status()
    assert store.status()["window_lost"] == 2
    chip.eio_from = -1
    # the log goes on after the lost window; the gap is what a reader sees
    seq = log.next_seq
    assert log.commit(_fill_payload(log, "frames", seq), sync=True) == seq == per_sync + 2
    _power_off()
    _power_on(chip)
    log = storage.Storage(MOUNT).open_log("frames", storage.KIND_PATTERN_FRAME, 1100)
    served, result = _served(log.path, 1100)
    assert sorted(served) == list(range(per_sync)) + [per_sync + 2], sorted(served)
    assert log.recovery.missing_records == 2 and result.dropped_bytes == 0
    _power_off()


def _fresh_store(chip, quota_bytes=-1):
    _power_on(chip, format_first=True)
    return storage.Storage(MOUNT, quota_bytes)


def test_a_bit_flip_in_an_old_record_costs_that_record_only():
    chip = _chip()
    store = _fresh_store(chip)
    log = store.open_log("frames", storage.KIND_PATTERN_FRAME, 1100)
    for seq in range(30):
        assert log.commit(_fill_payload(log, "frames", seq)) == seq
    _power_off()
    ledger = Ledger()
    ledger.committed["frames"] = set(range(30))
    assert _flip_a_stored_record(chip, ledger, random)
    (victim,) = ledger.corrupted["frames"]
    _power_on(chip)
    store = storage.Storage(MOUNT)
    log = store.open_log("frames", storage.KIND_PATTERN_FRAME, 1100)
    r = log.recovery
    assert r.records == 29 and r.skipped_regions == 1 and r.missing_records == 1, r.as_dict()
    assert r.reason == "bad crc" or r.reason == "bad length" or r.reason == "bad magic"
    status = store.status()  # what housekeeping reports
    assert status["missing"] == 1 and status["skipped"] == r.dropped_bytes > 0, status
    served, _ = _served(log.path, 1100)
    assert sorted(served) == [s for s in range(30) if s != victim]
    assert all(served[s] == _expected("frames", s) for s in served)
    # appends continue after the last record, and the bad one stays skipped
    assert log.commit(_fill_payload(log, "frames", 30)) == 30
    _power_off()


def test_recovery_of_a_torn_tail_needs_no_free_space():
    # A plain (non-copy-on-write) filesystem or an older firmware leaves a torn tail, and
    # the store is nearly full. Recovery must not need a copy of the file.
    chip = _chip(24)
    store = _fresh_store(chip)
    log = store.open_log("frames", storage.KIND_PATTERN_FRAME, 1100)
    for seq in range(40):
        assert log.commit(_fill_payload(log, "frames", seq)) == seq
    log.close()
    with open(log.path, "ab") as f:  # the start of a record that never finished
        f.write(b"QR\x01\x01" + bytes(60))
    filler = bytes(1024)
    with open(MOUNT + "/filler", "wb") as f:  # everything else littlefs has
        try:
            while True:
                f.write(filler)
                f.flush()
        except OSError:
            pass
    _power_off()
    _power_on(chip)
    store = storage.Storage(MOUNT)
    log = store.open_log("frames", storage.KIND_PATTERN_FRAME, 1100)
    assert log.recovery.records == 40 and log.recovery.skipped_regions == 1
    served, _ = _served(log.path, 1100)
    assert sorted(served) == list(range(40))
    assert all(served[s] == _expected("frames", s) for s in served)
    # and the full store refuses the next record cleanly
    got = log.commit(_fill_payload(log, "frames", 40))
    assert got == storage.COMMIT_FAILED and store.full, (got, store.status(), os.statvfs(MOUNT))
    _power_off()


def test_enospc_from_littlefs_itself_is_counted_and_leaves_no_torn_record():
    chip = _chip(24)
    store = _fresh_store(chip, quota_bytes=1 << 29)  # no quota: littlefs runs out first
    log = store.open_log("frames", storage.KIND_PATTERN_FRAME, 1100)
    seq = 0
    while log.commit(_fill_payload(log, "frames", seq)) == seq:
        seq += 1
    assert log.last_errno == 28 and log.commits_failed == 1 and store.full, log.status()
    _power_off()
    _power_on(chip)
    store = storage.Storage(MOUNT)
    log = store.open_log("frames", storage.KIND_PATTERN_FRAME, 1100)
    served, wrong, result = _served_checked(log.path, "frames", 1100)
    assert sorted(served) == list(range(seq)) and result.dropped_bytes == 0 and not wrong
    _power_off()


def test_a_full_store_is_a_reported_state_not_a_crash_nor_a_torn_record():
    chip = _chip(24)
    store = _fresh_store(chip)  # the default quota from the filesystem's size
    assert 0 < store.quota_bytes < 24 * 4096
    log = store.open_log("frames", storage.KIND_PATTERN_FRAME, 1100)
    seq = 0
    while True:
        got = log.commit(_fill_payload(log, "frames", seq))
        if got < 0:
            break
        seq += 1
    assert store.full and not store.can_commit() and log.commits_refused == 1, log.status()
    assert log.commits_failed == 0  # the quota stopped it before littlefs ran out
    assert store.status()["refused"] == 1
    # the file ends with the last committed record; littlefs still has room to work
    served, wrong, result = _served_checked(log.path, "frames", 1100)
    assert sorted(served) == list(range(seq)) and result.dropped_bytes == 0 and not wrong
    # deleting a product makes room again: the next commit goes in
    other = store.open_log("events", storage.KIND_TDC_BLOCK, 300)
    while other.commit(_fill_payload(other, "events", other.next_seq)) >= 0:
        pass
    assert store.full and other.commits_refused == 1
    log.close()
    os.remove(log.path)
    seq = other.next_seq
    assert other.commit(_fill_payload(other, "events", seq)) == seq and not store.full
    _power_off()


def test_an_io_error_mid_record_is_counted_and_leaves_no_torn_record():
    chip = _chip()
    store = _fresh_store(chip)
    log = store.open_log("frames", storage.KIND_PATTERN_FRAME, 1100)
    for seq in range(10):
        assert log.commit(_fill_payload(log, "frames", seq)) == seq
    chip.eio_at = chip.operations + 2  # the second program of the next record fails
    assert log.commit(_fill_payload(log, "frames", 10)) == storage.COMMIT_FAILED
    assert log.commits_failed == 1 and log.last_errno == _EIO
    assert store.status()["failed"] == 1
    # the chip works again: the log goes on with the same sequence number
    assert log.commit(_fill_payload(log, "frames", 10)) == 10
    assert log.commit(_fill_payload(log, "frames", 11)) == 11
    chip.eio_from = chip.operations + 1  # the chip dies for good
    assert log.commit(_fill_payload(log, "frames", 12)) == storage.COMMIT_FAILED
    assert log.commit(_fill_payload(log, "frames", 12)) == storage.COMMIT_FAILED
    assert log.commits_failed == 3
    chip.eio_from = -1
    _power_off()
    _power_on(chip)
    store = storage.Storage(MOUNT)
    log = store.open_log("frames", storage.KIND_PATTERN_FRAME, 1100)
    served, result = _served(log.path, 1100)
    assert sorted(served) == list(range(12)) and result.dropped_bytes == 0, result.as_dict()
    assert all(served[s] == _expected("frames", s) for s in served)
    _power_off()


def test_the_flash_model_is_nor_flash():
    chip = _chip(2)
    port = chip.port()
    buf = bytearray(16)
    port.readblocks(1, buf, 8)
    assert buf == b"\xff" * 16  # erased
    port.writeblocks(1, b"\x0f" * 16, 8)
    port.writeblocks(1, b"\xf1" * 16, 8)  # programming can only clear bits
    port.readblocks(1, buf, 8)
    assert buf == b"\x01" * 16 and chip.wrong_programs == 1
    assert port.ioctl(6, 1) == 0
    port.readblocks(1, buf, 8)
    assert buf == b"\xff" * 16 and chip.busy_us == 2 * 700 + 45_000
    chip.cut_at = chip.operations + 1
    chip.tear_at = 5
    try:
        port.writeblocks(0, b"\x00" * 256, 0)
        raise AssertionError("no power cut")
    except PowerCut:
        pass
    port.writeblocks(0, b"\x00" * 16, 0)  # that session is gone for good
    port = chip.port()
    port.readblocks(0, buf, 0)  # the cells kept what the torn program left, no more
    assert chip.torn_programs == 1 and buf[:5] == bytes(5) and buf[5:] != bytes(11)
    # the cells are kept per sector; a record header lying across two sectors is found
    # (and bit-flipped) as on one buffer
    chip = _chip(40)
    port = chip.port()
    head = b"QR\x01\x01" + bytes(range(8))
    port.writeblocks(3, head[:5], 4096 - 5)
    port.writeblocks(4, head[5:], 0)
    assert len(chip.cells) == 40 and max(len(cells) for cells in chip.cells) == 4096
    assert chip.find(head, 0) == 4 * 4096 - 5 and chip.find(head, 4 * 4096 - 4) == -1
    chip.flip_bit(4 * 4096 + 1, 3)
    port.readblocks(4, buf, 0)
    assert buf[:3] == b"\x01\x0a\x03" and chip.find(head, 0) == -1

# Sectors erased ahead of littlefs on NOR flash (docs/storage.md "Erase ahead").
#
# littlefs erases a block just before it programs it, inside the commit that needs it, and a
# 4 KiB NOR sector erase takes ~45 ms: longer than a 41 ms frame period. This block device
# sits between littlefs and the chip and keeps a few spare sectors erased in advance: when
# littlefs asks to erase block L, L is pointed at an already-erased spare (one 16-byte
# journal program), and the sector L held before is erased later, one per `background()`
# call, from the scheduler's idle time. On the chip such an erase runs while the
# controller works; a program that arrives meanwhile suspends it (erase-suspend, which
# serial NOR parts have; ~20-30 us).
#
# On the chip: sectors 0 and 1 are the journal (one active, the other erased standby), the
# rest data. littlefs sees `sectors - 2 - spares` blocks. The map (littlefs block ->
# sector) is a journal of 16-byte slots:
#   u8 'E', u8 'A', u16 block, u16 sector, u32 seq, 4 x 0x00, u16 CRC-16 of bytes 0..13
# Slot 0 of a journal sector is its header (block 0xFFFE, seq = epoch); slots 1.. are map
# entries, applied in order. When the active journal fills, the whole map is written to the
# standby (entries first, header last) and the old one becomes the standby, erased later.
# A power cut tears at most one slot (its CRC fails: skipped) or one compaction (no header:
# the old journal stays active). At mount every sector the map does not name is checked:
# blank ones are spares, the others erased in the background.
import array

import micropython
from micropython import const

from payload import framing

JOURNAL_SECTORS = const(2)
# what a data sector holds (self.state)
_NAMED = const(1)  # a littlefs block's
_SPARE = const(2)  # erased ahead, named by no block
_DIRTY = const(3)  # named by no block, not erased
SLOT_BYTES = const(16)
_HEADER = const(0xFFFE)
_ERASE = const(6)


@micropython.viper
def _all_erased(buf: ptr8, n: int) -> bool:
    for i in range(n):
        if buf[i] != 0xFF:
            return False
    return True


class EraseAhead:
    """littlefs's block device (extended interface: offsets, ioctl 4/5/6) over a raw NOR
    block device with the same interface (each of its erases is one sector erase)."""

    def __init__(self, raw, spares=4, journal_slots=0):
        self.raw = raw
        self.sectors = raw.ioctl(4, 0)
        self.sector_bytes = raw.ioctl(5, 0)
        self.blocks = self.sectors - JOURNAL_SECTORS - spares  # what littlefs sees
        if spares < 1 or self.blocks < 2:
            raise ValueError("eraseahead: %d sectors, %d spares" % (self.sectors, spares))
        # journal_slots (tests): a shorter journal, compacted more often
        self.slots = journal_slots or self.sector_bytes // SLOT_BYTES
        if self.slots < self.blocks + 2 or self.slots > self.sector_bytes // SLOT_BYTES:
            raise ValueError("eraseahead: journal sector too small for the map")
        self.map = array.array("H", range(JOURNAL_SECTORS, JOURNAL_SECTORS + self.blocks))
        # Per sector, _NAMED / _SPARE / _DIRTY (the journal's two: 0): fixed arrays, so an
        # erase asked for from a file's finaliser (heap locked) allocates nothing.
        self.state = bytearray(self.sectors)
        self._cursor = JOURNAL_SECTORS  # where the next spare or dirty search starts
        self.journal = 0  # the active journal sector
        self.epoch = 0
        self.next_slot = 1
        self.standby_blank = False
        self.seq = 0
        # counters (storage status): erases a caller waited for, and the rest
        self.foreground_erases = 0
        self.background_erases = 0
        self.remaps = 0
        self._slot = bytearray(SLOT_BYTES)
        self._read = bytearray(SLOT_BYTES)
        self._page = bytearray(256)
        status = self._mount()
        if status:
            raise OSError(-status)

    # ---------------------------------------------------------------- littlefs's interface

    def readblocks(self, block, buf, offset=0):
        return self.raw.readblocks(self.map[block], buf, offset)

    def writeblocks(self, block, buf, offset=None):
        return self.raw.writeblocks(self.map[block], buf, 0 if offset is None else offset)

    def ioctl(self, op, arg):
        if op == 4:
            return self.blocks
        if op == 5:
            return self.sector_bytes
        if op == _ERASE:
            return self._erase(arg)
        return self.raw.ioctl(op, arg)  # init, deinit, sync

    # ---------------------------------------------------------------- the scheduler's side

    def background(self):
        """Erase one sector owed (the old journal, or a sector a remap freed); returns True
        if it did. Call from idle time: the only place where a whole erase is waited."""
        if not self.standby_blank:
            status = self._erase_sector(1 - self.journal, False)
            if status == 0:
                self.standby_blank = True
            return status == 0
        sector = self._find(_DIRTY)
        if sector and self._erase_sector(sector, False) == 0:
            self.state[sector] = _SPARE
            return True
        return False

    def status(self):
        """[spares erased, sectors owed an erase, erases waited for, erases in the
        background, remaps]."""
        spares = dirty = 0
        for state in self.state:
            spares += state == _SPARE
            dirty += state == _DIRTY
        return [spares, dirty + (0 if self.standby_blank else 1),
                self.foreground_erases, self.background_erases, self.remaps]  # fmt: skip

    def _find(self, wanted):
        """A data sector in state `wanted` (searched round-robin, spreading the wear), or
        0 if none."""
        n = self.sectors - JOURNAL_SECTORS
        state = self.state
        for i in range(n):
            sector = JOURNAL_SECTORS + (self._cursor - JOURNAL_SECTORS + i) % n
            if state[sector] == wanted:
                self._cursor = JOURNAL_SECTORS + (sector + 1 - JOURNAL_SECTORS) % n
                return sector
        return 0

    # ---------------------------------------------------------------- internals

    def _erase(self, block):
        if not 0 <= block < self.blocks:
            return -22  # EINVAL
        sector = self._find(_SPARE)
        if not sector:
            # None erased ahead (the background fell behind): erase one now, waited for.
            sector = self._find(_DIRTY)
            if not sector:
                return -5  # EIO: cannot happen (every remap frees a sector)
            status = self._erase_sector(sector, True)
            if status:
                return status
            self.state[sector] = _SPARE
        status = self._append(block, sector)
        if status:
            return status
        self.state[self.map[block]] = _DIRTY
        self.state[sector] = _NAMED
        self.map[block] = sector
        self.remaps += 1
        return 0

    def _erase_sector(self, sector, waited):
        status = self.raw.ioctl(_ERASE, sector)
        if status == 0:
            if waited:
                self.foreground_erases += 1
            else:
                self.background_erases += 1
        return status

    def _fill_slot(self, block, sector, seq):
        s = self._slot
        s[0] = 0x45
        s[1] = 0x41
        s[2] = block & 0xFF
        s[3] = block >> 8
        s[4] = sector & 0xFF
        s[5] = sector >> 8
        for i in range(4):
            s[6 + i] = (seq >> (8 * i)) & 0xFF
            s[10 + i] = 0
        crc = framing.crc16(s, 14)
        s[14] = crc >> 8
        s[15] = crc & 0xFF

    def _write_slot(self, journal, slot, block, sector, seq):
        self._fill_slot(block, sector, seq)
        return self.raw.writeblocks(journal, self._slot, slot * SLOT_BYTES)

    def _read_slot(self, journal, slot):
        """(block, sector, seq) of a valid slot; None if blank; False if torn or corrupt."""
        s = self._read
        self.raw.readblocks(journal, s, slot * SLOT_BYTES)
        if _all_erased(s, SLOT_BYTES):
            return None
        crc = framing.crc16(s, 14)
        if s[0] != 0x45 or s[1] != 0x41 or s[14] != crc >> 8 or s[15] != crc & 0xFF:
            return False
        seq = s[6] | (s[7] << 8) | (s[8] << 16) | (s[9] << 24)
        return (s[2] | (s[3] << 8), s[4] | (s[5] << 8), seq)

    def _append(self, block, sector):
        if self.next_slot >= self.slots:
            status = self._compact()
            if status:
                return status
        self.seq += 1
        status = self._write_slot(self.journal, self.next_slot, block, sector, self.seq)
        self.next_slot += 1  # a failed program may have torn the slot: never reused
        return status

    def _compact(self):
        """Write the whole map to the standby journal (header last), make it the active."""
        standby = 1 - self.journal
        if not self.standby_blank:
            status = self._erase_sector(standby, True)
            if status:
                return status
        self.standby_blank = False
        for block in range(self.blocks):
            self.seq += 1
            status = self._write_slot(standby, 1 + block, block, self.map[block], self.seq)
            if status:
                return status
        status = self._write_slot(standby, 0, _HEADER, 0, self.epoch + 1)
        if status:
            return status
        self.epoch += 1
        self.journal = standby
        self.next_slot = 1 + self.blocks
        return 0

    def _blank(self, sector):
        page = self._page
        for offset in range(0, self.sector_bytes, len(page)):
            self.raw.readblocks(sector, page, offset)
            if not _all_erased(page, len(page)):
                return False
        return True

    def _mount(self):
        best = -1
        for journal in range(JOURNAL_SECTORS):
            head = self._read_slot(journal, 0)
            if head and head[0] == _HEADER and head[2] > best:
                best = head[2]
                self.journal = journal
        if best < 0:
            # A fresh chip (or a first compaction cut short): the identity map, written out.
            self.journal = 1  # so that _compact writes sector 0
            self.standby_blank = self._blank(0)
            status = self._compact()
            if status:
                return status
        else:
            self.epoch = best
            last = 0
            for slot in range(1, self.slots):
                entry = self._read_slot(self.journal, slot)
                if entry is None:
                    continue
                last = slot
                if entry is False:
                    continue  # torn by a power cut: that remap never happened
                block, sector, seq = entry
                if block < self.blocks and JOURNAL_SECTORS <= sector < self.sectors:
                    self.map[block] = sector
                    if seq > self.seq:
                        self.seq = seq
            self.next_slot = last + 1
            self.standby_blank = self._blank(1 - self.journal)
        state = self.state
        for block in range(self.blocks):
            state[self.map[block]] = _NAMED
        for sector in range(JOURNAL_SECTORS, self.sectors):
            if not state[sector]:
                state[sector] = _SPARE if self._blank(sector) else _DIRTY
        return 0

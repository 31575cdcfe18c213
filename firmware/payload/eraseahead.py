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
# On the chip: the first 2 x J sectors are the journal's two copies (one active, the other
# an erased standby; J = `journal_sectors`, 1 by default, more on a chip whose map does not
# fit one sector's 16-byte slots), the rest data. littlefs sees `sectors - 2J - spares`
# blocks. The map (littlefs block -> sector) is a journal of 16-byte slots:
#   u8 'E', u8 'A', u16 block, u16 sector, u32 seq, 4 x 0x00, u16 CRC-16 of bytes 0..13
# Slot 0 of a journal sector is its header (block 0xFFFE, seq = epoch); slots 1.. are map
# entries, applied in order. Once half the active journal's room after the map is used,
# `background()`, when no sector is owed an erase, copies the whole map to the erased
# standby, _COPY_SLOTS entries a call (entries first, header last; a remap of a block
# already copied is also appended to the standby after the map), and the standby becomes
# the active, the old one erased later: so
# no littlefs call writes the whole map (on the QEMU board's 500 blocks that was one append
# of 7.6 M instructions in ~2,900: docs/storage.md). Only when the active fills before the
# copy is done (no idle time) is the whole map written inside the remap, as before.
# A power cut tears at most one slot (its CRC fails: skipped) or one compaction (no header:
# the old journal stays active). At mount every sector the map does not name is checked:
# blank ones are spares, the others erased in the background.
import array

import micropython
from micropython import const

from payload import framing

JOURNAL_SECTORS = const(2)  # the journal's two copies with the default J = 1
# what a data sector holds (self.state)
_NAMED = const(1)  # a littlefs block's
_SPARE = const(2)  # erased ahead, named by no block
_DIRTY = const(3)  # named by no block, not erased
SLOT_BYTES = const(16)
_COPY_SLOTS = const(16)  # map entries background() copies to the standby a call
_HEADER = const(0xFFFE)
_ERASE = const(6)


@micropython.viper
def _all_erased(buf: ptr8, n: int) -> bool:
    for i in range(n):
        if buf[i] != 0xFF:
            return False
    return True


@micropython.viper
def _scan(state: ptr8, first: int, n: int, cursor: int, wanted: int) -> int:
    # the round-robin search of _find, in viper: in Python it cost ~50 k instructions a
    # remap on a 512-sector chip (QEMU -icount)
    k = cursor - first
    for _ in range(n):
        if k >= n:
            k -= n
        if state[first + k] == wanted:
            return first + k
        k += 1
    return 0


class EraseAhead:
    """littlefs's block device (extended interface: offsets, ioctl 4/5/6) over a raw NOR
    block device with the same interface (each of its erases is one sector erase)."""

    def __init__(self, raw, spares=4, journal_slots=0, journal_sectors=1):
        self.raw = raw
        # bound once: littlefs calls these for every page it reads or programs
        self._raw_read = raw.readblocks
        self._raw_write = raw.writeblocks
        self.sectors = raw.ioctl(4, 0)
        self.sector_bytes = raw.ioctl(5, 0)
        # J sectors per journal copy: copy 0 is sectors [0, J), copy 1 [J, 2J)
        self.journal_sectors = journal_sectors
        self.first_data = 2 * journal_sectors
        self.blocks = self.sectors - self.first_data - spares  # what littlefs sees
        if spares < 1 or journal_sectors < 1 or self.blocks < 2:
            raise ValueError("eraseahead: %d sectors, %d spares" % (self.sectors, spares))
        self.slots_per_sector = self.sector_bytes // SLOT_BYTES
        # journal_slots (tests): a shorter journal, compacted more often
        most = journal_sectors * self.slots_per_sector
        self.slots = journal_slots or most
        if self.slots < self.blocks + 2 or self.slots > most:
            raise ValueError("eraseahead: journal sector too small for the map")
        self.map = array.array("H", range(self.first_data, self.first_data + self.blocks))
        # Per sector, _NAMED / _SPARE / _DIRTY (the journal's two: 0): fixed arrays, so an
        # erase asked for from a file's finaliser (heap locked) allocates nothing.
        self.state = bytearray(self.sectors)
        self._cursor = self.first_data  # where the next spare or dirty search starts
        self.journal = 0  # the active journal copy
        self.epoch = 0
        self.next_slot = 1
        self.standby_blank = False
        self._standby_erased = 0  # sectors of the standby copy erased so far
        self.seq = 0
        # counters (storage status): erases a caller waited for, and the rest
        self.foreground_erases = 0
        self.background_erases = 0
        self.remaps = 0
        # the background copy of the map to the standby: the next block to copy (-1: none),
        # the remaps appended after the map, and when to start (half the room after it)
        self._copy_next = -1
        self._copy_extra = 0
        self._copy_ahead = max(1, (self.slots - 1 - self.blocks) // 2)
        self._slot = bytearray(SLOT_BYTES)
        self._copy_slot = bytearray(SLOT_BYTES)
        self._read = bytearray(SLOT_BYTES)
        self._page = bytearray(256)
        status = self._mount()
        if status:
            raise OSError(-status)

    # ---------------------------------------------------------------- littlefs's interface

    def readblocks(self, block, buf, offset=0):
        return self._raw_read(self.map[block], buf, offset)

    def writeblocks(self, block, buf, offset=None):
        return self._raw_write(self.map[block], buf, 0 if offset is None else offset)

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
        """Erase one sector owed (the old journal, or a sector a remap freed), or, with
        none owed, copy the next _COPY_SLOTS entries of the map to the standby journal;
        returns True if it did. Call from idle time: the only place where a whole erase is
        waited. (Erases first: a remap needs an erased spare now, the copy only before the
        journal fills.)"""
        if not self.standby_blank and self._copy_next < 0:
            status = self._erase_sector(self._standby_next(), False)
            if status == 0:
                self._standby_erased += 1
                self.standby_blank = self._standby_erased == self.journal_sectors
            return status == 0
        sector = self._find(_DIRTY)
        if sector and self._erase_sector(sector, False) == 0:
            self.state[sector] = _SPARE
            return True
        if self._copy_next < 0:
            if self.slots - self.next_slot > self._copy_ahead:
                return False
            self.standby_blank = False  # written from here on; erased again once retired
            self._standby_erased = 0
            self._copy_next = 0
            self._copy_extra = 0
        self._copy_step()
        return True

    def _copy_step(self):
        """Copy the next entries of the map to the standby; after the last, its header,
        and the standby becomes the active journal. A failed program abandons the copy
        (the standby is erased again, the active keeps every entry)."""
        standby = 1 - self.journal
        block = self._copy_next
        end = min(block + _COPY_SLOTS, self.blocks)
        while block < end:
            # counted as copied before its program: a remap of this block from a finaliser
            # while the program runs (littlefs closing a dropped file) is appended after
            # the map; the copy's own slot buffer, which that remap does not touch
            self._copy_next = block + 1
            self.seq += 1
            if self._write_slot(
                standby, 1 + block, block, self.map[block], self.seq, self._copy_slot
            ):
                self._copy_next = -1
                return
            block += 1
        if block < self.blocks:
            return
        self._copy_next = -1
        if self._write_slot(standby, 0, _HEADER, 0, self.epoch + 1, self._copy_slot):
            return
        self.epoch += 1
        self.journal = standby
        self.next_slot = 1 + self.blocks + self._copy_extra
        # the old copy is the standby now: standby_blank is False and _standby_erased 0
        # since the copy began, so background() erases it next

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
        first = self.first_data
        n = self.sectors - first
        sector = _scan(self.state, first, n, self._cursor, wanted)
        if sector:
            self._cursor = first + (sector + 1 - first) % n
        return sector

    def _standby_next(self):
        """The standby copy's next sector owed an erase."""
        return (1 - self.journal) * self.journal_sectors + self._standby_erased

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

    def _fill_slot(self, block, sector, seq, s):
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

    def _write_slot(self, journal, slot, block, sector, seq, buf=None):
        if buf is None:
            buf = self._slot
        self._fill_slot(block, sector, seq, buf)
        per = self.slots_per_sector
        sector_at = journal * self.journal_sectors + slot // per
        return self.raw.writeblocks(sector_at, buf, (slot % per) * SLOT_BYTES)

    def _read_slot(self, journal, slot):
        """(block, sector, seq) of a valid slot; None if blank; False if torn or corrupt."""
        s = self._read
        per = self.slots_per_sector
        sector_at = journal * self.journal_sectors + slot // per
        self.raw.readblocks(sector_at, s, (slot % per) * SLOT_BYTES)
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
        if not status and self._copy_next > block:  # (a device may return None)
            # a block the background copy already wrote: its new sector after the map
            extra = 1 + self.blocks + self._copy_extra
            self.seq += 1
            if extra >= self.slots or self._write_slot(
                1 - self.journal, extra, block, sector, self.seq
            ):
                self._copy_next = -1  # abandoned: the active journal has the remap
            self._copy_extra += 1
        return status

    def _compact(self):
        """Write the whole map to the standby journal (header last), make it the active
        (a background copy under way is abandoned: the standby is erased first)."""
        self._copy_next = -1
        standby = 1 - self.journal
        while not self.standby_blank:
            status = self._erase_sector(self._standby_next(), True)
            if status:
                return status
            self._standby_erased += 1
            self.standby_blank = self._standby_erased == self.journal_sectors
        self.standby_blank = False
        self._standby_erased = 0
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

    def _copy_blank(self, journal):
        """Whether journal copy `journal` is erased (sets the standby's erase progress)."""
        first = journal * self.journal_sectors
        done = 0
        while done < self.journal_sectors and self._blank(first + done):
            done += 1
        self._standby_erased = done
        return done == self.journal_sectors

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
            self.journal = 1  # so that _compact writes copy 0
            self.standby_blank = self._copy_blank(0)
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
                if block < self.blocks and self.first_data <= sector < self.sectors:
                    self.map[block] = sector
                    if seq > self.seq:
                        self.seq = seq
            self.next_slot = last + 1
            self.standby_blank = self._copy_blank(1 - self.journal)
        state = self.state
        for block in range(self.blocks):
            state[self.map[block]] = _NAMED
        for sector in range(self.first_data, self.sectors):
            if not state[sector]:
                state[sector] = _SPARE if self._blank(sector) else _DIRTY
        return 0

# Power-safe append-only record logs (.qrec, docs/formats.md; design in docs/storage.md).
#
# A record is  "QR" | version | kind | seq u32 | length u32 | payload | CRC-32  and each
# product is one file <root>/products/<name>.qrec. Opening a log walks it and keeps every
# record whose framing and CRC check; a torn record (power cut, failed write) or a record
# a bit flip corrupted is skipped, never served, and the walk resynchronises on the next
# record magic, so one bad record costs that record only. Nothing is copied or rewritten
# at recovery (no free space needed): appends continue after whatever the file holds.
#
# A commit that storage cannot take (quota reached, ENOSPC, an I/O error) returns -1 and
# is counted; it never raises into the data path, and on littlefs it leaves no partial
# record (a failed write leaves the file at its last synced state). The sequencer checks
# the result in one place and stops the laser (docs/storage.md).
#
# Records go out in flash-page sized writes (PAGE_BYTES). A log is synced per record, or,
# for the high-rate logs (pattern frames, TDC blocks) opened `batched`, once per
# `records_per_sync` records (a group commit): on NOR flash a sync per 2 kB frame record
# costs two frame periods, a sync per 8 less than one (docs/storage.md). The low-rate logs
# (clock, epochs, housekeeping, tracking) are opened `deferred`: a commit never syncs them;
# the scheduler's "sync" duty (Storage.sync_step) does, one log a pass, when the log's
# oldest unsynced record is sync_age_us old, and so do a pass's stop, a product list, a
# reset and every durable write of the link (a counter ceiling, a key): a synced littlefs
# append holds the CPU 0.45-3 M instructions, which stalled the paced loop per record. A
# power cut then loses at most the records since the last sync (the loss window, whole
# records: littlefs reverts an unsynced file to its last sync), never a torn one.
import os

import micropython
from micropython import const

from payload import framing

MAGIC0 = const(0x51)  # "Q"
MAGIC1 = const(0x52)  # "R"
FORMAT_VERSION = const(1)
HEADER_BYTES = const(12)
CRC_BYTES = const(4)
PAGE_BYTES = const(256)

KIND_PATTERN_FRAME = const(1)
KIND_TDC_BLOCK = const(2)
KIND_HOUSEKEEPING = const(3)
KIND_TRACKING = const(4)
KIND_CLOCK_DISCIPLINE = const(5)

PRODUCTS_DIR = "products"
_SCAN_CHUNK = const(512)
LAST_HEAD_BYTES = const(16)  # kept from the last record at recovery (e.g. its frame number)
COMMIT_FAILED = const(-1)  # what commit() returns when storage could not take the record
_ENOSPC = const(28)
# Free space kept out of the quota: littlefs copies a file's last block on every synced
# append and needs blocks for metadata compaction, so a store is "full" before littlefs is.
_RESERVE_FRACTION = const(8)  # 1/8 of the filesystem ...
_RESERVE_MIN_BLOCKS = const(8)  # ... and at least this many blocks
# What a store is on: each board states it (board.STORAGE_MEDIUM), and the reserve follows
# the medium, never the filesystem's size (a flight SD card or eMMC under littlefs is
# 1 GiB or more and needs its 1/8 all the same).
MEDIUM_LITTLEFS = "littlefs"  # the boards: littlefs on flash, 1/8 kept, whatever the size
# the unix target: a directory on the host's disk, which no littlefs copy-on-write draws on;
# it keeps the minimum only. With 1/8 of it, a host disk with less than 12.5 % available
# (32 GB free of 252 GB here) gave the store a quota of 0 and every commit was refused
# (storage_quota_on_a_host_disk test).
MEDIUM_HOST_DIRECTORY = "host directory"
# The code update's files on the storage root (payload/codeupdate.py writes them): the
# staging file, and each committed file waiting for its activation (<name>.new, at the
# root and under payload/). They take the products' flash, so the store counts them with
# the products, from boot on: a power cut can leave them (an upload cut off, a set
# committed and never activated), and uncounted they let the products fill the flash
# under the quota until a session removed them.
CODE_STAGING_FILE = "code.part"
CODE_WAITING_SUFFIX = ".new"
# Records per sync of a batched log (measured on the NOR model, docs/storage.md): the
# loss window on a power cut, in frames for the pattern log. A board may set its own
# (board.STORAGE_RECORDS_PER_SYNC).
RECORDS_PER_SYNC = const(8)
# Age at which the sync duty syncs a deferred log's oldest unsynced record (the time loss
# window of the low-rate logs, docs/storage.md). A board may set its own
# (board.STORAGE_SYNC_AGE_US).
SYNC_AGE_US = const(1_000_000)
_TICKS_WRAP = const(0x3FFFFFFF)  # the clocks' ticks_us wrap at 2^30


@micropython.viper
def _put_u32(buf: ptr8, offset: int, value: int):
    buf[offset] = value & 0xFF
    buf[offset + 1] = (value >> 8) & 0xFF
    buf[offset + 2] = (value >> 16) & 0xFF
    buf[offset + 3] = (value >> 24) & 0xFF


@micropython.viper
def _put_word(buf: ptr8, offset: int, words: ptr32, index: int, xor: int):
    # Copies a 32-bit word that may not fit a small int (a CRC) without making it one.
    value = words[index] ^ xor
    buf[offset] = value & 0xFF
    buf[offset + 1] = (value >> 8) & 0xFF
    buf[offset + 2] = (value >> 16) & 0xFF
    buf[offset + 3] = (value >> 24) & 0xFF


@micropython.viper
def _word_equals(buf: ptr8, offset: int, words: ptr32, index: int, xor: int) -> bool:
    value = words[index] ^ xor
    got = buf[offset] | (buf[offset + 1] << 8) | (buf[offset + 2] << 16)
    got |= buf[offset + 3] << 24
    diff = value ^ got  # compare the low 32 bits only (viper ints are 64-bit on unix)
    return (diff & 0xFFFF) == 0 and ((diff >> 16) & 0xFFFF) == 0


@micropython.viper
def _find_magic(buf: ptr8, start: int, end: int) -> int:
    # Index of the first "QR" + version in buf[start:end], or -1.
    i = start
    while i + 2 < end:
        if buf[i] == MAGIC0 and buf[i + 1] == MAGIC1 and buf[i + 2] == FORMAT_VERSION:
            return i
        i += 1
    return -1


def _get_u32(buf, offset):
    # Used for seq and length only, which stay far below 2**30.
    return buf[offset] | (buf[offset + 1] << 8) | (buf[offset + 2] << 16) | (buf[offset + 3] << 24)


def _join(*parts):
    return "/".join(p.rstrip("/") for p in parts if p)


def _exists(path):
    try:
        os.stat(path)
        return True
    except OSError:
        return False


def _mkdir(path):
    try:
        os.mkdir(path)
    except OSError:
        pass  # exists


def _errno(error):
    return error.args[0] if error.args and isinstance(error.args[0], int) else 0


class Recovery:
    """What opening a log found: records kept, bytes skipped, and why."""

    def __init__(self):
        self.records = 0
        self.valid_bytes = 0  # bytes inside valid records
        self.size_bytes = 0  # the whole file
        self.dropped_bytes = 0  # bytes in no valid record (torn or corrupt): never served
        self.skipped_regions = 0  # runs of such bytes, each resynchronised past
        self.missing_records = 0  # sequence numbers absent between valid records
        self.reason = None  # None, or why the first skipped region was skipped
        self.last_seq = -1
        self.last_payload_head = b""  # first bytes of the last valid record's payload
        self.last_kind = -1  # kind of the last valid record

    def as_dict(self):
        return {
            "records": self.records,
            "valid_bytes": self.valid_bytes,
            "dropped_bytes": self.dropped_bytes,
            "skipped_regions": self.skipped_regions,
            "missing_records": self.missing_records,
            "reason": self.reason,
        }


_REASONS = ("cut short", "bad magic", "bad length", "sequence repeat", "bad crc")


class _Walker:
    """Reads candidate records of one open file (buffers made once per scan)."""

    def __init__(self, f, size, max_payload_bytes, file_crc):
        self.f = f
        self.size = size
        self.max_payload_bytes = max_payload_bytes
        self.file_crc = file_crc
        self.header = bytearray(HEADER_BYTES)
        self.tail = bytearray(CRC_BYTES)
        self.chunk = bytearray(_SCAN_CHUNK)
        self.record_crc = framing.Crc32()
        self.head = b""

    def record_at(self, offset, last_seq, keep_file_crc):
        """Payload length of a valid record at offset, or -1 - index into _REASONS."""
        f = self.f
        size = self.size
        if size - offset < HEADER_BYTES + CRC_BYTES:
            return -1
        header = self.header
        f.seek(offset)
        f.readinto(header)
        if header[0] != MAGIC0 or header[1] != MAGIC1 or header[2] != FORMAT_VERSION:
            return -2
        length = _get_u32(header, 8)
        if length > self.max_payload_bytes:
            return -3
        if offset + HEADER_BYTES + length + CRC_BYTES > size:
            return -1
        if _get_u32(header, 4) <= last_seq:
            return -4
        file_crc = self.file_crc
        saved_file_crc = file_crc._state[0]
        record_crc = self.record_crc
        record_crc.reset()
        record_crc.update(header)
        if keep_file_crc:
            file_crc.update(header)
        chunk = self.chunk
        left = length
        head = b""
        while left > 0:
            n = f.readinto(chunk, left if left < _SCAN_CHUNK else _SCAN_CHUNK)
            if not n:
                file_crc._state[0] = saved_file_crc
                return -1
            record_crc.update(chunk, n)
            if keep_file_crc:
                file_crc.update(chunk, n)
            if not head:
                head = bytes(chunk[: min(n, LAST_HEAD_BYTES)])
            left -= n
        tail = self.tail
        f.readinto(tail)
        if not _word_equals(tail, 0, record_crc._state, 0, -1):
            file_crc._state[0] = saved_file_crc
            return -5
        if keep_file_crc:
            file_crc.update(tail)
        self.head = head
        return length

    def next_magic(self, start):
        """Offset of the next record magic at or after start (the file size if none)."""
        f = self.f
        chunk = self.chunk
        pos = start
        while pos + 2 < self.size:
            f.seek(pos)
            n = f.readinto(chunk)
            if n < 3:
                break
            i = _find_magic(chunk, 0, n)
            if i >= 0:
                return pos + i
            pos += n - 2  # a magic split across chunks is found in the next one
        return self.size


def scan(path, max_payload_bytes, file_crc=None, visit=None):
    """Walk the records of `path`, skipping torn or corrupt ones; returns a Recovery.

    file_crc (a framing.Crc32) is left holding the CRC-32 of the whole file. visit, when
    given, is called as visit(offset, seq, kind, length) for every valid record."""
    result = Recovery()
    try:
        size = os.stat(path)[6]
    except OSError:
        return result
    result.size_bytes = size
    if file_crc is None:
        file_crc = framing.Crc32()
    with open(path, "rb") as f:
        walker = _Walker(f, size, max_payload_bytes, file_crc)
        offset = 0
        bad_from = -1  # start of the run of bytes being skipped
        contiguous = True  # every byte so far is in a valid record: file CRC kept on the way
        while offset < size:
            length = walker.record_at(offset, result.last_seq, contiguous)
            if length < 0:
                if bad_from < 0:
                    bad_from = offset
                    if result.reason is None:
                        result.reason = _REASONS[-1 - length]
                contiguous = False
                offset = walker.next_magic(offset + 1)
                continue
            if bad_from >= 0:
                result.skipped_regions += 1
                result.dropped_bytes += offset - bad_from
                bad_from = -1
            seq = _get_u32(walker.header, 4)
            result.missing_records += seq - result.last_seq - 1
            result.last_seq = seq
            result.records += 1
            result.valid_bytes += HEADER_BYTES + length + CRC_BYTES
            result.last_payload_head = walker.head if length else b""
            result.last_kind = walker.header[3]
            if visit is not None:
                visit(offset, seq, walker.header[3], length)
            offset += HEADER_BYTES + length + CRC_BYTES
        if bad_from >= 0:
            result.skipped_regions += 1
            result.dropped_bytes += size - bad_from
        if not contiguous:
            _file_crc(f, file_crc, walker.chunk)
    return result


def _file_crc(f, crc, buf):
    crc.reset()
    f.seek(0)
    while True:
        n = f.readinto(buf)
        if not n:
            break
        crc.update(buf, n)


def _starts_like_a_log(path):
    # A torn first record still begins with (a prefix of) "QR" + version.
    with open(path, "rb") as f:
        first = f.read(3)
    return bytes((MAGIC0, MAGIC1, FORMAT_VERSION))[: len(first)] == first


class RecordLog:
    """One product file, opened for appending after recovering from any power cut.

    `payload` is a preallocated buffer: fill payload[:n] and call `commit(n)`, or call
    `append(data)`. A record is committed once commit() returns its sequence number; it is
    durable (synced) then, or with records_per_sync > 1 at the latest when that many
    records have been committed since the last sync, or at `sync()` (`durable_seq` says
    which). records_per_sync 0 is a deferred log: commits do not sync it, its store does
    (Storage.sync_step, by the age of its oldest unsynced record, `unsynced_since_us`);
    a commit syncs it only when that record is twice the store's sync age old (the sync
    duty is not running). commit() returns COMMIT_FAILED (-1) when storage cannot take it
    (quota reached, ENOSPC, I/O error), counts it, and leaves the log usable."""

    def __init__(self, path, kind, max_payload_bytes, store=None, records_per_sync=1, record=None):
        self.path = path
        self.kind = kind
        self.max_payload_bytes = max_payload_bytes
        self.store = store  # the Storage whose quota this log draws on (None: no quota)
        # record: a buffer shared with other logs that each fill their payload and commit
        # it in one go (Storage.open_log's shared), else this log's own
        if record is None or len(record) < HEADER_BYTES + max_payload_bytes + CRC_BYTES:
            record = bytearray(HEADER_BYTES + max_payload_bytes + CRC_BYTES)
        self.use_record(record)
        self._crc = framing.Crc32()
        self.file_crc = framing.Crc32()
        self.foreign = False
        self.recovery = self._recover()
        self.next_seq = self.recovery.last_seq + 1
        self.size_bytes = self.recovery.size_bytes
        self.commits_failed = 0  # storage errors (ENOSPC, EIO): record not written
        self.commits_refused = 0  # the quota was reached: record not written
        self.last_errno = 0
        self.records_per_sync = records_per_sync
        self.durable_seq = self.next_seq - 1  # the last record known to be on the medium
        self._unsynced = 0  # records committed since the last sync
        self.unsynced_since_us = 0  # deferred: ticks_us when the oldest unsynced was committed
        self.syncs = 0  # syncs of this log (group commits, deferred syncs, forced ones)
        self._synced_size = self.size_bytes
        # records a failed write or sync took back with it (committed, never durable)
        self.unsynced_lost = 0
        self._file = None  # opened at the first append: no empty products at boot
        # Called after each page write when set: the unix power-cut test uses it to give
        # pages a NOR-flash program time, so its kills land inside records.
        self.page_hook = None

    def use_record(self, record):
        """Commit through `record` from now on: a buffer shared with other logs (payloads
        up to its size less the header and CRC, at most max_payload_bytes), or None: one
        of the log's own for max_payload_bytes again. `payload` is a new view: a caller
        holding a view of the old one takes it again."""
        if record is None:
            record = bytearray(HEADER_BYTES + self.max_payload_bytes + CRC_BYTES)
        room = len(record) - HEADER_BYTES - CRC_BYTES
        if room > self.max_payload_bytes:
            room = self.max_payload_bytes
        self._record = record
        self._view = memoryview(record)
        self.payload = self._view[HEADER_BYTES : HEADER_BYTES + room]
        self._payload_room = room

    def _recover(self):
        result = scan(self.path, self.max_payload_bytes, self.file_crc)
        if result.dropped_bytes and result.records == 0 and not _starts_like_a_log(self.path):
            # Not a record log at all (a file the data path never wrote): never append to
            # it. The log refuses appends until someone deletes the file.
            self.foreign = True
            result.reason = "not a record log"
            return result
        if _exists(self.path + ".tmp"):
            os.remove(self.path + ".tmp")  # left by a recovery of an older firmware
        return result

    def append(self, data, length=-1, sync=False):
        if length < 0:
            length = len(data)
        self.payload[:length] = data[:length] if length < len(data) else data
        return self.commit(length, sync)

    def commit(self, length, sync=False):
        """Write the record whose payload is payload[:length]; returns its sequence
        number, or COMMIT_FAILED if storage could not take it (counted here). sync: make
        it durable now whatever the batch (a pass's configuration record)."""
        if length > self._payload_room:
            raise ValueError("record payload too long")
        if self.foreign:
            raise OSError("%s is not a record log; delete it to log here" % self.path)
        total = HEADER_BYTES + length + CRC_BYTES
        store = self.store
        if store is not None and not store.reserve(total):
            self.commits_refused += 1
            return COMMIT_FAILED
        rec = self._record
        rec[0] = MAGIC0
        rec[1] = MAGIC1
        rec[2] = FORMAT_VERSION
        rec[3] = self.kind
        _put_u32(rec, 4, self.next_seq)
        _put_u32(rec, 8, length)
        crc = self._crc
        crc.reset()
        crc.update(rec, HEADER_BYTES + length)
        _put_word(rec, HEADER_BYTES + length, crc._state, 0, -1)
        view = self._view
        self._unsynced += 1  # this record, from its first byte on
        per_sync = self.records_per_sync
        if per_sync == 0:  # deferred: synced by age (the store's sync duty)
            now = store.ticks_us()
            if self._unsynced == 1:
                self.unsynced_since_us = now
            elif ((now - self.unsynced_since_us) & _TICKS_WRAP) >= 2 * store.sync_age_us:
                sync = True  # the sync duty did not run: the age bound still holds
        elif self._unsynced >= per_sync:
            sync = True
        try:
            f = self._file
            if f is None:
                f = self._file = open(self.path, "ab")
            start = 0
            while start < total:
                stop = start + PAGE_BYTES
                if stop > total:
                    stop = total
                f.write(view[start:stop])
                start = stop
                if self.page_hook is not None:
                    self.page_hook()
            if sync:
                f.flush()
                self.syncs += 1
                self._unsynced = 0
        except OSError as error:
            self._failed(error)
            return COMMIT_FAILED
        self.file_crc.update(rec, total)
        self.size_bytes += total
        if store is not None:
            store.used_bytes += total
        seq = self.next_seq
        self.next_seq = seq + 1
        if self._unsynced == 0:
            self.durable_seq = seq
            self._synced_size = self.size_bytes
        return seq

    def sync(self):
        """Make every committed record durable; False if the sync failed (counted: the
        records since the last sync are lost on littlefs, and counted in unsynced_lost)."""
        f = self._file
        if f is None or self._unsynced == 0:
            return True
        try:
            f.flush()
        except OSError as error:
            self._failed(error, counted=False)
            return False
        self.syncs += 1
        self._unsynced = 0
        self.durable_seq = self.next_seq - 1
        self._synced_size = self.size_bytes
        return True

    def _failed(self, error, counted=True):
        if counted:
            self.commits_failed += 1
        self.last_errno = _errno(error)
        if self.store is not None and self.last_errno == _ENOSPC:
            self.store.full = True
        f = self._file
        self._file = None  # a failed littlefs file never syncs again: reopen next time
        if f is not None:
            try:
                f.close()
            except OSError:
                pass
        # littlefs leaves the file at its last sync (the batch since then is gone with the
        # failed record); a plain filesystem may keep part of the record (skipped by every
        # reader). Either way size and CRC come from the file.
        unsynced = self._unsynced - (1 if counted else 0)  # committed, not yet durable
        self._unsynced = 0
        try:
            size = os.stat(self.path)[6]
            if unsynced > 0 and size <= self._synced_size:
                self.unsynced_lost += unsynced
            self._synced_size = size
            if size != self.size_bytes:
                with open(self.path, "rb") as f:
                    _file_crc(f, self.file_crc, bytearray(_SCAN_CHUNK))
                if self.store is not None:
                    self.store.used_bytes += size - self.size_bytes
                self.size_bytes = size
        except OSError:
            pass  # storage unreadable too: the next failure tries again

    def can_commit(self, length):
        """True if a record of `length` payload bytes fits the quota now."""
        return self.store is None or self.store.reserve(HEADER_BYTES + length + CRC_BYTES)

    def status(self):
        return {
            "records": self.next_seq,
            "bytes": self.size_bytes,
            "failed": self.commits_failed,
            "refused": self.commits_refused,
            "unsynced_lost": self.unsynced_lost,
            "errno": self.last_errno,
            "skipped": self.recovery.skipped_regions,
            "missing": self.recovery.missing_records,
        }

    def crc32(self):
        return self.file_crc.value()

    def close(self):
        self.sync()
        f = self._file
        self._file = None
        if f is not None:
            f.close()


def file_bytes(path):
    """A file's size in bytes; 0 if it is not there."""
    try:
        return os.stat(path)[6]
    except OSError:
        return 0


def code_update_files(root):
    """The paths of the code update's files a store on `root` counts: the staging file
    (counted whether there or not) and every <name>.new there now."""
    paths = [_join(root, CODE_STAGING_FILE)]
    for folder in (root, _join(root, "payload")):
        try:
            names = os.listdir(folder)
        except OSError:
            continue  # no payload/ folder on the store: no code deployed there
        for name in names:
            if name.endswith(CODE_WAITING_SUFFIX):
                paths.append(_join(folder, name))
    return paths


def free_bytes(block_bytes, blocks, free_blocks, medium):
    """The room a store's quota may take from a filesystem of `blocks` blocks of
    `block_bytes` with `free_blocks` available (statvfs), less the reserve the store's
    `medium` needs; at most 0x3FFFFFFF (a small int)."""
    if free_blocks > blocks:
        return 0  # littlefs reports an error (a full or damaged store) as ~0: none
    if medium == MEDIUM_HOST_DIRECTORY:
        reserve = _RESERVE_MIN_BLOCKS
    elif medium == MEDIUM_LITTLEFS:
        reserve = max(blocks // _RESERVE_FRACTION, _RESERVE_MIN_BLOCKS)
    else:
        raise ValueError("board.STORAGE_MEDIUM: unknown medium %r" % (medium,))
    free = free_blocks - reserve
    if free <= 0:
        return 0
    if free >= 0x3FFFFFFF // block_bytes:
        return 0x3FFFFFFF  # a host disk: keep the quota a small int
    return free * block_bytes


class Storage:
    """The storage root: product logs under <root>/products/, listed with size and CRC.

    quota_bytes caps the bytes of all product files and the counted files beside them (the
    uploaded prediction, the code update's staging and waiting files: code_update_files);
    by default it is what they hold at boot plus the free space minus a reserve that keeps
    littlefs from ever running out under its own copy-on-write: 1/8 of the filesystem (at
    least 8 blocks) on MEDIUM_LITTLEFS, 8 blocks on MEDIUM_HOST_DIRECTORY. `medium` is the
    board's (board.STORAGE_MEDIUM) unless given. A store at its quota is `full`: commits
    return COMMIT_FAILED, counted, until products are deleted."""

    def __init__(
        self,
        root,
        quota_bytes=-1,
        records_per_sync=RECORDS_PER_SYNC,
        clock=None,
        sync_age_us=SYNC_AGE_US,
        counted_files=(),
        medium=None,
    ):
        self.root = root
        if medium is None:
            import board  # the store is on the board's medium (the firmware's board module)

            medium = board.STORAGE_MEDIUM
        self.medium = medium
        # files beside the products that draw on the same quota (the mission's uploaded
        # tracking prediction, docs/tracking.md), paths under root
        self.counted_files = [_join(root, name) for name in counted_files]
        # and the code update's, left from before this boot or written after it
        self.counted_files += code_update_files(root)
        self.records_per_sync = records_per_sync  # for the logs opened batched
        self._shared_record = None  # the record buffer of the logs opened shared
        # Logs opened deferred are synced by sync_step, by age on this clock; without a
        # clock they are synced per record, as before.
        self.ticks_us = clock.ticks_us if clock is not None else None
        self.sync_age_us = sync_age_us
        self.deferred = []  # the logs opened deferred, which sync_step syncs
        self.worst_sync_age_us = 0  # the oldest record sync_step found (the age bound kept)
        self.products_dir = _join(root, PRODUCTS_DIR)
        _mkdir(root)
        _mkdir(self.products_dir)
        self.logs = {}
        self.used_bytes = self._usage()
        if quota_bytes < 0:
            quota_bytes = self.used_bytes + self._free_bytes()
        self.quota_bytes = quota_bytes
        self.full = False

    def _usage(self):
        total = 0
        paths = [_join(self.products_dir, name) for name in os.listdir(self.products_dir)]
        for path in paths + self.counted_files:
            total += file_bytes(path)
        return total

    def room_bytes(self, rewritten=None):
        """Bytes the quota still has (what the products and the counted files hold,
        recounted). A check only: unlike reserve(), it never marks the store full.
        rewritten: a counted file about to be written again from its start (an upload's
        first chunk): its present bytes are room."""
        self.used_bytes = self._usage()
        room = self.quota_bytes - self.used_bytes
        if rewritten is not None:
            room += file_bytes(rewritten)
        return room

    def _free_bytes(self):
        try:
            st = os.statvfs(self.root)
        except (OSError, AttributeError):
            return 0x3FFFFFFF
        return free_bytes(st[1], st[2], st[4], self.medium)

    def reserve(self, nbytes):
        """True if nbytes more fit the quota; else the store is full (reported). A full
        store stays full until products are deleted: a small record must not slip into
        the room a larger one was refused (a TDC block after the frames it belongs with
        were refused)."""
        if not self.full and self.used_bytes + nbytes <= self.quota_bytes:
            return True
        used = self._usage()  # products may have been deleted since
        if self.full and used >= self.used_bytes:
            return False  # nothing was deleted: still full
        self.used_bytes = used
        self.full = used + nbytes > self.quota_bytes
        return not self.full

    def can_commit(self):
        return not self.full

    def path(self, name):
        return _join(self.products_dir, name + ".qrec")

    def open_log(self, name, kind, max_payload_bytes, batched=False, deferred=False,
                 shared=False):  # fmt: skip
        """The log `name`; batched: synced once per records_per_sync records (the
        high-rate logs); deferred: synced by sync_step when its oldest unsynced record is
        sync_age_us old (the low-rate logs; per record on a store without a clock); else
        per record. shared: the log's record buffer is one the store's other shared logs
        use too (a log that fills its payload and commits it in one call, never a payload
        kept between calls: housekeeping and the tracking product, ~1 kB each of the STM32
        board's heap); the first shared log sizes it."""
        log = self.logs.get(name)
        if log is None:
            per_sync = 1
            if batched:
                per_sync = self.records_per_sync
            elif deferred and self.ticks_us is not None:
                per_sync = 0
            record = self.shared_record(max_payload_bytes) if shared else None
            log = RecordLog(self.path(name), kind, max_payload_bytes, self, per_sync, record)
            self.logs[name] = log
            if per_sync == 0:
                self.deferred.append(log)
        return log

    def shared_record(self, max_payload_bytes=1024):
        """The record buffer the logs opened shared commit through (made by the first to
        ask, for its max_payload_bytes: housekeeping's 1024 in the mission)."""
        record = self._shared_record
        if record is None:
            record = bytearray(HEADER_BYTES + max_payload_bytes + CRC_BYTES)
            self._shared_record = record
        return record

    def sync_step(self):
        """The scheduler's "sync" duty: syncs the deferred log whose oldest unsynced record
        is the oldest, once that record is sync_age_us old; one log a call, so a pass
        holds the CPU for one sync at most (0.45-3 M instructions on the 25 MHz M3,
        docs/scheduling.md). True if it synced."""
        oldest = None
        oldest_age = -1
        now = 0
        for log in self.deferred:
            if log._unsynced:
                if oldest is None:
                    now = self.ticks_us()
                age = (now - log.unsynced_since_us) & _TICKS_WRAP
                if age > oldest_age:
                    oldest = log
                    oldest_age = age
        if oldest is None or oldest_age < self.sync_age_us:
            return False
        if oldest_age > self.worst_sync_age_us:
            self.worst_sync_age_us = oldest_age
        oldest.sync()
        return True

    def sync(self):
        """Make every log's committed records durable (a pass's stop, a product list);
        False if a sync failed (counted in the log)."""
        ok = True
        for log in self.logs.values():
            ok = log.sync() and ok
        return ok

    def status(self):
        """Storage health for housekeeping, short as it shares one packet: bytes used, and
        only when set: full, commits failed (I/O, ENOSPC) and refused (quota) over all logs,
        the last errno, bytes skipped as torn or corrupt when the logs were opened and the
        committed records found missing then (sequence gaps), and the committed records a
        failed write or sync of a batched log took back (window_lost)."""
        failed = refused = errno = skipped = missing = window_lost = 0
        for log in self.logs.values():
            window_lost += log.unsynced_lost
            failed += log.commits_failed
            refused += log.commits_refused
            skipped += log.recovery.dropped_bytes
            missing += log.recovery.missing_records
            if log.last_errno:
                errno = log.last_errno
        out = {"used": self.used_bytes}
        for key, value in (
            ("full", self.full),
            ("failed", failed),
            ("refused", refused),
            ("errno", errno),
            ("skipped", skipped),
            ("missing", missing),
            ("window_lost", window_lost),
        ):
            if value:
                out[key] = value
        return out

    def products(self):
        """[(file name, bytes, crc32)] for every product file, whether open or not."""
        self.sync()  # a listed size is what a download reads
        out = []
        names = sorted(os.listdir(self.products_dir))
        for name in names:
            if not name.endswith(".qrec"):
                continue
            stem = name[:-5]
            log = self.logs.get(stem)
            if log is not None and log._file is not None:
                out.append((name, log.size_bytes, log.crc32()))
                continue
            crc = framing.Crc32()
            path = _join(self.products_dir, name)
            size = os.stat(path)[6]
            with open(path, "rb") as f:
                _file_crc(f, crc, bytearray(_SCAN_CHUNK))
            out.append((name, size, crc.value()))
        return out

    def close(self):
        for log in self.logs.values():
            log.close()
        self.logs = {}
        self.deferred = []

# Power-safe append-only record logs (.qrec, docs/formats.md; design in docs/storage.md).
#
# A record is  "QR" | version | kind | seq u32 | length u32 | payload | CRC-32  and each
# product is one file <root>/products/<name>.qrec. After a power cut the last record may be
# torn; opening a log walks it, keeps every record whose framing and CRC check, and rewrites
# the file without the torn tail (copy to <name>.tmp, rename over: atomic on littlefs and
# POSIX), so a reader is never served a torn record and appends continue the sequence.
#
# Records go out in flash-page sized writes (PAGE_BYTES): a cut between two pages leaves
# exactly the torn record the recovery is built for (and lets the unix power-cut test,
# which kills the process, produce one).
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


class Recovery:
    """What opening a log found: records kept, bytes dropped, and why."""

    def __init__(self):
        self.records = 0
        self.valid_bytes = 0
        self.dropped_bytes = 0
        self.reason = None  # None, or why the tail was dropped
        self.last_payload_head = b""  # first bytes of the last valid record's payload

    def as_dict(self):
        return {
            "records": self.records,
            "valid_bytes": self.valid_bytes,
            "dropped_bytes": self.dropped_bytes,
            "reason": self.reason,
        }


def scan(path, max_payload_bytes, file_crc=None, stop_at=-1):
    """Walk the records of `path`; returns a Recovery with the valid prefix.

    file_crc (a framing.Crc32) is left holding the CRC-32 of that valid prefix."""
    result = Recovery()
    try:
        size = os.stat(path)[6]
    except OSError:
        return result
    record_crc = framing.Crc32()
    if file_crc is None:
        file_crc = framing.Crc32()
    header = bytearray(HEADER_BYTES)
    tail = bytearray(CRC_BYTES)
    chunk = bytearray(_SCAN_CHUNK)
    offset = 0
    with open(path, "rb") as f:
        while offset < size:
            if stop_at >= 0 and result.records >= stop_at:
                break
            if size - offset < HEADER_BYTES:
                result.reason = "cut short"
                break
            f.readinto(header)
            if header[0] != MAGIC0 or header[1] != MAGIC1 or header[2] != FORMAT_VERSION:
                result.reason = "bad magic"
                break
            seq = _get_u32(header, 4)
            length = _get_u32(header, 8)
            if seq != result.records:
                result.reason = "sequence gap"
                break
            if length > max_payload_bytes:
                result.reason = "bad length"
                break
            if offset + HEADER_BYTES + length + CRC_BYTES > size:
                result.reason = "cut short"
                break
            saved_file_crc = file_crc._state[0]
            record_crc.reset()
            record_crc.update(header)
            file_crc.update(header)
            left = length
            first = True
            while left > 0:
                n = f.readinto(chunk, left if left < _SCAN_CHUNK else _SCAN_CHUNK)
                record_crc.update(chunk, n)
                file_crc.update(chunk, n)
                if first:
                    head = bytes(chunk[: min(n, LAST_HEAD_BYTES)])
                    first = False
                left -= n
            f.readinto(tail)
            if not _word_equals(tail, 0, record_crc._state, 0, -1):
                file_crc._state[0] = saved_file_crc
                result.reason = "bad crc"
                break
            file_crc.update(tail)
            offset += HEADER_BYTES + length + CRC_BYTES
            result.records += 1
            result.last_payload_head = head if length else b""
    result.valid_bytes = offset
    result.dropped_bytes = size - offset
    return result


def _starts_like_a_log(path):
    # A torn first record still begins with (a prefix of) "QR" + version.
    with open(path, "rb") as f:
        first = f.read(3)
    return bytes((MAGIC0, MAGIC1, FORMAT_VERSION))[: len(first)] == first


def _copy_prefix(src, dst, count):
    buf = bytearray(_SCAN_CHUNK)
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        left = count
        while left > 0:
            n = fin.readinto(buf, left if left < _SCAN_CHUNK else _SCAN_CHUNK)
            if not n:
                break
            fout.write(memoryview(buf)[:n])
            left -= n


class RecordLog:
    """One product file, opened for appending after recovering from any power cut.

    `payload` is a preallocated buffer: fill payload[:n] and call `commit(n)`, or call
    `append(data)`. A record is committed once commit() returns (flushed to the file)."""

    def __init__(self, path, kind, max_payload_bytes):
        self.path = path
        self.kind = kind
        self.max_payload_bytes = max_payload_bytes
        self._record = bytearray(HEADER_BYTES + max_payload_bytes + CRC_BYTES)
        self._view = memoryview(self._record)
        self.payload = self._view[HEADER_BYTES : HEADER_BYTES + max_payload_bytes]
        self._crc = framing.Crc32()
        self.file_crc = framing.Crc32()
        self.foreign = False
        self.recovery = self._recover()
        self.next_seq = self.recovery.records
        self.size_bytes = self.recovery.valid_bytes
        self._file = None  # opened at the first append: no empty products at boot
        # Called after each page write when set: the power-cut test uses it to give pages
        # a NOR-flash program time, so its kills land inside records as they would in orbit.
        self.page_hook = None

    def _recover(self):
        result = scan(self.path, self.max_payload_bytes, self.file_crc)
        if result.dropped_bytes and result.records == 0 and not _starts_like_a_log(self.path):
            # Not a record log at all (a file the data path never wrote): never cut it.
            # The log refuses appends until someone deletes the file.
            self.foreign = True
            result.reason = "not a record log"
            return result
        if result.dropped_bytes:
            tmp = self.path + ".tmp"
            _copy_prefix(self.path, tmp, result.valid_bytes)
            os.rename(tmp, self.path)
        elif _exists(self.path + ".tmp"):
            os.remove(self.path + ".tmp")  # a cut during an earlier recovery
        return result

    def append(self, data, length=-1):
        if length < 0:
            length = len(data)
        self.payload[:length] = data[:length] if length < len(data) else data
        return self.commit(length)

    def commit(self, length):
        """Write the record whose payload is payload[:length]; returns its sequence number."""
        if length > self.max_payload_bytes:
            raise ValueError("record payload too long")
        if self.foreign:
            raise OSError("%s is not a record log; delete it to log here" % self.path)
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
        end = HEADER_BYTES + length
        _put_word(rec, end, crc._state, 0, -1)
        total = end + CRC_BYTES
        view = self._view
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
        f.flush()
        self.file_crc.update(rec, total)
        self.size_bytes += total
        seq = self.next_seq
        self.next_seq = seq + 1
        return seq

    def crc32(self):
        return self.file_crc.value()

    def close(self):
        if self._file is not None:
            self._file.close()
            self._file = None


class Storage:
    """The storage root: product logs under <root>/products/, listed with size and CRC."""

    def __init__(self, root):
        self.root = root
        self.products_dir = _join(root, PRODUCTS_DIR)
        _mkdir(root)
        _mkdir(self.products_dir)
        self.logs = {}

    def path(self, name):
        return _join(self.products_dir, name + ".qrec")

    def open_log(self, name, kind, max_payload_bytes):
        log = self.logs.get(name)
        if log is None:
            log = RecordLog(self.path(name), kind, max_payload_bytes)
            self.logs[name] = log
        return log

    def products(self):
        """[(file name, bytes, crc32)] for every product file, whether open or not."""
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
            buf = bytearray(_SCAN_CHUNK)
            with open(path, "rb") as f:
                while True:
                    n = f.readinto(buf)
                    if not n:
                        break
                    crc.update(buf, n)
            out.append((name, size, crc.value()))
        return out

    def close(self):
        for log in self.logs.values():
            log.close()
        self.logs = {}

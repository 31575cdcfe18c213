# Power-safe record logs on the target's filesystem (a directory on unix, littlefs on
# PSRAM on QEMU): records survive reopening, a torn tail at any byte is dropped and the
# sequence continues, corruption ends the valid part, products carry size and CRC-32.
import os

import board
from payload import framing, storage

ROOT = board.mount_storage() + "/t_storage"


def _fresh(name):
    store = storage.Storage(ROOT)
    path = store.path(name)
    for p in (path, path + ".tmp"):
        try:
            os.remove(p)
        except OSError:
            pass
    return store, path


def _payload(seq):
    n = (seq * 37) % 300 + 1
    return bytes((seq + i) & 0xFF for i in range(n))


def _write(store, name, count):
    log = store.open_log(name, storage.KIND_HOUSEKEEPING, 400)
    for seq in range(count):
        assert log.append(_payload(seq)) == seq
    return log


def _read(path):
    with open(path, "rb") as f:
        return f.read()


def test_records_survive_reopen_and_continue_the_sequence():
    store, path = _fresh("reopen")
    _write(store, "reopen", 20).close()
    store = storage.Storage(ROOT)
    log = store.open_log("reopen", storage.KIND_HOUSEKEEPING, 400)
    assert log.recovery.records == 20 and log.recovery.dropped_bytes == 0
    assert log.append(b"more") == 20
    log.close()
    assert storage.scan(path, 400).records == 21


def test_record_layout_matches_formats_doc():
    store, path = _fresh("layout")
    log = store.open_log("layout", storage.KIND_TDC_BLOCK, 64)
    log.append(b"\x01\x02\x03")
    log.close()
    data = _read(path)
    assert data[:12] == b"QR\x01\x02\x00\x00\x00\x00\x03\x00\x00\x00"
    assert data[12:15] == b"\x01\x02\x03"
    crc = framing.Crc32()
    crc.update(data[:15])
    assert int.from_bytes(data[15:19], "little") == crc.value()


def test_torn_tail_at_every_cut_is_dropped_and_sequence_continues():
    store, path = _fresh("torn")
    _write(store, "torn", 5).close()
    full = _read(path)
    last = 12 + len(_payload(4)) + 4
    keep = len(full) - last
    for cut in range(1, last, 7):  # cut inside the header, payload and CRC of the last
        with open(path, "wb") as f:
            f.write(full[: len(full) - cut])
        log = storage.RecordLog(path, storage.KIND_HOUSEKEEPING, 400)
        assert log.recovery.records == 4, (cut, log.recovery.as_dict())
        assert log.recovery.dropped_bytes == last - cut
        assert log.size_bytes == keep
        assert log.append(_payload(4)) == 4
        log.close()
        assert _read(path) == full, cut


def test_corruption_ends_the_valid_part_with_a_reason():
    store, path = _fresh("corrupt")
    _write(store, "corrupt", 6).close()
    data = bytearray(_read(path))
    offset = 0
    for seq in range(3):
        offset += 12 + len(_payload(seq)) + 4
    data[offset + 14] ^= 0x40  # a payload byte of record 3
    with open(path, "wb") as f:
        f.write(data)
    result = storage.scan(path, 400)
    assert result.records == 3 and result.reason == "bad crc"
    assert result.valid_bytes == offset


def test_products_list_size_and_crc32():
    store, path = _fresh("listed")
    log = _write(store, "listed", 7)
    data = _read(path)
    crc = framing.Crc32()
    crc.update(data)
    listed = dict((n, (size, c)) for n, size, c in store.products())
    assert listed["listed.qrec"] == (len(data), crc.value())
    log.close()
    store2 = storage.Storage(ROOT)  # not open: listed from the file itself
    listed = dict((n, (size, c)) for n, size, c in store2.products())
    assert listed["listed.qrec"] == (len(data), crc.value())


def test_a_file_that_is_not_a_record_log_is_never_cut():
    store, path = _fresh("foreign")
    data = bytes((i * 31 + 7) & 0xFF for i in range(700))  # starts 07 26 ...: not "QR"
    with open(path, "wb") as f:
        f.write(data)
    log = store.open_log("foreign", storage.KIND_TDC_BLOCK, 64)
    assert log.foreign and log.recovery.reason == "not a record log"
    assert _read(path) == data
    try:
        log.append(b"x")
        raise AssertionError("appended to a foreign file")
    except OSError:
        pass
    assert _read(path) == data
    # a torn first record (only "QR" made it) is ours, and is cut
    with open(path, "wb") as f:
        f.write(b"QR")
    log = storage.RecordLog(path, storage.KIND_TDC_BLOCK, 64)
    assert not log.foreign and log.recovery.dropped_bytes == 2
    assert log.append(b"y") == 0
    log.close()

# Power-safe record logs on the target's filesystem (a directory on unix, littlefs on
# PSRAM on QEMU): records survive reopening, a torn tail at any byte is skipped (never
# served, never copied) and the sequence continues, a corrupt record costs that record only,
# products carry size and CRC-32. Flash faults on littlefs: mptest_flash_faults.py.
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


def _served(path):
    out = []
    with open(path, "rb") as f:

        def visit(offset, seq, kind, length):
            f.seek(offset + storage.HEADER_BYTES)
            out.append((seq, f.read(length)))

        result = storage.scan(path, 400, visit=visit)
    return out, result


def test_torn_tail_at_every_cut_is_skipped_and_sequence_continues():
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
        assert log.recovery.valid_bytes == keep
        # recovery copies nothing: the torn bytes stay, the next record follows them
        assert log.size_bytes == len(full) - cut and _read(path) == full[: len(full) - cut]
        assert log.append(_payload(4)) == 4
        assert log.append(_payload(5)) == 5
        log.close()
        served, result = _served(path)
        assert served == [(seq, _payload(seq)) for seq in range(6)], cut
        assert result.skipped_regions == 1 and result.missing_records == 0
        # the product list describes the file as it is (what the ground downloads)
        crc = framing.Crc32()
        crc.update(_read(path))
        assert log.crc32() == crc.value()


def test_a_corrupt_record_is_skipped_and_every_later_record_kept():
    store, path = _fresh("corrupt")
    _write(store, "corrupt", 6).close()
    data = bytearray(_read(path))
    offset = 0
    for seq in range(3):
        offset += 12 + len(_payload(seq)) + 4
    for at, bit in ((offset + 14, 0x40), (offset + 9, 0x01), (offset, 0x02)):
        # a payload byte, the length, the magic of record 3
        bad = bytearray(data)
        bad[at] ^= bit
        with open(path, "wb") as f:
            f.write(bad)
        served, result = _served(path)
        assert [seq for seq, _ in served] == [0, 1, 2, 4, 5], (at, result.as_dict())
        assert all(payload == _payload(seq) for seq, payload in served)
        assert result.skipped_regions == 1 and result.missing_records == 1
        assert result.reason in ("bad crc", "bad length", "bad magic")
        assert result.dropped_bytes == 12 + len(_payload(3)) + 4
        log = storage.RecordLog(path, storage.KIND_HOUSEKEEPING, 400)
        assert log.next_seq == 6 and log.recovery.records == 5
        log.close()


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
    # a torn first record (only "QR" made it) is ours: skipped, and appended after
    with open(path, "wb") as f:
        f.write(b"QR")
    log = storage.RecordLog(path, storage.KIND_TDC_BLOCK, 64)
    assert not log.foreign and log.recovery.dropped_bytes == 2
    assert log.append(b"y") == 0
    log.close()
    assert storage.scan(path, 64).records == 1


def test_storage_quota_on_a_host_disk_keeps_only_the_minimum_reserve():
    # The unix target's store is a host directory: with 1/8 of the disk kept back, a disk
    # with less than 12.5 % available gave a quota of 0 and every commit was refused
    # (this machine: 8,145,453 of 66,053,021 4 KiB blocks available).
    host = storage.MEDIUM_HOST_DIRECTORY
    assert storage.free_bytes(4096, 66_053_021, 8_145_453, host) == 0x3FFFFFFF
    assert storage.free_bytes(4096, 66_053_021, 4, host) == 0  # a truly full disk is full
    # a payload's flash keeps its 1/8 (littlefs's copies and compactions need the room)
    flash = storage.MEDIUM_LITTLEFS
    assert storage.free_bytes(256, 64, 40, flash) == (40 - 8) * 256
    assert storage.free_bytes(4096, 4096, 1000, flash) == (1000 - 512) * 4096
    assert storage.free_bytes(4096, 4096, 500, flash) == 0
    # the unix board says its store is a host directory; a store asks its board
    if board.NAME == "unix":
        assert board.STORAGE_MEDIUM == host
    assert storage.Storage(board.mount_storage() + "/t_medium").medium == board.STORAGE_MEDIUM


def test_a_large_flash_store_keeps_the_eighth_whatever_its_size():
    # A flight SD card or eMMC under littlefs is 1 GiB or more: it needs the 1/8 reserve as
    # much as a 16 KiB NOR region. Storage asks the board what it is on, never the size
    # (a 1 GiB rule kept 8 blocks here: 32 KiB out of 1 GiB).
    if board.NAME != "unix":
        assert board.STORAGE_MEDIUM == storage.MEDIUM_LITTLEFS  # the MCU boards' policy
    flash = storage.MEDIUM_LITTLEFS
    blocks = 1 << 18  # 1 GiB of 4 KiB blocks
    assert storage.free_bytes(4096, blocks, blocks // 4, flash) == (blocks // 8) * 4096
    # 8 GiB, half of it free (a quota at the small-int cap) and 1/8 free (none)
    blocks = 1 << 21
    assert storage.free_bytes(4096, blocks, blocks // 2, flash) == 0x3FFFFFFF
    assert storage.free_bytes(4096, blocks, blocks // 8, flash) == 0
    # a medium no board states is refused, not guessed
    try:
        storage.free_bytes(4096, blocks, blocks // 2, "sd")
        raise AssertionError("an unknown medium was accepted")
    except ValueError:
        pass

# The boards' flight storage path: littlefs mounted by board.mount_storage() on the board's
# NOR chip (boardkit.RamNorDevice: 0xFF erases, counted) through eraseahead.EraseAhead
# (boardkit.FlashStore). A NOR sector erase (~45 ms) inside a commit is longer than a frame
# period (docs/storage.md "Erase ahead"); on the board no commit erases: the erases happen
# in the scheduler's idle duty, board.storage_background().
import os

import board
import vfs
from payload import storage

TARGETS = ("qemu", "netduino2")
TARGETS_REASON = "the boards whose littlefs sits on a NOR chip through EraseAhead"

if board.NAME == "qemu":
    RECORD_BYTES = 2048  # a 4096-slot frame's pattern record
    RECORDS = 48  # ~100 kB on 4 KiB sectors: littlefs erases ~25 blocks on the way
else:
    RECORD_BYTES = 200  # the STM32 board's 16.5 KiB store of 256-byte sectors
    RECORDS = 40


def _payload(log, seq):
    p = log.payload
    for i in range(RECORD_BYTES):
        p[i] = (seq * 7 + i) & 0xFF
    return RECORD_BYTES


def _remount():
    """A power cycle of the storage path: unmount, then a fresh EraseAhead over the same
    chip reads its journal back and littlefs mounts (never formats) again."""
    vfs.umount(board.STORAGE_ROOT)
    board.store.device = None
    formatted = board.store.mount()
    return formatted


def test_no_commit_on_the_board_waits_for_a_sector_erase():
    root = board.mount_storage() + "/t_flash"
    store = storage.Storage(root)
    path = store.path("frames")
    try:
        os.remove(path)
    except OSError:
        pass
    store = storage.Storage(root)
    log = store.open_log("frames", storage.KIND_PATTERN_FRAME, RECORD_BYTES, batched=True)
    flash = board.flash
    # The idle time between boot and a pass: every sector owed an erase (a first boot's
    # chip is not blank, and mkfs took sectors) is erased ahead.
    while board.storage_background():
        pass
    waited = board.store.status()[2]
    inside = background = 0
    for seq in range(RECORDS):
        n = _payload(log, seq)
        before = flash.erases
        assert log.commit(n) == seq
        inside += flash.erases - before
        # the frame's idle time: the scheduler's last duty, one sector per pass
        before = flash.erases
        for _ in range(2):
            board.storage_background()
        background += flash.erases - before
    store.close()
    status = board.store.status()
    print("erases inside commits", inside, "in the background", background, "status", status)
    assert background >= 10, (background, status)  # littlefs did ask for erases
    assert inside == 0, (inside, status)
    assert status[2] == waited, status  # no erase waited for during the pass
    # The map survives a power cycle: every record comes back, the log continues.
    assert not _remount()
    store = storage.Storage(root)
    log = store.open_log("frames", storage.KIND_PATTERN_FRAME, RECORD_BYTES, batched=True)
    assert log.recovery.records == RECORDS and log.recovery.dropped_bytes == 0, log.status()
    assert log.next_seq == RECORDS
    with open(path, "rb") as f:
        f.seek(log.size_bytes - RECORD_BYTES - 4)  # the last record's payload, CRC after
        tail = f.read(RECORD_BYTES)
    assert tail == bytes((((RECORDS - 1) * 7 + i) & 0xFF for i in range(RECORD_BYTES)))
    store.close()
    os.remove(path)


def test_the_flash_path_reads_and_erases_ahead_without_allocating():
    # littlefs calls the block device from a file's finaliser too (an open file dropped:
    # its close flushes), where the heap is locked: a read that sliced the device (a new
    # memoryview) raised MemoryError through littlefs's C code and corrupted the heap on
    # the STM32 board (a config's probabilities read back as 0 in mptest_sequencer).
    import micropython

    board.mount_storage()
    device = board.store.device
    page = bytearray(64)
    before = board.flash.erases
    micropython.heap_lock()
    try:
        device.readblocks(0, page, 0)  # littlefs's superblock, through the map
        active = device.journal * device.journal_sectors
        board.flash.readblocks(active, page, 0)  # the active journal's header, on the chip
        while board.storage_background():  # erases ahead and their bookkeeping
            pass
    finally:
        micropython.heap_unlock()
    status = device.status()
    assert page[0] == 0x45 and page[1] == 0x41, page  # a journal slot: 'E' 'A'
    assert page[2] == 0xFE and page[3] == 0xFF, page  # the header (block 0xFFFE)
    assert board.flash.erases >= before and status[1] == 0, status

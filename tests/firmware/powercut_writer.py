# Power-cut test program (tests/test_power_cut.py), run as the unix target's main script:
# recover the log, report what was recovered (records, torn regions skipped), then append
# records forever, acknowledging each on stdout once commit() returned. The test kills the
# process at random points.
import os
import time

import board
from payload import storage

MAX_PAYLOAD = 2000


PATTERN = bytes(i & 0xFF for i in range(MAX_PAYLOAD + 256))


def payload_for(seq, buf):
    # record seq: n bytes counting up from seq*7 (cheap, so the process spends its time
    # writing, and a kill lands inside records often)
    n = (seq * 389) % MAX_PAYLOAD + 1  # 1 .. 2000 bytes: records span up to 8 pages
    start = (seq * 7) & 0xFF
    buf[:n] = memoryview(PATTERN)[start : start + n]
    return n


def main():
    store = storage.Storage(board.mount_storage())
    log = store.open_log("powercut", storage.KIND_HOUSEKEEPING, MAX_PAYLOAD)
    r = log.recovery
    try:
        size = os.stat(log.path)[6]
    except OSError:
        size = 0  # the log's file appears with its first record
    print("R", r.records, r.skipped_regions, r.dropped_bytes, size, r.reason)
    if os.getenv("POWERCUT_EXIT"):
        # recovery only: stay up until the test has read the report and stops us (an exit
        # would hang up the pty and could discard the report before it is read)
        time.sleep(30)
        return
    # a NOR flash page program takes ~0.2-3 ms: give the unix target's pages that time
    log.page_hook = lambda: time.sleep_us(300)
    payload = log.payload
    while True:
        n = payload_for(log.next_seq, payload)
        seq = log.commit(n)
        if seq >= 0:  # else storage refused it (counted in the log): not acknowledged
            print("C", seq)


main()

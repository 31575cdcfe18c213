"""A controller crash during writes: the unix controller process is killed (SIGKILL,
emulator Target.kill) at 50 random points while it appends records; after every restart no
torn record is served and no committed (acknowledged) record is missing.

A process kill is not a power cut: the host's page cache keeps every write that returned,
so only a record cut between two page writes is torn. Power cuts at every program/erase
operation of the flash under littlefs are tests/firmware/mptest_flash_faults.py."""

import os
import random
import re
import select
import time
from pathlib import Path

from emulator.targets import UnixTarget
from host.formats import qrec

WRITER = Path(__file__).parent / "firmware" / "powercut_writer.py"
KILLS = 50


def _payload(seq: int) -> bytes:
    n = (seq * 389) % 2000 + 1
    return bytes((seq * 7 + i) & 0xFF for i in range(n))


def _read_lines(fd: int, until: float, want: str | None = None) -> list[str]:
    """Lines from the target's ground pty until `want` starts a line, or until `until`
    (reading all the while, so the writer never blocks on a full pty)."""
    text = ""
    while time.monotonic() < until:
        ready, _, _ = select.select([fd], [], [], 0.002)
        if ready:
            try:
                chunk = os.read(fd, 65536)
            except OSError:
                break
            text += chunk.decode(errors="replace")
            if want and re.search(rf"(^|\n){want}[^\n]*\n", text):
                break
    return text.replace("\r", "").splitlines()


def _boot(storage_dir, extra_env=None):
    target = UnixTarget(storage_dir=storage_dir, script=WRITER, extra_env=extra_env)
    target.start()
    fd = os.open(target.ground_port, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
    return target, fd


def _check_file(path: Path, acknowledged: int) -> qrec.RecordLog:
    """The whole .qrec file with the host's reader: every record it serves is intact (the
    payload written for its sequence number), and every acknowledged record is there."""
    log = qrec.read_records(path)
    for record in log.records:
        assert record.payload == _payload(record.seq), f"record {record.seq} altered"
    seqs = [record.seq for record in log.records]
    assert seqs == list(range(len(seqs))) and len(seqs) >= acknowledged + 1
    return log


def test_controller_killed_at_fifty_random_points_loses_no_committed_record(tmp_path):
    rng = random.Random(50)
    acknowledged = -1
    torn = 0
    for kill in range(KILLS):
        target, fd = _boot(tmp_path)
        try:
            lines = _read_lines(fd, time.monotonic() + 10, want="R ")
            boot = [line for line in lines if line.startswith("R ")]
            assert boot, f"kill {kill}: no recovery report: {lines[-5:]} {target.stderr_text()}"
            records, skipped = map(int, boot[0].split()[1:3])
            # every acknowledged record came back; a new torn tail was found and skipped
            assert records >= acknowledged + 1, (kill, records, acknowledged)
            torn += skipped > torn  # (two torn records in a row read as one region)
            lines += _read_lines(fd, time.monotonic() + rng.uniform(0.0, 0.03))
            target.kill()
            lines += _read_lines(fd, time.monotonic() + 0.05)
        finally:
            target.kill()
            os.close(fd)
        acks = [int(line.split()[1]) for line in lines if re.fullmatch(r"C \d+", line)]
        if acks:
            acknowledged = max(acknowledged, max(acks))
    target, fd = _boot(tmp_path, {"POWERCUT_EXIT": "1"})
    try:
        lines = _read_lines(fd, time.monotonic() + 10, want="R ")
    finally:
        target.stop()
        os.close(fd)
    records, skipped = map(int, next(line for line in lines if line.startswith("R ")).split()[1:3])
    assert records >= acknowledged + 1
    log = _check_file(tmp_path / "products" / "powercut.qrec", acknowledged)
    # the host's reader and the firmware's recovery agree on what is skipped
    assert len(log.records) == records and len(log.skipped) == skipped >= torn
    # the kills really landed inside records, so recovery was exercised
    assert torn >= 5, torn
    print(f"\n{KILLS} kills: {records} records kept, {torn} torn records skipped")

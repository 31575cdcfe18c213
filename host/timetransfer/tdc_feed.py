"""The satellite endpoint's uplink record from the controller's TDC log (products/tdc.qrec,
the TDC_BLOCK records the controller's ring spools): the tags of the uplink detectors'
channels, basis and bit from the detector (docs/time-transfer.md).

`uplink_of` turns a log's events into the record (the downloaded log, post-pass);
`LiveTdcUplink` reads the log while the controller is still writing it, so the streamed
time transfer (stream.StreamSatellite) takes each block of its uplink as it comes down
instead of a file downloaded after the pass:

- a block of the satellite's clock is taken once the log's clock has passed its end by
  CLOCK_MARGIN_PS: an event of an uplink channel or a sync mark of the laser (10 kHz on
  micius-2017, so the clock moves when no uplink photon comes), on the TDC's one clock.
  The log is in time order up to the detectors' jitter (~350 ps), far under the margin,
  so nothing of a block taken is still to come and the block holds what the whole log
  gives it;
- the last block is taken at the end of the log: the controller's end of pass (`end()`,
  the processor link's pass-end notice) or the log silent for `idle_s` wall seconds (no
  new whole record: a controller that stopped without saying so).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np

from emulator.optical_head import CH_SYNC, CH_UPLINK0
from host.formats.qrec import AppendedRecords, tdc_events_of

UPLINK_CHANNELS = 4  # H, V, D, A: channel CH_UPLINK0 + 2 * basis + bit
CLOCK_MARGIN_PS = 10**9  # 1 ms past a block's end: > 10^6 jitters of the uplink detectors
POLL_S = 0.02


def uplink_of(channel: np.ndarray, time_ps: np.ndarray) -> tuple:
    """(tags int64, basis uint8, bit uint8) of the uplink channels' events, in log order."""
    uplink = (channel >= CH_UPLINK0) & (channel < CH_UPLINK0 + UPLINK_CHANNELS)
    detector = (channel[uplink] - CH_UPLINK0).astype(np.uint8)
    return time_ps[uplink].astype(np.int64), detector // 2, detector % 2


class LiveTdcUplink:
    """The uplink record of a TDC log being written, read as it grows (module docstring).
    Thread-safe for one reader (the satellite endpoint) and one producer calling end()."""

    def __init__(self, path: str | Path, idle_s: float = 10.0, poll_s: float = POLL_S,
                 ending: threading.Event | None = None):  # fmt: skip
        """`ending`: set by the producer at the end of pass (else call end())."""
        self.path = Path(path)
        self.log = AppendedRecords(self.path)
        self.idle_s, self.poll_s = float(idle_s), float(poll_s)
        self._parts: list[tuple] = []
        self._record = (np.zeros(0, np.int64), np.zeros(0, np.uint8), np.zeros(0, np.uint8))
        self.clock_ps = None  # the newest uplink or sync tag so far
        self._ending = ending if ending is not None else threading.Event()
        self.ended_by = None  # "end of pass (controller)" or "idle"
        self._last_growth = time.monotonic()
        self.taken = []  # per block taken: (uplink events present, the log's clock)

    def end(self) -> None:
        """The controller's end of pass: what the log holds once read is all of it."""
        self._ending.set()

    def _poll(self, final: bool) -> None:
        records = self.log.poll(final=final)
        if not records:
            return
        self._last_growth = time.monotonic()
        channel, time_ps = tdc_events_of(self.path, records)
        clocked = (channel == CH_SYNC) | (
            (channel >= CH_UPLINK0) & (channel < CH_UPLINK0 + UPLINK_CHANNELS)
        )
        if clocked.any():
            newest = int(time_ps[clocked].max())
            self.clock_ps = newest if self.clock_ps is None else max(self.clock_ps, newest)
        part = uplink_of(channel, time_ps)
        if part[0].size:
            self._parts.append(part)

    def _wait(self, done) -> None:
        while self.ended_by is None:
            ending = self._ending.is_set()  # read before the poll: nothing written after
            self._poll(final=ending)
            if done():
                return
            if ending:
                self.ended_by = "end of pass (controller)"
            elif time.monotonic() - self._last_growth > self.idle_s:
                self.ended_by = "idle"
            else:
                time.sleep(self.poll_s)

    def record(self) -> tuple:
        """(tags, basis, bit) of every uplink event read so far."""
        if self._parts:
            parts = [self._record, *self._parts]
            self._record = tuple(np.concatenate([p[i] for p in parts]) for i in range(3))
            self._parts = []
        return self._record

    def first_tag(self) -> int | None:
        """The first uplink detection's tag (waited for); None if the log ended without."""
        self._wait(lambda: bool(self._parts) or self._record[0].size > 0)
        tags = self.record()[0]
        return int(tags[0]) if tags.size else None

    def through(self, tag_ps: int | None) -> tuple:
        """The record once the log's clock has passed `tag_ps` (None: the end of the log)."""
        if tag_ps is None:
            self._wait(lambda: False)
        else:
            self._wait(
                lambda: self.clock_ps is not None and self.clock_ps >= tag_ps + CLOCK_MARGIN_PS
            )
        record = self.record()
        self.taken.append((int(record[0].size), self.clock_ps))
        return record

    def report(self) -> dict:
        return {
            "events": int(self.record()[0].size),
            "records": self.log.records_read,
            "records_missing": self.log.missing_records,
            "bytes_skipped": sum(n for _, n, _ in self.log.skipped),
            "ended_by": self.ended_by,
            "events_when_taken": [n for n, _ in self.taken],
        }

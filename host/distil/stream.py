"""Streaming distillation: Alice and Bob distil DURING the pass (docs/streaming.md).

Bob reads the time tagger's detections as they arrive, in blocks of at most `block_s` of
pass time; Alice answers as the pass runs. The steps are those of the post-pass protocol
(host/distil/protocol.py), run on the detections so far:

- time synchronisation on the first blocks (timesync.Synchroniser: first anchor, tracking
  windows), then forward tracking block by block; a detection is assigned its slot once
  anchors lie beyond it (spline interpolation, as post-pass);
- sifting per block, with Alice's disclosed sample drawn per block from the CSPRNG so that
  the cumulative sample follows the post-pass rule (Config.sample_fraction, min, max);
- error correction (reconcile.ldpc_alice / ldpc_bob, unchanged) on chunks of whole LDPC
  frames, as soon as a key basis holds `chunk_frames` frames of unreconciled bits, sized
  from the running QBER estimate of the sample;
- at loss of signal: the remaining bits, then parameter estimation, verification and
  privacy amplification over the whole pass (protocol.Alice._finish / Bob._finish, the
  post-pass code): the finite-key analysis is per pass.

Bob drives: every step he takes is announced to Alice by a `stream_next` message (sync,
block, reconcile, end); the exchanges are request/answer, so a link outage only delays
them (the link queues and retransmits) and a link lost for good ends both sides in an
abort before privacy amplification, with no key on either side.

Each side's report gains `timeline` (one row per second of pass time), `lag_s_max`,
`lag_s_median` and `stream`; run.py adds `key_latency_s`.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from host.distil import ldpc, noise_model, pa, reconcile, timesync
from host.distil.bitcodec import (
    decode_sorted,
    encode_sorted,
    pack_bits,
    rice_decode_sorted,
    rice_encode_sorted,
    unpack_bits,
)
from host.distil.channel import AuthenticationFailed, ChannelClosed, PeerAborted
from host.distil.endpoint_random import endpoint_random
from host.distil.protocol import (
    BASES,
    EC_CONSISTENT_SIGMAS,
    NO_PATTERN,
    Alice,
    Bob,
    Config,
    Outcome,
    _end_failed_run,
    _naming_block,
    _public_seed,
    _request_sifting,
    _Stages,
    check_parameters,
    intensity_names,
    key_bases_for,
    own_detection_counts,
)
from host.errors import BadInput, ProtocolAborted
from host.formats.passdir import read_pass_json
from host.formats.qdet import END_OF_PASS_CHANNEL, AppendedDetections
from host.mission.timeline import timeline_row

MODE = "stream"
# The first anchor's window grows while the detections are sparse (the first attempt
# waited for 2 s and 2,000 detections, then searched the densest 20 ms: at the start of
# the full micius-2017 pass that held 73-98 detections, z 5.8-6.8 below FIRST_Z, and the
# first sync came only at ~20 s; the densest 40 ms of the first second, 129 detections,
# locked). An attempt is made once the densest window of one of these lengths holds the
# detections the statistics need: FIRST_SYNC_DETECTIONS at first, then, after a window
# gave no peak (z < FIRST_Z on n detections), n (FIRST_Z SYNC_RETRY_Z_MARGIN / z)^2: the
# peak grows as the square root of the detections (jinan-1 gave z 6.5 on 240, locked on
# 476), and an attempt costs Alice's window of slot intensities (retried every 2 s, they
# kept Bob from ever reaching the strong part of a jinan-1 pass). Counted in detections,
# not time, so that the same pass is cut the same way however fast it is replayed.
# Windows are tried shortest first, then the longer ones on the same data. At most
# FIRST_SYNC_MAX_SLOTS slots a window: Alice's intensity window, the AES-CTR words behind
# it and the lag FFTs grow with it (at jinan-1's 625 MHz the 20 ms window is 12.5 M slots
# already; a 40 ms attempt took 10-27 s of this loaded machine).
FIRST_SYNC_WINDOWS_S = (0.02, 0.04, 0.08, 0.16)
FIRST_SYNC_MAX_SLOTS = 25_000_000
# Around the orbit prediction the lag correlation asks Alice only for each detected slot's
# run of predicted lags when that is fewer slots (timesync's _sparse_correlation, summed by
# Alice): its cost is the detections, not the window's span, so the predicted search may
# integrate over
# longer windows, up to FIRST_SYNC_MAX_SLOTS asked. jinan-1's weak start (seed 1, ~4,000
# detections a second, ~41 k predicted lags): on its first second of data the densest
# 40 ms held 192 detections, z 5.1 (6.23 needed: no lock), 80 ms 357, z 7.4 (lock, 14.8
# M slots asked), 160 ms 684, z 10.4 (28 M); the FFT of the 40 ms window asked 25 M.
# Every window's predicted search is tried (shortest first) before any full search.
# The sums Alice computes for it hold one SYNC_PIECE_SLOTS piece of her pattern at a time
# (host/distil/protocol.py): only her time grows with the slots asked, ~3-5 M slots a second
# on this loaded machine (measured: 14.8 M in 5.1 s, 28.7 M in 5.8 s, load ~7), so the
# sparse searches may ask for FIRST_SYNC_MAX_SPARSE_SLOTS. At jinan-1's start that admits
# the densest 160 ms (~700 detections, z ~10 where 6.1 is needed: docs/streaming.md "The
# first lock of every realisation"), which the first second tries when 40 and 80 ms miss:
# before, 80 ms was the longest, a miss there (~1 realisation in 30) left no window that
# could reach the detections the retry rule then asked for, and the first lock came from
# the full search after 37 s.
FIRST_SYNC_PREDICTED_WINDOWS_S = (0.02, 0.04, 0.08, 0.16, 0.32)
FIRST_SYNC_MAX_SPARSE_SLOTS = 2 * FIRST_SYNC_MAX_SLOTS
FIRST_SYNC_DETECTIONS = 120
# A bright pass (10x jinan-1: ~12,000 detections in 20 ms) needs far less than 20 ms: its
# densest 5 or 10 ms are tried first when they hold FIRST_SYNC_SHORT_DETECTIONS. The lag
# FFTs and Alice's window are the span plus the 7.5 M-slot lag range at 625 MHz (20 M
# slots at 20 ms, 10.6 M at 5 ms), and the drift scan has 4x fewer drifts of 4x fewer
# detections: jinan-1-stress10x's first anchor took 22.3 s at 20 ms and 11.6 s at 5 ms
# (same data and run, load ~9; z 49 on 12,557 detections, 25.5 on 3,361; the two anchors
# agree within 0.1 slot). z grows as ~0.44 sqrt(n) there (0.65 at micius-2017), so 2,000
# detections give z ~20, far above FIRST_Z: a short window that fails costs an attempt,
# and sparse passes (micius-2017, jinan-1: a few hundred in 5 ms at most) never try one.
FIRST_SYNC_SHORT_WINDOWS_S = (0.005, 0.01)
FIRST_SYNC_SHORT_DETECTIONS = 2000
SYNC_RETRY_Z_MARGIN = 1.1
# A lock is verified before any block is sifted: PROBE_DETECTIONS of its first assigned
# detections (then never sifted) are compared with Alice's bits where the bases agree
# (she discloses basis and bit of these slots only, and never sifts them again). A wrong
# lock gives ~50 % errors, a true one the channel's QBER (below the 11 % threshold): with
# >= PROBE_MIN_COMPARED bits, FALSE_LOCK_QBER is >= 5 standard deviations from both
# (0.5 - 0.25 = 5.0 sigma at 100 bits; 0.25 - 0.11 = 4.5 sigma at 100, 6.3 at 200, and
# a probe compares ~300). A lock that fails is dropped (the detections stay, the anchors
# go) and the first sync is attempted again with more detections.
PROBE_DETECTIONS = 600
FALSE_LOCK_RETRY_GROWTH = 1.5  # detections a window needs for the next try, after one
PROBE_MIN_COMPARED = 100
FALSE_LOCK_QBER = 0.25
# An endpoint shows the link as down in its timeline while it has waited this long (wall
# seconds, so that a replay's speed-up does not turn the peer's computing into an outage)
# for the peer's next message. Over the emulated optical link, emulator/link_session.py
# replaces the column by the link's own record of its outages.
LINK_SILENT_S = 5.0
# A live tagger's file (qdet.LiveDetectionsWriter) is polled this often (wall seconds)
# while Bob waits for the tagger to pass a block's end.
LIVE_POLL_S = 0.05
# Rice-coded slots per block message stay far below channel.MAX_MESSAGE_BYTES; a backlog
# after an outage is sent block by block.
#
# The optical link's predicted end (docs/streaming.md, "The link's end"). Bob closes the
# pass at the last block from which the rest (reconciling the backlog, the finite-key
# analysis, privacy amplification, the last messages) still ends before the link does;
# the detections after that cut are never sifted (they never cross the link). The time
# the rest takes is estimated from what it costs, times LINK_END_SAFETY (the load of this
# shared machine swings ~2x within a pass):
# - error correction at Bob's measured wall seconds per LDPC frame so far (the whole
#   exchange, Alice's syndromes and the link included: a short frame costs about as much
#   as a full one, its ~10-30 exchanges each wait for the peer's and the link's turn);
#   before the first chunk, WARM_UP_TO_STREAM times the warm-up's (reconcile.warm_up: one
#   frame decoded in Bob's process before the pass), or EC_S_PER_FRAME_UNMEASURED;
# - one privacy amplification hashing (both sides hash at once, protocol._finish) of the
#   key block, pa_rest_s: PA_S_PER_BIT a bit up to PA_REFERENCE_BITS, growing as
#   n^PA_GROWTH_EXPONENT beyond (the carry-less product's work grows as n l^0.585, and l
#   grows with n);
# - FINISH_FIXED_S for the estimation, the verification hashes, loading the hashing's
#   machine code (the first hashing in a process), the last round trips and the keys'
#   fsyncs.
LINK_END_SAFETY = 2.0
# Measured in full missions at load 8-10 (Bob's error correction wall / frames, and the
# warm-up's frame): jinan-1 132 s / 77 frames = 1.72 s a frame, warm-up 0.22 s (x8.0);
# micius-2017 59 s / 28 = 2.11 s, warm-up 0.25 s (x8.6).
EC_S_PER_FRAME_UNMEASURED = 2.0
WARM_UP_TO_STREAM = 8.0
# Within NEAR_END_RESTS times the rest of the link's end, every whole frame is reconciled
# at once (no frame held back): the backlog the rest must reconcile stays under a frame,
# and the chunks measure the error correction's speed before the cut is decided (a 30 s
# micius-2017 pass under load ~10: 58 kbit took 8 s in the stream, ~40x the warm-up's
# rate: each of a chunk's ~10-30 exchanges waits for the peer's and the link's turn).
NEAR_END_RESTS = 4.0
# Measured in one fresh process at load 9.6-10 (2026-12-05, /tmp harness: pa.toeplitz_hash
# on random bits, docs/streaming.md "The link's end"): the first hashing (numba's cache
# loaded) 0.60 s; 5,311,900 -> 1,330,000 bits (jinan-1's key block) 0.28-0.38 s, 7.1e-8 s a
# bit at worst; 2.7 -> 0.65 Mbit 0.09-0.12 s; 53 -> 13.3 Mbit (10x jinan-1) 13.1 s, 2.5e-7
# s a bit; the verification hash of 5.3 Mbit 0.05 s. PA_S_PER_BIT is twice the worst rate
# at the reference size, and the growth beyond it gives 30.6 s at 53 Mbit (2.3x the
# measured): both before LINK_END_SAFETY. (Before, 3.5e-6 s a bit, measured on the FFT
# hashing, 5.4 Mbit in 2.2-7.8 s at load ~4: 19 s reserved for jinan-1's block, 38 s with
# the safety, so its pass was cut ~40 s before the link's end, ~230 k detections never
# sifted, the keys written 35-38 s before loss of signal.)
PA_S_PER_BIT = 1.5e-7
PA_REFERENCE_BITS = 5_300_000
PA_GROWTH_EXPONENT = 0.585
# The rest but the frames and the hashing, measured in a jinan-1 mission over the optical
# link at load 8.7-9.5 (main at f63a0f4, Bob's stages): the last block's tracking and
# sifting ~0.9 s, estimation 1.2 s, verification 0.15 s, the privacy amplification stage
# 2.2 s of which ~1.4 s is not the hashing (each side's first hashing loads its machine
# code, ~0.6 s; Bob waits for Alice's lengths and her hashing), the keys' fsyncs: ~3.5 s.
# (At 2 s, that run's rest took 5.8 s of the 10.1 s reserved: the costs themselves ran
# 1.27x above the estimate, which the safety then had to cover.)
FINISH_FIXED_S = 3.5
# Loss of signal, predicted by the pass geometry (pass.json's utc_end): within the pass
# time a key basis takes to sift LOS_RELEASE_FRAMES frames of ldpc.FRAME_BITS at its rate
# over the last RATE_WINDOW_S, no frame is held back and every whole frame of the chunks'
# length is reconciled at once. What is left at loss of signal is then under one such frame
# and the last blocks per basis, one frame (chunk_frame_bits), sized from a chunk that
# ended seconds before: with the frame held back it was the held frame and what came since
# (~1.25 frames, cut into two, sized from a chunk a minute older), 10-17 retry rounds a
# basis one after the other, ~80 % of micius-2017's key latency (docs/streaming.md, "After
# loss of signal").
LOS_RELEASE_FRAMES = 2.0
RATE_WINDOW_S = 10.0
FRAME_LENGTHS = (ldpc.FRAME_BITS, *ldpc.LONG_FRAME_BITS)
STREAM_FRAME_BITS = 2**17
# The chunks fall back from longer frames to frames of ldpc.FRAME_BITS while Bob's lag
# behind the detections is high, and go back to the longer ones once it is low again
# (docs/streaming.md, "Falling back to 2^16 frames when the lag grows"). A 2^17 frame costs
# ~1.9x the decoder work of a 2^16 one per key bit (docs/distillation.md "Issue 17 after
# session 14"), so a loaded machine's catch-up goes ~1.9x faster in 2^16 frames for ~0.03
# in f on those chunks. The lag is Timeline.busy_lag_wall_s: the report's lag in wall
# seconds (the decoder's work is wall time; at the mission's real time the same seconds as
# the 10 s target's, docs/mission.md; a replay sped up 6x would otherwise fall back at
# 0.7 s of decoding), less the waits on a silent link (an outage's lag is the link's: the
# fallback answers the decoder). The thresholds from the target and the main job's
# measured chunks: on a quiet machine the chunks put the lag at most 2.2 s (micius-2017) /
# 3.1 s (jinan-1) behind, so the fallback starts above that (there the f of 2^17 is kept);
# under load two 2^17 chunks back to back took 5-7 s (the lag grew 1 s a second), so one
# 2^17 chunk started just under LAG_FALLBACK_S and a 2^16 one after it (~1.9x faster)
# end by ~4 + 3.5 + 1.8 = 9.3 s, under the target. Back to 2^17 under LAG_RECOVERED_S:
# above the quiet median (1.1-1.3 s), so a pipeline that caught up returns.
LAG_FALLBACK_S = 4.0
LAG_RECOVERED_S = 2.0


def frame_bits_for_lag(current_bits: int, lag_s: float, frame_bits: int) -> int:
    """The frame length of Bob's next chunk during the pass, `current_bits` the last one's,
    `lag_s` his lag behind the detections (Timeline.busy_lag_wall_s) and `frame_bits` the
    chunks' (StreamOptions.frame_bits): ldpc.FRAME_BITS above LAG_FALLBACK_S, frame_bits
    again under LAG_RECOVERED_S, else unchanged (hysteresis: the length does not flap
    around one threshold). Chunks of ldpc.FRAME_BITS stay so. Public timing only: Alice
    checks the length the request names is a provisioned one, as for any chunk."""
    if frame_bits <= ldpc.FRAME_BITS:
        return frame_bits
    if lag_s > LAG_FALLBACK_S:
        return ldpc.FRAME_BITS
    if lag_s < LAG_RECOVERED_S:
        return frame_bits
    return current_bits


def pa_rest_s(key_block_bits: int) -> float:
    """Wall seconds one privacy amplification hashing of a key block of key_block_bits is
    reserved (before LINK_END_SAFETY): PA_S_PER_BIT a bit, growing as the carry-less
    product's work beyond PA_REFERENCE_BITS."""
    growth = max(1.0, key_block_bits / PA_REFERENCE_BITS) ** PA_GROWTH_EXPONENT
    return PA_S_PER_BIT * key_block_bits * growth


def link_end_rest_s(ec_s_per_frame: float, frames: float, key_block_bits: int) -> float:
    """Wall seconds reserved before the optical link's end for the rest of the pass after
    a cut: the frames still to reconcile at the measured seconds per frame, one privacy
    amplification hashing of the whole key block, and FINISH_FIXED_S, all times
    LINK_END_SAFETY (docs/streaming.md, "The link's end")."""
    return LINK_END_SAFETY * (ec_s_per_frame * frames + pa_rest_s(key_block_bits) + FINISH_FIXED_S)


@dataclass
class StreamOptions:
    block_s: float = 1.0  # pass seconds per detection block (at most 1 s)
    speedup: float = 1.0  # pass seconds per wall second of the replay
    chunk_frames: int = 2  # LDPC frames per error-correction chunk
    # The chunks' LDPC frame length (ldpc.FRAME_BITS or one of ldpc.LONG_FRAME_BITS): Bob
    # names each chunk's in its reconcile request (StreamBob._chunk_request), Alice follows
    frame_bits: int = STREAM_FRAME_BITS
    # A live tagger silent this long (wall seconds: no new record in detections.qdet or
    # pps.qdet, whose marks come every second) stopped without its end-of-pass record:
    # the pass ends at its last record (LiveDetectionFeed)
    idle_s: float = 10.0
    # The optical link's predicted end (the satellite sets), in wall seconds after the
    # first detection (a replay's speed-up does not move it), from the pass geometry;
    # None: not known, the pipeline runs to loss of signal.
    link_end_s: float | None = None

    def validate(self) -> None:
        if self.link_end_s is not None and not (
            math.isfinite(self.link_end_s) and self.link_end_s > 0
        ):
            raise BadInput(f"--stream-link-end-s {self.link_end_s}: must be a positive number")
        if not (math.isfinite(self.idle_s) and 0 < self.idle_s <= 600):
            raise BadInput(f"--stream-idle-s {self.idle_s}: must be in (0, 600] s")
        if not (math.isfinite(self.block_s) and 0.05 <= self.block_s <= 1.0):
            raise BadInput(f"--stream-block-s {self.block_s}: must be in [0.05, 1] s")
        if not (math.isfinite(self.speedup) and 0 < self.speedup <= 1000):
            raise BadInput(f"--stream-speedup {self.speedup}: must be in (0, 1000]")
        if not 1 <= int(self.chunk_frames) <= 64:
            raise BadInput(f"--stream-chunk-frames {self.chunk_frames}: must be in 1..64")
        if int(self.frame_bits) not in FRAME_LENGTHS:
            raise BadInput(
                f"--stream-frame-bits {self.frame_bits}: must be one of {FRAME_LENGTHS}"
            )


class PassClock:
    """Pass time: seconds since the first detection arrived, at `speedup` pass seconds per
    wall second from the wall time `epoch_unix_s` (both sides read UTC; in emulation the
    host clock)."""

    def __init__(self, speedup: float, epoch_unix_s: float | None = None):
        self.speedup = float(speedup)
        self.epoch_unix_s = time.time() if epoch_unix_s is None else float(epoch_unix_s)

    def now(self) -> float:
        return (time.time() - self.epoch_unix_s) * self.speedup

    def wall_of(self, pass_s: float) -> float:
        return self.epoch_unix_s + pass_s / self.speedup

    def sleep_until(self, pass_s: float) -> None:
        delay = self.wall_of(pass_s) - time.time()
        if delay > 0:
            time.sleep(delay)


class Timeline:
    """The pipeline's state over pass time: every change is logged with its pass time;
    rows() gives one row per second (the schema of docs/streaming.md, shared with
    `qkdsat mission`)."""

    def __init__(self, clock: PassClock):
        self.clock = clock
        self.state = {
            "detections": 0,
            "sifted_bits": 0,
            "reconciled_bits": 0,
            "backlog_bits": 0,
            "handled_s": 0.0,
        }
        self.events = [(0.0, dict(self.state))]
        # (start, end) pass seconds of the waits for the peer longer than LINK_SILENT_S: the
        # link silent from LINK_SILENT_S into each (rows), the whole wait not the pipeline's
        # own (busy_lag_wall_s)
        self.link_waits = []
        self.last_detection_s = None

    def update(self, **values) -> None:
        self.state.update(values)
        self.events.append((self.clock.now(), dict(self.state)))

    def busy_lag_wall_s(self) -> float:
        """How far the pipeline is behind the detections now in wall seconds (the lag of the
        timeline's rows at this instant, over the replay's speed-up), less the waits for
        the peer longer than LINK_SILENT_S within it (a silent link's, not the pipeline's
        work)."""
        now, handled = self.clock.now(), float(self.state["handled_s"])
        waited = sum(
            max(0.0, min(end, now) - max(start, handled)) for start, end in self.link_waits
        )
        return max(0.0, now - handled - waited) / self.clock.speedup

    def waited(self, start_s: float, end_s: float) -> None:
        """A wait for the peer from start_s to end_s (pass seconds)."""
        silent_s = LINK_SILENT_S * self.clock.speedup
        if end_s - start_s > silent_s:
            self.link_waits.append((start_s, end_s))

    def rows(self, end_s: float) -> list[dict]:
        times = np.array([t for t, _ in self.events])
        silent_s = LINK_SILENT_S * self.clock.speedup
        silences = [(start + silent_s, end) for start, end in self.link_waits]
        rows = []
        # up to the second after end_s: the last row shows the state at the end
        for second in range(int(math.ceil(max(end_s, 0.0))) + 1):
            i = int(np.searchsorted(times, second, side="right")) - 1
            state = self.events[max(i, 0)][1]
            handled = min(state["handled_s"], float(second))
            last = self.last_detection_s
            arrived_until = second if last is None else min(second, last)
            rows.append(
                timeline_row(
                    second,
                    int(state["detections"]),
                    int(state["sifted_bits"]),
                    int(state["reconciled_bits"]),
                    not any(a <= second < b for a, b in silences),
                    int(state["backlog_bits"]),
                    max(0.0, arrived_until - handled),
                )
            )
        return rows

    def report(self) -> dict:
        end = self.clock.now()
        rows = self.rows(end)
        last = self.last_detection_s if self.last_detection_s is not None else end
        during = [r["lag_s"] for r in rows if r["t_s"] <= last] or [0.0]
        return {
            "timeline": rows,
            "lag_s_max": float(max(during)),
            "lag_s_median": float(np.median(during)),
        }


class _Watched:
    """The channel, with the waits for the peer's messages logged on the timeline (its
    link_up column). Alice logs only her waits for Bob's next step: while Bob decodes,
    her wait for his answer is his computing, not the link."""

    def __init__(self, channel, timeline: Timeline, kinds=None):
        self.channel, self.timeline, self.kinds = channel, timeline, kinds

    def send(self, kind, **fields):
        self.channel.send(kind, **fields)

    def recv(self, kind):
        if self.kinds is not None and kind not in self.kinds:
            return self.channel.recv(kind)
        start = self.timeline.clock.now()
        try:
            return self.channel.recv(kind)
        finally:
            self.timeline.waited(start, self.timeline.clock.now())

    def abort(self, reason):
        self.channel.abort(reason)

    def close(self):
        self.channel.close()


class _Growing:
    """An array that grows at its end (amortised doubling)."""

    def __init__(self, dtype):
        self.data = np.zeros(1024, dtype=dtype)
        self.size = 0

    def extend(self, values) -> np.ndarray:
        values = np.asarray(values, dtype=self.data.dtype)
        need = self.size + values.size
        if need > self.data.size:
            grown = np.zeros(max(need, 2 * self.data.size), dtype=self.data.dtype)
            grown[: self.size] = self.data[: self.size]
            self.data = grown
        index = np.arange(self.size, need)
        self.data[self.size : need] = values
        self.size = need
        return index

    @property
    def view(self) -> np.ndarray:
        return self.data[: self.size]


def first_sync_windows(slot_rate_hz: float) -> list[float]:
    """The first-anchor window lengths allowed at this slot rate (FIRST_SYNC_MAX_SLOTS)."""
    allowed = [w for w in FIRST_SYNC_WINDOWS_S if w * slot_rate_hz <= FIRST_SYNC_MAX_SLOTS]
    return allowed or [FIRST_SYNC_WINDOWS_S[0]]


def first_sync_attempts(sync, t: np.ndarray, needed: dict, final: bool) -> list[tuple]:
    """The first-anchor attempts worth making on detections t (true seconds), in order:
    (window, searches). A bright pass's short windows holding FIRST_SYNC_SHORT_DETECTIONS
    (both searches); then every window whose densest holds needed["predicted"] detections
    and whose search around the orbit prediction asks Alice for at most
    FIRST_SYNC_MAX_SLOTS (FIRST_SYNC_MAX_SPARSE_SLOTS when she sums each detected slot's
    lags); then the allowed windows holding needed["full"], over the whole
    ranges. Empty while none does (at loss of signal, the last chance: the longest
    windows)."""
    short = max(min(needed.values()), FIRST_SYNC_SHORT_DETECTIONS)
    rate = sync.rate
    attempts = [
        (w, ("predicted", "full"))
        for w in FIRST_SYNC_SHORT_WINDOWS_S
        if timesync.densest_count(t, w) >= short
    ]
    predicted = []
    for w in FIRST_SYNC_PREDICTED_WINDOWS_S:
        cost = sync.first_cost(t, w, "predicted")
        if cost is None:
            continue
        slots, sparse = cost
        if slots > (FIRST_SYNC_MAX_SPARSE_SLOTS if sparse else FIRST_SYNC_MAX_SLOTS):
            continue
        predicted.append(w)
        if timesync.densest_count(t, w) >= needed["predicted"]:
            attempts.append((w, ("predicted",)))
    full = first_sync_windows(rate)
    attempts += [(w, ("full",)) for w in full if timesync.densest_count(t, w) >= needed["full"]]
    if final and not attempts:
        attempts = [(w, ("predicted",)) for w in predicted[-1:]] + [(full[-1], ("full",))]
    return attempts


def first_anchor_of_attempts(sync, t: np.ndarray, attempts: list, final: bool) -> tuple:
    """The first anchor of the first attempt (first_sync_attempts) with a correlation
    peak: (anchor time or None, its window, the misses: per search, (z, z needed,
    detections) of the last window it tried). With `final` (loss of signal), a miss of
    every attempt raises ProtocolAborted."""
    missed = {}
    for i, (window_s, kinds) in enumerate(attempts):
        try:
            return sync.first_anchor(t, window_s, kinds), window_s, missed
        except (PeerAborted, ChannelClosed, AuthenticationFailed):
            raise
        except ProtocolAborted:
            missed.update(sync.first_tries)
            if final and i + 1 == len(attempts):
                raise
    return None, None, missed


def sample_target(count: int, cfg: Config) -> int:
    """Disclosed sample after `count` sifted bits of a key basis: the post-pass rule
    (protocol._sample_positions) applied to the bits so far, its cap (sample_max)
    included. Uncapped (2 % of a full micius-2017 pass: 15.9 kbit per basis instead of
    8,192) the extra disclosed bits left the key blocks and took 3.3-3.6 kbit of s1 per
    basis with them (-2.5 kbit of key each). Once the cap is reached, the chunks are
    sized from the exact error counts of the chunks reconciled before them
    (StreamBob._estimate), which come from ~15x more bits than a 2 % sample of a chunk."""
    return min(count, max(cfg.sample_min, int(cfg.sample_fraction * count)), cfg.sample_max)


# A basis's first chunk is sized from the chunk reconciled just before it (of the other
# basis) when the sample agrees with that chunk's tail rate; a request sized from the
# sample instead says they disagree: one bit about that chunk's error count.
SIZING_DECISION_BITS = 1


def count_announcement_bits(chunk_bits: int) -> int:
    """Leak of announcing a reconciled chunk's error count (a number in [0, chunk_bits]),
    counted as post-pass counts ec_block_errors (protocol.bob_counts_bits)."""
    return math.ceil(math.log2(chunk_bits + 1))


def request_reveals(
    source: tuple[str, int] | None,
    announced: set,
    first_of_basis: bool,
    last_chunk: tuple[str, int] | None,
    chunk_bits,
) -> tuple[tuple[str, int], int] | None:
    """(reconciled chunk, leak bits) that a reconcile request reveals about that chunk's
    error count, the same on both sides (Alice refuses a leak count below her own), or None.

    A request sized from a chunk (`source`) reveals its tail's error count: counted once per
    chunk (`announced`, updated), as a number in [0, chunk_bits(chunk)]. A basis's first
    chunk (`first_of_basis`) sized from the sample after another basis's chunk
    (`last_chunk`) was reconciled says that Bob found that chunk's tail rate apart from the
    sample (StreamBob._estimate): one bit, counted whether or not he could compare (his
    sample's size), since Alice cannot tell."""
    if source is not None:
        if source in announced:
            return None
        announced.add(source)
        return source, count_announcement_bits(chunk_bits(source))
    if first_of_basis and last_chunk is not None:
        return last_chunk, SIZING_DECISION_BITS
    return None


def frame_key_bits(
    cfg: Config, qber: float, sample_bits: int, frame_bits: int = ldpc.FRAME_BITS
) -> int:
    """Key bits of one whole LDPC frame of `frame_bits` in the plan the reconciliation will
    choose for this QBER estimate (reconcile._plan); ldpc.FRAME_BITS for Cascade."""
    if cfg.ec != "ldpc":
        return ldpc.FRAME_BITS
    low, high = reconcile.qber_interval(qber, sample_bits)
    return ldpc.max_key_bits(low, cfg.ec_efficiency, frame_bits, qber_high=high)


def chunk_bits(cfg: Config, options: StreamOptions, qber: float, sample_bits: int) -> int:
    """Key bits of one error-correction chunk: `chunk_frames` whole frames of the chunks'
    length (frame_key_bits), so that no frame of a chunk is short (a short frame costs as
    much in check bits and Bob's messages)."""
    return options.chunk_frames * frame_key_bits(cfg, qber, sample_bits, options.frame_bits)


def next_chunk(
    backlog: int,
    short_frame: int,
    long_frame: int,
    options: StreamOptions,
    final: bool,
    hold: bool,
    measure_first: bool = False,
) -> int:
    """Key bits of a basis to reconcile now (0: none yet), `backlog` bits unreconciled,
    short_frame and long_frame the key bits of a frame of ldpc.FRAME_BITS and of
    options.frame_bits at the running estimate. Chunks are counted in frames of
    options.frame_bits (due_chunk_bits): during the pass (`hold`) with one held back; near
    loss of signal or the link's end every whole one goes at once, so that what the keys
    wait for stays under one of them and the last blocks, which then go in one frame of
    the length the post-pass rule picks for a block of that size (chunk_frame_bits; before,
    whole frames of ldpc.FRAME_BITS went there and the rest in them: docs/streaming.md,
    "The last chunks in one frame"). Near the link's end before any chunk has measured
    Bob's error correction (`measure_first`), whole frames of ldpc.FRAME_BITS go instead,
    as before session 16: the cut's reserve rests on that measurement, and until it on
    WARM_UP_TO_STREAM times the warm-up's seconds per frame (7-9x what a chunk measured on
    an idle machine), on which a short pass waiting for a whole frame of 2^17 was cut
    early, its key lost (docs/streaming.md, "The last chunks in one frame"). A function of
    public counts, the estimate and public timing."""
    frame = short_frame if measure_first and not hold else long_frame
    # the cap on a chunk's frames bounds Bob's decoder memory: as many bits as
    # MAX_CHUNK_FRAMES frames of ldpc.FRAME_BITS
    max_frames = max(1, MAX_CHUNK_FRAMES * short_frame // max(frame, 1))
    return due_chunk_bits(
        backlog, frame, options.chunk_frames, final, hold=hold, max_frames=max_frames
    )


def chunk_frame_bits(
    cfg: Config, options: StreamOptions, chunk_bits: int, qber: float, sample_bits: int
) -> int:
    """The frame length Bob asks for a chunk of chunk_bits key bits sized for (qber,
    sample_bits), the estimate the request names: options.frame_bits for a chunk of at
    least one whole frame of it; a smaller one (the last of a basis, at loss of signal or
    the cut) takes the post-pass rule's length for a block of its size at that estimate
    (ldpc.frame_bits_for, what reconcile._plan picks when no length is named): one longer
    frame, shortened, for more than one frame of ldpc.FRAME_BITS filling at least
    ldpc.SMALL_BLOCK_MIN_FILL of it, else frames of ldpc.FRAME_BITS. That length holds the
    chunk, so it is never longer than options.frame_bits (with 2^16 chunks, 2^16)."""
    if cfg.ec != "ldpc":
        return options.frame_bits if chunk_bits >= ldpc.FRAME_BITS else ldpc.FRAME_BITS
    if chunk_bits >= frame_key_bits(cfg, qber, sample_bits, options.frame_bits):
        return options.frame_bits
    low, high = reconcile.qber_interval(qber, sample_bits)
    return ldpc.frame_bits_for(chunk_bits, low, cfg.ec_efficiency, high)


def chunk_short_frames(chunk: dict) -> float:
    """A reconciled chunk's frames (its report entry, ec.blocks[].chunk_list[]) in frames
    of ldpc.FRAME_BITS: the probe's (reconcile._probe_split, when it has one) and the rest's
    of `frame_bits` scaled by their length."""
    probe = 1 if chunk.get("probe_bits") else 0
    scale = chunk.get("frame_bits", ldpc.FRAME_BITS) / ldpc.FRAME_BITS
    return probe + (int(chunk["frames"]) - probe) * scale


def chunk_tail_bits(chunk_bits: int) -> int:
    """The latest bits of a reconciled chunk (its key bits are in time order) whose exact
    error rate sizes the next chunk (StreamBob._estimate): a quarter of it, at least
    CHUNK_TAIL_MIN_BITS (~200 errors at 1.3 %: +-7 %), all of a smaller chunk."""
    return min(chunk_bits, max(chunk_bits // 4, CHUNK_TAIL_MIN_BITS))


CHUNK_TAIL_MIN_BITS = 16384
# The last chunk of a basis (at loss of signal or the cut: one frame or a little more; the
# keys wait for it) is sized for the upper confidence bound of its frames' error rate,
# LAST_CHUNK_SIGMAS standard errors above the rate it is sized from, with the spread of
# both counts (the bits behind the estimate, and a frame's own: a short frame's rate strays
# further), and that estimate's interval, plus the rise of the basis's error rate from the
# chunk before the one it is sized from (StreamBob._climb: at micius-2017's end each chunk
# ran 20-35 % above the tail before it). Sized like the chunks before it (the estimate,
# with the interval of a 2 % sample), its first syndromes and Bob's top-up fall short of a
# single frame's threshold by up to ~0.1-0.2 in f, and the retries climb 0.01 in f a round,
# whether the estimate ran high or low (jinan-1, seed 1: the last 24 single-frame chunks
# took 0-25 rounds, mean 8.5; each round is a decoding pass and a round trip on the link).
# Measured on one frame of throw-away bits (/tmp harness, reconcile.ldpc_alice / ldpc_bob
# in two threads, 16 noise seeds, load ~10; rounds mean / max, f) as before -> with the
# bound at 2 / 3 sigmas: 46 kbit at 1.05 % sized from 1.1 %: 10.4 / 20, 1.158 -> 1.5 / 5,
# 1.196 / 0.2 / 3, 1.211; 33.6 kbit at 2.29 % from 2.19 %: 9.1 / 19, 1.148 -> 1.8 / 7, 1.158
# / 1.9 / 9, 1.156; 15 kbit at 2.15 % from 2.0 %: 12.6 / 19, 1.232 -> 8.0 / 15, 1.241 / 3.4
# / 15, 1.231. At 4 sigmas the rounds fell little further (0.9-1.4) and the leak rose
# (+0.13 in f on a 46 kbit frame at 1.05 % that decoded at once either way). The extra
# leak at 3 sigmas, 0-0.05 in f on one frame a basis, is at most ~200 bits a basis. With
# the bound alone, micius-2017's last frames (12.8 and 14.3 kbit at 2.36 and 2.68 %, from
# tails at ~2.0 % after tails at ~1.25 %) still took 9 and 13 rounds in a mission; with the
# climb, 13 kbit at 2.68 % on 8 draws: 91 -> 15 rounds (max 17 -> 7), f 1.228 either way.
LAST_CHUNK_SIGMAS = 3.0
LAST_CHUNK_MAX_FRAMES = 2


def last_chunk_sizing(
    qber: float, behind_bits: int, chunk_bits: int, frame_bits: int, climb: float = 0.0
) -> tuple[float, int]:
    """(QBER, bits behind it) a basis's last chunk of chunk_bits is sized for
    (LAST_CHUNK_SIGMAS), from qber measured on behind_bits, frames of at most frame_bits,
    and `climb`, how much the rate rose from the chunk before (StreamBob._climb: the same
    rise again is allowed for). A function of public counts and of error counts already
    announced: the request reveals nothing more than the requests before it did."""
    per_frame = chunk_bits // max(1, math.ceil(chunk_bits / max(frame_bits, 1)))
    q = min(max(qber, 1e-4), 0.5)
    spread = math.sqrt(q * (1 - q) * (1 / max(behind_bits, 1) + 1 / max(per_frame, 1)))
    return min(q + max(climb, 0.0) + LAST_CHUNK_SIGMAS * spread, 0.2), behind_bits


# A backlog of many frames (a bright pass, the catch-up after the first lock or an outage)
# is reconciled as one chunk of every whole frame but the held one, up to this many frames
# (or `chunk_frames` if more): the decoder works on a chunk's frames in parallel (both
# cores) and its retry rounds are per chunk, so one 12-frame chunk took 2.1 CPU s where
# six 2-frame chunks took 6.1 (1.2 % QBER, same bits, docs/streaming.md "Keeping up").
# The cap bounds Bob's decoder memory (messages and LLRs of the frames, ~3 MB a frame).
MAX_CHUNK_FRAMES = 16


def due_chunk_bits(
    backlog: int,
    frame_bits: int,
    chunk_frames: int,
    final: bool,
    hold: bool = True,
    max_frames: int = MAX_CHUNK_FRAMES,
) -> int:
    """Key bits of a basis to reconcile now (0: none yet), `backlog` bits unreconciled and
    frames of `frame_bits` at the running estimate. During the pass: once the backlog holds
    `chunk_frames` frames plus one held back (so that what is left at loss of signal is at
    least a frame, reconciled in equal frames, never a sliver of one: a short frame costs
    as much in check bits and Bob's messages as a full one, and decodes worse), every whole
    frame but the held one (at most MAX_CHUNK_FRAMES). Without `hold` (the optical link's
    end is near): every whole frame, from the first. At loss of signal: all of it."""
    if backlog <= 0:
        return 0
    if final:
        return backlog
    if not hold:
        return min(backlog // frame_bits, max(max_frames, chunk_frames)) * frame_bits
    frames = backlog // frame_bits - 1
    if frames < chunk_frames:
        return 0
    return min(frames, max(max_frames, chunk_frames)) * frame_bits


class _Sifted:
    """One side's sifted bits of the pass so far, and per key basis the positions that
    are key (not disclosed) with how far they are reconciled."""

    def __init__(self, key_bases):
        self.basis = _Growing(np.uint8)
        self.bit = _Growing(np.uint8)
        self.intensity = _Growing(np.uint8)
        self.key_positions = {n: _Growing(np.int64) for n in key_bases}
        self.reconciled = dict.fromkeys(key_bases, 0)  # key positions reconciled
        self.basis_bits = dict.fromkeys(BASES, 0)  # sifted bits per basis
        self.sampled = dict.fromkeys(BASES, 0)  # disclosed bits per basis

    def backlog(self, name: str) -> int:
        return self.key_positions[name].size - self.reconciled[name]

    def backlog_total(self) -> int:
        return sum(self.backlog(n) for n in self.key_positions)


def _sizing_source(msg: dict, chunk_sizes: dict) -> tuple[str, int] | None:
    """The reconciled chunk whose exact error count a reconcile request was sized from
    (its QBER field reveals that count), or None (sized from the disclosed sample)."""
    basis, index = str(msg.get("sized_from_basis", "")), int(msg.get("sized_from_chunk", -1))
    if not basis:
        return None
    if basis not in chunk_sizes or not 0 <= index < len(chunk_sizes[basis]):
        raise ProtocolAborted(f"stream: sized from chunk {index} of {basis!r}, not reconciled")
    return basis, index


def _check_step(msg: dict, expected: str) -> None:
    if msg.get("step") != expected:
        raise ProtocolAborted(f"stream: expected step {expected!r}, received {msg.get('step')!r}")


# ====================================================================== Alice


def _missing_codes(config, role: str) -> dict:
    """{role: {"missing", "of"}}: the LDPC codes this pass may pick that are not in this
    side's cache, counted at the warm-up, before the pass clock (None with Cascade). Counted,
    never built here: provisioning is `qkdsat codes build`'s, before the pass."""
    if config.ec != "ldpc":
        return {role: None}
    from host.distil import codes

    return {role: codes.count_missing_for_stream(config)}


class StreamAlice(Alice):
    """Alice during the pass (on the payload processor): answers Bob's steps."""

    def __init__(self, *args, stream: StreamOptions | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.stream = stream or StreamOptions()
        self._burned = np.zeros(0, np.int64)  # slots a lock's probe disclosed, sorted
        self._burning = False  # _symbols answers burned slots as unknown (sifting only)

    def run(self, channel) -> Outcome:
        out = Outcome("alice")
        stage = _Stages(out.stage_seconds, self.on_stage)
        cfg = self.config
        key_bases = key_bases_for(self.pass_json, cfg)
        timeline = None
        try:
            self._hello(channel, mode=MODE)
            # the codes this pass may pick that are not built: each would be built in the
            # chunk that first needs it, seconds to tens of seconds (`qkdsat codes build`)
            out.report["ldpc_codes_missing"] = _missing_codes(cfg, "alice")
            # the hashing's machine code loaded (or compiled) while Bob warms his decoder,
            # not at the link's end, whose reserve does not hold a compilation (pa.warm_up)
            with stage("privacy_amplification_warm_up"):
                pa.warm_up()
            start = channel.recv("stream_start")
            clock = PassClock(float(start["speedup"]), float(start["epoch_unix_s"]))
            timeline = Timeline(clock)
            link_end_s = start.get("link_end_s")
            mine = self.stream.link_end_s
            if mine is not None and (link_end_s is None or abs(float(link_end_s) - mine) > 1.0):
                # both sides predict the link's end from the same pass geometry
                raise ProtocolAborted(
                    f"stream: Bob predicts the optical link's end at {link_end_s} s, Alice at "
                    f"{mine:g} s"
                )
            # claimed once the pass runs (the head's memory fills from its start: the
            # ledger's fingerprint reads its first slots) and before her first answer
            self._claim_raw_data()
            out.report["stream"] = {
                "block_s": float(start["block_s"]),
                "speedup": clock.speedup,
                "epoch_unix_s": clock.epoch_unix_s,
                "link_end_s": None if link_end_s is None else float(link_end_s),
            }
            watched = _Watched(channel, timeline, kinds={"stream_next"})
            sifted = _Sifted(key_bases)
            self._last_slot = -1  # the newest slot sifted: every block's slots lie beyond it
            blocks = {n: [] for n in key_bases}
            discards = {n: {"frames_discarded": 0, "bits_discarded": 0} for n in key_bases}
            my_leaks = dict.fromkeys(key_bases, 0)
            totals = [0, 0, 0]  # leak, frames, frame errors
            chunk_sizes = {n: [] for n in key_bases}  # bits of each reconciled chunk
            announced = set()  # (basis, chunk) whose error count Bob's sizing revealed
            last_chunk = None  # (basis, chunk) reconciled last
            detections = 0
            last_block_end_s = None
            while True:
                msg = watched.recv("stream_next")
                step = msg.get("step")
                if step == "sync":
                    with stage("sync"):
                        self._serve_sync(channel)
                elif step == "probe":
                    with stage("sync"):
                        self._answer_probe(channel, msg)
                elif step == "block":
                    last_block_end_s = float(msg["t_end_s"])
                    with stage("sifting"):
                        detections += int(msg["detections"])
                        self._sift_block(channel, msg, sifted, key_bases)
                    timeline.update(
                        detections=detections,
                        sifted_bits=sifted.basis.size,
                        backlog_bits=sifted.backlog_total(),
                        handled_s=float(msg["t_end_s"]),
                    )
                elif step == "reconcile":
                    name = str(msg["basis"])
                    revealed = request_reveals(
                        _sizing_source(msg, chunk_sizes),
                        announced,
                        not chunk_sizes[name],
                        last_chunk,
                        lambda chunk: chunk_sizes[chunk[0]][chunk[1]],
                    )
                    if revealed is not None:
                        my_leaks[revealed[0][0]] += revealed[1]
                        totals[0] += revealed[1]
                    with stage("error_correction"):
                        kept_bits, stats, count = self._reconcile(channel, msg, sifted, name)
                    chunk_sizes[name].append(count)
                    last_chunk = (name, len(chunk_sizes[name]) - 1)
                    blocks[name].append(kept_bits)
                    discards[name]["frames_discarded"] += int(stats.get("frames_discarded", 0))
                    discards[name]["bits_discarded"] += count - kept_bits.size
                    my_leaks[name] += stats["leak_bits"]
                    totals[0] += stats["leak_bits"]
                    totals[1] += stats["frames"]
                    totals[2] += stats["frame_errors"]
                    timeline.update(
                        reconciled_bits=timeline.state["reconciled_bits"] + count,
                        backlog_bits=sifted.backlog_total(),
                        handled_s=float(msg["t_handled_s"]),
                    )
                elif step == "end":
                    loss_of_signal_s = float(msg["last_detection_s"])
                    out.report["last_detection_unix_s"] = clock.wall_of(loss_of_signal_s)
                    timeline.last_detection_s = self._agree_cut(
                        msg, out, last_block_end_s, loss_of_signal_s
                    )
                    break
                else:
                    raise ProtocolAborted(f"stream: unknown step {step!r}")
            out.report["sifted_bits"] = int(sifted.basis.size)
            report = {"key_bases": key_bases}
            joined = {
                n: np.concatenate(blocks[n]) if blocks[n] else np.zeros(0, np.uint8)
                for n in key_bases
            }
            out.report = self._finish(
                channel,
                stage,
                out,
                report,
                int(sifted.basis.size),
                joined,
                discards,
                my_leaks,
                tuple(totals),
                own_detection_counts(
                    intensity_names(self.pass_json),
                    sifted.basis.view,
                    sifted.intensity.view,
                    {n: sifted.key_positions[n].view for n in key_bases},
                ),
            ) | {
                k: out.report[k]
                for k in ("stream", "last_detection_unix_s", "stream_cut", "ldpc_codes_missing")
                if k in out.report
            }
            channel.send("done")
            channel.recv("done")
        except Exception as error:
            _end_failed_run(channel, out, error, "Alice")
        finally:
            if timeline is not None:
                out.report.update(timeline.report())
        return out

    def _agree_cut(self, msg, out, last_block_end_s, loss_of_signal_s: float) -> float:
        """The end of the pass Bob announces: at loss of signal, or cut early for the
        optical link's end (StreamBob._cut_for_link_end). A cut must be where the last block
        ended (everything before it sifted, nothing after it) and before loss of signal;
        the report names it and the detections it discarded. Returns the pass time up to
        which the pipeline took detections."""
        cut_s = msg.get("cut_s")
        out.report["stream_cut"] = None
        if cut_s is None:
            return loss_of_signal_s
        cut_s = float(cut_s)
        if last_block_end_s is None or cut_s != last_block_end_s or cut_s > loss_of_signal_s:
            raise ProtocolAborted(
                f"stream: a cut at {cut_s} s that is not the last block's end "
                f"({last_block_end_s} s) before loss of signal ({loss_of_signal_s} s)"
            )
        out.report["stream_cut"] = {
            "cut_s": cut_s,
            "loss_of_signal_s": loss_of_signal_s,
            "link_end_s": out.report["stream"]["link_end_s"],
            "detections_discarded": int(msg["detections_discarded"]),
        }
        return cut_s

    def _answer_probe(self, channel, msg) -> None:
        """A new lock's probe (StreamBob._verify_lock): her basis and bit of each slot Bob
        names, and whether she holds it. These bits are disclosed, so the slots are burned:
        never sifted afterwards (answered as slots she holds no pattern for)."""
        count = int(msg["count"])
        if not 0 <= count <= PROBE_DETECTIONS:
            raise ProtocolAborted(f"stream probe: {count} slots, at most {PROBE_DETECTIONS}")
        try:
            slots = rice_decode_sorted(int(msg["rice_k"]), msg["slots"], count)
        except ValueError as error:
            raise ProtocolAborted(f"stream probe: {error}") from error
        if np.any(np.diff(slots) <= 0):
            raise ProtocolAborted("stream probe: slots not strictly increasing")
        if slots.size and slots[0] <= self._last_slot:
            # a slot already sifted may be in the key: its bit in the clear would be a
            # disclosed key bit no leak counts (burning it now spares later blocks only)
            raise ProtocolAborted(
                f"stream probe: slot {int(slots[0])} is not after the slots already sifted "
                f"(the last {self._last_slot}); their bits are not disclosed"
            )
        basis, bit, inten = self._symbols(slots)
        self._burned = np.union1d(self._burned, slots)
        channel.send(
            "stream_probe",
            basis=pack_bits(basis),
            bit=pack_bits(bit),
            known=pack_bits((inten != NO_PATTERN).astype(np.uint8)),
        )

    def _symbols(self, slots):
        basis, bit, inten = super()._symbols(slots)
        if self._burning and self._burned.size and slots.size:
            at = np.minimum(np.searchsorted(self._burned, slots), self._burned.size - 1)
            burned = self._burned[at] == slots
            basis[burned], bit[burned], inten[burned] = 0, 0, NO_PATTERN
        return basis, bit, inten

    def _sift_block(self, channel, msg, sifted: _Sifted, key_bases) -> None:
        # Alice takes each slot once, in pass order (see _answer_sifting), and never a slot
        # whose bit a lock's probe disclosed
        self._burning = True
        try:
            slots, answer, (s_basis, s_bit, s_int) = self._answer_sifting(
                msg, "stream block", self._last_slot
            )
        finally:
            self._burning = False
        if slots.size:
            self._last_slot = int(slots[-1])
        index = sifted.basis.extend(s_basis)
        sifted.bit.extend(s_bit)
        sifted.intensity.extend(s_int)
        fields = {}
        for b, name in enumerate(BASES):
            pos = index[s_basis == b]
            sifted.basis_bits[name] += pos.size
            if name in key_bases:
                want = sample_target(sifted.basis_bits[name], self.config) - sifted.sampled[name]
                sample = np.sort(self.rng.choice(pos.size, size=want, replace=False))
                mask = np.ones(pos.size, bool)
                mask[sample] = False
                sifted.key_positions[name].extend(pos[mask])
            else:
                sample = np.arange(pos.size)  # the test basis: disclosed in full
            sifted.sampled[name] += sample.size
            fields[f"pos_{name}"] = encode_sorted(sample)
            fields[f"count_{name}"] = int(sample.size)
            fields[f"bits_{name}"] = pack_bits(sifted.bit.view[pos[sample]])
        channel.send("stream_sift", **answer, **fields)

    def _reconcile(self, channel, msg, sifted: _Sifted, name: str):
        if name not in sifted.key_positions:
            raise ProtocolAborted(f"stream: reconcile of {name!r}, not a key basis")
        count = int(msg["bits"])
        qber, sample_bits = float(msg["qber"]), int(msg["sample_bits"])
        if not 0 < count <= sifted.backlog(name) or not 0 < qber < 0.5 or sample_bits < 0:
            raise ProtocolAborted(f"stream: reconcile request out of range ({count} bits)")
        # Bob's choice of frame length (public, like the chunk's size): any length a code
        # is provisioned for; the syndromes' code digest checks that both sides used it.
        # Named, an integer, checked before any message or code: no default (a request
        # without it came from a Bob whose frames were ldpc.frame_bits_for's, 2^17 for a
        # catch-up chunk: a code mismatch after the chunk's syndromes), no rounding
        frame_bits = msg.get("frame_bits")
        if type(frame_bits) is not int or frame_bits not in FRAME_LENGTHS:
            raise ProtocolAborted(
                f"stream: reconcile request with frame length {frame_bits!r}, not one of "
                f"{FRAME_LENGTHS} bits"
            )
        start = sifted.reconciled[name]
        positions = sifted.key_positions[name].view[start : start + count]
        key_bits = sifted.bit.view[positions]
        if self.config.ec == "ldpc":
            with _naming_block(name):
                kept, stats = reconcile.ldpc_alice(
                    channel,
                    key_bits,
                    qber,
                    self.config.ec_efficiency,
                    self.rng,
                    sample_bits,
                    frame_bits,
                )
        else:
            stats = reconcile.cascade_alice(
                channel, key_bits, qber, _public_seed(BASES.index(name))
            )
            kept = np.ones(count, bool)
        sifted.reconciled[name] += count
        return key_bits[kept], stats, count


# ====================================================================== Bob


class DetectionFeed:
    """Bob's detections as the time tagger delivers them: ground/detections.qdet (and
    pps.qdet) read as files being appended. In emulation the files are complete and are
    REPLAYED: a record becomes visible once the pass clock has passed its time (its
    offset from the first detection), at the clock's speed-up; the rest of the file is
    never read before then. A real tagger appending to the file is read the same way
    (records() maps what is there)."""

    def __init__(self, ground: Path, clock_speedup: float):
        self.detections = AppendedDetections(ground / "detections.qdet")
        pps_path = ground / "pps.qdet"
        self.pps = AppendedDetections(pps_path) if pps_path.exists() else None
        records = self.detections.records()
        if records.size == 0:
            raise ProtocolAborted("too few detections to synchronise (0)")
        self.first_ps = int(records["time_ps"][0])
        self.last_s = (int(records["time_ps"][-1]) - self.first_ps) * 1e-12
        self.speedup = clock_speedup

    def until(self, pass_s: float) -> int:
        """How many records have arrived by pass time pass_s."""
        times = self.detections.records()["time_ps"]
        cutoff = self.first_ps + int(round(pass_s * 1e12))
        return int(np.searchsorted(times, cutoff, side="right"))

    def count(self) -> int:
        return int(self.detections.records().size)

    def read(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        records = self.detections.records()[start:stop]
        return records["time_ps"].astype(np.int64), records["channel"].astype(np.int16)

    def pps_until(self, pass_s: float) -> np.ndarray | None:
        if self.pps is None:
            return None
        times = self.pps.records()["time_ps"]
        cutoff = self.first_ps + int(round(pass_s * 1e12))
        return times[: int(np.searchsorted(times, cutoff, side="right"))].astype(np.int64)

    # a replay is paced by the pass clock alone (StreamBob._stream sleeps until each
    # block's end) and its end is the file's end, known from the start
    epoch_unix_s = None  # the pass clock starts with the stream
    end = {"by": "end of the replayed file"}

    def start(self) -> None:
        pass

    def wait_for(self, pass_s: float) -> None:
        pass


class LiveDetectionFeed(DetectionFeed):
    """Bob's detections from a time tagger appending during the pass: a live
    ground/detections.qdet (qdet.LiveDetectionsWriter: count null; pps.qdet likewise), read
    at the tagger's own pace (docs/streaming.md, "End of pass from a live tagger").

    A block is taken once the tagger's clock has passed its end: a record beyond it in
    detections.qdet or pps.qdet (a mark every second, detections or not). Records come in
    time order, so nothing of the block is still to come, and a block still arriving is
    never cut. The pass ends at the first of:
    - the tagger's end-of-pass record: its time is the end (the normal case);
    - loss of signal by the pass geometry: the tagger's clock (through its PPS marks)
      passes pass.json's utc_end; the end is utc_end, later records are not the pass's;
    - the tagger silent for idle_s wall seconds (no new whole record in either file): it
      stopped without its end record; the end is its last record.
    Until then last_s is infinite: no block is the last."""

    def __init__(self, ground: Path, pass_json: dict, idle_s: float):
        self.detections = AppendedDetections(ground / "detections.qdet")
        pps_path = ground / "pps.qdet"
        self.pps = AppendedDetections(pps_path) if pps_path.exists() else None
        self.pass_json, self.idle_s, self.speedup = pass_json, float(idle_s), 1.0
        self.los_true_s = _seconds_between(pass_json.get("utc_start"), pass_json.get("utc_end"))
        self.end = None  # how the pass ended, for the report
        self._count = 0  # detection records of the pass known so far
        self._scanned = 0  # records searched for the end-of-pass record
        self._reached_ps = None  # the tagger's clock: its latest record, marks included
        self._end_ps = None
        self._sizes = None
        self._grew = time.monotonic()
        self.first_ps = None
        self.epoch_unix_s = None

    @property
    def last_s(self) -> float:
        if self._end_ps is None:
            return math.inf
        return (self._end_ps - self.first_ps) * 1e-12

    def start(self) -> None:
        """Wait for the first detection (Bob may start before the pass). The pass clock's
        epoch is the wall time of the tagger's latest record less its distance from the
        first detection, so a stream joined late works its backlog off at once."""
        while True:
            self._poll()
            if self._count or self.end is not None:
                break
            time.sleep(LIVE_POLL_S)
        if self._count == 0:
            raise ProtocolAborted(f"too few detections to synchronise (0; {self.end['by']})")
        self.first_ps = int(self.detections.records()["time_ps"][0])
        self.epoch_unix_s = time.time() - (self._reached_ps - self.first_ps) * 1e-12

    def wait_for(self, pass_s: float) -> None:
        """Return once the tagger has passed pass_s (a record beyond it) or the pass ended."""
        target = self.first_ps + int(round(pass_s * 1e12))
        while True:
            self._poll()
            if self.end is not None or self._reached_ps > target:
                return
            time.sleep(LIVE_POLL_S)

    def _poll(self) -> None:
        records = self.detections.records()
        marks = self._marks()
        sizes = (records.size, 0 if marks is None else marks.size)
        now = time.monotonic()
        if sizes != self._sizes:
            self._sizes, self._grew = sizes, now
        if self.end is not None:
            return
        times, channels = records["time_ps"], records["channel"]
        ends = np.flatnonzero(channels[self._scanned :] == END_OF_PASS_CHANNEL)
        if ends.size:
            at = self._scanned + int(ends[0])
            if at != records.size - 1:
                raise BadInput(
                    f"{self.detections.path}: {records.size - 1 - at} records after the "
                    "end-of-pass record"
                )
            self._count, self._end_ps = at, int(times[at])
            self._reached_ps = self._end_ps
            self.end = {"by": "end-of-pass record"}
            return
        self._scanned = records.size
        latest = [int(times[-1])] if records.size else []
        if marks is not None and marks.size:
            latest.append(int(marks[-1]))
        if latest:
            self._reached_ps = max(latest)
        if self.los_true_s is not None and marks is not None and marks.size >= 2:
            los_ps = timesync.ground_ps_of_true_s(self.los_true_s, marks, self.pass_json)
            if self._reached_ps >= los_ps:
                self._count = int(np.searchsorted(times, los_ps, side="right"))
                self._end_ps = los_ps
                self.end = {"by": "loss of signal (pass geometry: utc_end)"}
                return
        self._count = records.size
        if now - self._grew > self.idle_s:
            self._end_ps = self._reached_ps
            self.end = {"by": "idle", "idle_s": self.idle_s}

    def _marks(self) -> np.ndarray | None:
        """The PPS marks so far (int64 ps), without an end-of-pass record."""
        if self.pps is None:
            return None
        marks = self.pps.records()
        return marks["time_ps"][marks["channel"] != END_OF_PASS_CHANNEL].astype(np.int64)

    def until(self, pass_s: float) -> int:
        return min(super().until(pass_s), self._count)

    def count(self) -> int:
        return self._count

    def pps_until(self, pass_s: float) -> np.ndarray | None:
        marks = self._marks()
        if marks is None:
            return None
        cutoff = self.first_ps + int(round(pass_s * 1e12))
        return marks[: int(np.searchsorted(marks, cutoff, side="right"))]


def _seconds_between(utc_start, utc_end) -> float | None:
    """utc_end - utc_start in seconds (pass.json), None when either is missing."""
    import datetime as dt

    if not utc_start or not utc_end:
        return None
    try:
        start, end = (
            dt.datetime.fromisoformat(str(text).replace("Z", "+00:00"))
            for text in (utc_start, utc_end)
        )
    except ValueError:
        raise BadInput(f"pass.json: utc_start/utc_end {utc_start!r}, {utc_end!r}") from None
    return (end - start).total_seconds()


def open_feed(ground: Path, pass_json: dict, options: StreamOptions) -> DetectionFeed:
    """A live tagger's file (count null) is read as it grows; a complete one is replayed."""
    if AppendedDetections(ground / "detections.qdet").live:
        if options.speedup != 1.0:
            raise BadInput(
                f"--stream-speedup {options.speedup:g}: {ground / 'detections.qdet'} is a "
                "live tagger's file, read at the tagger's pace"
            )
        return LiveDetectionFeed(ground, pass_json, options.idle_s)
    return DetectionFeed(ground, options.speedup)


class StreamBob(Bob):
    """Bob during the pass (the ground station): reads the detections as they arrive and
    drives the steps."""

    def __init__(
        self,
        pass_dir,
        config: Config,
        insecure_deterministic_seed: int | None = None,
        stream: StreamOptions | None = None,
    ):
        # not Bob.__init__: the detections are not read whole, they arrive (DetectionFeed)
        self.pass_dir = Path(pass_dir)
        self.pass_json = read_pass_json(self.pass_dir / "pass.json")
        self.config = config
        check_parameters(self.pass_json, config)
        self.rng = endpoint_random(insecure_deterministic_seed)
        self.stream = stream or StreamOptions()
        self.stream.validate()
        self.feed = open_feed(self.pass_dir / "ground", self.pass_json, self.stream)
        self.multi_click_slots = {"one_basis": 0, "both_bases": 0}  # squashed, so far

    def run(self, channel) -> Outcome:
        out = Outcome("bob")
        stage = _Stages(out.stage_seconds, self.on_stage)
        timeline = None
        try:
            self._check_hello(channel, MODE)
            # the decoders loaded and their speed measured before the pass clock starts
            # (the first chunk would pay the loading, and the link's end needs the speed)
            self._warm_up_s_per_frame = None
            out.report["ldpc_codes_missing"] = _missing_codes(self.config, "bob")
            if self.config.ec == "ldpc":
                with stage("error_correction_warm_up"):
                    self._warm_up_s_per_frame = reconcile.warm_up(self.config.ec_efficiency)
            # and the hashing's: its first call in a process with numba's cache empty
            # compiles it (~4 s), more than the link's end reserves for it (pa.warm_up)
            with stage("privacy_amplification_warm_up"):
                pa.warm_up()
            with stage("sync_warm_up"):  # the clock model's kernels, likewise
                timesync.warm_up()
            self.feed.start()  # a live tagger: its first detection
            clock = PassClock(self.stream.speedup, self.feed.epoch_unix_s)
            timeline = Timeline(clock)
            channel.send(
                "stream_start",
                epoch_unix_s=clock.epoch_unix_s,
                speedup=clock.speedup,
                block_s=self.stream.block_s,
                link_end_s=self.stream.link_end_s,
            )
            out.report["stream"] = {
                **asdict(self.stream),
                "epoch_unix_s": clock.epoch_unix_s,
                "warm_up_ec_s_per_frame": self._warm_up_s_per_frame,
            }
            watched = _Watched(channel, timeline)
            self._stream(watched, stage, out, clock, timeline)
            channel.recv("done")
            channel.send("done")
        except Exception as error:
            _end_failed_run(channel, out, error, "Bob")
        finally:
            if timeline is not None:
                out.report.update(timeline.report())
        return out

    # ------------------------------------------------------------------ the pass

    def _stream(self, channel, stage, out, clock: PassClock, timeline: Timeline) -> None:
        cfg, opts, feed = self.config, self.stream, self.feed
        key_bases = key_bases_for(self.pass_json, cfg)
        self.key_bases = key_bases
        sync = timesync.Synchroniser(self.pass_json, channel)
        self._sifted = _Sifted(key_bases)
        self._sifted_slot = _Growing(np.int64)  # Bob's: each sifted bit's slot, ascending
        self._errors = _Growing(bool)
        self._known = _Growing(bool)
        self._sample = {n: [0, 0] for n in BASES}  # errors, bits of the disclosed bits
        self._blocks = {n: [] for n in key_bases}
        self._block_idx = {n: [] for n in key_bases}
        self._leaks = dict.fromkeys(key_bases, 0)
        self._ec_stats = dict.fromkeys(key_bases)
        # per basis: sifted positions of the disclosed bits, and whether each was an error
        self._sample_at = {n: _Growing(np.int64) for n in BASES}
        self._sample_wrong = {n: _Growing(bool) for n in BASES}
        # per key basis: (errors, bits) of each reconciled chunk, exact once decoded
        self._chunk_errors = {n: [] for n in key_bases}
        # per key basis: (errors, bits) of each reconciled chunk's latest bits (its tail)
        self._chunk_tail = {n: [] for n in key_bases}
        self._announced = set()  # (basis, chunk) whose error count a request revealed
        self._chunk_log = []  # (basis, chunk) in the order reconciled
        # the frame length of the chunks during the pass (frame_bits_for_lag), and each
        # change of it: {t_s, lag_wall_s, frame_bits}, for the report
        self._frame_bits = opts.frame_bits
        self._frame_switches = out.report["stream"]["frame_switches"] = []
        self._last_slot = -1
        self._assigned = 0
        self._t0 = None  # true seconds of the first detection: pass time 0
        self._unverified = False  # a lock whose probe has not run yet
        self._false_locks = 0
        self._probe = None
        self._lock_s = None
        buffer_t = np.zeros(0)  # true seconds of the detections not yet assigned
        buffer_ch = np.zeros(0, np.int16)
        read = 0  # records read from the feed
        synced = False
        # detections in a window for a first sync, per search (around the orbit prediction,
        # over the whole ranges): each grows after its own misses
        sync_needed = dict.fromkeys(("predicted", "full"), FIRST_SYNC_DETECTIONS)
        last_centre = 0.0
        handled_s = 0.0
        block = 0
        # what runs after loss of signal (docs/streaming.md "After loss of signal"): wall
        # seconds from the last detection's arrival to the end of each step
        after_los = out.report["after_loss_of_signal_s"] = {}

        def after(pass_s: float) -> float:
            return round(time.time() - clock.wall_of(pass_s), 3)

        def loss_of_signal_s() -> float:
            # a live tagger still writing when the link's end cut the pass: the cut
            return feed.last_s if math.isfinite(feed.last_s) else block_end

        link_cut = None  # the link's end closes the pass at this block: its report entry
        near_end = False  # the link's end is near: every whole frame is reconciled at once
        block_key_bits = {n: 0 for n in key_bases}  # key bits the latest block added
        key_history = []  # (block end, key bits so far per basis) over RATE_WINDOW_S
        while True:
            block += 1
            block_end = block * opts.block_s
            if opts.link_end_s is not None and block_end < feed.last_s:
                link_cut, near_end = self._cut_for_link_end(out, clock, block_end, block_key_bits)
            if link_cut is None:
                feed.wait_for(block_end)  # a live tagger: until it has passed the block's end
            final = link_cut is not None or block_end >= feed.last_s
            if final and link_cut is None:
                block_end = feed.last_s
            clock.sleep_until(block_end)
            visible = feed.until(block_end) if link_cut or not final else feed.count()
            time_ps, channels = feed.read(read, visible)
            read = visible
            if time_ps.size:
                if self._t0 is None:
                    # The ground clock's PPS fit is frozen at the first detections: refitted
                    # as marks arrive, it would move every later detection's true time a
                    # little at each block boundary, a step the anchors' spline cannot
                    # follow (a frozen fit is off by a linear function of time, which the
                    # clock model absorbs like any drift).
                    self._pps = feed.pps_until(block_end)
                t_new = timesync._true_seconds(time_ps, self._pps, self.pass_json)
                if self._t0 is None:
                    self._t0 = float(t_new[0])
                buffer_t = np.concatenate([buffer_t, t_new])
                buffer_ch = np.concatenate([buffer_ch, channels])
            timeline.update(detections=read)
            det = timesync.detector_tags(buffer_ch)
            detected = int(det.sum())
            if not synced:
                attempts = []
                if detected >= timesync.MIN_DETECTIONS:
                    attempts = first_sync_attempts(sync, buffer_t[det], sync_needed, final)
                if attempts:
                    synced, last_centre, missed = self._first_sync(
                        channel, stage, sync, buffer_t[det], final, attempts
                    )
                    for kind, (z, z_needed, detections) in missed.items():
                        # the detections a peak at the z needed (FIRST_Z, less around the
                        # orbit prediction: timesync.first_z_needed) needs, from the last
                        # window that search tried
                        grown = detections * (z_needed * SYNC_RETRY_Z_MARGIN / max(z, 1.0)) ** 2
                        if not math.isfinite(grown):  # too few slots to stand out at all
                            grown = 2 * detections
                        sync_needed[kind] = max(sync_needed[kind] + 1, math.ceil(grown))
                    self._unverified = synced
                    if synced:
                        self._lock_s = block_end
                if not synced and final:
                    raise ProtocolAborted(f"too few detections to synchronise ({detected})")
            elif detected:
                edge = buffer_t[det][-1] - timesync.TRACK_WINDOW_S / 2
                if edge > last_centre + timesync.STEP_S or (final and edge > last_centre):
                    channel.send("stream_next", step="sync")
                    with stage("sync"):
                        last_centre = sync.track(
                            buffer_t[det], last_centre, +1, edge, to_edge=final
                        )
                        channel.send(
                            "sync_request", done=1, starts=np.zeros(0, np.int64), length=0
                        )
            # assign every detection with anchors beyond it (all of them at the end)
            take = np.zeros(buffer_t.size, bool)
            handled_before = handled_s
            if synced:
                cut = math.inf if final else max(sync.anchors_t)
                take = buffer_t < cut
                if not final:
                    handled_s = max(handled_s, cut - self._t0)
            if final:
                handled_s = block_end  # loss of signal, or the cut for the link's end
            result = None
            if take.any():
                with stage("sync"):
                    result = sync.assign(buffer_t[take], det[take])
                if self._unverified:
                    with stage("sync"):
                        verdict = self._verify_lock(channel, result, buffer_ch[take], final)
                    if verdict is None:  # too few assigned detections yet: wait for more
                        take[:] = False
                        result = None
                    elif verdict is False:  # a false lock: drop it, sync again later
                        # one found around the orbit prediction: the next searches the
                        # whole ranges (the prediction may be what was wrong)
                        use_prior = sync.use_prior and sync.first_search != "predicted"
                        sync = timesync.Synchroniser(self.pass_json, channel)
                        sync.use_prior = use_prior
                        growth = FALSE_LOCK_RETRY_GROWTH
                        sync_needed = {k: math.ceil(growth * n) for k, n in sync_needed.items()}
                        synced, self._unverified, self._lock_s = False, False, None
                        handled_s = handled_before
                        take[:] = False
                        result = None
                    else:
                        self._unverified = False
                        result = verdict
                if result is not None and not final and result.assigned.any():
                    # The block's last slot waits for the next block: a click of it may lie
                    # beyond the cut, and a slot's clicks are squashed together (a
                    # cross-basis double click split here gave the first click's basis
                    # and bit, unsquashed, and dropped the second as a slot already sent).
                    held = result.slots >= result.slots[result.assigned].max()
                    at = np.nonzero(take)[0]
                    take[at[held]] = False
                    result = replace(
                        result,
                        slots=result.slots[~held],
                        assigned=result.assigned[~held],
                    )
                if result is not None:
                    self.channels = buffer_ch[take]  # what _detections_to_slots reads
            key_bits_before = {n: p.size for n, p in self._sifted.key_positions.items()}
            with stage("sifting"):
                self._send_block(channel, result, int(take.sum()), handled_s)
            block_key_bits = {
                n: p.size - key_bits_before[n] for n, p in self._sifted.key_positions.items()
            }
            if final:
                after_los["last_block_sifted"] = after(loss_of_signal_s())
            buffer_t, buffer_ch = buffer_t[~take], buffer_ch[~take]
            timeline.update(
                sifted_bits=self._sifted.basis.size,
                backlog_bits=self._sifted.backlog_total(),
            )
            self._check_qber(key_bases, final)
            key_history.append(
                (block_end, {n: p.size for n, p in self._sifted.key_positions.items()})
            )
            while key_history and key_history[0][0] < block_end - RATE_WINDOW_S:
                key_history.pop(0)
            for name in key_bases:
                while True:
                    if not final:
                        # the last chunks keep the chunks' length: what the keys wait for
                        # is their rule's (chunk_frame_bits), as is the link-end reserve
                        self._follow_lag(timeline)
                    # When a chunk is due, and how long, from public values and counts
                    # already announced only: a basis's first chunk is not scheduled on the
                    # other basis's unannounced tail (its comparison with the sample, block
                    # after block, would show in the request's timing); its request is
                    # sized on it below, which request_reveals counts
                    qber, bits, _ = self._estimate(name, compare_other=False)
                    # key bits of a frame of ldpc.FRAME_BITS and of the chunks' length now
                    short_frame = frame_key_bits(cfg, qber, bits)
                    long_frame = frame_key_bits(cfg, qber, bits, self._chunks_frame_bits(final))
                    backlog = self._sifted.backlog(name)
                    # near the link's end or loss of signal no frame is held back: what is
                    # left then is under a frame of the chunks' length and the blocks since,
                    # reconciled at the end in one frame of the post-pass rule's length
                    hold = not (near_end or self._near_loss_of_signal(
                        name, short_frame, block_end, key_history
                    ))  # fmt: skip
                    # near the link's end, a first chunk measures the error correction's
                    # speed for the cut's reserve as soon as a frame of 2^16 is there
                    measure_first = near_end and not any(self._ec_stats.values())
                    chunk = next_chunk(
                        backlog, short_frame, long_frame, opts, final, hold, measure_first
                    )
                    if not chunk:
                        break
                    scheduled = (qber, bits)
                    qber, bits, source = self._estimate(name)
                    if (qber, bits) != scheduled:
                        # sized from the other basis's chunk: the chunk in whole frames of
                        # that sizing where the backlog has one (a function of that chunk's
                        # count, which the request reveals and request_reveals counts)
                        resized = next_chunk(
                            backlog,
                            frame_key_bits(cfg, qber, bits),
                            frame_key_bits(cfg, qber, bits, self._chunks_frame_bits(final)),
                            opts,
                            final,
                            hold,
                            measure_first,
                        )
                        chunk = resized or chunk
                    qber, bits, frame_bits = self._chunk_request(
                        chunk, qber, bits, source, last=final
                    )
                    started = time.perf_counter()
                    with stage("error_correction"):
                        self._reconcile(
                            channel, name, chunk, qber, bits, handled_s, source, frame_bits
                        )
                    self._ec_stats[name]["chunk_list"][-1]["seconds"] = round(
                        time.perf_counter() - started, 3
                    )
                    timeline.update(
                        reconciled_bits=timeline.state["reconciled_bits"] + chunk,
                        backlog_bits=self._sifted.backlog_total(),
                    )
            timeline.update(handled_s=handled_s)
            if final:
                after_los["last_chunks_reconciled"] = after(loss_of_signal_s())
                break
        # the lag is the pipeline's behind what it takes: up to the cut when the link's
        # end closed the pass early; the key latency is from loss of signal all the same
        timeline.last_detection_s = block_end
        out.report["last_detection_unix_s"] = clock.wall_of(loss_of_signal_s())
        out.report["end_of_pass"] = {
            **(feed.end or {"by": "the optical link's end (the cut), the tagger still on"}),
            "end_s": loss_of_signal_s(),
            "detections": read,
        }
        if link_cut is not None:
            link_cut["loss_of_signal_s"] = loss_of_signal_s()
            link_cut["detections_discarded"] = feed.count() - read
        out.report["stream_cut"] = link_cut
        out.report["sifted_bits"] = int(self._sifted.basis.size)
        out.report["sync"] = {
            "anchors": len(sync.anchors_t),
            "detections": read,
            "assigned_fraction": self._assigned / max(read, 1),
            "multi_click_slots": dict(self.multi_click_slots),
            "first_lock_s": self._lock_s,
            "first_search": sync.first_search,  # "predicted" (around the orbit) or "full"
            "false_locks": self._false_locks,
            "probe": self._probe,
        }
        channel.send(
            "stream_next",
            step="end",
            last_detection_s=loss_of_signal_s(),
            cut_s=None if link_cut is None else link_cut["cut_s"],
            detections_discarded=0 if link_cut is None else link_cut["detections_discarded"],
        )
        for name in key_bases:
            if not self._block_idx[name]:
                raise ProtocolAborted(f"too few events: no {name}-basis key bits")
        sifted = self._sifted
        figures = self._finish(
            channel,
            stage,
            out,
            sifted.basis.view,
            sifted.intensity.view,
            self._errors.view,
            self._known.view,
            {n: np.concatenate(self._block_idx[n]) for n in key_bases},
            {n: np.concatenate(self._blocks[n]) for n in key_bases},
            self._leaks,
            [self._ec_stats[n] for n in key_bases],
        )
        out.report.update(figures)
        after_los["keys_computed"] = after(loss_of_signal_s())
        if link_cut is not None:
            # what the rest really took, from the decision to the keys computed, against
            # the reserve_wall_s it was given (Bob's report only: Alice's entry is the cut
            # both agreed on)
            link_cut["rest_wall_s"] = round(time.time() - self._cut_decided_unix_s, 3)

    def _follow_lag(self, timeline: Timeline) -> None:
        """The chunks' frame length for Bob's lag now (frame_bits_for_lag), each change
        logged for the report."""
        lag_s = timeline.busy_lag_wall_s()
        frame_bits = frame_bits_for_lag(self._frame_bits, lag_s, self.stream.frame_bits)
        if frame_bits != self._frame_bits:
            self._frame_bits = frame_bits
            self._frame_switches.append(
                {
                    "t_s": round(timeline.clock.now(), 3),
                    "lag_wall_s": round(lag_s, 3),
                    "frame_bits": frame_bits,
                }
            )

    def _chunks_frame_bits(self, last: bool) -> int:
        """The chunks' frame length: the one Bob's lag asks for during the pass
        (_follow_lag), the chunks' own (StreamOptions.frame_bits) for the last chunks,
        whose rule the keys and the link-end reserve wait for."""
        return self.stream.frame_bits if last else self._frame_bits

    def _predicted_loss_of_signal_s(self) -> float | None:
        """Loss of signal in pass seconds, before it comes, by the pass geometry (pass.json's
        utc_end); None if unknown. The same for a live tagger and a replay (not the replayed
        file's end): both then chunk the same bits the same way and give the same key."""
        pj = self.pass_json
        los_true_s = _seconds_between(pj.get("utc_start"), pj.get("utc_end"))
        if los_true_s is None or self._t0 is None:
            return None
        return los_true_s - self._t0

    def _near_loss_of_signal(self, name, frame_bits, block_end, key_history) -> bool:
        """Whether loss of signal comes before the basis sifts LOS_RELEASE_FRAMES more
        frames at its key-bit rate over the last RATE_WINDOW_S (public timing and counts)."""
        los_s = self._predicted_loss_of_signal_s()
        if los_s is None or len(key_history) < 2:
            return False
        (t_first, first), (t_last, last) = key_history[0], key_history[-1]
        rate = (last[name] - first[name]) / max(t_last - t_first, 1e-9)
        # no key bits yet (before the first lock): nothing to go by
        return rate > 0 and (los_s - block_end) * rate < LOS_RELEASE_FRAMES * frame_bits

    def _cut_for_link_end(self, out, clock: PassClock, block_end: float, block_key_bits: dict):
        """(the report entry of the cut when the block ending at block_end must be the last
        one for the keys to exist before the optical link's predicted end, else None;
        whether that end is near: within NEAR_END_RESTS times the time the rest would take).

        A decision from the clock and the pipeline's measured costs only, never from a bit
        value (LINK_END_SAFETY and the costs above). If this block is not the last, the next
        block's rest starts a block later at the earliest, with each key basis's backlog
        grown by up to two blocks of key bits (this one's and the next's): that rest must
        still end before the link does."""
        opts = self.stream
        link_end_unix_s = clock.epoch_unix_s + opts.link_end_s
        # in frames of ldpc.FRAME_BITS, the unit `frames` below counts in (a chunk's frames
        # are longer, but a probe's, one first frame of ldpc.FRAME_BITS, is not)
        frames_done = sum(
            chunk_short_frames(c) for s in self._ec_stats.values() if s for c in s["chunk_list"]
        )
        if frames_done:
            s_per_frame = out.stage_seconds.get("error_correction", 0.0) / frames_done
        elif self._warm_up_s_per_frame is not None:
            s_per_frame = WARM_UP_TO_STREAM * self._warm_up_s_per_frame
        else:
            s_per_frame = EC_S_PER_FRAME_UNMEASURED
        frames, pending = 0, 0
        for name in self.key_bases:
            bits = self._sifted.backlog(name) + 2 * block_key_bits[name]
            if bits:
                # in frames of ldpc.FRAME_BITS, as s_per_frame, of the length the rest's
                # request would ask (each basis's last chunk)
                frames += self._last_chunk_short_frames(name, bits)
                pending += bits
        reconciled = sum(self._sifted.reconciled.values())
        rest_s = link_end_rest_s(s_per_frame, frames, reconciled + pending)
        block_wall_s = opts.block_s / clock.speedup
        next_start_unix_s = max(time.time(), clock.wall_of(block_end)) + block_wall_s
        near_end = next_start_unix_s + NEAR_END_RESTS * rest_s >= link_end_unix_s
        if next_start_unix_s + rest_s < link_end_unix_s:
            return None, near_end
        self._cut_decided_unix_s = time.time()
        return {
            "cut_s": float(block_end),
            # how far the pipeline was behind the detections when it had to stop: what
            # arrived after the cut is the tail, discarded (the lag statistics stop at the cut)
            "behind_s": round(max(clock.now() - block_end, 0.0), 3),
            "link_end_s": float(opts.link_end_s * clock.speedup),
            "reserve_wall_s": round(rest_s + block_wall_s, 3),
            "rest_bits_estimated": int(pending),
            "rest_frames_estimated": int(frames),
            "ec_s_per_frame": s_per_frame,
            "reason": (
                "the optical link's predicted end: the pass was closed early so that the "
                "keys exist before it; the detections after the cut were never sifted"
            ),
        }, near_end

    def _first_sync(self, channel, stage, sync, t: np.ndarray, final: bool, attempts: list):
        """The first anchor and tracking over the detections so far: (synced, last centre
        tried forward, the misses: per search, (z, z needed, detections) of the last window
        it tried). The attempts (first_sync_attempts) are made in order until one has a
        correlation peak; a failure for want of correlation is retried with more data."""
        channel.send("stream_next", step="sync")
        with stage("sync"):
            tc, window_s, missed = first_anchor_of_attempts(sync, t, attempts, final)
            if tc is None:
                channel.send("sync_request", done=1, starts=np.zeros(0, np.int64), length=0)
                return False, 0.0, missed
            self._lock_window_s = window_s
            sync.track(t, tc, -1, t[0] + timesync.TRACK_WINDOW_S / 2, to_edge=True)
            last = sync.track(t, tc, +1, t[-1] - timesync.TRACK_WINDOW_S / 2, to_edge=final)
            channel.send("sync_request", done=1, starts=np.zeros(0, np.int64), length=0)
        return True, last, missed

    def _verify_lock(self, channel, result, channels: np.ndarray, final: bool):
        """The probe of a new lock (PROBE_DETECTIONS, FALSE_LOCK_QBER): None while too few
        detections are assigned yet, False for a false lock, else the result without
        the probe's detections, which are never sifted (Alice burns their slots)."""
        assigned = np.nonzero(result.assigned)[0]
        if assigned.size < PROBE_DETECTIONS and not final:
            return None
        last = int(result.slots[assigned[:PROBE_DETECTIONS][-1]]) if assigned.size else -1
        probe = result.assigned & (result.slots <= last)
        slots, first, counts = np.unique(
            result.slots[probe], return_index=True, return_counts=True
        )
        single = counts == 1  # a slot clicked twice is left out of the probe
        slots = slots[single]
        ch = channels[probe][first[single]].astype(np.int64)
        basis, bit = (ch >= 2).astype(np.uint8), (ch & 1).astype(np.uint8)
        rice_k, packed = rice_encode_sorted(slots)
        channel.send(
            "stream_next", step="probe", count=int(slots.size), rice_k=rice_k, slots=packed
        )
        msg = channel.recv("stream_probe")
        a_basis = unpack_bits(msg["basis"], slots.size)
        a_bit = unpack_bits(msg["bit"], slots.size)
        known = unpack_bits(msg["known"], slots.size).astype(bool)
        match = known & (a_basis == basis)
        compared = int(match.sum())
        errors = int((a_bit[match] != bit[match]).sum())
        qber = errors / compared if compared else 0.0
        if compared >= PROBE_MIN_COMPARED and qber >= FALSE_LOCK_QBER:
            self._false_locks += 1
            return False
        self._probe = {
            "slots": int(slots.size),
            "compared_bits": compared,
            "qber": qber,
            "window_s": self._lock_window_s,
        }
        return replace(result, assigned=result.assigned & ~probe)

    def _send_block(self, channel, result, raw_count: int, handled_s: float):
        """One block: Bob's slots and bases, Alice's answer (her bases, intensities and the
        block's disclosed bits)."""
        if result is None:
            slots, basis, bit = np.zeros(0, np.int64), np.zeros(0, np.uint8), np.zeros(0, np.uint8)
        else:
            slots, basis, bit = self._detections_to_slots(result)
            self._assigned += int(result.assigned.sum())
        fresh = slots > self._last_slot  # a slot split across two blocks is sifted once
        slots, basis, bit = slots[fresh], basis[fresh], bit[fresh]
        if slots.size:
            self._last_slot = int(slots[-1])
        (s_basis, s_bit, s_int, s_slot), msg = _request_sifting(
            channel,
            "stream_next",
            "stream_sift",
            slots,
            basis,
            bit,
            classes=len(intensity_names(self.pass_json)),
            step="block",
            t_end_s=float(handled_s),
            detections=raw_count,
        )
        sifted = self._sifted
        index = sifted.basis.extend(s_basis)
        sifted.bit.extend(s_bit)
        sifted.intensity.extend(s_int)
        self._sifted_slot.extend(s_slot)
        self._errors.extend(np.zeros(index.size, bool))
        self._known.extend(np.zeros(index.size, bool))
        for b, name in enumerate(BASES):
            pos = index[s_basis == b]
            sifted.basis_bits[name] += pos.size
            count = int(msg[f"count_{name}"])
            sample = decode_sorted(msg[f"pos_{name}"], count) if count else np.zeros(0, int)
            if sample.size and (sample[-1] >= pos.size or np.any(np.diff(sample) <= 0)):
                raise ProtocolAborted("Alice disclosed positions outside the block's bits")
            if name in self.key_bases:
                want = sample_target(sifted.basis_bits[name], self.config) - sifted.sampled[name]
                if sample.size != want:
                    raise ProtocolAborted(
                        f"Alice disclosed {sample.size} {name} bits of a block, the rule "
                        f"gives {want}"
                    )
                mask = np.ones(pos.size, bool)
                mask[sample] = False
                sifted.key_positions[name].extend(pos[mask])
            elif sample.size != pos.size:
                raise ProtocolAborted(f"Alice disclosed part of the test basis {name}")
            sifted.sampled[name] += sample.size
            alice_bits = unpack_bits(msg[f"bits_{name}"], count)
            idx = pos[sample]
            wrong = alice_bits != sifted.bit.view[idx]
            self._errors.data[idx] = wrong
            self._known.data[idx] = True
            self._sample[name][0] += int(wrong.sum())
            self._sample[name][1] += int(idx.size)
            self._sample_at[name].extend(idx)
            self._sample_wrong[name].extend(wrong)

    def _estimate(
        self, name: str, compare_other: bool = True
    ) -> tuple[float, int, tuple[str, int] | None]:
        """The QBER the next chunk of a basis is sized for, the bits it comes from, and the
        reconciled chunk it is that chunk's exact error rate of (None: the sample).
        compare_other False: a first chunk from its sample alone (the schedule's).

        - After a chunk of the same basis: the exact error rate of that chunk's latest
          bits (chunk_tail_bits: Bob knows every error once it is decoded). The QBER
          drifts over a pass (it rises towards low elevation) and a chunk's bits are
          contiguous in time, so the previous chunk's tail is the nearest stretch of the
          pass, measured on ~16-30 kbit instead of a 2 % sample.
        - The first chunk of a basis: the disclosed bits among its unreconciled bits (or
          the whole sample while those are fewer than sample_min), replaced, as post-pass
          (protocol._ec_sizing), by the exact rate of the other basis's latest chunk when
          the sample agrees with it.
        Floored as post-pass (protocol._ec_sizing)."""
        sifted = self._sifted
        backlog = sifted.key_positions[name].view[sifted.reconciled[name] :]
        at = self._sample_at[name].view
        local = at >= backlog[0] if backlog.size else np.zeros(at.size, bool)
        wrong = self._sample_wrong[name].view[local]
        if wrong.size < self.config.sample_min:  # too few yet: the pass so far
            wrong = self._sample_wrong[name].view
        q = float(wrong.mean()) if wrong.size else 0.0
        bits, source = int(wrong.size), None
        own = self._chunk_errors[name]
        if own:
            source = (name, len(own) - 1)
        elif compare_other and self._chunk_log and bits:
            other = self._chunk_log[-1]  # the latest chunk, of another basis
            errors, other_bits = self._chunk_tail[other[0]][other[1]]
            spread = math.sqrt(max(q, 1e-4) * (1 - q) / bits)
            if abs(errors / other_bits - q) <= EC_CONSISTENT_SIGMAS * spread:
                source = other
        if source is not None:
            # The rate of the source chunk's tail, not of the whole chunk: near loss of
            # signal the QBER climbs within a chunk (micius-2017, seed 1: a 59 kbit chunk
            # at 1.65 %, the 15 kbit after it at 2.58 %, 16 retry rounds). The request's
            # QBER reveals that tail's error count, a number in [0, tail bits]: counted as
            # one in [0, chunk bits] (count_announcement_bits), at least as many bits.
            errors, tail_bits = self._chunk_tail[source[0]][source[1]]
            exact_bits = self._chunk_errors[source[0]][source[1]][1]
            q = errors / tail_bits
            # The interval stays that of a sample_fraction sample of the chunk, not of an
            # exact count: the QBER moves between chunks (full micius-2017 pass, seed 1:
            # 1.56 % -> 1.17 % over the first two chunks, 1.13 % -> 1.57 % over the last
            # two). Sized from the exact count's narrow interval, the last chunks' reserve
            # fell short and retries revealed key bits (35-42 kbit leaked for 150 kbit).
            bits = max(self.config.sample_min, int(self.config.sample_fraction * exact_bits))
        return min(max(q, 0.004), 0.2), bits, source

    def _climb(self, source: tuple[str, int] | None) -> float:
        """How much the error rate of a basis's chunk tails rose from the chunk before the
        source chunk to the source (0 if it fell, or if the earlier chunk's count was never
        announced: using it would reveal a count the leak has not counted)."""
        if source is None or source[1] < 1 or (source[0], source[1] - 1) not in self._announced:
            return 0.0
        tails = self._chunk_tail[source[0]]
        (now_errors, now_bits), (then_errors, then_bits) = tails[source[1]], tails[source[1] - 1]
        return max(0.0, now_errors / now_bits - then_errors / then_bits)

    def _chunk_request(self, chunk, qber, sample_bits, source, last: bool):
        """(QBER, sample bits, frame length) Bob's reconcile request names for a chunk of
        `chunk` key bits of a basis estimated at (qber, sample_bits) from `source`
        (_estimate). The last chunk of a basis (`last`: at loss of signal or the cut; at
        most LAST_CHUNK_MAX_FRAMES frames of the chunks' length), which the keys wait for,
        is sized for the upper bound of its frames' error rate (last_chunk_sizing), so that
        it decodes in few rounds, with the frames of the length it would take at the
        estimate; its length is then the one chunk_frame_bits gives at that bound, the
        interval Alice's plan sees. Public counts and announced error counts only."""
        cfg = self.config
        opts = replace(self.stream, frame_bits=self._chunks_frame_bits(last))
        frame_bits = chunk_frame_bits(cfg, opts, chunk, qber, sample_bits)
        long_frame = frame_key_bits(cfg, qber, sample_bits, opts.frame_bits)
        if last and cfg.ec == "ldpc" and chunk <= LAST_CHUNK_MAX_FRAMES * long_frame:
            behind = self._chunk_tail[source[0]][source[1]][1] if source else sample_bits
            if behind > 0:
                per_frame = frame_key_bits(cfg, qber, sample_bits, frame_bits)
                qber, sample_bits = last_chunk_sizing(
                    qber, behind, chunk, per_frame, self._climb(source)
                )
                frame_bits = chunk_frame_bits(cfg, opts, chunk, qber, sample_bits)
        return qber, sample_bits, frame_bits

    def _last_chunk_short_frames(self, name: str, bits: int) -> float:
        """The frames a last chunk of `bits` key bits of basis `name` takes, of the length
        and sizing its request would name (_chunk_request), in frames of ldpc.FRAME_BITS
        as Bob's seconds per frame are measured (chunk_short_frames): one 2^17 frame counts
        2, one 2^18 frame 4."""
        cfg = self.config
        # a schedule's figure: public values and announced counts only (_estimate)
        qber, sample_bits, source = self._estimate(name, compare_other=False)
        qber, sample_bits, frame_bits = self._chunk_request(
            bits, qber, sample_bits, source, last=True
        )
        per_frame = max(1, frame_key_bits(cfg, qber, sample_bits, frame_bits))
        # Cascade has no frames: counted in ldpc.FRAME_BITS bits, as its chunks report
        unit = frame_bits if cfg.ec == "ldpc" else ldpc.FRAME_BITS
        return chunk_short_frames({"frames": math.ceil(bits / per_frame), "frame_bits": unit})

    def _record_chunk_errors(self, name: str, wrong: np.ndarray) -> None:
        """A reconciled chunk's errors (`wrong`: per key bit, in time order), which size
        the next chunks (_estimate)."""
        self._chunk_errors[name].append((int(wrong.sum()), int(wrong.size)))
        tail = chunk_tail_bits(int(wrong.size))
        self._chunk_tail[name].append((int(wrong[-tail:].sum()), tail))
        self._chunk_log.append((name, len(self._chunk_errors[name]) - 1))

    def _check_qber(self, key_bases, final: bool = False) -> None:
        """The sample's QBER against the threshold, once the sample has its minimum size
        (at the end, whatever its size: post-pass checks the sample it has)."""
        cfg = self.config
        for name in BASES:
            errors, bits = self._sample[name]
            if bits and (bits >= cfg.sample_min or final) and errors / bits > cfg.qber_threshold:
                role = "" if name in key_bases else "test basis "
                raise ProtocolAborted(
                    f"QBER above threshold: {role}{name} basis {errors / bits:.4f} > "
                    f"{cfg.qber_threshold:.4f} (from {bits} sampled bits)"
                )

    def _chunk_noise_shares(self, idx: np.ndarray) -> np.ndarray:
        """The noise shares (noise_model) of a chunk's bits, counted over the detections
        sifted up to its last bit only, in the pass's windows: the same whatever else has
        been sifted when the chunk is reconciled (a window still filling at that moment
        would make Bob's decoding, hence the leak and the key, depend on timing), and
        O(chunk): only the windows the chunk touches are counted."""
        slots, classes = self._sifted_slot.view, self._sifted.intensity.view
        intensities, probabilities, window_slots = self._rates_parameters()
        origin = int(slots[0])
        chunk = slots[idx]
        first_window = (int(chunk.min()) - origin) // window_slots
        lo = int(np.searchsorted(slots, origin + first_window * window_slots, side="left"))
        hi = int(np.searchsorted(slots, int(chunk.max()), side="right"))
        rates = noise_model.DetectionRates(intensities, probabilities, window_slots, origin)
        rates.add(slots[lo:hi], classes[lo:hi])
        return rates.shares(chunk, classes[idx])

    def _reconcile(
        self, channel, name, count, qber, sample_bits, handled_s, source, frame_bits
    ) -> None:
        cfg = self.config
        sifted = self._sifted
        channel.send(
            "stream_next",
            step="reconcile",
            basis=name,
            bits=int(count),
            qber=float(qber),
            sample_bits=int(sample_bits),
            frame_bits=int(frame_bits),
            sized_from_basis="" if source is None else source[0],
            sized_from_chunk=-1 if source is None else int(source[1]),
            t_handled_s=float(handled_s),
        )
        revealed = request_reveals(
            source,
            self._announced,
            not self._chunk_errors[name],
            self._chunk_log[-1] if self._chunk_log else None,
            lambda chunk: self._chunk_errors[chunk[0]][chunk[1]][1],
        )
        if revealed is not None:
            revealed, leak = revealed
            self._leaks[revealed[0]] += leak
            stats_of_source = self._ec_stats[revealed[0]]
            stats_of_source["leak_bits"] += leak
            stats_of_source["chunk_list"][revealed[1]]["leak_bits"] += leak
            stats_of_source["chunk_list"][revealed[1]]["leak_error_count_bits"] += leak
        start = sifted.reconciled[name]
        idx = sifted.key_positions[name].view[start : start + count].copy()
        mine = sifted.bit.view[idx]
        if cfg.ec == "ldpc":
            with _naming_block(name):
                # a chunk's top-up at LDPC_FIRST_F whatever its frames: the stream's
                # latency is the decoder's, and the lower top-up of long frames costs more
                # decoding for little f here (docs/streaming.md, "Frame length and top-up")
                share = self._chunk_noise_shares(idx)
                corrected, kept, stats = reconcile.ldpc_bob(
                    channel,
                    mine,
                    qber,
                    cfg.ec_efficiency,
                    sample_bits,
                    reconcile.LDPC_FIRST_F,
                    frame_bits,
                    noise_share=share,
                )
        else:
            corrected, stats = reconcile.cascade_bob(
                channel, mine, qber, _public_seed(BASES.index(name))
            )
            kept = np.ones(count, bool)
        sifted.reconciled[name] += count
        wrong = corrected != mine
        self._record_chunk_errors(name, wrong)
        self._errors.data[idx] = wrong
        self._known.data[idx] = True
        self._blocks[name].append(corrected[kept])
        self._block_idx[name].append(idx)
        self._leaks[name] += stats["leak_bits"]
        stats.setdefault("frames_discarded", 0)
        stats.setdefault("bits_discarded", 0)
        merged = self._ec_stats[name] or {
            "basis": name,
            "chunks": 0,
            "bits": 0,
            "errors": 0,
            "errors_discarded": 0,
            "leak_bits": 0,
            "frames": 0,
            "frame_errors": 0,
            "frames_discarded": 0,
            "bits_discarded": 0,
            "chunk_list": [],
        }
        merged["chunks"] += 1
        merged["bits"] += int(kept.sum())
        merged["errors"] += int(wrong[kept].sum())
        merged["errors_discarded"] += int(wrong[~kept].sum())
        for key in ("leak_bits", "frames", "frame_errors", "frames_discarded", "bits_discarded"):
            merged[key] += int(stats[key])
        merged["chunk_list"].append(
            {
                "bits": int(count),
                "frames": int(stats["frames"]),
                "frame_bits": int(stats.get("frame_bits", ldpc.FRAME_BITS)),
                "leak_bits": int(stats["leak_bits"]),
                "qber_sized_for": qber,
                "sample_bits": int(sample_bits),
                "sized_from": None if source is None else f"{source[0]}{source[1]}",
                "errors": int(wrong.sum()),
                **{
                    key: stats[key]
                    for key in (
                        "probe_bits",
                        "retry_rounds",
                        "leak_bob_messages_bits",
                        "revealed_bits",
                        "decoder_seconds",
                    )
                    if key in stats
                },
                "leak_error_count_bits": 0,
                "t_handled_s": round(float(handled_s), 3),
            }
        )
        self._ec_stats[name] = merged

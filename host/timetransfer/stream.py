"""Time transfer DURING the pass: the two endpoints exchange their time data block by
block as the pass goes by, and the ground knows the offset of each 0.1 s bin about one
block after the bin (docs/time-transfer.md, "During the pass").

The steps are those of the post-pass protocol (endpoints.py), cut into blocks of
`block_s` of pass time. Both sides read their records as a pass clock lets them
(host/distil/stream.py PassClock: pass seconds since the first event, at `speedup`
pass seconds per wall second); the satellite decides each block's downlink events by
its own clock (index ranges of its record, which the ground takes the same from its
own, index i being the same photon in both). The uplink is matched by its time
synchronisation (_StreamUplink, timesync.UplinkSlotSync): the satellite asks once for
the ground transmitter's intensity classes of windows of slots around its detections,
locks the lag, then names the slots of each block's detections; the ground returns its
bases and bits of them (all: they are never key, endpoints.uplink_bases_and_bits). An
uplink event lost or added on board moves nothing else.
Messages, strictly alternating (the satellite is the first speaker):

    satellite -> ground  tt_block       block k: bases of its downlink emissions; the
                                        uplink's request for the ground's classes (once)
                                        or the slots of its detections added since the
                                        last block; for block k-1: SEALED, the
                                        uplink fit of the bins now complete and its
                                        emitted bits of the downlink sample (Alice's raw
                                        key bits), and in the clear the downlink emission
                                        epochs of the sifted events, the uplink's sifted,
                                        sampled and sample-error counts
    ground -> satellite  tt_block_sift  block k: which downlink bases agree and a CSPRNG
                                        sample of the sifted; the classes asked for, or
                                        its bases and emitted bits of the uplink slots
                                        named
    ...
    satellite -> ground  tt_block       final: block N-1's data only
    ground -> satellite  tt_result      SEALED: the measured offset (middle, rate)

"By slot" (a satellite without a downlink record: a mission's, which reads its symbols
on board): its tt_block says downlink_count = -1; the ground cuts its detections into
blocks by its own clock and names each block's slots, its bases and a sample over all of
them in tt_block_sift; the satellite sifts and returns the mask in the next tt_block.

A bin is fitted once, when it is complete (its end more than COMPLETE_MARGIN_S behind
the newest timing event of the direction, or at the end), from all its events; the
ground combines a bin as soon as both directions' fits of it are in and records the
pass time it knew the offset at. The checks that need the whole pass (timing QBER, the
range and range-rate checks, enough events and overlap) are estimate.combine's, at the
end, over the same per-bin fits: the offsets known during the pass are provisional until
then, like the streaming distillation's bits before privacy amplification.

Key: a streaming session has N + 2 messages each way (N blocks, the result, an abort),
so its authentication region is 8 + 16 (N + 2) bytes; the sealed uplink fits follow as
raw bytes (SEALED_FIT header, 26 bytes, then 8 bytes a bin), ~8 bytes a bin in all, as post-pass.
During the pass the pass's own key does not exist yet (privacy amplification runs at
loss of signal): the key is an earlier distillation's (`--keys`).
"""

from __future__ import annotations

import math
import struct
import time
from pathlib import Path

import numpy as np

from host.distil import channel as ch
from host.distil import timesync
from host.distil.bitcodec import pack_bits, unpack_2bit, unpack_bits
from host.distil.endpoint_random import SystemRandom
from host.distil.stream import PassClock
from host.errors import BadInput, ProtocolAborted
from host.timetransfer import endpoints, estimate, files
from host.timetransfer.endpoints import (
    SealedChannel,
    _check,
    _positions,
    pack_epochs,
    unpack_epochs,
)

COMPLETE_MARGIN_S = 0.02  # a bin is complete when the newest event is this far past it
SEALED_FIT = struct.Struct("<qdfIH")  # base ps, reference ps, jitter ps, first bin, count
BASE_UNKNOWN = -(2**63)  # the sealed fit's base before the satellite knows one
FIT_BYTES_PER_BIN = 8  # float32 intercept - reference, float16 variance, uint16 events
RESULT_PAD_BYTES = 400  # the sealed result's encoded fields (as post-pass)


def block_count(scenario: dict, block_s: float) -> int:
    return int(math.ceil(float(scenario["duration_s"]) / block_s))


def auth_region_bytes(n_blocks: int) -> int:
    return 8 + 16 * (n_blocks + 2)


def downlink_sample_cap(n_blocks: int) -> int:
    """A block's downlink QBER sample at most: the pass's DOWNLINK_SAMPLE_MAX shared by
    its blocks, so the sealed sample bits of the whole pass stay within the budget."""
    return max(1, endpoints.DOWNLINK_SAMPLE_MAX // n_blocks)


def key_budget(pool: ch.KeyPool, scenario: dict, block_s: float) -> dict:
    """endpoints.key_budget for a streamed session: tags of N + 2 messages each way, a
    sealed fit header a block and the result, 8 bytes a bin, and each block's sealed
    sample bits (whole bytes a block)."""
    n_blocks = block_count(scenario, block_s)
    n_bins = estimate.bin_grid(scenario)[1]
    return endpoints.key_budget(
        pool, scenario, auth_region_bytes(n_blocks), FIT_BYTES_PER_BIN * n_bins,
        SEALED_FIT.size * (n_blocks + 1) + RESULT_PAD_BYTES,
        n_blocks * ((downlink_sample_cap(n_blocks) + 7) // 8),
    )  # fmt: skip


def check_key(pool: ch.KeyPool, key_info: dict, scenario: dict, block_s: float) -> dict:
    budget = key_budget(pool, scenario, block_s)
    endpoints.refuse_short_key(budget, key_info, "the streamed time data")
    return budget


def block_edges(tags_ps: np.ndarray, zero_ps: int, block_s: float, n_blocks: int) -> np.ndarray:
    """Index ranges of a record by its own clock: edges[k]..edges[k+1] is block k (the
    last block takes everything left). Tags out of order by a jitter count where their
    running maximum puts them."""
    monotone = (
        np.maximum.accumulate(np.asarray(tags_ps, dtype=np.int64)) if tags_ps.size else tags_ps
    )
    bounds = zero_ps + np.rint(np.arange(1, n_blocks) * block_s * 1e12).astype(np.int64)
    inner = np.searchsorted(monotone, bounds, side="left")
    return np.concatenate([[0], inner, [tags_ps.size]]).astype(np.int64)


def pack_fit_bytes(fit: dict, base: int, first: int, count: int, sigma_ps: float) -> bytes:
    a = fit["a_ps"][first : first + count]
    finite = np.isfinite(a)
    reference = float(np.median(a[finite])) if finite.any() else 0.0
    variance = np.minimum(fit["var_ps2"][first : first + count], float(np.finfo(np.float16).max))
    return (
        SEALED_FIT.pack(int(base), reference, sigma_ps, first, count)
        + (a - reference).astype("<f4").tobytes()
        + variance.astype("<f2").tobytes()
        + np.minimum(fit["n"][first : first + count], 65535).astype("<u2").tobytes()
    )


def unpack_fit_bytes(data: bytes, n_bins: int):
    _check(len(data) >= SEALED_FIT.size, "sealed fit header")
    base, reference, sigma_ps, first, count = SEALED_FIT.unpack_from(data)
    _check(len(data) == SEALED_FIT.size + FIT_BYTES_PER_BIN * count, "sealed fit length")
    _check(first + count <= n_bins, "sealed fit bins out of range")
    at = SEALED_FIT.size
    a = np.frombuffer(data, "<f4", count, at).astype(np.float64) + reference
    variance = np.frombuffer(data, "<f2", count, at + 4 * count).astype(np.float64)
    n = np.frombuffer(data, "<u2", count, at + 6 * count).astype(np.int64)
    return int(base), int(first), a, variance, n, float(sigma_ps)


class _Direction:
    """One receiving direction's timing samples so far and its per-bin fits, each bin
    fitted once when complete."""

    def __init__(self, n_bins: int, bin_s: float):
        self.n_bins, self.bin_s = n_bins, bin_s
        self.t, self.y = [], []
        self.done = 0  # bins [0, done) fitted
        self.fit = {
            "a_ps": np.full(n_bins, np.nan),
            "var_ps2": np.full(n_bins, np.nan),
            "n": np.zeros(n_bins, np.int64),
        }
        self.sigmas = []

    def add(self, t: np.ndarray, y: np.ndarray) -> None:
        if t.size:
            self.t.append(t)
            self.y.append(y)

    def complete(self, final: bool) -> tuple[int, int]:
        """Fit the bins now complete; (first, count) of them."""
        first = self.done
        if final:
            last = self.n_bins
        elif not self.t:
            return first, 0
        else:
            newest = float(self.t[-1].max())
            last = min(self.n_bins, int((newest - COMPLETE_MARGIN_S) / self.bin_s))
        if last <= first:
            return first, 0
        t = np.concatenate(self.t) if self.t else np.zeros(0)
        y = np.concatenate(self.y) if self.y else np.zeros(0)
        index = np.clip((t / self.bin_s).astype(np.int64), 0, self.n_bins - 1)
        keep = (index >= first) & (index < last)
        if keep.sum() >= 3:
            fit = estimate.fit_direction(t[keep], y[keep], self.bin_s, self.n_bins)
            for name in ("a_ps", "var_ps2", "n"):
                self.fit[name][first:last] = fit[name][first:last]
            self.sigmas.append(fit["sigma_ps"])
        # the samples of fitted bins are not needed again
        self.t, self.y = ([t[~keep & (index >= last)]], [y[~keep & (index >= last)]])
        self.done = last
        return first, last - first

    def as_fit(self) -> dict:
        sigma = float(np.median(self.sigmas)) if self.sigmas else math.nan
        return {**self.fit, "sigma_ps": sigma}


class _StreamUplink:
    """The streamed uplink on the satellite: its detections added block by block to the
    uplink's time synchronisation (timesync.UplinkSlotSync, as post-pass:
    endpoints.UplinkSync). The first block whose detections can make one carries the
    request for the ground's classes of windows of slots; once the ground's answer has
    locked the lag, each block names the slots of the detections added since the last,
    and the ground's bases and bits of them (its tt_block_sift) sift them. A detection
    lost on board moves nothing else; a dark count takes a slot only inside the gate."""

    def __init__(self, scenario: dict):
        _check("satellite_coarse_time" in scenario, "the scenario has no coarse satellite time")
        self.scenario = scenario
        self.clock = endpoints.uplink_slot_clock(scenario)
        self.sync = timesync.UplinkSlotSync(
            np.zeros(0, np.int64), np.zeros(0), self.clock, scenario["satellite_coarse_time"]
        )
        self.tags = np.zeros(0, np.int64)
        self.basis = self.bits = np.zeros(0, np.uint8)
        self.requested = False
        self.named_from = 0  # detections before this one have had their slot named or not
        self.last_slot = -1
        self.pending = (np.zeros(0, np.int64), np.zeros(0, np.int64))  # detections, slots
        self.matched = self.sifted = 0

    def add(self, tags, basis, bits, final: bool) -> None:
        """A block's detections (the record's order; sorted by tag inside the block)."""
        order = np.argsort(tags, kind="stable")
        tags = np.asarray(tags, dtype=np.int64)[order]
        flights = endpoints.detection_flights_ps(self.scenario, tags) if tags.size else ()
        self.sync.extend(tags, flights, final)
        self.tags = np.concatenate([self.tags, tags])
        self.basis = np.concatenate([self.basis, np.asarray(basis, np.uint8)[order]])
        self.bits = np.concatenate([self.bits, np.asarray(bits, np.uint8)[order]])

    def fields(self, final: bool = False) -> dict:
        """tt_block's uplink: before the lock, the request (once the detections so far can
        make one); after, the slots of the detections added since the last block (a slot
        at or before one already named is not named again)."""
        if not self.sync.locked:
            if self.requested or not self.sync.det.size:
                return {"uplink_count": 0}
            i0, i1 = self.sync.first_window()
            if i1 - i0 < timesync.SLOT_REQUEST_MIN and not final:
                return {"uplink_count": 0}  # too few detections yet: a later block
            try:
                starts, length = self.sync.request()
            except ProtocolAborted:
                return {"uplink_count": 0}  # no slot phase yet: a later block
            self.requested = True
            return {
                "uplink_count": 0,
                "uplink_sync_count": int(starts.size),
                "uplink_sync_length": int(length),
                **pack_epochs("uplink_sync_start", starts),
            }
        slot = self.sync.slots(self.named_from)
        detection = np.flatnonzero(slot > self.last_slot) + self.named_from
        slot = slot[slot > self.last_slot]
        order = np.argsort(slot, kind="stable")
        detection, slot = detection[order], slot[order]
        self.pending = (detection, slot)
        self.named_from = self.tags.size
        self.matched += int(slot.size)
        if slot.size:
            self.last_slot = int(slot[-1])
        return {"uplink_count": int(slot.size), **pack_epochs("uplink_slot", slot)}

    def base(self) -> int:
        """The fits' reference (ps): the median of tag - epoch over the detections with a
        slot so far (once locked)."""
        slot = self.sync.slots(0)
        ok = slot >= 0
        epochs = int(self.clock["first_epoch_ps"]) + slot[ok] * int(self.clock["period_ps"])
        return int(np.median(self.tags[ok] - epochs))

    def on_sift(self, sift: dict):
        """The ground's answer: its classes (lock), or its bases and bits of the slots
        named. Returns the newly sifted events' (emission epochs, reception tags, timing
        mask, (sampled: all sifted, errors))."""
        none = np.zeros(0, dtype=np.int64)
        if "uplink_intensity" in sift:
            _check(self.requested and not self.sync.locked, "uplink pattern not asked for")
            length = 2 * self.sync.half + 1
            codes = unpack_2bit(sift["uplink_intensity"], self.sync.asked.size * length)
            _check(codes.size == self.sync.asked.size * length, "uplink pattern length")
            try:
                self.sync.lock(endpoints.uplink_class_weights(self.scenario)[codes])
            except ProtocolAborted:
                self.requested = False  # no peak yet: a later block asks again, with more
        detection, slot = self.pending
        self.pending = (none, none)
        count = int(sift["uplink_count"])
        _check(count == slot.size, "uplink count")
        if count == 0:
            return none, none, np.zeros(0, dtype=bool), (0, 0)
        ground_basis, ground_bits = endpoints.uplink_bases_and_bits(sift, count)
        sifted = self.basis[detection] == ground_basis
        detection, slot, ground_bit = detection[sifted], slot[sifted], ground_bits[sifted]
        wrong = self.bits[detection] != ground_bit
        self.sifted += int(detection.size)
        epochs = int(self.clock["first_epoch_ps"]) + slot * int(self.clock["period_ps"])
        return epochs, self.tags[detection], ~wrong, (int(detection.size), int(wrong.sum()))


def _start(transport, pool, role, key_info, scenario, block_s, budget):
    chan = endpoints._session(transport, pool, role, budget)
    sealed = SealedChannel(chan, key_info, auth_region_bytes(block_count(scenario, block_s)))
    return chan, sealed


class StreamSatellite:
    """The payload processor's side, streaming: its uplink receptions and downlink
    emissions, read as the pass clock lets it."""

    def __init__(self, scenario, events, pool, key_info, clock: PassClock, block_s: float,
                 downlink_source=None, uplink_feed=None):  # fmt: skip
        """`downlink_source`: as endpoints.SatelliteEndpoint's (a mission: the slot clock
        and the head's pattern memory); the ground then names its detections' slots.
        `uplink_feed`: the uplink read as the controller's TDC log grows
        (tdc_feed.LiveTdcUplink) instead of `events["uplink_rx"]`: each block is taken
        when the log has passed its end, the last at the log's end, not by the clock."""
        self.scenario, self.events = scenario, events
        self.pool, self.key_info = pool, key_info
        self.clock, self.block_s = clock, block_s
        self.downlink_source = downlink_source
        self.uplink_feed = uplink_feed
        self.sealed = None

    def run(self, transport) -> dict:
        budget = check_key(self.pool, self.key_info, self.scenario, self.block_s)
        chan, self.sealed = _start(
            transport, self.pool, ch.ALICE, self.key_info, self.scenario, self.block_s, budget
        )
        return endpoints.run_session(chan, self.sealed, lambda: self._run(chan, self.sealed))

    def _run(self, chan, sealed) -> dict:
        scenario, block_s = self.scenario, self.block_s
        feed = self.uplink_feed
        if feed is None:
            up_tag, up_basis, up_bit = self.events["uplink_rx"]
        else:  # the block edges need the first uplink tag: wait for it
            feed.first_tag()
            up_tag, up_basis, up_bit = feed.record()
        by_slot = self.downlink_source is not None
        if by_slot:  # the ground names the slots: no downlink record of the satellite's
            down_tag = np.zeros(0, np.int64)
            down_basis = down_bit = np.zeros(0, np.uint8)
        else:
            down_tag, down_basis, down_bit = self.events["downlink_tx"]
        n_blocks = block_count(scenario, block_s)
        bin_s, n_bins = estimate.bin_grid(scenario)
        zero = min(
            int(up_tag[0]) if up_tag.size else 2**62, int(down_tag[0]) if down_tag.size else 2**62
        )
        up_edges = block_edges(up_tag, zero, block_s, n_blocks)
        matcher = _StreamUplink(scenario)
        down_edges = block_edges(down_tag, zero, block_s, n_blocks)
        orbit = estimate.predicted_orbit(scenario)
        down_cap = downlink_sample_cap(n_blocks)
        uplink = _Direction(n_bins, bin_s)
        base = None
        previous = None
        errors = sampled = 0
        for k in range(n_blocks + 1):
            final = k == n_blocks
            fields = {"block": k, "final": final}
            if not final and feed is None:
                self.clock.sleep_until(min((k + 1) * block_s, float(scenario["duration_s"])))
            elif not final:  # the log has passed the block's end (the last: the log's end)
                end_ps = zero + round((k + 1) * block_s * 1e12) if k + 1 < n_blocks else None
                up_tag, up_basis, up_bit = feed.through(end_ps)
                up_edges = block_edges(up_tag, zero, block_s, n_blocks)
            if not final:
                u = slice(up_edges[k], up_edges[k + 1])
                matcher.add(up_tag[u], up_basis[u], up_bit[u], k + 1 == n_blocks)
                d = slice(down_edges[k], down_edges[k + 1])
                fields.update(
                    **matcher.fields(final=k + 1 == n_blocks),
                    downlink_count=endpoints.BY_SLOT if by_slot else int(down_basis[d].size),
                    downlink_basis=pack_bits(down_basis[d]),
                )  # fmt: skip
            if previous is not None:
                first, count = uplink.complete(final)
                sigma = uplink.as_fit()["sigma_ps"]
                payload = pack_fit_bytes(
                    uplink.fit, BASE_UNKNOWN if base is None else base, first, count, sigma
                )
                fields.update(
                    sealed=sealed.seal_bytes(payload),
                    **pack_epochs("downlink_emission", previous["down_epochs"]),
                    downlink_sample_sealed=endpoints.seal_downlink_sample_bits(
                        sealed, previous["down_sample_bits"]
                    ),
                    uplink_sample_errors=previous["up_errors"],
                    uplink_sampled=previous["up_sampled"],
                    uplink_sifted=previous["up_sifted"],
                )
                if by_slot:
                    fields["downlink_sifted"] = pack_bits(previous["down_sifted"])
            chan.send("tt_block", **fields)
            if final:
                break
            sift = chan.recv("tt_block_sift")
            _check(int(sift["block"]) == k, "block out of order")
            emission, received, timing, (n_sampled, n_wrong) = matcher.on_sift(sift)
            errors, sampled = errors + n_wrong, sampled + n_sampled
            got = received[timing]
            if base is None and matcher.sync.locked:  # the lag locked: any matched event
                base = matcher.base()
            if base is None and got.size:
                base = int(np.median(got - emission[timing]))
            if got.size:
                t2, y = estimate.uplink_samples(scenario, orbit, emission[timing], got, base)
                uplink.add(t2, y)
            if by_slot:
                epochs, bits, down_sifted, down_sample = endpoints.sift_downlink_by_slot(
                    self.downlink_source, sift
                )
            else:
                epochs, bits = down_tag[d], down_bit[d]
                down_sifted = unpack_bits(sift["downlink_sifted"], epochs.size).astype(bool)
                down_sample = _positions(
                    sift["downlink_sample"], int(down_sifted.sum()), "downlink sample"
                )
            _check(down_sample.size <= down_cap, "downlink sample past the key budget")
            previous = {
                "down_epochs": epochs[down_sifted],
                "down_sample_bits": bits[down_sifted][down_sample],
                "down_sifted": down_sifted,
                "up_errors": n_wrong,
                "up_sampled": n_sampled,
                "up_sifted": int(received.size),
            }
        return {
            **endpoints.receive_offset_result(chan, sealed),
            "uplink_qber_sample": {"n": sampled, "errors": errors},
            "uplink_sync": {
                **matcher.sync.summary(),
                "detections": int(up_tag.size),
                "matched": matcher.matched,
            },
            **({"uplink_feed": feed.report()} if feed is not None else {}),
        }


class StreamGround:
    """The ground station's side, streaming; its report is the result, with the pass time
    at which each bin's offset was known."""

    def __init__(self, scenario, events, pool, key_info, clock: PassClock, block_s: float,
                 rng=None, downlink_slots=None):  # fmt: skip
        """`downlink_slots`: the slot of each downlink detection, named to a satellite
        that asks (endpoints.GroundEndpoint's)."""
        self.downlink_slots = downlink_slots
        self.scenario, self.events = scenario, events
        self.pool, self.key_info = pool, key_info
        self.clock, self.block_s = clock, block_s
        self.rng = rng if rng is not None else SystemRandom()
        self.sealed = None
        self.report = {"aborted": False, "abort_reason": None, "mode": "stream"}

    def run(self, transport) -> dict:
        try:
            self.report["key_budget"] = check_key(
                self.pool, self.key_info, self.scenario, self.block_s
            )
        except endpoints.NotEnoughKey as error:
            self.report["key_budget"] = error.key_budget
            endpoints.mark_aborted(self.report, error)
            raise
        chan, self.sealed = _start(
            transport, self.pool, ch.BOB, self.key_info, self.scenario, self.block_s,
            self.report["key_budget"],
        )  # fmt: skip
        return endpoints.run_session(
            chan, self.sealed, lambda: self._run(chan, self.sealed), self.report
        )

    def _sample(self, count: int, cap: int) -> np.ndarray:
        return endpoints.sample_positions(count, self.rng, cap)

    def _run(self, chan, sealed) -> dict:
        scenario, report = self.scenario, self.report
        uplink = endpoints.UplinkTransmitterRecord(self.events["uplink_transmitter"])
        down_tag, down_basis, down_bit = self.events["downlink_rx"]
        bin_s, n_bins = estimate.bin_grid(scenario)
        orbit = estimate.predicted_orbit(scenario)
        downlink = _Direction(n_bins, bin_s)
        up_fit = {"a_ps": np.full(n_bins, np.nan), "var_ps2": np.full(n_bins, np.nan),
                  "n": np.zeros(n_bins, np.int64)}  # fmt: skip
        known_at = np.full(n_bins, np.nan)  # pass time the ground knew each bin's offset
        known_in = np.full(n_bins, -1)  # and the block whose message brought it
        d0 = 0
        backlog = []  # the downlink's (epochs, tags) waiting for the base
        base = None
        pending = None
        by_slot = None  # decided by the satellite's first block
        n_blocks = block_count(scenario, self.block_s)
        down_cap = downlink_sample_cap(n_blocks)
        # the pass's start by the ground's clock: its transmitter's first slot (the
        # satellite's: its first uplink tag)
        first_slot_ps = int(endpoints.uplink_slot_clock(scenario)["first_epoch_ps"])
        zero = min(first_slot_ps, int(down_tag[0]) if down_tag.size else 2**62)
        own_down_edges = block_edges(down_tag, zero, self.block_s, n_blocks)
        up_sigma = math.nan
        counts = {"up": [0, 0], "down": [0, 0], "up_sifted": 0, "down_sifted": 0}
        up_named = 0  # slots the satellite named so far (the ground sent a bit of each)
        while True:
            message = chan.recv("tt_block")
            final = bool(message["final"])
            if pending is not None and by_slot:  # the satellite sifted the named slots
                sifted = unpack_bits(message["downlink_sifted"], pending["count"]).astype(bool)
                in_sample = np.zeros(pending["count"], dtype=bool)
                in_sample[pending["sample_all"]] = True
                pending.update(
                    n_down=int(sifted.sum()),
                    received=pending["tags"][sifted],
                    down_bits=pending["bits"][sifted],
                    down_sample=np.flatnonzero(in_sample[sifted]),
                )
                counts["down_sifted"] += int(sifted.sum())
            if pending is not None:
                _check("sealed" in message, "block data missing")
                b, first, a, variance, n, up_sigma = unpack_fit_bytes(
                    sealed.open_bytes(message["sealed"]), n_bins
                )
                base = b if base is None and b != BASE_UNKNOWN else base
                up_fit["a_ps"][first : first + a.size] = a
                up_fit["var_ps2"][first : first + a.size] = variance
                up_fit["n"][first : first + a.size] = n
                emission = unpack_epochs(message, "downlink_emission", pending["n_down"])
                sample = pending["down_sample"]
                satellite_bits = endpoints.open_downlink_sample_bits(sealed, message, sample.size)
                wrong = pending["down_bits"][sample] != satellite_bits
                counts["down"][0] += int(wrong.sum())
                counts["down"][1] += sample.size
                up_errors = int(message["uplink_sample_errors"])
                up_sampled = int(message["uplink_sampled"])
                counts["up"][0] += up_errors
                counts["up"][1] += up_sampled
                counts["up_sifted"] += int(message["uplink_sifted"])
                # the ground sent its bit of every slot named: the QBER is on every sifted
                # event of the block (a sample's count refused), at most one a slot named
                _check(
                    0 <= up_errors <= up_sampled == int(message["uplink_sifted"])
                    and counts["up_sifted"] <= up_named,
                    "uplink sample counts: not every sifted",
                )
                timing = np.ones(pending["n_down"], dtype=bool)
                timing[sample[wrong]] = False
                # before the satellite's base is known, the downlink's events wait for it
                backlog.append((emission[timing], pending["received"][timing]))
                while backlog and base is not None:
                    sent, got = backlog.pop(0)
                    if sent.size:
                        t3, y = estimate.downlink_samples(scenario, orbit, sent, got, base)
                        downlink.add(t3, y)
                downlink.complete(final)
                both = np.isfinite(up_fit["a_ps"]) & np.isfinite(downlink.fit["a_ps"])
                new = both & np.isnan(known_at)
                known_at[new] = self.clock.now()
                known_in[new] = int(message["block"])
            if final:
                break
            k = int(message["block"])
            n_dn = int(message["downlink_count"])
            # the uplink: the ground's classes of the slots the satellite asks about
            # (once), then its bases and bits of the slots the satellite names
            # (_StreamUplink)
            pattern_fields = {}
            if "uplink_sync_count" in message:
                pattern_fields["uplink_intensity"] = uplink.classes(message)["intensity"]
            n_up, up_fields = uplink.named(message)
            up_named += n_up
            if by_slot is None:
                by_slot = n_dn == endpoints.BY_SLOT
                if by_slot and self.downlink_slots is None:
                    raise ProtocolAborted(
                        "the satellite asks for the downlink slots and the ground has no "
                        "slot identification of its detections"
                    )
            _check((n_dn == endpoints.BY_SLOT) == by_slot, "downlink mode changed")
            if by_slot:  # the ground's own blocks of its detections, by its clock
                n_dn = int(own_down_edges[k + 1] - own_down_edges[k]) if k < n_blocks else 0
            if d0 + n_dn > down_basis.size:
                raise ProtocolAborted(
                    f"block {k}: the satellite names events past the ground's records: the "
                    "two records do not belong together"
                )
            d = slice(d0, d0 + n_dn)
            d0 = d0 + n_dn
            if by_slot:  # name the slots and bases; the satellite sifts
                sample_all = self._sample(n_dn, down_cap)
                downlink_fields = {
                    "downlink_count": n_dn,
                    **pack_epochs("downlink_slot", self.downlink_slots[d]),
                    "downlink_basis": pack_bits(down_basis[d]),
                    "downlink_sample": sample_all,
                }
            else:
                down_sifted = unpack_bits(message["downlink_basis"], n_dn) == down_basis[d]
                down_sample = self._sample(int(down_sifted.sum()), down_cap)
                counts["down_sifted"] += int(down_sifted.sum())
                downlink_fields = {
                    "downlink_sifted": pack_bits(down_sifted),
                    "downlink_sample": down_sample,
                }
            chan.send(
                "tt_block_sift",
                block=k,
                **up_fields,
                **pattern_fields,
                **downlink_fields,
            )
            pending = {}
            if by_slot:
                pending.update(
                    count=n_dn, sample_all=sample_all, tags=down_tag[d], bits=down_bit[d]
                )
            else:
                pending.update(
                    n_down=int(down_sifted.sum()),
                    received=down_tag[d][down_sifted],
                    down_bits=down_bit[d][down_sifted],
                    down_sample=down_sample,
                )
        if d0 != down_basis.size:
            raise ProtocolAborted(
                "the satellite's blocks cover a different number of events than the "
                "ground's records: the two records do not belong together"
            )
        report["qber"] = {
            "uplink": counts["up"][0] / counts["up"][1] if counts["up"][1] else math.nan,
            "downlink": counts["down"][0] / counts["down"][1] if counts["down"][1] else math.nan,
        }
        report["qber_sample"] = {
            name: {"n": counts[key][1], "errors": counts[key][0]}
            for name, key in (("uplink", "up"), ("downlink", "down"))
        }
        report["sifted_events"] = {
            "uplink": counts["up_sifted"],
            "downlink": counts["down_sifted"],
        }
        up = {**up_fit, "sigma_ps": up_sigma}  # the satellite's scatter, as of its last fit
        down = downlink.as_fit()
        _check(base is not None, "no uplink timing event in the whole pass")
        estimate.combine(scenario, orbit, base, up, down, report)
        series = report["series"]
        centres = (np.arange(n_bins) + 0.5) * bin_s
        good = np.isfinite(known_at) & np.isfinite(up_fit["a_ps"]) & np.isfinite(down["a_ps"])
        latency = known_at[good] - (centres[good] + bin_s / 2)
        duration = float(scenario["duration_s"])
        listed = np.isin(centres, series["t_s"])
        series["known_at_s"] = known_at[listed]
        series["known_in_block"] = known_in[listed]
        report["streaming"] = {
            "block_s": self.block_s,
            "speedup": self.clock.speedup,
            "bins_known_before_the_end": int(np.sum(known_at[good] < duration)),
            "offset_latency_s": {
                "median": float(np.median(latency)) if latency.size else None,
                "max": float(np.max(latency)) if latency.size else None,
            },
            "key_source": "an earlier distillation's key (--keys): the pass's own key exists "
            "only after privacy amplification at loss of signal",
        }
        endpoints.send_offset_result(chan, sealed, series, base)
        return report


def check_block_s(block_s: float) -> None:
    if not (math.isfinite(block_s) and 0.1 <= block_s <= 10.0):
        raise BadInput(f"--block-s {block_s}: must be in [0.1, 10] s")


def run_streaming(
    pass_dir: Path, keys_dir: Path, block_s: float = 1.0, speedup: float = 1.0,
    transports=None, tamper=None, satellite=None, clock=None,
) -> tuple[dict, dict]:  # fmt: skip
    """Both streaming endpoints in threads over `transports` (satellite's, ground's; an
    in-process pair by default, or the optical link's time-transfer stream); returns (the
    ground's report, the satellite's result) or raises ProtocolAborted with the report.
    `satellite`: the satellite's records when they are not satellite/tt_*.npz, as
    command.run_endpoints's ({"uplink_rx", "downlink_source"}), or its uplink read as
    the controller's TDC log grows ({"uplink_feed": tdc_feed.LiveTdcUplink}, with or
    without "downlink_source": without, the downlink record is satellite/'s). `clock`:
    the pass clock both sides read (a PassClock; by default one started now at `speedup`)."""
    check_block_s(block_s)
    scenario = files.read_scenario(pass_dir)
    satellite = satellite or {}
    downlink_source = satellite.get("downlink_source")
    uplink_feed = satellite.get("uplink_feed")
    if downlink_source is None:
        wanted = ("downlink_tx",) if uplink_feed is not None else files.SATELLITE_FILES
        satellite_events = files.read_events(pass_dir, wanted)
    else:
        satellite_events = {}
    if "uplink_rx" in satellite:
        satellite_events["uplink_rx"] = satellite["uplink_rx"]
    ground_events = files.read_ground_records(pass_dir, scenario)
    ground_slots = files.read_downlink_slots(pass_dir)
    satellite_pool, satellite_key = endpoints.open_time_key(keys_dir, "satellite")
    try:
        ground_pool, ground_key = endpoints.open_time_key(keys_dir, "ground")
    except BaseException:
        satellite_pool.close()
        raise
    clock = clock if clock is not None else PassClock(speedup)
    satellite = StreamSatellite(
        scenario, satellite_events, satellite_pool, satellite_key, clock, block_s,
        downlink_source, uplink_feed,
    )  # fmt: skip
    ground = StreamGround(
        scenario, ground_events, ground_pool, ground_key, clock, block_s,
        downlink_slots=ground_slots,
    )  # fmt: skip
    if transports is None:
        transports = ch.queue_pair(timeout_s=600.0)
    to_ground, to_satellite = transports
    if tamper is not None:
        to_ground.tamper = tamper
    started = time.process_time()
    results = endpoints.run_pair(
        satellite, ground, to_ground, to_satellite, (satellite_pool, ground_pool)
    )
    report = ground.report
    report["cpu_seconds"] = time.process_time() - started
    endpoints.raise_stop_reason(results, report)
    return report, results["satellite"]


def optical_link_transports(pass_dir: Path, scenario: dict, seed: int = 1):
    """The emulated optical link of the pass (emulator/optical_link.py: rate, light time,
    bit errors, ARQ; the profile's link configuration) carrying the time-transfer stream
    (stream 1, beside the distillation's): (link, satellite transport, ground transport).
    Its schedule is the predicted two-way orbit from a minute before the window to a
    minute after, mask 0: the window itself never sees the satellite set. The link runs
    on the wall clock: a streaming session over it runs at speedup 1."""
    import dataclasses

    from emulator.optical_link import LinkSchedule, OpticalLink, OpticalLinkConfig
    from emulator.pass_model import geometry as geo
    from emulator.pass_model.two_way import inertial_pass_geometry
    from host.formats.passdir import read_pass_json
    from host.simulate import profiles

    pass_json = read_pass_json(Path(pass_dir) / "pass.json")
    config = OpticalLinkConfig.from_profile(profiles.load(pass_json["profile"], {}))
    margin_s = 60.0
    orbit = estimate.predicted_orbit(scenario)
    orbit = dataclasses.replace(orbit, t_reference_s=orbit.t_reference_s - margin_s)
    geometry = inertial_pass_geometry(
        orbit, float(scenario["duration_s"]) + 2 * margin_s,
        geo.parse_utc(pass_json["utc_start"], "pass.json utc_start"), {"kind": "predicted"},
        float(scenario["wavelengths_nm"]["downlink"]), 0.0, 0.0,
    )  # fmt: skip
    schedule = LinkSchedule(geometry, margin_s, 0.0)
    link = OpticalLink(config, schedule, start_s=0.0, seed=seed, streams=("time_transfer",))
    satellite_port, ground_port = link.start()
    satellite = ch.connect(f"127.0.0.1:{satellite_port}")
    ground = ch.connect(f"127.0.0.1:{ground_port}")
    return link, satellite, ground

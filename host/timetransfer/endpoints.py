"""The two time-transfer endpoints: the satellite's (payload processor) and the ground
station's. They share nothing but the public scenario (timetransfer.json) and the
messages below, over the distillation's authenticated channel (host/distil/channel.py:
Wegman-Carter tags, pads reserved before use). The key is the pass's distilled key
(`qkdsat distil --out DIR`: alice.key on the satellite, bob.key on the ground), read as a
key pool: its usage record KEY.used moves forward, durably, before any bit is used, so no
bit serves twice, even across a power cut.

Messages (the satellite is the channel's first speaker, "alice"):

    satellite -> ground  tt_bases           bases of every downlink emission (public, as
                                            the distillation's sifting; or "by slot"), the
                                            uplink's sync request (windows of slots)
    ground -> satellite  tt_uplink_pattern  its transmitter's intensity classes of them
    satellite -> ground  tt_uplink_slots    the slots of its matched uplink detections
    ground -> satellite  tt_sift            its transmitter's bases and bits of every slot
                                            named (never key: all disclosed); the downlink's
                                            sifting and a CSPRNG sample of its sifted events
    satellite -> ground  tt_uplink          SEALED: the satellite's per-bin uplink fit
                                            (intercept, variance, events; its detection tags
                                            never leave it) and its emitted bits of the
                                            downlink sample (Alice's raw key bits: the
                                            downlink events are the QKD pass's detections);
                                            in the clear: the downlink emission epochs of
                                            the sifted events, the uplink's counts (sifted,
                                            and the errors of them all)
    ground -> satellite  tt_result          SEALED: the offset the ground measured (value
                                            at the pass middle and rate), so the satellite
                                            learns its clock

SEALED is one-time-pad encryption with key bits after the authentication region (the
hash key and the tag pads of at most MAX_MESSAGES_EACH_WAY messages each way), then the
channel's tag over the ciphertext. Both sides take the pads in protocol order, so they
agree on every offset without sending one. The sealed messages have a fixed size for a
pass (one entry per bin, NaN where a bin is empty): their length says nothing about the
data.

Timing events are the sifted events minus the disclosed ones whose bits disagree: every
erring uplink event (the ground's bits are all disclosed), the downlink sample's. The
bits of the downlink's undisclosed events stay secret (they can be key: beside a QKD
pass its timing photons are the pass's detections) and are not needed: a wrong bit does
not move a photon's arrival time, and noise counts are clipped by the fit.
docs/time-transfer.md has the reasons.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from host.distil import channel as ch
from host.distil import timesync
from host.distil.bitcodec import (
    pack_2bit,
    pack_bits,
    rice_decode_sorted,
    rice_encode_sorted,
    unpack_2bit,
    unpack_bits,
)
from host.distil.endpoint_random import SystemRandom
from host.errors import BadInput, ProtocolAborted
from host.protocol.symbols import decode_symbols
from host.timetransfer import estimate

MAX_MESSAGES_EACH_WAY = 4  # three protocol messages + an abort
AUTH_REGION_BYTES = 8 + 16 * MAX_MESSAGES_EACH_WAY  # hash key + one pad per message each way
# The satellite's bits of the downlink sample are Alice's raw key and go sealed, one pad
# bit an event: 10 % of a full pass's detections took 218-527 kbit, more than a Micius
# pass's key (216-326 kbit). The QBER check needs far fewer: at 8,192 events a clean 1.2 %
# has a sigma of 0.12 %, 15 sigma under the 3 % abort, and intercept-resend on a tenth of
# the photons (+2.5 %) is vouched 2.6e-4 of the time. So at most this many a pass (1 KiB
# of pad), which makes the key budget a fixed bound known before any bit is taken. A smaller pass
# discloses every sifted event (it was 10 %, at least 256): the budget holds them already,
# and a sample of 256 could not decide (a clean 1.2 % aborted 1.3 % of the time, 5 %
# passed 5.5 %; estimate.qber_check)
DOWNLINK_SAMPLE_MAX = 8192
SEALED_HEADER_BYTES = 400  # a sealed message's header: kind, field names, scalars, shapes
ROLE_OF_SIDE = {"satellite": ch.ALICE, "ground": ch.BOB}
BY_SLOT = -1  # tt_bases downlink_count: "name your detections' slots, I sift the downlink"
UPLINK_BY_SLOT = -2  # tt_bases uplink_count: "your classes of these slots; I name mine"


class NotEnoughKey(ProtocolAborted):
    pass


def open_time_key(keys_dir: Path, side: str) -> tuple[ch.KeyPool, dict]:
    """The side's distilled key as a pool that records its use (KEY.used, the auth pool's
    format). Only a key the distillation's report vouches for (host/network/pool.py's
    reader: not aborted, not made with replayed randomness, length as reported); the
    padding bits of the last byte are not used. A key never used has no record yet: it
    is created at 0 before the first bit is taken."""
    from host.network.pool import read_distilled_key

    role = ROLE_OF_SIDE[side]
    keys_dir = Path(keys_dir)
    if not keys_dir.is_dir():
        raise BadInput(f"--keys {keys_dir}: not a directory (a `qkdsat distil --out` directory)")
    read_distilled_key(keys_dir, role)  # a key the report vouches for, or its error
    path = keys_dir / f"{role}.key"
    # the file is locked and its record read BEFORE the key is read, and the key read must
    # be the locked file's: a distillation finishing into this directory in between
    # replaces the key and removes its record, and the old key's bytes would start at 0
    pool = ch.KeyPool.from_file(str(path), new=not os.path.exists(f"{path}.used"))
    try:
        data, source = read_distilled_key(keys_dir, role)
    except BaseException:
        pool.close()
        raise
    if pool.data[: len(data)] != data:
        pool.close()
        raise BadInput(f"{path}: replaced while it was opened (a distillation finished?)")
    pool.data = data  # whole bytes only
    if pool.start_byte >= len(data):
        pool.close()
        raise BadInput(f"{path}: every bit of this key is used (record {path}.used)")
    return pool, {"file": path.name, "source": source}


class SealedChannel:
    """One-time-pad sealing over an AuthChannel: pads from the key after the
    authentication region, in protocol order (both sides count the same bytes)."""

    def __init__(self, chan: ch.AuthChannel, key_info: dict,
                 auth_region_bytes: int = AUTH_REGION_BYTES):  # fmt: skip
        """`auth_region_bytes`: the hash key and one tag pad per message either way, at
        the session's start; the sealing pads follow (a streaming session, with a
        message pair per block, reserves more: host/timetransfer/stream.py)."""
        self.chan = chan
        self.key_info = key_info
        self.auth_region_bytes = auth_region_bytes
        self.pad_bytes = 0
        # the tags' pads stay in the region: a message past it is refused, never tagged
        # with a sealing pad
        chan.limit_tag_region((auth_region_bytes - 8) // 16)

    def require(self, count: int) -> None:
        """Refuse, before anything secret is sent, a key too short for `count` more pad
        bytes."""
        pool = self.chan.pool
        offset = self.auth_region_bytes + self.pad_bytes
        left = len(pool.data) - pool.start_byte - offset
        if count > left:
            raise NotEnoughKey(
                f"not enough key in {self.key_info['file']}: the time data needs "
                f"{8 * count} pad bits, {8 * max(left, 0)} are left after "
                f"{8 * (pool.start_byte + offset)} used or reserved for authentication"
            )

    def _pad(self, count: int) -> np.ndarray:
        self.require(count)
        offset = self.auth_region_bytes + self.pad_bytes
        self.pad_bytes += count
        return np.frombuffer(self.chan.pool.take(offset, count), dtype=np.uint8)

    def seal_bytes(self, plain: bytes) -> bytes:
        """One-time pad over raw bytes (a fixed binary layout: no field names to pay for)."""
        data = np.frombuffer(plain, dtype=np.uint8)
        return (data ^ self._pad(data.size)).tobytes()

    def open_bytes(self, sealed: bytes) -> bytes:
        return self.seal_bytes(sealed)

    def seal(self, kind: str, **fields) -> bytes:
        plain = np.frombuffer(ch.encode(kind, fields), dtype=np.uint8)
        return (plain ^ self._pad(plain.size)).tobytes()

    def open(self, sealed: bytes, kind: str) -> dict:
        cipher = np.frombuffer(sealed, dtype=np.uint8)
        received_kind, fields = ch.decode((cipher ^ self._pad(cipher.size)).tobytes())
        if received_kind != kind:
            raise ProtocolAborted(f"sealed message {received_kind!r}, expected {kind!r}")
        return fields

    def accounting(self) -> dict:
        """Key bits this side consumed: pads of the sealed messages, the hash key and the
        tag pads of every message each way; `consumed_bits` is the span of the key this
        session used (the authentication region is reserved whole), `record_bits` where
        the usage record stands (reserved ahead for power-cut safety, never reused)."""
        pool, chan = self.chan.pool, self.chan
        return {
            **self.key_info,
            "start_bit": 8 * pool.start_byte,
            "pad_bits": 8 * self.pad_bytes,
            "auth_bits": 64 + 64 * (chan.sent + chan.received),
            "consumed_bits": pool.used_bits,
            "record_bits": 8 * pool.reserved_byte,
            "left_bits": 8 * (len(pool.data) - pool.reserved_byte),
        }


def _check(condition: bool, reason: str) -> None:
    if not condition:
        raise ProtocolAborted(f"malformed time message: {reason}")


def _positions(values, limit: int, name: str) -> np.ndarray:
    positions = np.asarray(values, dtype=np.int64)
    _check(positions.ndim == 1, f"{name} is not a list")
    _check(bool(np.all((positions >= 0) & (positions < limit))), f"{name} out of range")
    _check(np.unique(positions).size == positions.size, f"{name} repeats a position")
    return positions


def uplink_bases_and_bits(sift: dict, count: int) -> tuple[np.ndarray, np.ndarray]:
    """The ground transmitter's bases and bits of the `count` uplink slots the satellite
    named (tt_sift / tt_block_sift). Every bit is disclosed, not a sample: they are never
    key (the uplink carries time only), the slots are past, and the pattern is AES-CTR
    under the transmitter's key (or the QRNG), so they tell nothing of the slots to come.
    The QBER check then counts every sifted uplink event: a 10 % sample was ~50 events on
    a weak 6 s uplink, where a 0.7 % QBER showed 2 errors (4 %, past the 3 % abort) in
    about one draw in twelve. One bit a slot, where 10 % in positions cost 6.5."""
    try:
        packed_basis, packed_bits = sift["uplink_basis"], sift["uplink_bits"]
    except KeyError as error:
        raise ProtocolAborted(f"malformed time message: no {error.args[0]}") from None
    whole_bytes = (count + 7) // 8  # np.unpackbits would pad a short field with zeros
    for name, packed in (("bases", packed_basis), ("bits", packed_bits)):
        # bytes, a scalar or a string is one element to np.asarray: of the packed uint8
        # array's shape only (a blob of 1 byte reached np.unpackbits and raised ValueError)
        packed = np.asarray(packed)
        _check(
            packed.dtype == np.uint8 and packed.shape == (whole_bytes,),
            f"uplink {name}: not {count} bits",
        )
    return unpack_bits(packed_basis, count), unpack_bits(packed_bits, count)


def seal_downlink_sample_bits(sealed: SealedChannel, bits: np.ndarray) -> bytes:
    """The satellite's emitted bits of the downlink QBER sample, one-time padded: the
    downlink events are the QKD pass's detections, so these are Alice's raw key bits,
    which the distillation's privacy amplification counted as secret (in the clear they
    were a leak no distillation accounted for). One pad bit a sampled event."""
    return sealed.seal_bytes(pack_bits(np.asarray(bits, dtype=np.uint8)).tobytes())


def open_downlink_sample_bits(sealed: SealedChannel, message: dict, count: int) -> np.ndarray:
    data = message.get("downlink_sample_sealed")
    _check(isinstance(data, bytes), "downlink sample bits missing")
    _check(len(data) == (count + 7) // 8, "downlink sample bits length")
    return unpack_bits(np.frombuffer(sealed.open_bytes(data), dtype=np.uint8), count)


def sample_size(count: int, cap: int) -> int:
    """A downlink QBER sample's size out of `count` events: all of them, at most `cap`
    (DOWNLINK_SAMPLE_MAX a pass, or a block's share of it: its bits are sealed, key)."""
    return min(count, cap)


def sample_positions(count: int, rng, cap: int) -> np.ndarray:
    size = sample_size(count, cap)
    return np.sort(rng.choice(count, size)) if size else np.zeros(0, dtype=np.int64)


def pad_bytes_bound(scenario: dict) -> int:
    """Pad bytes the two sealed messages of a pass take at most: 8 a bin for the uplink
    fit, plus the headers (field names and scalars, < SEALED_HEADER_BYTES each)."""
    return 8 * estimate.bin_grid(scenario)[1] + 2 * SEALED_HEADER_BYTES


def pack_fit(fit: dict, base: int, n_bins: int) -> dict:
    """A direction's per-bin fit in 8 bytes a bin, the bulk of the key the time data
    costs: the intercepts as float32 residuals from a quadratic over the pass (float64
    coefficients; the residuals are the clock noise, ns at most, so float32 keeps them to
    a few 1e-4 ps, where the raw intercepts, microseconds of drift, would lose 0.5 ps),
    the variances as float16 (0.05 % steps, capped at its largest finite value: such a
    bin weighs nothing anyway) and the event counts as uint16."""
    a = fit["a_ps"]
    centres = np.arange(n_bins, dtype=np.float64)
    finite = np.isfinite(a)
    trend = np.polyfit(centres[finite], a[finite], 2) if finite.sum() >= 3 else np.zeros(3)
    variance = np.minimum(fit["var_ps2"], float(np.finfo(np.float16).max))
    return {
        "offset_reference_ps": int(base),
        "sigma_ps": float(fit["sigma_ps"]),
        "trend_ps": trend.astype(np.float64),
        "residual_ps": (a - np.polyval(trend, centres)).astype(np.float32),
        "var_ps2": variance.astype(np.float16),
        "n": np.minimum(fit["n"], 65535).astype(np.uint16),
    }


def unpack_fit(fields: dict, n_bins: int) -> tuple[int, dict]:
    for name in ("residual_ps", "var_ps2", "n"):
        _check(np.shape(fields.get(name)) == (n_bins,), f"uplink fit {name} size")
    _check(np.shape(fields.get("trend_ps")) == (3,), "uplink fit trend")
    centres = np.arange(n_bins, dtype=np.float64)
    fit = {
        "a_ps": np.polyval(fields["trend_ps"], centres) + fields["residual_ps"],
        "var_ps2": np.asarray(fields["var_ps2"], dtype=np.float64),
        "n": np.asarray(fields["n"], dtype=np.int64),
        "sigma_ps": float(fields["sigma_ps"]),
    }
    return int(fields["offset_reference_ps"]), fit


def pack_epochs(name: str, tags_ps: np.ndarray) -> dict:
    """Emission epochs (public) for the wire: Rice-coded gaps (host/distil/bitcodec.py,
    the sync messages' codec) of tag - first + index, strictly increasing when the tags
    are in time order (two photons may share a slot): ~30 bits an epoch instead of 64.
    Tags out of order go as raw int64."""
    tags = np.asarray(tags_ps, dtype=np.int64)
    if tags.size and np.all(np.diff(tags) >= 0):
        first = int(tags[0])
        k, packed = rice_encode_sorted(tags - first + np.arange(tags.size))
        return {f"{name}_first_ps": first, f"{name}_rice_k": k, f"{name}_rice": packed}
    return {f"{name}_tag_ps": tags}


def unpack_epochs(fields: dict, name: str, count: int) -> np.ndarray:
    if f"{name}_tag_ps" in fields:
        tags = np.asarray(fields[f"{name}_tag_ps"], dtype=np.int64)
    else:
        try:
            k = int(fields[f"{name}_rice_k"])
            _check(0 <= k < 64, f"{name} Rice parameter {k}")
            offsets = rice_decode_sorted(k, fields[f"{name}_rice"], count)
            tags = offsets - np.arange(count) + np.int64(fields[f"{name}_first_ps"])
        except (KeyError, ValueError, TypeError) as error:
            raise ProtocolAborted(f"malformed time message: {name} ({error})") from None
    _check(tags.shape == (count,), f"{name} epochs do not match the sifting")
    return tags


def key_budget(pool: ch.KeyPool, scenario: dict, auth_bytes: int = AUTH_REGION_BYTES,
               fit_bytes: int | None = None, header_bytes: int = 2 * SEALED_HEADER_BYTES,
               sample_bytes: int = (DOWNLINK_SAMPLE_MAX + 7) // 8) -> dict:  # fmt: skip
    """The key a pass's time data takes at most, part by part, in bits, against what is
    left of the key: the pool-start exchange (two announcements, each on its party's
    lane of the key, at most channel.POOL_START_MAX_BYTES before the session's start),
    the hash key and tag pads, the sealed uplink fit (8 bytes a bin), the sealed
    messages' headers, the sealed downlink sample bits (at most DOWNLINK_SAMPLE_MAX).
    Known from the scenario alone, before any bit is taken."""
    if fit_bytes is None:
        fit_bytes = 8 * estimate.bin_grid(scenario)[1]
    parts = {
        "pool_start_bits": 8 * ch.POOL_START_MAX_BYTES,
        "auth_bits": 8 * auth_bytes,
        "fit_bits": 8 * fit_bytes,
        "header_bits": 8 * header_bytes,
        "downlink_sample_bits": 8 * sample_bytes,
    }
    need = sum(parts.values())
    left = 8 * (len(pool.data) - pool.start_byte)
    return {**parts, "need_bits": need, "left_bits": left, "enough": need <= left}


def refuse_short_key(budget: dict, key_info: dict, what: str = "the time data") -> None:
    """NotEnoughKey naming every part of the budget, unless the key holds it."""
    if budget["enough"]:
        return
    error = NotEnoughKey(
        f"not enough key in {key_info['file']}: {what} of this pass needs "
        f"{budget['need_bits']} bits (pool start {budget['pool_start_bits']}, tags "
        f"{budget['auth_bits']}, uplink fit "
        f"{budget['fit_bits']}, headers {budget['header_bits']}, downlink QBER sample "
        f"{budget['downlink_sample_bits']}), {budget['left_bits']} are left; no bit of it "
        "was used"
    )
    error.key_budget = budget
    raise error


def check_key_length(pool: ch.KeyPool, key_info: dict, scenario: dict) -> dict:
    """Refuse a key too short for this pass before the session takes any of it: the
    session's first tag would reserve key ahead (power-cut safety) that a refused run
    would waste. (Inside the session `SealedChannel.require` checks again from the start
    both sides agreed, which the peer's record can move forward.) Returns the budget."""
    budget = key_budget(pool, scenario)
    refuse_short_key(budget, key_info)
    return budget


def session_bytes(budget: dict) -> int:
    """The most of the key a session takes from its start (its budget but the pool start)."""
    return (budget["need_bits"] - budget["pool_start_bits"] + 7) // 8


def _session(transport, pool: ch.KeyPool, role: str, budget: dict) -> ch.AuthChannel:
    """The pool start, each side's record covering the session's whole budget before the
    peer may take any of it: a sealed message the link loses carries pads its receiver
    never took, and its sender's peer floor stands past them (channel.exchange_pool_start)."""
    session = ch.exchange_pool_start(transport, pool, role, session_bytes(budget))
    return ch.AuthChannel(transport, pool, role, session=session)


class SatelliteEndpoint:
    """The payload processor's side: its uplink detection tags and its downlink emission
    epochs (satellite/ of the pass directory, or the controller's streams in a mission)."""

    def __init__(self, scenario: dict, events: dict, pool: ch.KeyPool, key_info: dict,
                 downlink_source=None):  # fmt: skip
        """`events`: "uplink_rx" and, unless `downlink_source` is given, "downlink_tx".
        `downlink_source(slots) -> (epoch_ps, basis, bit)`: the satellite's own record of
        the slots the ground names (its slot clock and the head's pattern memory, read on
        board, in a mission); the ground then sends the slots of its detections."""
        self.scenario, self.events = scenario, events
        self.pool, self.key_info = pool, key_info
        self.downlink_source = downlink_source
        self.sealed: SealedChannel | None = None

    def run(self, transport) -> dict:
        budget = check_key_length(self.pool, self.key_info, self.scenario)
        chan = _session(transport, self.pool, ch.ALICE, budget)
        self.sealed = sealed = SealedChannel(chan, self.key_info)
        return {**run_session(chan, sealed, lambda: self._run(chan, sealed)), "key_budget": budget}

    def _run(self, chan, sealed) -> dict:
        sealed.require(pad_bytes_bound(self.scenario) + (DOWNLINK_SAMPLE_MAX + 7) // 8)
        up_tag, up_basis, up_bit = self.events["uplink_rx"]
        by_slot = self.downlink_source is not None
        downlink = {"downlink_count": BY_SLOT}
        if not by_slot:
            down_tag, down_basis, down_bit = self.events["downlink_tx"]
            downlink = {
                "downlink_count": int(down_basis.size),
                "downlink_basis": pack_bits(down_basis),
            }
        sync = UplinkSync(self.scenario, up_tag)
        chan.send("tt_bases", uplink_count=UPLINK_BY_SLOT, **sync.request(), **downlink)
        chan.send("tt_uplink_slots", **sync.name_slots(chan.recv("tt_uplink_pattern")))
        sift = chan.recv("tt_sift")
        uplink = sync.sift(up_basis, up_bit, sift)
        extra = {}
        if by_slot:
            down_tag, down_bit, down_sifted, down_sample = self._downlink_by_slot(sift)
            extra["downlink_sifted"] = pack_bits(down_sifted)
            n_down = int(down_sifted.sum())
        else:
            down_sifted = unpack_bits(sift["downlink_sifted"], down_basis.size).astype(bool)
            n_down = int(down_sifted.sum())
            down_sample = _positions(sift["downlink_sample"], n_down, "downlink sample")
        # its bits go sealed: a sample past the budget would burn key both sides counted
        # on for nothing (the ground draws at most DOWNLINK_SAMPLE_MAX)
        _check(down_sample.size <= DOWNLINK_SAMPLE_MAX, "downlink sample past the key budget")
        emission, received = uplink["emission_ps"], uplink["received_ps"]
        timing = uplink["timing"]
        base = int(np.median(received[timing] - emission[timing])) if timing.any() else 0
        orbit = estimate.predicted_orbit(self.scenario)
        t2, y = estimate.uplink_samples(
            self.scenario, orbit, emission[timing], received[timing], base
        )
        bin_s, n_bins = estimate.bin_grid(self.scenario)
        fit = estimate.fit_direction(t2, y, bin_s, n_bins)
        payload = sealed.seal("tt_uplink_fit", **pack_fit(fit, base, n_bins))
        sample_bits = seal_downlink_sample_bits(sealed, down_bit[down_sifted][down_sample])
        chan.send(
            "tt_uplink",
            sealed=payload,
            **pack_epochs("downlink_emission", down_tag[down_sifted]),
            downlink_sample_sealed=sample_bits,
            uplink_sifted=int(emission.size),
            uplink_sample=uplink["sampled"],
            uplink_sample_errors=uplink["sample_errors"],
            uplink_detections=int(up_tag.size),
            uplink_matched=uplink["matched"],
            **extra,
        )
        return {**receive_offset_result(chan, sealed), "uplink_sync": sync.summary()}

    def _downlink_by_slot(self, sift: dict):
        return sift_downlink_by_slot(self.downlink_source, sift)


def send_offset_result(chan, sealed, series: dict, base) -> None:
    """The ground's last message (post-pass and streamed), tt_result: the offset's line
    over the pass (its value and rate at the middle of the series, and the reference),
    sealed for the satellite."""
    middle_s = float(np.mean(series["t_s"]))
    rate_ps_s, at_middle = np.polyfit(series["t_s"] - middle_s, series["offset_ps"], 1)
    chan.send(
        "tt_result",
        sealed=sealed.seal(
            "tt_offset",
            offset_reference_ps=base,
            offset_at_middle_ps=float(at_middle),
            middle_s=middle_s,
            rate=float(rate_ps_s) * 1e-12,
        ),
    )


def receive_offset_result(chan, sealed) -> dict:
    """The satellite's end of tt_result (post-pass and streamed): the offset the ground
    measured, with the key's accounting and the bytes sent."""
    result = sealed.open(chan.recv("tt_result")["sealed"], "tt_offset")
    return {
        "offset_reference_ps": int(result["offset_reference_ps"]),
        "offset_at_middle_ps": float(result["offset_at_middle_ps"]),
        "middle_s": float(result["middle_s"]),
        "rate": float(result["rate"]),
        "key": sealed.accounting(),
        "classical_bytes_sent": chan.bytes_sent,
    }


def uplink_slot_clock(scenario: dict) -> dict:
    clock = scenario.get("uplink_slot_clock")
    _check(isinstance(clock, dict), "the scenario has no uplink slot clock")
    return clock


def uplink_class_weights(scenario: dict) -> np.ndarray:
    """Mean photon number by the ground's intensity class index (timetransfer.json's
    uplink_intensities, in class order; class 3 unused: 0)."""
    weights = np.zeros(4)
    values = [float(v) for v in (scenario.get("uplink_intensities") or {}).values()]
    _check(1 <= len(values) <= 4, "the scenario has no uplink intensities")
    weights[: len(values)] = values
    return weights


def detection_flights_ps(scenario: dict, tag_ps: np.ndarray) -> np.ndarray:
    """Each uplink detection's predicted flight (ps: the ground's tx delay, light time on
    the predicted orbit, troposphere, the satellite's rx delay), for the ground epoch it
    left at by the payload's coarse time: the flight changes by ~2.5e-5 of the time it
    is off, ps for the coarse time's microsecond."""
    coarse = scenario["satellite_coarse_time"]
    lag = float(coarse["offset_ps"]) + float(coarse["rate"]) * (
        tag_ps - int(coarse["satellite_reference_ps"])
    ).astype(np.float64)
    orbit = estimate.predicted_orbit(scenario)
    flight = np.zeros(tag_ps.size)
    for _ in range(3):  # each round gains the range rate over c, ~2.5e-5
        tx = tag_ps - np.rint(lag + flight).astype(np.int64)
        t1, t2 = estimate.uplink_flight(scenario, orbit, tx)
        flight = (t2 - t1) * 1e12
    return flight


class UplinkSync:
    """The satellite's uplink: its detections matched to the ground's pulses by the
    uplink's time synchronisation (timesync.UplinkSlotSync: the ground's slot clock and
    its intensity classes of the slots asked about), then named to the ground by slot
    and sifted against the bases it returns. A detection lost on board moves nothing
    else; a dark count takes a slot only inside the +-1 ns gate of one (its bit is a
    coin: the QBER counts it)."""

    def __init__(self, scenario: dict, tag_ps):
        _check("satellite_coarse_time" in scenario, "the scenario has no coarse satellite time")
        self.scenario = scenario
        tags = np.asarray(tag_ps, dtype=np.int64)
        self.by_tag = np.argsort(tags, kind="stable")  # the log's order: a rare swap
        self.tags = tags
        sorted_tags = tags[self.by_tag]
        self.sync = timesync.UplinkSlotSync(
            sorted_tags, detection_flights_ps(scenario, sorted_tags),
            uplink_slot_clock(scenario), scenario["satellite_coarse_time"],
        )  # fmt: skip
        self.slot = np.full(tags.size, -1, dtype=np.int64)

    def request(self) -> dict:
        starts, length = self.sync.request()
        return {
            "uplink_sync_count": int(starts.size),
            "uplink_sync_length": int(length),
            **pack_epochs("uplink_sync_start", starts),
        }

    def name_slots(self, pattern: dict) -> dict:
        """tt_uplink_slots: the slots of the detections matched, from the ground's classes
        of the windows asked (tt_uplink_pattern)."""
        asked, length = self.sync.asked.size, 2 * self.sync.half + 1
        try:
            codes = unpack_2bit(pattern["intensity"], asked * length)
        except (KeyError, TypeError, ValueError):
            raise ProtocolAborted("malformed time message: uplink pattern") from None
        _check(codes.size == asked * length, "uplink pattern length")
        self.sync.lock(uplink_class_weights(self.scenario)[codes])
        self.sync.finish()
        self.slot[self.by_tag] = self.sync.slots()
        named = np.unique(self.slot[self.slot >= 0])
        return {"uplink_count": int(named.size), **pack_epochs("uplink_slot", named)}

    def sift(self, basis, bit, sift: dict) -> dict:
        """tt_sift's uplink (the ground's bases and bits of the named slots): the matched
        detections sifted, every sifted one's error counted. Returns the sifted events'
        emission epochs (the slot clock's) and reception tags, their timing mask (those
        whose bits disagree dropped), the counts."""
        named = np.unique(self.slot[self.slot >= 0])
        matched = int((self.slot >= 0).sum())
        count = int(sift["uplink_count"])
        _check(count == named.size, "uplink count")
        ground_basis, ground_bits = uplink_bases_and_bits(sift, count)
        detection = np.flatnonzero(self.slot >= 0)
        named_index = np.searchsorted(named, self.slot[detection])
        sifted = np.asarray(basis, dtype=np.uint8)[detection] == ground_basis[named_index]
        detection, named_index = detection[sifted], named_index[sifted]
        order = np.argsort(named_index, kind="stable")  # time order of emission
        detection, named_index = detection[order], named_index[order]
        wrong = np.asarray(bit, dtype=np.uint8)[detection] != ground_bits[named_index]
        clock = uplink_slot_clock(self.scenario)
        epochs = int(clock["first_epoch_ps"]) + named[named_index] * int(clock["period_ps"])
        return {
            "emission_ps": epochs,
            "received_ps": self.tags[detection],
            "timing": ~wrong,
            "sampled": int(detection.size),
            "sample_errors": int(wrong.sum()),
            "matched": matched,
        }

    def summary(self) -> dict:
        return {**self.sync.summary(), "matched": int((self.slot >= 0).sum())}


class UplinkTransmitterRecord:
    """The ground's uplink: its transmitter's pattern and slot clock
    (files.read_uplink_transmitter), answering the satellite's requests: its intensity
    classes of the windows of slots asked (public help, never bits: decoy classes are
    announced in any sifting) and its bases and bits of the slots the satellite names
    (all: the uplink is never key, uplink_bases_and_bits)."""

    def __init__(self, transmitter: dict):
        self.pattern = transmitter["pattern"]
        self.slot_count = int(transmitter["slot_clock"]["slot_count"])
        self.last_named = -1  # streamed: each block's slots come after the last block's

    def classes(self, message: dict) -> dict:
        """tt_uplink_pattern's field: the classes of the windows asked (uplink_sync_*)."""
        count, length = int(message["uplink_sync_count"]), int(message["uplink_sync_length"])
        _check(0 < count and 0 < length, "uplink sync request size")
        _check(count * length <= timesync.SLOT_MAX_REQUEST, "uplink sync request too large")
        starts = unpack_epochs(message, "uplink_sync_start", count)
        _check(
            bool(np.all((starts >= 0) & (starts + length <= self.slot_count))),
            "uplink sync request outside the ground's slots",
        )
        slots = (starts[:, None] + np.arange(length)).reshape(-1)
        _, _, intensity = decode_symbols(self.pattern.symbols(slots))
        return {"intensity": pack_2bit(intensity)}

    def named(self, message: dict) -> tuple[int, dict]:
        """(slots named, tt_sift's uplink fields: the transmitter's bases and bits of them,
        all, as uplink_bases_and_bits reads them)."""
        count = int(message["uplink_count"])
        _check(0 <= count <= self.slot_count, "uplink slot count")
        slots = unpack_epochs(message, "uplink_slot", count) if count else np.zeros(0, np.int64)
        _check(
            bool(np.all(np.diff(slots) > 0)) and (count == 0 or self.last_named < slots[0])
            and (count == 0 or slots[-1] < self.slot_count),
            "uplink slots not increasing or outside the ground's slots",
        )  # fmt: skip
        if count:
            self.last_named = int(slots[-1])
        basis, bit, _ = decode_symbols(self.pattern.symbols(slots))
        return count, {
            "uplink_count": count,
            "uplink_basis": pack_bits(basis.astype(np.uint8)),
            "uplink_bits": pack_bits(bit.astype(np.uint8)),
        }


def sift_downlink_by_slot(downlink_source, sift: dict):
    """The downlink when the ground names the slots of its detections: the satellite's
    epochs and symbols of those slots (`downlink_source`), sifted against the ground's
    bases; the ground's sample (over all its detections) restricted to the sifted ones.
    Returns (epoch_ps, bit, sifted mask, sample positions among the sifted)."""
    count = int(sift["downlink_count"])
    _check(0 <= count, "downlink count")
    slots = unpack_epochs(sift, "downlink_slot", count)
    ground_basis = unpack_bits(sift["downlink_basis"], count)
    sample = _positions(sift["downlink_sample"], count, "downlink sample")
    try:
        epoch_ps, basis, bit = downlink_source(slots)
    except (IndexError, ValueError) as error:
        raise ProtocolAborted(f"downlink slots the satellite did not emit ({error})") from None
    sifted = np.asarray(basis, dtype=np.uint8) == ground_basis
    in_sample = np.zeros(count, dtype=bool)
    in_sample[sample] = True
    epoch_ps, bit = np.asarray(epoch_ps, dtype=np.int64), np.asarray(bit, dtype=np.uint8)
    return epoch_ps, bit, sifted, np.flatnonzero(in_sample[sifted])


class GroundEndpoint:
    """The ground station's side: its uplink emission epochs and downlink detection tags
    (ground/ of the pass directory). It makes the time-transfer report."""

    def __init__(self, scenario: dict, events: dict, pool: ch.KeyPool, key_info: dict,
                 rng=None, downlink_slots=None):  # fmt: skip
        """`downlink_slots`: the slot of each downlink detection (the downlink's time
        synchronisation), sent when the satellite asks for them (a mission: the satellite
        reads its symbols on board instead of holding a downlink record)."""
        self.downlink_slots = downlink_slots
        self.scenario, self.events = scenario, events
        self.pool, self.key_info = pool, key_info
        self.rng = rng if rng is not None else SystemRandom()
        self.sealed: SealedChannel | None = None
        self.report = {
            "aborted": False,
            "abort_reason": None,
            "qber": {"uplink": None, "downlink": None},
            "sifting": "bases exchanged by the endpoints; the ground's bits of every "
            "sifted uplink event and the satellite's (sealed) of every sifted downlink "
            f"event, a CSPRNG sample of {DOWNLINK_SAMPLE_MAX} past that, compared for the "
            "QBER; the events whose bits disagree dropped",
        }

    def run(self, transport) -> dict:
        try:
            self.report["key_budget"] = check_key_length(self.pool, self.key_info, self.scenario)
        except NotEnoughKey as error:
            self.report["key_budget"] = error.key_budget
            mark_aborted(self.report, error)
            raise
        chan = _session(transport, self.pool, ch.BOB, self.report["key_budget"])
        self.sealed = sealed = SealedChannel(chan, self.key_info)
        return run_session(chan, sealed, lambda: self._run(chan, sealed), self.report)

    def _run(self, chan, sealed) -> dict:
        report = self.report
        uplink = UplinkTransmitterRecord(self.events["uplink_transmitter"])
        down_tag, down_basis, down_bit = self.events["downlink_rx"]
        bases = chan.recv("tt_bases")  # the satellite has checked its key: now ours
        sealed.require(pad_bytes_bound(self.scenario) + (DOWNLINK_SAMPLE_MAX + 7) // 8)
        by_slot = int(bases["downlink_count"]) == BY_SLOT
        if by_slot and self.downlink_slots is None:
            raise ProtocolAborted(
                "the satellite asks for the downlink slots and the ground has no slot "
                "identification of its detections"
            )
        if not by_slot and int(bases["downlink_count"]) != down_basis.size:
            raise ProtocolAborted(
                f"the satellite holds {int(bases['downlink_count'])} downlink events, the "
                f"ground {down_basis.size}: the two records do not belong together"
            )
        # the uplink: the ground's classes of the slots the satellite asks about; the
        # satellite matches its detections to its pulses, names their slots, and sifts
        # against the bases the ground returns (UplinkSync)
        _check(int(bases["uplink_count"]) == UPLINK_BY_SLOT, "uplink mode")
        chan.send("tt_uplink_pattern", **uplink.classes(bases))
        up_count, up_fields = uplink.named(chan.recv("tt_uplink_slots"))
        if by_slot:  # the satellite sifts: the ground names slots and its bases
            down_sample_all = sample_positions(down_basis.size, self.rng, DOWNLINK_SAMPLE_MAX)
            downlink = {
                "downlink_count": int(down_basis.size),
                **pack_epochs("downlink_slot", self.downlink_slots),
                "downlink_basis": pack_bits(down_basis),
                "downlink_sample": down_sample_all,
            }
        else:
            down_sifted = unpack_bits(bases["downlink_basis"], down_basis.size) == down_basis
            down_sample = sample_positions(int(down_sifted.sum()), self.rng, DOWNLINK_SAMPLE_MAX)
            downlink = {"downlink_sifted": pack_bits(down_sifted), "downlink_sample": down_sample}
        chan.send("tt_sift", **up_fields, **downlink)
        message = chan.recv("tt_uplink")
        if by_slot:
            down_sifted = unpack_bits(message["downlink_sifted"], down_basis.size).astype(bool)
            in_sample = np.zeros(down_basis.size, dtype=bool)
            in_sample[down_sample_all] = True
            down_sample = np.flatnonzero(in_sample[down_sifted])
        n_down = int(down_sifted.sum())
        bin_s, n_bins = estimate.bin_grid(self.scenario)
        base, up = unpack_fit(sealed.open(message["sealed"], "tt_uplink_fit"), n_bins)
        emission = unpack_epochs(message, "downlink_emission", n_down)
        satellite_bits = open_downlink_sample_bits(sealed, message, down_sample.size)
        received = down_tag[down_sifted]
        wrong = down_bit[down_sifted][down_sample] != satellite_bits
        timing = np.ones(n_down, dtype=bool)
        timing[down_sample[wrong]] = False
        up_sampled, up_errors = int(message["uplink_sample"]), int(message["uplink_sample_errors"])
        n_up = int(message["uplink_sifted"])
        # the ground sent its bit of every named slot: the QBER is on every sifted event,
        # and a count of fewer (a sample's) is refused, not reported as the whole's
        _check(0 <= up_errors <= up_sampled == n_up, "uplink sample counts: not every sifted")
        detections, matched = int(message["uplink_detections"]), int(message["uplink_matched"])
        _check(0 <= n_up <= matched <= min(detections, up_count), "uplink match counts")
        report["uplink_sync"] = {
            "slots_named": up_count,
            "detections": detections,
            "matched": matched,
            "unmatched_detections": detections - matched,
        }
        report["qber"] = {
            "uplink": up_errors / up_sampled if up_sampled else math.nan,
            "downlink": int(wrong.sum()) / down_sample.size if down_sample.size else math.nan,
        }
        report["sifted_events"] = {"uplink": n_up, "downlink": n_down}
        report["qber_sample"] = {
            "uplink": {"n": up_sampled, "errors": up_errors},
            "downlink": {"n": int(down_sample.size), "errors": int(wrong.sum())},
        }
        orbit = estimate.predicted_orbit(self.scenario)
        t3, y = estimate.downlink_samples(
            self.scenario, orbit, emission[timing], received[timing], base
        )
        down = estimate.fit_direction(t3, y, bin_s, n_bins)
        estimate.combine(self.scenario, orbit, base, up, down, report)
        series = report["series"]
        send_offset_result(chan, sealed, series, base)
        return report


def describe_security(key: dict) -> str:
    return (
        f"one-time pad ({key['pad_bits']} bits) + Wegman-Carter tags ({key['auth_bits']} "
        f"bits) from {key['file']} of {key['source']}"
    )


def run_pair(satellite, ground, to_ground, to_satellite, pools) -> dict:
    """Both endpoints of a time transfer in this process, each in its own thread
    (channel.endpoint_thread: `to_ground` is the satellite's transport); the key pools are
    closed once both have ended. Returns their results (name, or name_error)."""
    results = {}
    threads = [
        ch.endpoint_thread("satellite", satellite, to_ground, results),
        ch.endpoint_thread("ground", ground, to_satellite, results),
    ]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        for pool in pools:
            pool.close()
    return results


def raise_stop_reason(results: dict, report: dict) -> None:
    """Either endpoint's error, if any, raised: the side that stopped first says why (the
    other only saw its channel close); a protocol abort marks `report` aborted with its
    reason and carries it (error.report)."""
    error = results.get("ground_error")
    if error is None or isinstance(error, ch.ChannelClosed):
        error = results.get("satellite_error", error)
    if error is not None:
        if not isinstance(error, ProtocolAborted):
            raise error
        mark_aborted(report, error)
        raise error


def mark_aborted(report: dict, error: Exception) -> None:
    """The ground's report ends aborted with the error's reason, and the error carries
    the report (error.report) to whoever writes it."""
    report["aborted"], report["abort_reason"] = True, str(error)
    error.report = report


def run_session(chan, sealed, body, ground_report: dict | None = None):
    """One endpoint's session over `chan` (satellite or ground, post-pass or streamed):
    returns body(). A protocol abort is told to the peer (unless the peer aborted or the
    channel closed) and propagates; with `ground_report` (the ground's), an authentication
    failure is named as the time messages', the report is marked aborted, and it gets the
    key's accounting and the bytes each way whatever happens. The channel is closed."""
    try:
        return body()
    except ProtocolAborted as error:
        if ground_report is not None and isinstance(error, ch.AuthenticationFailed):
            error = ProtocolAborted(f"time message authentication failed: {error}")
        if not isinstance(error, (ch.PeerAborted, ch.ChannelClosed)):
            chan.abort(str(error))
        if ground_report is None:
            raise
        mark_aborted(ground_report, error)
        raise error from None
    finally:
        if ground_report is not None:
            ground_report["key"] = sealed.accounting()
            ground_report["classical_bytes"] = {
                "satellite_to_ground": chan.bytes_received,
                "ground_to_satellite": chan.bytes_sent,
            }
        chan.close()

"""`qkdsat codes build`: every LDPC code reconciliation can pick is built before the pass.

Frames of 2^11 bits (the command's --frame-bits; in-process, ldpc.FRAME_BITS patched) go
through the same enumeration and the same ldpc.construct as the flight lengths, so the
whole grid builds in seconds instead of minutes (the shortest frame every rate's design
fits: at 2^10 the rate-0.92 codes have fewer checks than their variables' degree 80).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import numpy as np
import pytest

from host.distil import codes, ldpc, reconcile, stream
from host.distil.protocol import Config

SMALL_FRAME_BITS = 2048
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _codes_cli(cache, *extra) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "host.cli", "codes", "build", "--cache", str(cache)]
        + ["--frame-bits", str(SMALL_FRAME_BITS), *extra],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
    )


@pytest.fixture(scope="module")
def provisioned(tmp_path_factory):
    """A cache dir: --check before the build, the build, --check and the build again."""
    cache = tmp_path_factory.mktemp("codes")
    before = _codes_cli(cache, "--check")
    build = _codes_cli(cache)
    after = _codes_cli(cache, "--check")
    again = _codes_cli(cache)
    return cache, before, build, after, again


def test_check_names_every_missing_code_and_fails_before_the_build(provisioned):
    cache, before, *_ = provisioned
    assert before.returncode == 1, before.stderr
    listed = [line for line in before.stdout.splitlines() if line.startswith("missing: ")]
    expected = codes.default_codes((SMALL_FRAME_BITS,))
    assert len(listed) == len(expected) > 0
    for line, (n, rate) in zip(listed, expected, strict=True):
        assert line.startswith(f"missing: n={n} rate={rate} ")
        assert line.endswith(".npz") and str(cache) in line
    assert f"0 of {len(expected)} codes" in before.stdout


def test_build_is_idempotent_and_check_passes_after_it(provisioned):
    _, _, build, after, again = provisioned
    total = len(codes.default_codes((SMALL_FRAME_BITS,)))
    assert build.returncode == 0, build.stderr
    assert f"built {total}, skipped 0" in build.stdout
    assert after.returncode == 0, after.stdout + after.stderr
    assert "missing:" not in after.stdout and f"{total} of {total} codes" in after.stdout
    assert again.returncode == 0 and f"built 0, skipped {total}" in again.stdout


def test_every_code_plan_picks_is_in_the_provisioned_cache(provisioned, monkeypatch):
    """reconcile._plan over block sizes, QBER estimates up to the abort threshold and sample
    sizes: each code it picks is loaded from the cache, none is built (a build raises)."""
    cache, *_ = provisioned
    monkeypatch.setenv("QKDSAT_CACHE", str(cache))
    monkeypatch.setattr(ldpc, "FRAME_BITS", SMALL_FRAME_BITS)
    monkeypatch.setattr(ldpc, "LONG_FRAME_BITS", ())
    monkeypatch.setattr(ldpc, "_CODES", {})

    def no_build(*args):
        raise AssertionError("a code was built: the provisioning missed it")

    monkeypatch.setattr(ldpc, "_peg_edges", no_build)
    draw = np.random.default_rng(12)  # public simulation draw of (count, qber, sample)
    picked = set()
    for _ in range(400):
        count = int(10 ** draw.uniform(0, math.log10(50 * SMALL_FRAME_BITS)))
        qber = float(draw.uniform(1e-4, Config().qber_threshold))
        sample_bits = int(draw.choice([0, 10, 256, 2_000, 50_000, 10**6]))
        for efficiency in (Config().ec_efficiency, reconcile.LDPC_FIRST_F):
            plan = reconcile._plan(count, qber, efficiency, sample_bits)
            picked.add((plan.code.n, plan.code.rate))
    assert len(picked) > 20  # the draw reaches across the grid, not one corner of it


def test_a_frame_too_short_for_a_rates_design_is_refused_before_any_build(tmp_path):
    """`--frame-bits 1024` (or 64) ran the code growth for ever: the rate-0.9225 design's
    degree-80 variables need 80 distinct checks, and such a frame has 79. Now: exit 2
    naming the frame, the rate and the degree, and nothing written."""
    for frame_bits, rate, checks in ((1024, 0.9225, 79), (64, 0.5075, 32)):
        out = subprocess.run(
            [sys.executable, "-m", "host.cli", "codes", "build", "--cache", str(tmp_path),
             "--frame-bits", str(frame_bits)],
            capture_output=True, text=True, cwd=ROOT, timeout=120,
        )  # fmt: skip
        assert out.returncode == 2, out.stderr
        assert (
            f"--frame-bits {frame_bits}: a frame of {frame_bits} bits at rate {rate} has "
            f"{checks} checks, fewer than the degree 80 of its design's heaviest variables"
        ) in out.stderr
        assert not list(tmp_path.rglob("*.npz"))
    with pytest.raises(ValueError, match="has 79 checks"):
        ldpc.construct(1024, 0.9225)  # the library itself: an error, not a hang


def test_warm_up_counts_the_missing_codes_and_names_the_command(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("QKDSAT_CACHE", str(tmp_path))
    monkeypatch.setattr(ldpc, "FRAME_BITS", SMALL_FRAME_BITS)
    monkeypatch.setattr(ldpc, "LONG_FRAME_BITS", ())
    total = len(codes.default_codes())
    assert stream._missing_codes(Config(), "bob") == {"bob": {"missing": total, "of": total}}
    warning = capsys.readouterr().err.strip().splitlines()
    assert len(warning) == 1 and "qkdsat codes build" in warning[0], warning
    n, rate = codes.default_codes()[0]
    ldpc.construct(n, rate)
    assert stream._missing_codes(Config(), "alice") == {
        "alice": {"missing": total - 1, "of": total}
    }


def _record_construct(monkeypatch) -> set:
    """Stub ldpc.construct with a code of the right n and m but no edges (plan_for reads only
    those: building the flight codes does not fit a test); the set it fills with every
    (n, rate) asked for."""
    asked = set()

    def record(n, rate, seed=1, distribution=None):
        asked.add((n, rate))
        m = round(n * (1 - rate))
        empty = np.zeros(0, np.int32)
        return ldpc.Code(n, m, empty, empty, seed, rate, np.arange(n, dtype=np.int32))

    monkeypatch.setattr(ldpc, "construct", record)
    return asked


def test_every_flight_length_code_plan_picks_is_in_the_provisioned_set(monkeypatch):
    """The flight lengths (2^16, and 2^17/2^18 for larger blocks, ldpc.frame_bits_for): the
    codes reconcile._plan picks over block sizes, QBER estimates and samples are all in
    what `qkdsat codes build` provisions. Building 543 flight codes does not fit a test, so
    construct hands _plan a code of the right n and m without its edges (plan_for reads only
    those) and records what was asked for."""
    asked = _record_construct(monkeypatch)
    draw = np.random.default_rng(13)  # public simulation draw of (count, qber, sample)
    for _ in range(1500):
        count = int(10 ** draw.uniform(0, math.log10(60 * max(ldpc.LONG_FRAME_BITS))))
        qber = float(draw.uniform(1e-4, Config().qber_threshold))
        sample_bits = int(draw.choice([0, 10, 256, 2_000, 50_000, 10**6]))
        for efficiency in (Config().ec_efficiency, reconcile.LDPC_FIRST_F):
            reconcile._plan(count, qber, efficiency, sample_bits)
            # and a block of exactly 1 or 4 full short frames (the short length's fullest
            # frames, hence its lowest rates: since session 15 the random sizes between
            # 4 and 8 short frames take 2^17, ldpc.MID_FRAME_MIN_FRAMES)
            low, high = reconcile.qber_interval(qber, sample_bits)
            most = ldpc.max_key_bits(low, efficiency, ldpc.FRAME_BITS, high)
            for frames in (1, 4):
                reconcile._plan(frames * most, qber, efficiency, sample_bits)
    provisioned = codes.default_codes()
    assert {n for n, _ in asked} == set(codes.frame_lengths())
    assert asked <= set(provisioned), sorted(asked - set(provisioned))
    # and not padded: _plan reaches both ends of each length's provisioned rates (a tiny
    # block at a low QBER the top, a few sampled bits at a high one the bottom)
    for n in codes.frame_lengths():
        picked = [rate for length, rate in asked if length == n]
        built = [rate for length, rate in provisioned if length == n]
        assert (min(picked), max(picked)) == (min(built), max(built)), n


def test_a_qber_range_provisions_a_small_blocks_one_long_frame(monkeypatch):
    """`qkdsat codes build --qber-min/--qber-max` (codes.codes_for on a range): a block of
    2 to LONG_FRAME_MIN_FRAMES - 1 frames of 2^16 takes one long frame filled down to
    ldpc.SMALL_BLOCK_MIN_FILL (ldpc.frame_bits_for), a higher mother rate than the frames
    of a block of LONG_FRAME_MIN_FRAMES or more (filled beyond 3/4) ever pick. Over the
    whole QBER range every grid rate is provisioned anyway, so only a narrower range shows
    whether codes_for provisions that fill: every code _plan picks for such blocks at
    estimates in the range is in it (construct stubbed as above)."""
    asked = _record_construct(monkeypatch)
    qber_min, qber_max = 0.04, 0.06
    efficiencies = (Config().ec_efficiency, reconcile.LDPC_FIRST_F)
    draw = np.random.default_rng(17)  # public simulation draw of (size, qber, sample)
    for _ in range(400):
        qber = float(draw.uniform(qber_min, qber_max))
        sample_bits = int(draw.choice([0, 10, 256, 2_000, 50_000, 10**6]))
        for efficiency in efficiencies:
            low, high = reconcile.qber_interval(qber, sample_bits)
            short = ldpc.max_key_bits(low, efficiency, ldpc.FRAME_BITS, qber_high=high)
            count = int(draw.uniform(1, ldpc.LONG_FRAME_MIN_FRAMES - 1) * short) + 1
            reconcile._plan(count, qber, efficiency, sample_bits)
    assert {n for n, _ in asked} == set(ldpc.LONG_FRAME_BITS)  # all in one long frame
    provisioned = codes.codes_for(qber_min, qber_max, efficiencies)
    assert asked <= set(provisioned), sorted(asked - set(provisioned))


def test_a_qber_range_provisions_the_mid_sized_blocks_frames_whatever_the_fill(monkeypatch):
    """A block that makes ldpc.MID_FRAME_MIN_FRAMES frames of 2^17 (ldpc.frame_bits_for)
    fills each to just over (MID - 1) / MID of the most: codes_for's fewest key bits of a
    longer frame must count that bound too, not rely on SMALL_BLOCK_MIN_FILL (0.5) lying
    under it. With the fill raised to 0.7 (over 2/3), every code _plan picks for such
    blocks at 4-6 % is still in `codes build --qber-min 0.04 --qber-max 0.06`'s set; codes_for
    bounded by LONG_FRAME_MIN_FRAMES and the fill alone missed 2^17's higher rates."""
    asked = _record_construct(monkeypatch)
    monkeypatch.setattr(ldpc, "SMALL_BLOCK_MIN_FILL", 0.7)
    qber_min, qber_max = 0.04, 0.06
    efficiencies = (Config().ec_efficiency, reconcile.LDPC_FIRST_F)
    draw = np.random.default_rng(19)  # public simulation draw of (qber, sample)
    for _ in range(200):
        qber = float(draw.uniform(qber_min, qber_max))
        sample_bits = int(draw.choice([0, 10, 256, 2_000, 50_000, 10**6]))
        for efficiency in efficiencies:
            low, high = reconcile.qber_interval(qber, sample_bits)
            room = ldpc.max_key_bits(low, efficiency, 1 << 17, qber_high=high)
            reconcile._plan(
                (ldpc.MID_FRAME_MIN_FRAMES - 1) * room + 1, qber, efficiency, sample_bits
            )
    assert {n for n, _ in asked} == {1 << 17}
    provisioned = codes.codes_for(qber_min, qber_max, efficiencies)
    assert asked <= set(provisioned), sorted(asked - set(provisioned))


@pytest.mark.parametrize("qber_min, qber_max", [(0.01, 0.03), (0.04, 0.06)])
def test_a_qber_range_provisions_the_codes_of_every_entropy_ratio_bob_may_announce(
    monkeypatch, qber_min, qber_max
):
    """Bob's ec_sizing scales the efficiency each part is planned on by a ratio in
    [reconcile._entropy_ratio_floor, 1] (session 20): a lower efficiency picks higher
    mother rates, which `codes build --qber-min/--qber-max` must provision too (at the
    floor, a 2^18 code of a rate above those of efficiency 1.05 was missing in each range)."""
    asked = _record_construct(monkeypatch)
    cfg = Config()
    floor = reconcile._entropy_ratio_floor(cfg.ec_efficiency)
    draw = np.random.default_rng(17)  # public simulation draw of (size, qber, sample)
    for _ in range(600):
        count = int(10 ** draw.uniform(0, math.log10(60 * max(ldpc.LONG_FRAME_BITS))))
        qber = float(draw.uniform(qber_min, qber_max))
        sample_bits = int(draw.choice([0, 10, 256, 2_000, 50_000, 10**6]))
        for ratio in (floor, (floor + reconcile.ENTROPY_RATIO_ONE) // 2):
            reconcile._plan(count, qber, cfg.ec_efficiency, sample_bits, ratio=ratio)
    provisioned = codes.codes_for(qber_min, qber_max, codes.sizing_efficiencies(cfg))
    assert asked <= set(provisioned), sorted(asked - set(provisioned))

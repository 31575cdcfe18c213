"""`make bench`: the optical head's pattern-memory port (docs/payload-bus.md "Pattern-memory
port"), where Alice on the payload processor reads her symbols. "Before" and "after" are
measured in the same run, in the same process:

- before: every slot a u32 offset (PATTERN_READ) and the byte-wise COBS of
  tests/cobs_reference.py (framing.py before its numpy paths);
- after: contiguous slots as runs (PATTERN_READ_RUNS, chosen by PatternMemoryClient) and
  host/protocol/framing.py's COBS.

Printed: the frame cost of one request of 16,384 consecutive offsets (COBS encode and
decode, before and after), a 2 M-slot contiguous window read over the port (before, lists
with the new COBS, after; and generated directly, without the port), and the sync stage of
a post-pass distillation whose Alice reads a head-generated micius-2017 segment over the
port (tests/test_payload_processor.py's setup, in-process).

    pytest -q benchmarks/bench_pattern_port.py -p no:randomly -s
"""

from __future__ import annotations

import contextlib
import os
import time

import numpy as np

from emulator import pattern_generator
from emulator.optical_head import HeadServer, OpticalHead
from host.link.pattern_memory import PatternMemoryClient
from host.protocol import framing
from host.protocol import payload_bus as pb
from tests import cobs_reference

WINDOW_SLOTS = 2_000_000


def _generating_head(frames: int, frame_slots: int = 4096):
    head = OpticalHead(seed=3, qrng_key=os.urandom(32))
    generator = pattern_generator.attach(head)
    # p_Z 0.5; mu 0.5, nu 0.25, vac 0.25 as integer thresholds (docs/sequencer.md)
    for offset, value in ((5, 16384), (6, 32768), (7, 49152)):
        assert head.write_reg(0x0600 + offset, value) == pb.OK
    assert head.write_reg(pb.REG_FRAME_SLOTS, frame_slots) == pb.OK
    assert head.write_reg(0x0600, 1) == pb.OK
    pattern_generator.fast_forward(head, head.boundary_ps(frames - 1))
    assert head.write_reg(0x0600, 0) == pb.OK
    return head, generator


@contextlib.contextmanager
def _before(memory: PatternMemoryClient | None = None):
    """The port as it was: slot lists only, byte-wise COBS (both ends: one process)."""
    saved = framing.cobs_encode, framing.cobs_decode
    framing.cobs_encode, framing.cobs_decode = (
        cobs_reference.cobs_encode,
        cobs_reference.cobs_decode,
    )
    if memory is not None:
        memory.runs_supported = False
    try:
        yield
    finally:
        framing.cobs_encode, framing.cobs_decode = saved
        if memory is not None:
            memory.runs_supported = True


def _best_s(action, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        action()
        best = min(best, time.perf_counter() - started)
    return best


def test_bench_one_request_of_16384_consecutive_offsets():
    body = pb.pack_pattern_read(1, 20_000_000, np.arange(pb.MAX_PATTERN_READ_SLOTS))
    frame = framing.encode_frame(body)
    zeros = body.count(0)
    figures = {}
    for name in ("before", "after", "before again", "after again"):
        context = _before() if name.startswith("before") else contextlib.nullcontext()
        with context:
            encode_s = _best_s(lambda: framing.encode_frame(body), 20)
            decode_s = _best_s(lambda: framing.decode_frame(frame[:-1], len(body)), 20)
            assert framing.encode_frame(body) == frame
            assert framing.decode_frame(frame[:-1], len(body)) == body
        figures[name] = (encode_s, decode_s)
    before = min(figures["before"], figures["before again"])
    after = min(figures["after"], figures["after again"])
    runs_body = pb.pack_pattern_read_runs(1, 20_000_000, [0], [pb.MAX_PATTERN_READ_SLOTS])
    runs_frame_s = _best_s(lambda: framing.encode_frame(runs_body), 200)
    print(
        f"\none PATTERN_READ of 16,384 consecutive offsets ({len(body)} bytes, {zeros} zero "
        f"bytes), best of 20:\n  COBS frame encode {before[0] * 1e3:.2f} ms -> "
        f"{after[0] * 1e3:.2f} ms (x{after[0] / before[0]:.3f}), decode "
        f"{before[1] * 1e3:.2f} ms -> {after[1] * 1e3:.2f} ms (x{after[1] / before[1]:.3f})"
        f"\n  the same slots as one PATTERN_READ_RUNS run: {len(runs_body)} bytes, frame "
        f"encode {runs_frame_s * 1e6:.1f} us"
    )


def test_bench_a_contiguous_window_over_the_port():
    frames = WINDOW_SLOTS // 4096 + 10
    head, generator = _generating_head(frames)
    truth = generator.truth()
    window = np.arange(4096, 4096 + WINDOW_SLOTS)
    times, symbols = {}, {}
    with HeadServer(head) as server:
        with PatternMemoryClient(server.pattern_address, truth.slot_count) as memory:
            for name in ("before", "after", "lists, new COBS", "before again", "after again"):
                if name.startswith("before"):
                    context = _before(memory)
                elif name.startswith("lists"):
                    memory.runs_supported = False
                    context = contextlib.nullcontext()
                else:
                    memory.runs_supported = True
                    context = contextlib.nullcontext()
                sent_before = memory.bytes_sent
                with context:
                    started = time.perf_counter()
                    symbols[name] = memory.symbols(window)
                    times[name] = (time.perf_counter() - started, memory.bytes_sent - sent_before)
        memory.runs_supported = True
    direct_s = _best_s(lambda: truth.symbols(window), 2)
    direct = truth.symbols(window)
    for name, got in symbols.items():
        assert np.array_equal(got, direct), name
    before_s = min(times["before"][0], times["before again"][0])
    after_s = min(times["after"][0], times["after again"][0])
    print(f"\n{WINDOW_SLOTS:,} contiguous slots over the pattern-memory port (same run):")
    for name, (seconds, sent) in times.items():
        print(f"  {name}: {seconds:.3f} s, {sent:,} bytes sent")
    print(
        f"  after / before x{after_s / before_s:.3f}; lists with the new COBS / before "
        f"x{times['lists, new COBS'][0] / before_s:.3f}; generated directly (no port) "
        f"{direct_s:.3f} s: port / direct before x{before_s / direct_s:.1f}, after "
        f"x{after_s / direct_s:.1f}"
    )


def test_bench_the_sync_stage_reading_alices_window_over_the_port(tmp_path):
    from host.distil.protocol import Config
    from host.distil.run import run_local
    from host.mission import ground
    from host.simulate import profiles

    profile = profiles.load("micius-2017", {})
    segment_s = 2.0
    head, generator = _generating_head(int(segment_s * 1e8) // 4096)
    truth = generator.truth()
    pass_dir = tmp_path / "pass"
    ground.write_ground(
        pass_dir, ground.make_segment_scenario(profile, 1, truth.slot_count), truth
    )
    reports = {}
    with HeadServer(head) as server:
        for name in ("after", "before"):
            with PatternMemoryClient(server.pattern_address, truth.slot_count) as memory:
                context = _before(memory) if name == "before" else contextlib.nullcontext()
                with context:
                    report = run_local(
                        pass_dir,
                        tmp_path / name,
                        Config(),
                        insecure_deterministic_seed=5,
                        alice_patterns=memory,
                    )
                reports[name] = (report, memory.requests, memory.bytes_sent)
    (after, after_requests, after_sent), (before, before_requests, before_sent) = (
        reports["after"],
        reports["before"],
    )
    assert after["sync"] == before["sync"] and after["key_bits"] == before["key_bits"]
    sync_after, sync_before = after["stage_seconds"]["sync"], before["stage_seconds"]["sync"]
    print(
        f"\npost-pass distillation of a {segment_s} s head-generated micius-2017 segment "
        f"({truth.slot_count:,} slots), Alice reading over the port (same run):\n"
        f"  sync stage {sync_before:.2f} s -> {sync_after:.2f} s "
        f"(x{sync_after / sync_before:.3f}); whole run {before['stage_seconds']['total']:.2f} s "
        f"-> {after['stage_seconds']['total']:.2f} s; port requests {before_requests} -> "
        f"{after_requests}, bytes sent {before_sent:,} -> {after_sent:,}; key "
        f"{after['key_bits']} bits both"
    )

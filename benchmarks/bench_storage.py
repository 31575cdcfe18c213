"""Storage as flash fails (`make bench`): the power-cut campaign of
tests/firmware/mptest_flash_faults.py at >= 1000 random cuts, on the unix target: the
firmware's record logs on littlefs (vfs.VfsLfs2, as the boards mount it) over the NOR
flash model, cut at a random program/erase operation (torn programs leave a prefix, 0xFF
or garbage; torn erases a half-erased sector), with a bit flipped in a stored record every
7th cut and a fresh chip whenever the store reports itself full.

Printed: cuts, records committed, committed records lost (must be 0), torn records served
(must be 0), torn and bit-flipped records found and skipped at recovery, and the flash
model's cost of logging: bytes programmed per record byte (littlefs write amplification),
erases per 100 records, modelled flash time per record and for the slowest commit (0.7 ms
per 256 B page program, 45 ms per 4 KiB sector erase), against the 41 ms frame period
(docs/sequencer.md); the same through the firmware's group commit (one sync per k
records, storage.RECORDS_PER_SYNC), alone and with a TDC block per frame; and one bit
flipped anywhere on the chip, littlefs's structures included: how many records each flip
costs. The wall time is this shared machine's and only for scale."""

import dataclasses
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from emulator.targets import unix_firmware_command, unix_firmware_env

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import mptest  # noqa: E402

CAMPAIGN = Path(__file__).resolve().parent.parent / "tests" / "firmware" / "mptest_flash_faults.py"
CUTS = 1200
SEED = 2026
FRAME_PERIOD_MS = 41.0


def _run_raw(extra_source: str, test: str, tag: str) -> tuple[str, float]:
    """Run one test of the campaign file with extra source appended; the figures it
    prints on the line starting with `tag`."""
    spec = mptest.parse_spec(CAMPAIGN)
    spec = dataclasses.replace(spec, source=spec.source + extra_source, test_names=[test])
    with tempfile.TemporaryDirectory(prefix="bench-storage-") as workdir:
        program = Path(workdir) / CAMPAIGN.name
        program.write_text(mptest.build_program(spec))
        started = time.monotonic()
        proc = subprocess.run(
            unix_firmware_command(program),
            capture_output=True,
            text=True,
            timeout=3600,
            cwd=workdir,
            env=unix_firmware_env(Path(workdir) / "flash"),
            stdin=subprocess.DEVNULL,
        )
        wall_s = time.monotonic() - started
    result = mptest.split_results(spec, proc.stdout)
    status, text = result.outcomes.get(test, ("fail", proc.stdout[-2000:] + proc.stderr))
    assert status == "pass", text
    line = next(line for line in proc.stdout.splitlines() if line.startswith(tag + " "))
    return line[len(tag) + 1 :], wall_s


def _run(extra_source: str, test: str, tag: str) -> tuple[dict, float]:
    line, wall_s = _run_raw(extra_source, test, tag)
    figures = dict(re.findall(r"\('(\w+)', (-?\d+)\)", line))
    return {key: int(value) for key, value in figures.items()}, wall_s


def test_power_cut_campaign_on_littlefs_over_nor_flash():
    f, wall_s = _run(
        f"\nCAMPAIGN_CUTS = {CUTS}\nCAMPAIGN_SEED = {SEED}\n",
        "test_random_power_cuts_lose_no_committed_record_and_serve_no_torn_one",
        "campaign",
    )
    records = f["records"]
    per_record_ms = f["flash_busy_ms"] / records
    print(
        f"\nstorage campaign: {f['cuts']} power cuts ({f['torn_programs']} torn programs, "
        f"{f['torn_erases']} torn erases), {f['boots']} boots, {f['devices']} chips filled\n"
        f"  records committed {records}, lost {f['lost']}, torn served {f['torn_served']}\n"
        f"  group commit (the pattern-sized log, {f['records_per_sync']} records per sync): "
        f"{f['window_lost']} records committed but not yet synced were lost at cuts, at "
        f"most {f['worst_window']} at one cut (the window: at most "
        f"{f['records_per_sync'] - 1})\n"
        f"  skipped at recovery: {f['torn_skipped']} torn, {f['flipped_skipped']} of "
        f"{f['bit_flips']} bit-flipped records (each costs that record only)\n"
        f"  NOR programs that asked for a 0->1 change: {f['wrong_programs']}\n"
        f"  littlefs write amplification: "
        f"{f['programmed_bytes'] / f['record_bytes']:.2f} bytes programmed per record byte, "
        f"{100 * f['erases'] / records:.1f} sector erases per 100 records\n"
        f"  modelled flash time: {per_record_ms:.1f} ms per record on average, "
        f"{f['worst_commit_us'] / 1000:.1f} ms for the slowest commit "
        f"({f['worst_commit_us'] / 1000 / FRAME_PERIOD_MS:.2f} frame periods)\n"
        f"  wall time {wall_s:.1f} s ({1000 * wall_s / f['cuts']:.1f} ms per cut, shared machine)"
    )
    assert f["cuts"] >= 1000
    assert f["lost"] == 0 and f["torn_served"] == 0 and f["wrong_programs"] == 0
    assert f["worst_window"] <= f["records_per_sync"] - 1


# (payload bytes, what logs records of that size)
STEADY = ((2064, "pattern frame of 4096 slots"), (528, "pattern frame of 1024 slots"),
          (64, "small housekeeping record"))  # fmt: skip


def test_steady_state_flash_cost_of_one_synced_record():
    rows = []
    for payload_bytes, what in STEADY:
        source = (
            "\ndef test_bench_steady():\n"
            f"    print('steady', sorted(steady_state({payload_bytes}, 40).items()))\n"
        )
        f, _ = _run(source, "test_bench_steady", "steady")
        rows.append((payload_bytes, what, f))
    print("\nsteady state, one synced commit per record, no faults (NOR model, littlefs):")
    for payload_bytes, what, f in rows:
        n = f["records"]
        mean_ms = f["busy_us"] / n / 1000
        print(
            f"  {payload_bytes:5d} B ({what}): {mean_ms:6.1f} ms per record "
            f"({mean_ms / FRAME_PERIOD_MS:.2f} frame periods), slowest "
            f"{f['worst_commit_us'] / 1000:.1f} ms, {f['erases'] / n:.2f} erases and "
            f"{f['programmed_bytes'] / f['record_bytes']:.2f} bytes programmed per record byte"
            f" over {n} records"
        )
        assert n >= 20
    # the firmware's group commit (storage.RECORDS_PER_SYNC for the pattern and TDC logs)
    print("the 2064 B record through the batched log, one sync per k records:")
    results = {}
    for k in (1, 2, 4, 8, 16):
        source = (
            "\ndef test_bench_steady():\n"
            f"    print('steady', sorted(steady_state(2064, 40, records_per_sync={k}).items()))\n"
        )
        f, _ = _run(source, "test_bench_steady", "steady")
        mean_ms = f["busy_us"] / f["records"] / 1000
        results[k] = mean_ms
        print(
            f"  k = {k:2d}: {mean_ms:5.1f} ms per record ({mean_ms / FRAME_PERIOD_MS:.2f} frame "
            f"periods), {f['erases'] / f['records']:.2f} erases per record, slowest commit "
            f"{f['worst_commit_us'] / 1000:.1f} ms, slowest window of k "
            f"{f['worst_window_us'] / 1000:.1f} ms"
        )
    per_sync = int(_run_raw("\ndef test_k():\n    print('k', storage.RECORDS_PER_SYNC)\n",
                            "test_k", "k")[0])  # fmt: skip
    print(f"  the firmware syncs the pattern and TDC logs every {per_sync} records")
    # every frame's pattern record within the frame period, on average, at the firmware's k
    assert results[per_sync] < FRAME_PERIOD_MS
    print("a frame's pattern record (2064 B) and a 2 kB TDC block, both batched:")
    for k in (per_sync,):
        source = (
            "\ndef test_bench_steady():\n"
            f"    print('steady', sorted(steady_state_frames(40, 2064, 2048, {k}).items()))\n"
        )
        f, _ = _run(source, "test_bench_steady", "steady")
        mean_ms = f["busy_us"] / f["frames"] / 1000
        print(
            f"  k = {k:2d}: {mean_ms:5.1f} ms per frame ({mean_ms / FRAME_PERIOD_MS:.2f} frame "
            f"periods), slowest frame {f['worst_frame_us'] / 1000:.1f} ms"
        )


def test_erase_ahead_campaign_and_commit_cost():
    """littlefs through eraseahead.EraseAhead (docs/storage.md "Erase ahead"): the same
    1200-cut campaign (a short journal, so cuts land in its compactions too), then the
    steady-state commit cost with the flight journal and one background erase per frame,
    against littlefs straight on the chip, measured in the same run."""
    f, wall_s = _run(
        f"\nEA_CUTS = {CUTS}\nCAMPAIGN_SEED = {SEED}\n",
        "test_erase_ahead_power_cuts_lose_no_committed_record_and_serve_no_torn_one",
        "erase-ahead campaign",
    )
    print(
        f"\nerase-ahead campaign: {f['cuts']} power cuts ({f['torn_programs']} torn programs, "
        f"{f['torn_erases']} torn erases), {f['boots']} boots, {f['devices']} chips filled\n"
        f"  records committed {f['records']}, lost {f['lost']}, torn served "
        f"{f['torn_served']}, at most {f['worst_window']} unsynced lost at one cut\n"
        f"  wall time {wall_s:.1f} s"
    )
    assert f["cuts"] >= 1000 and f["lost"] == 0 and f["torn_served"] == 0
    print("the 2064 B record, one sync per 8 records, 30 records, 40-sector chip:")
    rows = {}
    for label, flag in (("littlefs on the chip", "False"), ("through EraseAhead", "True")):
        source = (
            "\ndef test_bench_steady():\n"
            "    print('steady', sorted(steady_state(2064, 30, blocks=40, records_per_sync=8, "
            f"erase_ahead={flag}).items()))\n"
        )
        f, _ = _run(source, "test_bench_steady", "steady")
        rows[flag] = f
        n = f["records"]
        print(
            f"  {label:>21}: slowest commit {f['worst_commit_us'] / 1000:5.1f} ms "
            f"({f['worst_commit_us'] / 1000 / FRAME_PERIOD_MS:.2f} frame periods), "
            f"{f['commit_erases']} erases inside commits, commits {f['commit_us'] / n / 1000:.1f}"
            f" ms a record + background erases {f['background_us'] / n / 1000:.1f} ms a record "
            f"(flash busy {f['busy_us'] / n / 1000 / FRAME_PERIOD_MS:.2f} of a frame period)"
        )
    assert rows["True"]["commit_erases"] == 0
    assert rows["True"]["worst_commit_us"] / 1000 < FRAME_PERIOD_MS


def test_a_bit_flip_anywhere_on_the_chip():
    source = (
        "\ndef test_bench_flips():\n"
        "    lost, wrong = flips_anywhere(200, 7)\n"
        "    print('flips', sorted(lost.items()), wrong)\n"
    )
    spec_line, _ = _run_raw(source, "test_bench_flips", "flips")
    lost, wrong = spec_line.rsplit(" ", 1)
    print(
        "\none bit flipped anywhere in the programmed chip, 200 trials of 25 records:\n"
        f"  (records lost, trials) {lost}; wrong records served: {wrong}"
    )
    assert wrong == "0"


_COMMIT_CPU = """
import board, gc
from payload import storage
root = board.mount_storage()
clock = board.clock
while board.storage_background():  # the idle time between boot and a pass
    pass
for k in (1, %d):
    store = storage.Storage(root, -1, k)
    log = store.open_log("bench%%d" %% k, storage.KIND_PATTERN_FRAME, 2064, batched=True)
    gc.collect()
    idle = 0
    t0 = clock.now_us()
    for i in range(%d):
        log.commit(2064)
        t1 = clock.now_us()
        board.storage_background()  # the frame's idle time: one sector erased ahead
        idle += clock.now_us() - t1
    log.sync()
    print("COMMIT_CPU", k, clock.now_us() - t0 - idle, idle)
    store.close()
"""


def test_commit_cpu_cost_on_qemu_icount():
    """The controller's own work per committed 2064 B record (CRC, page writes, littlefs,
    EraseAhead's remaps) on the QEMU MPS2-AN385 image's storage path (board.mount_storage:
    littlefs through EraseAhead on a RAM NOR chip, so no flash time), and apart, the idle
    duty's erases (board.storage_background, one per record); -icount shift=0: one
    emulated ns per instruction, so microseconds are thousands of instructions."""
    from emulator.targets import QemuTarget
    from host.deploy.raw_repl import RawRepl

    records = 60
    per_sync = int(_run_raw("\ndef test_k():\n    print('k', storage.RECORDS_PER_SYNC)\n",
                            "test_k", "k")[0])  # fmt: skip
    with QemuTarget(boot="maintenance", icount_shift=0) as target:
        with RawRepl(target.ground_port, timeout_s=30.0) as repl:
            out = repl.exec(_COMMIT_CPU % (per_sync, records), timeout_s=300)
    costs = {}
    idle = {}
    for line in out.splitlines():
        if line.startswith("COMMIT_CPU"):
            _, k, us, idle_us = line.split()
            costs[int(k)] = int(us) / records
            idle[int(k)] = int(idle_us) / records
    print(
        "\ncommit of a 2064 B record on QEMU MPS2-AN385 (-icount shift=0, littlefs through"
        " EraseAhead on the board's RAM NOR chip):"
    )
    for k, us in sorted(costs.items()):
        ms_at_25mhz = us * 1000 / 25_000  # instructions / 25 M per s, one per cycle
        print(
            f"  one sync per {k} records: {us * 1000:,.0f} instructions per record "
            f"({ms_at_25mhz:.1f} ms at 25 MHz, {ms_at_25mhz / FRAME_PERIOD_MS:.2f} frame "
            f"periods), + {idle[k] * 1000:,.0f} in the idle duty's erases"
        )
    assert costs[per_sync] <= costs[1]

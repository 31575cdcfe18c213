"""The real firmware tracking loop (MicroPython) closed against the optical plant in
lockstep: the issue's must-show figures, asserted (docs/tracking.md)."""

from __future__ import annotations

import contextlib
import fcntl
import math
import os
import shutil
import struct
import subprocess
import tempfile
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest

from emulator.optical_head import HeadServer
from emulator.optical_plant import OpticalPlant, PassGeometry, PlantParams, prediction_table
from emulator.payload_run import payload_session, run_pass
from emulator.targets import (
    CONTROLLER_HEAP_BYTES,
    QemuTarget,
    unix_firmware_command,
    unix_firmware_env,
    unix_firmware_tree,
)
from emulator.tracking_lockstep import TrackingHead, run_lockstep, run_over_bus
from host.deploy.raw_repl import RawRepl
from host.link.client import CommandRejected
from host.protocol import tracking as trk

# The targets, under the default plant (docs/tracking.md "Figures"): the runs are
# seeded and bit-for-bit reproducible. Culmination: 0.5 urad per axis (the target); the
# loop with the angular-rate sensor's feed-forward gives 0.39 / 0.40 on seed 1, the
# QPD-only loop before it 0.60 / 0.59. 20 deg: 0.65 urad, below the 1 urad target, so that
# it fails for the QPD-only loop (0.81 / 0.77) and holds for this one (0.49 / 0.50).
FINE_RMS_CULMINATION_URAD = 0.5
FINE_RMS_20_DEG_URAD = 0.65


def _names(result):
    return [(a, b) for _, a, b in result.state_sequence()]


@pytest.mark.slow
def test_acquisition_and_fine_residual_near_culmination_under_the_honest_plant(tmp_path):
    # The default plant: beacon 3.1 mrad off the prediction and drifting, 1 sample of
    # latency, a 700 Hz mirror resonance, wheel lines at 95/190 Hz and a floor, beacon
    # scintillation (sigma_I^2 0.7, 5 ms), quadrant mismatch, a 5 Hz coarse axis with
    # stiction and a 24-bit encoder; 500 km pass, 1 s before culmination at the end.
    result = run_lockstep(PlantParams(seed=1), duration_s=9.0)
    acquired_s = result.first_entry_s("FINE")
    assert _names(result)[:4] == [
        ("IDLE", "OPEN_LOOP"), ("OPEN_LOOP", "SCAN"), ("SCAN", "COARSE"), ("COARSE", "FINE")
    ]  # fmt: skip
    assert acquired_s is not None and acquired_s <= 10.0, acquired_s
    # Scintillation fades are ridden through in FINE: the loop is not flapping.
    assert len(result.transitions) <= 8, _names(result)
    rms_x, rms_y, n = result.fine_rms_urad(settle_s=0.5)
    assert n > 5000
    # The 0.5 urad target (docs/tracking.md "Figures").
    assert rms_x <= FINE_RMS_CULMINATION_URAD and rms_y <= FINE_RMS_CULMINATION_URAD, (
        rms_x, rms_y)  # fmt: skip
    # The pointing-error export reads back through the one TRACKING reader.
    path = tmp_path / "pointing.qrec"
    result.write_pointing_log(path)
    samples, transitions, period_us, decimation = trk.read_tracking_log(path)
    assert (period_us, decimation, len(samples)) == (500, 1, result.steps)
    assert transitions == result.transitions
    # The firmware's own telemetry product: decimated samples, measured error in FINE.
    tel = tmp_path / "tracking.qrec"
    result.write_telemetry_log(tel)
    samples, transitions, period_us, decimation = trk.read_tracking_log(tel)
    assert decimation == 10 and len(samples) == result.steps // 10
    assert result.telemetry_lost == 0
    assert set(np.unique(samples["state"])) >= {2, 3, 4}
    # What the firmware measures is the truth plus sensor noise and the quadrant offset.
    _measured_error_follows_the_truth(result, samples)


@pytest.mark.slow
def test_fine_residual_at_20_deg_elevation_under_the_honest_plant():
    # Low in the pass the beacon is 8x weaker and fading (scintillation), so QPD noise
    # and the vibration share the residual; the loop must stay in FINE through the fades.
    geometry = PassGeometry().at_elevation(20.0)
    params = PlantParams(seed=1, geometry=geometry, initial_error_urad=(600.0, -400.0))
    result = run_lockstep(params, duration_s=8.0)
    assert _names(result) == [
        ("IDLE", "OPEN_LOOP"), ("OPEN_LOOP", "SCAN"), ("SCAN", "COARSE"), ("COARSE", "FINE")
    ]  # fmt: skip
    rms_x, rms_y, n = result.fine_rms_urad(settle_s=0.5)
    assert n > 14000
    assert rms_x <= FINE_RMS_20_DEG_URAD and rms_y <= FINE_RMS_20_DEG_URAD, (rms_x, rms_y)


def _measured_error_follows_the_truth(result, samples, settle_steps=1000, min_samples=100):
    fine = samples["state"] == 4
    steps = samples["step"][fine].astype(np.int64) - 1  # kernel step n <-> plant step n-1
    steps = steps[steps > steps[0] + settle_steps]
    truth_x = result.plant.err_x[steps] * 1e6
    measured_x = samples["err_x_nrad"][fine][-len(steps) :] / 1000.0
    assert len(steps) > min_samples
    assert np.sqrt(np.mean((measured_x - truth_x) ** 2)) < 2.0
    assert np.corrcoef(measured_x, truth_x)[0, 1] > 0.3


def _acquired_quickly(**changes):
    # Beacon inside the camera field from the start: acquisition in ~0.3 s.
    return PlantParams(seed=5, initial_error_urad=(500.0, -300.0), **changes)


def test_reacquisition_after_one_second_dropout():
    result = run_lockstep(_acquired_quickly(dropouts=((1.0, 1.0),)), duration_s=3.0)
    seq = _names(result)
    assert ("FINE", "HOLD") in seq and ("HOLD", "FINE") in seq, seq
    back_s = result.first_entry_s("FINE", after_s=2.0)
    assert back_s is not None and back_s - 2.0 <= 1.0, back_s
    # During the outage the predictor kept the mirror within the QPD field: no rescan.
    assert ("HOLD", "REACQ") not in seq
    rms_x, rms_y, _ = result.fine_rms_urad(settle_s=0.2, window=(2.3, 3.0))
    assert rms_x < FINE_RMS_CULMINATION_URAD and rms_y < FINE_RMS_CULMINATION_URAD, (
        rms_x, rms_y)  # fmt: skip


def test_beacon_that_never_returns_ends_in_lost_pointing_on_prediction():
    result = run_lockstep(_acquired_quickly(dropouts=((1.0, math.inf),)), duration_s=6.5)
    seq = _names(result)
    assert seq[-3:] == [("FINE", "HOLD"), ("HOLD", "REACQ"), ("REACQ", "LOST")], seq
    hold_s = result.first_entry_s("HOLD")
    reacq_s = result.first_entry_s("REACQ")
    assert 1.4 <= reacq_s - hold_s <= 1.6  # the 1.5 s hold budget
    # LOST points at prediction + learned bias: once back from the spiral's edge the
    # error stays near the cone's centre (vibration + prediction drift), never runs away.
    ex, ey = result.error_urad(downlink=False)
    lost = result.states_per_step() == 7
    assert lost[-1] and np.all(lost[-2000:])
    assert np.max(np.hypot(ex[-2000:], ey[-2000:])) < 200.0


@pytest.mark.slow
def test_same_state_sequence_and_commands_on_unix_and_qemu():
    params = _acquired_quickly(dropouts=((0.6, 0.2),))
    on_unix = run_lockstep(params, duration_s=1.0, target="unix")
    on_qemu = run_lockstep(params, duration_s=1.0, target="qemu", icount_shift=3)
    assert _names(on_unix) == [
        ("IDLE", "OPEN_LOOP"), ("OPEN_LOOP", "SCAN"), ("SCAN", "COARSE"), ("COARSE", "FINE"),
        ("FINE", "HOLD"), ("HOLD", "FINE"),
    ]  # fmt: skip
    assert on_qemu.transitions == on_unix.transitions
    # Integer arithmetic bounded below 2**31: the 32-bit MCU computes the same bits.
    assert np.array_equal(on_qemu.plant.fsm_cmd_log, on_unix.plant.fsm_cmd_log)
    assert np.array_equal(on_qemu.samples, on_unix.samples)


def test_payload_bus_path_runs_the_same_loop_as_the_lockstep_link(tmp_path):
    # The application's path: bus client + scheduler + tracking duty, the plant behind the
    # optical head's 0x0500 register block. Same plant, same firmware: same bits.
    params = _acquired_quickly(dropouts=((0.6, 0.2),))
    over_bus = run_over_bus(params, duration_s=1.0)
    over_link = run_lockstep(params, duration_s=1.0)
    assert over_bus.extra["bus_errors"] == 0 and over_bus.extra["duty_steps"] == 2000
    assert over_bus.transitions == over_link.transitions
    assert ("HOLD", "FINE") in _names(over_bus)
    assert np.array_equal(over_bus.plant.fsm_cmd_log, over_link.plant.fsm_cmd_log)
    # Telemetry is a storage product: record kind 4, read by the host's one reader.
    path = tmp_path / "tracking.qrec"
    path.write_bytes(over_bus.extra["files"]["tracking.qrec"])
    samples, transitions, period_us, decimation = trk.read_tracking_log(path)
    assert transitions == over_bus.transitions
    assert (period_us, decimation, len(samples)) == (500, 10, 200)
    assert over_bus.extra["product"][1:] == [0, 0]  # no transition or sample lost
    # The stored telemetry is the loop's own measurement of the truth.
    _measured_error_follows_the_truth(over_bus, samples, settle_steps=100, min_samples=30)


@pytest.mark.slow
def test_payload_bus_path_on_qemu_matches_unix():
    # Real-time QEMU clock: the bus client's 500 ms reply timeout is virtual time under
    # -icount sleep=off, where a host hiccup can expire it (docs/tracking.md).
    params = _acquired_quickly(dropouts=((0.6, 0.2),))
    on_qemu = run_over_bus(params, duration_s=1.0, target="qemu")
    on_unix = run_over_bus(params, duration_s=1.0, target="unix")
    assert on_qemu.extra["bus_errors"] == 0
    assert on_qemu.transitions == on_unix.transitions
    assert np.array_equal(on_qemu.plant.fsm_cmd_log, on_unix.plant.fsm_cmd_log)
    # The stored telemetry product (littlefs on QEMU, a directory on unix): same bytes.
    assert on_qemu.extra["stored"]["tracking.qrec"] == on_unix.extra["stored"]["tracking.qrec"]


def _pass_config(rows, parameters=None):
    return {
        "intensity_probabilities": [0.5, 0.25, 0.25],
        "basis_probability_z": 0.7,
        "slot_rate_hz": 100_000_000,
        "frame_slots": 1024,
        "pps_period_ps": 100_000_000,
        "tdc": {"bursts_per_step": 1},
        "tracking": {"parameters": parameters or {}, "predictions": rows},
    }


def _uploaded_pass(prediction_s: float, plant_s: float = 1.0):
    """(plant, head, upload telecommands, pass configuration naming the upload by node
    count and CRC-32) of a quickly acquired pass whose prediction spans prediction_s."""
    params = _acquired_quickly()
    plant = OpticalPlant(params, plant_s)
    head = TrackingHead(seed=5)
    head.attach(plant)
    chunks, reference = trk.prediction_upload(prediction_table(params, prediction_s))
    return plant, head, chunks, _pass_config(reference)


@pytest.mark.slow
def test_tracking_runs_in_pass_mode_configured_by_telecommand(tmp_path):
    # The application: the pass configuration (diagnostic telecommand) carries a
    # "tracking" section; start/stop drive the loop; its product is downloaded.
    # The head's frames pace the run (about one loop period per frame); the plant's
    # scenario is far longer so a slow host poll cannot run the loop past its end.
    # A full pass's prediction (402 nodes: 6.7 minutes) goes up in 67 configure
    # telecommands of 6 nodes each, then the configuration names it by count and CRC-32.
    plant, head, chunks, config = _uploaded_pass(400.0, plant_s=10.0)
    assert len(chunks) == 67
    run = run_pass("unix", head, config, 800, uploads=chunks)
    assert run.configure_reply["ok"], run.configure_reply
    state, steps, bus_errors, transition_count, lost, overruns, fast = run.telemetry["tracking"]
    assert state == "IDLE" and bus_errors == 0 and lost == 0, run.telemetry["tracking"]
    assert fast == 0  # the unix port has no Thumb TRACK pair: the general period, reported
    # Periods that came later than the configured 500 us are counted, not hidden.
    assert 0 <= overruns <= steps
    assert steps >= 800, steps
    path = tmp_path / "tracking.qrec"
    path.write_bytes(run.files["tracking.qrec"])
    samples, transitions, _, _ = trk.read_tracking_log(path)
    names = [(trk.STATE_NAMES[t.old], trk.STATE_NAMES[t.new]) for t in transitions]
    assert names[0] == ("IDLE", "OPEN_LOOP") and names[-1][1] == "IDLE", names
    assert ("COARSE", "FINE") in names and len(samples) >= 70
    assert len(transitions) == transition_count
    # The stop's IDLE commands reached the head (a plain WRITE: no next period carries them)
    assert plant.k > 0 and plant.states[plant.k - 1] == trk.STATE_NAMES.index("IDLE")


def test_full_pass_upload_and_configure_fit_the_heap_with_15_percent_to_spare():
    # The flake CI met at a7b0454: after 67 upload telecommands the unix heap held 258 KB
    # free in blocks of at most 9.4 KB, and configure's 8.6 KB tracker state failed now and
    # then at the full 512 KiB (every time at 500,000 bytes). Configure now collects first
    # and the tracker's state is one block: the same pass configures with 15 % less heap.
    # (It then failed once in CI at 85 %, and every time at 84 %: the unix port parsing
    # tracking.py at the first chunk. The unix target runs .mpy since: it passes at 53 %.)
    _, head, chunks, config = _uploaded_pass(400.0)
    heap_bytes = CONTROLLER_HEAP_BYTES * 85 // 100
    run = run_pass("unix", head, config, 10, uploads=chunks, unix_heap_bytes=heap_bytes)
    assert run.configure_reply["ok"], run.configure_reply


def test_a_full_pass_upload_and_configure_fit_in_two_thirds_of_the_heap_as_on_a_board():
    # Through UnixTarget (its own script, main.py, comes first on sys.path): from source
    # this failed at 84 % (the parse of tracking.py at the first chunk) and the application
    # did not load at 60 %; compiled, as a board runs it, it passes at 53 %
    _, head, chunks, config = _uploaded_pass(400.0)
    heap_bytes = CONTROLLER_HEAP_BYTES * 65 // 100
    run = run_pass("unix", head, config, 10, uploads=chunks, unix_heap_bytes=heap_bytes)
    assert run.configure_reply["ok"], run.configure_reply


def _firmware_program(workdir, source: str, heap_bytes: int = CONTROLLER_HEAP_BYTES):
    """A MicroPython program run on the unix port beside the unix target's firmware."""
    program = workdir / "program.py"
    program.write_text(source + "\n")
    return subprocess.run(
        unix_firmware_command(program, heap_bytes),
        capture_output=True,
        text=True,
        timeout=60,
        cwd=workdir,
        env=unix_firmware_env(workdir, None),
    )


def test_the_unix_tree_holds_the_code_of_its_sources_even_if_one_changes_mid_compile(
    tmp_path, monkeypatch
):
    """A tree is named by the digest of the sources it was compiled from: an edit gives a
    new tree, and a file edited and put back during the compile (a checkout while tests
    run, an editor's save) cannot put other code under the sources' name: the compile
    reads the bytes the digest was taken over."""
    from emulator import targets
    from host.deploy import flash

    firmware = tmp_path / "firmware"
    shutil.copytree(targets.FIRMWARE_DIR, firmware)
    monkeypatch.setattr(targets, "FIRMWARE_DIR", firmware)
    monkeypatch.setattr(targets, "BUILD_DIR", tmp_path / "build")
    version = firmware / "payload" / "version.py"
    first = unix_firmware_tree()
    assert unix_firmware_tree() == first  # compiled once per state of the sources
    version.write_text(version.read_text() + "CHANGED = 1\n")
    compile_firmware = flash.compile_firmware

    def edited_while_compiling(*args, **kwargs):
        source = version.read_text()
        version.write_text(source + "EDITED = 1\n")
        try:
            return compile_firmware(*args, **kwargs)
        finally:
            version.write_text(source)

    monkeypatch.setattr(flash, "compile_firmware", edited_while_compiling)
    second = unix_firmware_tree()
    monkeypatch.setattr(flash, "compile_firmware", compile_firmware)
    assert second != first and unix_firmware_tree() == second
    result = _firmware_program(
        tmp_path, "from payload import version\nprint(sorted(dir(version)))"
    )
    assert result.returncode == 0, result.stderr
    assert "'CHANGED'" in result.stdout and "'EDITED'" not in result.stdout
    assert sorted(p.name for p in (tmp_path / "build" / "unix-mpy").iterdir()) == sorted(
        [first.name, second.name, ".lock"]
    )  # no staging left


def test_unix_trees_unused_for_a_week_and_killed_compiles_go_when_a_new_tree_is_made(
    tmp_path, monkeypatch
):
    """Every firmware edit makes a tree: without pruning, build/unix-mpy grows for ever, and
    a compile killed mid-way (SIGKILL, a power cut) leaves its staging folder. A launch
    marks its tree used, so a tree in use is never taken."""
    from emulator import targets
    from host.deploy import flash  # noqa: F401 (imports BUILD_DIR before it is replaced)

    monkeypatch.setattr(targets, "BUILD_DIR", tmp_path / "build")
    trees = tmp_path / "build" / "unix-mpy"
    current = unix_firmware_tree()
    day_s = 86400.0
    now_s = time.time()
    ages_s = {
        "0123456789abcdef": 8 * day_s,  # unused for over a week: goes
        "fedcba9876543210": 6 * day_s,  # used within the week: stays
        ".staging-killed": 2 * day_s,  # a compile killed two days ago: goes
        ".staging-running": 3600.0,  # another process compiling (or paused): stays
        "notes": 30 * day_s,  # not a name the target makes: never touched
    }
    for name, age_s in ages_s.items():
        (trees / name).mkdir()
        (trees / name / "main.py").write_text("")
        os.utime(trees / name, (now_s - age_s, now_s - age_s))
    os.utime(current, (now_s - 30 * day_s, now_s - 30 * day_s))
    assert unix_firmware_tree() == current  # launched again: marked used
    assert current.stat().st_mtime > now_s - 60
    firmware = tmp_path / "firmware"  # an edit: a new tree, and the pruning
    shutil.copytree(targets.FIRMWARE_DIR, firmware)
    monkeypatch.setattr(targets, "FIRMWARE_DIR", firmware)
    version = firmware / "payload" / "version.py"
    version.write_text(version.read_text() + "CHANGED = 1\n")
    edited = unix_firmware_tree()
    assert sorted(p.name for p in trees.iterdir() if p.is_dir()) == sorted(
        [current.name, edited.name, "fedcba9876543210", ".staging-running", "notes"]
    )
    # A launch marks under the trees' shared lock and a prune removes under the exclusive
    # one: a prune waits for a launch in progress, which then finds its tree intact.
    # The prune's removals happen while it holds the lock (no launch can take it then).
    os.utime(current, (now_s - 30 * day_s, now_s - 30 * day_s))
    rmtree, locked_out = shutil.rmtree, []

    def rmtree_noting_the_lock(path, *args, **kwargs):
        with open(trees / ".lock", "rb") as other:
            try:
                fcntl.flock(other, fcntl.LOCK_SH | fcntl.LOCK_NB)
                locked_out.append(False)
            except BlockingIOError:
                locked_out.append(True)
        return rmtree(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", rmtree_noting_the_lock)
    launch = contextlib.ExitStack()
    assert launch.enter_context(targets._trees_locked(trees, exclusive=False))
    pruned = []
    prune = threading.Thread(target=lambda: pruned.extend(targets._prune_unix_trees(edited)))
    prune.start()
    prune.join(0.5)
    assert prune.is_alive() and (current / "main.py").exists()
    launch.close()
    prune.join(10)
    monkeypatch.setattr(shutil, "rmtree", rmtree)
    assert pruned == [current.name] and not current.exists() and locked_out == [True]
    # and a launch waits for a prune in progress
    prune_lock = contextlib.ExitStack()
    assert prune_lock.enter_context(targets._trees_locked(trees, exclusive=True))
    launched = []
    relaunch = threading.Thread(target=lambda: launched.append(unix_firmware_tree()))
    relaunch.start()
    relaunch.join(0.5)
    assert relaunch.is_alive()
    prune_lock.close()
    relaunch.join(10)
    assert launched == [edited]
    # A prune cut off mid-way (Ctrl-C in rmtree) leaves a staging folder for a later prune,
    # not a tree that still has main.py and not all of its modules.
    os.utime(edited, (now_s - 30 * day_s, now_s - 30 * day_s))

    def rmtree_interrupted(path, *args, **kwargs):
        (Path(path) / "payload" / "tracking.mpy").unlink()
        raise KeyboardInterrupt

    monkeypatch.setattr(shutil, "rmtree", rmtree_interrupted)
    with pytest.raises(KeyboardInterrupt):
        targets._prune_unix_trees(trees / "0000000000000000")
    monkeypatch.setattr(shutil, "rmtree", rmtree)
    assert not edited.exists()
    (left,) = [p for p in trees.iterdir() if p.name.startswith(".staging-pruned-")]
    assert (left / "main.py").exists()  # the part left, out of the trees' names
    # A tree without its main.py is compiled again, not returned.
    assert unix_firmware_tree() == edited
    (edited / "main.py").unlink()
    assert unix_firmware_tree() == edited and (edited / "main.py").exists()
    assert (edited / "payload" / "tracking.mpy").exists()


def test_the_unix_target_imports_the_firmware_compiled_as_a_board_does(tmp_path):
    # Parsing tracking.py (80 KB of source) took ~200 KB of heap at once for 43 KB kept:
    # the unix target imports the .mpy files a board is flashed with, in ~60 KB. From
    # source, this import fails at this heap (MemoryError) and names a .py file.
    result = _firmware_program(
        tmp_path, "from payload import tracking\nprint(tracking.__file__)", heap_bytes=100_000
    )
    assert result.returncode == 0, result.stderr
    imported = Path(result.stdout.strip())
    assert imported.name == "tracking.mpy" and imported.parent.parent == unix_firmware_tree()


def test_full_pass_prediction_upload_refused_when_incomplete_or_corrupt():
    _, head, chunks, config = _uploaded_pass(100.0)
    reference = config["tracking"]["predictions"]
    run = run_pass("unix", head, config, 10, uploads=chunks[:-1])  # last chunk missing
    assert not run.configure_reply["ok"]
    assert "102 nodes named, 96 uploaded" in run.configure_reply["reason"]
    config["tracking"]["predictions"] = dict(reference, crc32=reference["crc32"] ^ 1)
    run = run_pass("unix", head, config, 10, uploads=chunks)
    assert not run.configure_reply["ok"] and "CRC-32" in run.configure_reply["reason"]


def test_a_new_upload_withdraws_the_configured_prediction_until_configured_again():
    # The prediction lives in storage (docs/tracking.md "Full-pass prediction upload"): a
    # new upload overwrites the file the configured loop pages from, so a start is refused
    # (the reason names what to do) until a configuration names the new upload
    _, head, chunks, config = _uploaded_pass(30.0)
    with HeadServer(head) as server:
        with payload_session("unix", server.address, track_address=server.track_address) as (
            _target,
            payload,
        ):
            for chunk in chunks:
                payload.configure(chunk)
            payload.configure(config)
            payload.configure(chunks[0])  # a new upload begins
            with pytest.raises(CommandRejected, match="configure again"):
                payload.start()
            for chunk in chunks[1:]:
                payload.configure(chunk)
            payload.configure(config)
            payload.start()
            payload.stop()
            assert payload.housekeeping()["mission"]["tracking"][0] == "IDLE"


def test_an_upload_that_does_not_fit_the_storage_quota_is_refused_and_the_store_not_full():
    # The prediction's file draws on the products' quota: a chunk beyond it is refused
    # (the ground sees why), the store is not marked full (the products keep logging), and
    # a new, shorter upload takes the room of the old file back
    _, head, chunks, config = _uploaded_pass(100.0)  # 102 nodes: 3,264 bytes
    _, _, short_chunks, short_config = _uploaded_pass(30.0)  # 32 nodes: 1,024 bytes
    with HeadServer(head) as server:
        with payload_session(
            "unix",
            server.address,
            track_address=server.track_address,
            unix_env={"QKDSAT_STORAGE_QUOTA": "2000"},
        ) as (_target, payload):
            accepted = 0
            with pytest.raises(CommandRejected, match="storage quota"):
                for chunk in chunks:
                    payload.configure(chunk)
                    accepted += 1
            assert accepted == 2000 // 192, accepted  # 10 chunks of 6 nodes (1,920 bytes)
            assert "full" not in payload.housekeeping()["mission"]["storage"]
            for chunk in short_chunks:
                payload.configure(chunk)
            payload.configure(short_config)
            storage_status = payload.housekeeping()["mission"]["storage"]
            assert storage_status["used"] == 1024 and "full" not in storage_status


def test_bad_tracking_configuration_refused_by_telecommand():
    params = _acquired_quickly()
    head = TrackingHead(seed=5)
    head.attach(OpticalPlant(params, 1.0))
    config = _pass_config(prediction_table(params, 1.0), {"fsm_limit_urad": 5000.0})
    run = run_pass("unix", head, config, 10)
    assert not run.configure_reply["ok"]
    assert "fsm_limit_urad" in run.configure_reply["reason"]
    assert "range" in run.configure_reply["reason"]


def test_sine_table_constant_is_the_double_precision_table():
    # The kernel's sine table is a constant in firmware/payload/_sin_q14.py (flash on the
    # MCU, the same on every target); it is the table the 64-bit unix build computed.
    namespace: dict = {}
    exec((Path(__file__).parents[1] / "firmware/payload/_sin_q14.py").read_text(), namespace)
    expected = struct.pack(
        "<1024H",
        *(int(16384 + 16384 * math.sin(2 * math.pi * i / 1024) + 0.5) for i in range(1024)),
    )
    assert namespace["SIN_Q14"] == expected
    assert zlib.crc32(expected) == 0x7F778D94


def test_pointing_efficiency_is_the_gaussian_beam_loss():
    samples = np.zeros(3, trk.SAMPLE_DTYPE)
    samples["err_x_nrad"] = [0, 5000, 3000]
    samples["err_y_nrad"] = [0, 0, 4000]  # 0, 5, 5 urad off axis
    eff = trk.pointing_efficiency(samples, beam_half_angle_urad=10.0)
    assert np.allclose(eff, [1.0, math.exp(-0.5), math.exp(-0.5)])
    with pytest.raises(ValueError, match="beam_half_angle_urad"):
        trk.pointing_efficiency(samples, 0.0)


def test_tracking_payload_round_trip_and_bad_payload_named():
    samples = np.zeros(3, trk.SAMPLE_DTYPE)
    samples["step"] = [10, 20, 30]
    samples["err_x_nrad"] = [-5, 0, 7]
    subtype, period, dec, back = trk.decode_payload(trk.encode_samples(samples, 500, 10))
    assert (subtype, period, dec) == (1, 500, 10) and np.array_equal(back, samples)
    with pytest.raises(trk.TrackingFormatError, match="bytes for 3"):
        trk.decode_payload(trk.encode_samples(samples, 500, 10)[:-1])
    with pytest.raises(trk.TrackingFormatError, match="subtype 9"):
        trk.decode_payload(bytes([1, 9, 0, 0]) + bytes(8))


# ------------------------------------------------ 32-bit regimes (issue 15, finding 5)
# The kernel's int32 state overflowed on the 32-bit MCU (and not on the 64-bit unix
# build): the extrapolation v*t after ~143 s past the last node, the Q6 predictor bias
# at 33.5 mrad, the us pass clock after 35.8 min. This program drives the real kernel
# through those regimes with scripted sensors (encoder on the prediction + an offset, a
# beacon the camera then the QPD see) and digests every output word of every step.
REGIME_PROGRAM = """
import binascii
from payload import tracking
ROWS = [[-1300000000 + i * 15000000, 20000000, 15000, 0, 0, 0, -50000, 0] for i in range(4)]
LIT = (3000, 3300, 2900, 3200)
DARK = (25, 25, 25, 25)
def run(at_ms, seconds, enc_offset):
    t = tracking.Tracker({'loop_rate_hz': 500, 'wheel_lines_hz': (0.0, 0.0)})
    t.load_predictions(ROWS)
    io = t.io
    outputs = io[tracking.IO_FSM_X:]
    t.start(at_ms)
    crc = 0
    worst_rate = 0
    for k in range(seconds * 500):
        quads, cam = DARK, 0
        if 20 <= k < 40:
            cam = 5000
        elif k >= 40 and not 25000 <= k < 25250:  # a half-second outage at 50 s
            quads, cam = LIT, 5000
        io[0] = quads[0]; io[1] = quads[1]; io[2] = quads[2]; io[3] = quads[3]
        io[4] = 1; io[5] = 0; io[6] = 0; io[7] = cam
        io[8] = io[tracking.IO_PRED_X] + enc_offset
        io[9] = io[tracking.IO_PRED_Y]
        t.step()
        crc = binascii.crc32(bytes(outputs), crc)
        if abs(io[tracking.IO_RATE_X]) > worst_rate:
            worst_rate = abs(io[tracking.IO_RATE_X])
    bx, by = t.bias_nrad()
    print('@@regime', at_ms, seconds, enc_offset, crc, t.state, t.pass_time_ms(),
          io[tracking.IO_PRED_X], io[tracking.IO_PRED_Y], bx, by, worst_rate,
          t.transition_count())
run(0, 150, 0)              # 147 s of extrapolation past the 4-node table
run(0, 60, -40000000)       # the beacon 40 mrad from the prediction: bias past 33.5 mrad
run(2147000, 20, 0)         # started where the int32 us clock wrapped (35.8 min)
"""


def _regime_lines(output: str) -> list[list[int]]:
    return [[int(v) for v in line.split()[1:]] for line in output.splitlines()
            if line.startswith("@@regime")]  # fmt: skip


def _regime_on_unix() -> list[list[int]]:
    with tempfile.TemporaryDirectory() as workdir:
        script = Path(workdir) / "regime.py"
        script.write_text(REGIME_PROGRAM)
        proc = subprocess.run(
            unix_firmware_command(script), capture_output=True, text=True, timeout=300,
            cwd=workdir, env=unix_firmware_env(Path(workdir) / "flash", None),
            stdin=subprocess.DEVNULL,
        )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return _regime_lines(proc.stdout)


@pytest.mark.slow
def test_32_bit_regimes_equal_on_unix_and_qemu_and_bounded():
    on_unix = _regime_on_unix()
    with QemuTarget(boot="maintenance") as target:
        with RawRepl(target.ground_port, timeout_s=30.0) as repl:
            on_qemu = _regime_lines(repl.exec(REGIME_PROGRAM, timeout_s=600))
    assert len(on_unix) == 3
    # Same bits: every output word of every step, on the 64-bit build and the 32-bit MCU.
    assert on_qemu == on_unix
    extrapolated, biased, late = on_unix
    # Past the table (last node at 3 s) the prediction extrapolates 10 s, then holds with
    # no rate fed forward: 1 s segment + 10 s at 15 urad/ms from the node at 2 s.
    _, _, _, _, state, time_ms, pred_x, pred_y, _, _, worst_rate, _ = extrapolated
    assert state == 4 and time_ms == 13000, (state, time_ms)  # FINE, clock held
    assert pred_x == -1300000000 + 2 * 15000000 + 11000 * 15000 and pred_y == 20000000
    assert worst_rate <= 50000  # never beyond the axis limit (an overflow saturates it)
    # The beacon 40 mrad below the prediction: the bias saturates at -16.8 mrad with the
    # right sign (a Q6 int32 wrapped to a positive bias at 33.5 mrad).
    assert biased[8] == -(1 << 24), biased
    # Started at 2147 s, past the table: the node index stays in the table and the
    # prediction is the held one (an int32 us clock read a negative node here).
    assert late[5] == 13000 and late[6] == extrapolated[6], late

"""One key per pass: Alice marks a pass's raw data used before her first message that
depends on it (host/distil/raw_data_record.py) and refuses the pass after. Two keys hashed
from the same raw bits, each after its own disclosures, together hold about twice what
privacy amplification allows."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from distil_passgen import make_pass

from host.cli import main as qkdsat
from host.distil.protocol import Config
from host.distil.raw_data_record import (
    FINGERPRINT_SLOTS,
    INSECURE_NAME,
    RECORD_NAME,
    raw_data_fingerprint,
)
from host.distil.run import run_local
from host.errors import ProtocolAborted
from host.formats.patterns import open_patterns

PY = sys.executable
KEY_NAMES = ("alice.key", "bob.key")


@pytest.fixture
def small_pass(tmp_path):
    return make_pass(tmp_path / "pass", duration_s=3.0, seed=2)


def _keys(out: Path) -> list[str]:
    return sorted(p.name for p in out.glob("*.key")) if out.exists() else []


def test_a_second_secure_run_on_a_pass_aborts_without_a_key(small_pass, tmp_path, capsys):
    first, second = tmp_path / "k1", tmp_path / "k2"
    assert qkdsat(["distil", str(small_pass), "--out", str(first)]) == 0
    assert _keys(first) == list(KEY_NAMES)
    record = small_pass / "satellite" / RECORD_NAME
    claimed = json.loads(record.read_text())
    assert claimed["pass_sha256"] and record.stat().st_mode & 0o777 == 0o600
    capsys.readouterr()
    assert qkdsat(["distil", str(small_pass), "--out", str(second)]) == 3
    assert _keys(second) == []
    report = json.loads((second / "report.json").read_text())
    assert report["aborted"] and str(record) in report["abort_reason"]
    assert "already used" in report["abort_reason"]
    assert _keys(first) == list(KEY_NAMES)  # the first key is untouched


def test_an_insecure_run_leaves_the_pass_unusable_for_a_secure_key(small_pass, tmp_path):
    """The deterministic test mode may rerun a pass (its keys are refused for any use), but
    what it disclosed is public: a secure run on that pass is refused."""
    seed = ["--insecure-deterministic-seed", "7"]
    for out in ("d1", "d2"):
        assert qkdsat(["distil", str(small_pass), "--out", str(tmp_path / out), *seed]) == 0
    assert (small_pass / "satellite" / INSECURE_NAME).exists()
    assert qkdsat(["distil", str(small_pass), "--out", str(tmp_path / "k")]) == 3
    assert _keys(tmp_path / "k") == []


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_run_killed_after_the_claim_burns_the_pass(small_pass, tmp_path):
    """Alice (split mode) is SIGKILLed as soon as her record exists, mid-run: no key
    anywhere, and the pass stays used (the safe side: what she disclosed is unknown)."""
    pool = os.urandom(1 << 16)
    for name in ("alice.pool", "bob.pool"):
        (tmp_path / name).write_bytes(pool)
        (tmp_path / name).chmod(0o600)
    port = _free_port()
    common = [PY, "-m", "host.cli", "distil", str(small_pass), "--new-auth-pool", "--quiet"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}

    def endpoint(role: str, option: str) -> subprocess.Popen:
        argv = ["--role", role, option, f"127.0.0.1:{port}"]
        argv += ["--auth-pool", str(tmp_path / f"{role}.pool"), "--out", str(tmp_path / role)]
        return subprocess.Popen(common + argv, env=env, stderr=subprocess.DEVNULL)

    alice = endpoint("alice", "--listen")
    time.sleep(0.5)
    bob = endpoint("bob", "--connect")
    record = small_pass / "satellite" / RECORD_NAME
    deadline = time.monotonic() + 120
    while not record.exists() and alice.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    alice.send_signal(signal.SIGKILL)
    alice.wait(timeout=30)
    bob.wait(timeout=60)
    assert alice.returncode == -signal.SIGKILL, "Alice finished before she was killed"
    assert bob.returncode != 0
    assert record.exists()
    assert _keys(tmp_path / "alice") == [] and _keys(tmp_path / "bob") == []
    assert qkdsat(["distil", str(small_pass), "--out", str(tmp_path / "rerun")]) == 3
    assert _keys(tmp_path / "rerun") == []


@pytest.fixture
def onboard_pass(small_pass, tmp_path):
    """The payload processor's view of a pass: pass.json and Bob's ground/, no satellite/;
    Alice reads her symbols from the head's pattern memory (here the pattern files of
    small_pass, opened as a source)."""
    onboard = tmp_path / "onboard"
    onboard.mkdir()
    shutil.copy(small_pass / "pass.json", onboard / "pass.json")
    shutil.copytree(small_pass / "ground", onboard / "ground")
    return onboard, open_patterns(small_pass / "satellite")


def _distil(pass_dir, out, memory, ledger=None) -> dict:
    return run_local(pass_dir, out, Config(), alice_patterns=memory, raw_data_ledger=ledger)


def test_a_satellite_directory_made_after_the_first_run_does_not_hide_its_record(
    onboard_pass, tmp_path
):
    """With the pattern memory the record sits in the pass directory (no satellite/ there);
    a satellite/ made later (a product download) must not let a second run in."""
    onboard, memory = onboard_pass
    assert not _distil(onboard, tmp_path / "k1", memory)["aborted"]
    (onboard / "satellite").mkdir()
    second = _distil(onboard, tmp_path / "k2", memory)
    assert second["aborted"] and "already used" in second["abort_reason"]
    assert str(onboard / RECORD_NAME) in second["abort_reason"]
    assert _keys(tmp_path / "k2") == []


def test_the_ledger_refuses_the_same_raw_data_under_any_directory_and_pass_json(
    onboard_pass, tmp_path
):
    """The pattern memory is read by slot index, whatever pass.json says: a second
    directory with the same pass.json, or with a field changed (a note added, the rate
    written as an integer), reaches the same raw bits. Alice's ledger names them by their
    own fingerprint and refuses them every time, where the folder's record cannot see
    another folder (a ledger named by pass.json's digest let the changed ones through:
    four keys from one run in a cold review)."""
    onboard, memory = onboard_pass
    ledger = tmp_path / "store" / "raw-data-used"
    assert not _distil(onboard, tmp_path / "k1", memory, ledger)["aborted"]
    record = ledger / f"{raw_data_fingerprint(memory)}.json"
    assert json.loads(record.read_text())["pass_sha256"]
    assert record.stat().st_mode & 0o777 == 0o600 and ledger.stat().st_mode & 0o777 == 0o700
    pass_json = json.loads((onboard / "pass.json").read_text())
    edits = {
        "same": pass_json,
        "noted": {**pass_json, "note": "again"},
        "integer_rate": {**pass_json, "slot_rate_hz": int(pass_json["slot_rate_hz"])},
    }
    for name, edited in edits.items():
        copy = tmp_path / name
        copy.mkdir()
        (copy / "pass.json").write_text(json.dumps(edited))
        shutil.copytree(onboard / "ground", copy / "ground")
        second = _distil(copy, tmp_path / f"k-{name}", memory, ledger)
        assert second["aborted"] and f"raw-data ledger {ledger}:" in second["abort_reason"]
        # the reason reaches Bob and the reports: the fingerprint is not in it
        assert record.stem not in second["abort_reason"], name
        assert _keys(tmp_path / f"k-{name}") == []
        # nothing of the refused run in the copy: the ledger is checked before any record
        assert not (copy / RECORD_NAME).exists()
    assert _keys(tmp_path / "k1") == list(KEY_NAMES)
    assert sorted(p.name for p in ledger.iterdir()) == [record.name]


def test_a_ledger_others_can_write_is_refused_before_any_disclosure(onboard_pass, tmp_path):
    """Whoever can delete a record lets the raw data in again: a ledger directory open to
    group or others is refused, and the pass is not claimed anywhere."""
    onboard, memory = onboard_pass
    ledger = tmp_path / "open-ledger"
    ledger.mkdir()
    ledger.chmod(0o777)
    report = _distil(onboard, tmp_path / "k", memory, ledger)
    assert (
        report["aborted"]
        and "must be a directory of this user with mode 0700" in (report["abort_reason"])
    )
    assert list(ledger.iterdir()) == [] and not (onboard / RECORD_NAME).exists()
    assert _keys(tmp_path / "k") == []


def test_the_ledger_is_alices_only(small_pass, tmp_path, capsys):
    argv = ["distil", str(small_pass), "--role", "bob", "--connect", "127.0.0.1:9"]
    argv += ["--auth-pool", str(tmp_path / "p"), "--out", str(tmp_path / "b")]
    assert qkdsat(argv + ["--raw-data-ledger", str(tmp_path / "l")]) == 2
    assert "--raw-data-ledger is Alice's record" in capsys.readouterr().err


class _FirstSlotsOnly:
    """Alice's pattern as a processor given a smaller --slot-count reads it: the slots
    past the count are not asked for (host/link/pattern_memory.py)."""

    def __init__(self, patterns, slot_count: int):
        self.patterns, self.first_slot, self.slot_count = patterns, patterns.first_slot, slot_count

    def covers(self, slots):
        slots = np.asarray(slots)
        return self.patterns.covers(slots) & (slots < self.first_slot + self.slot_count)

    def symbols(self, slots):
        return self.patterns.symbols(slots)


def test_the_raw_datas_name_does_not_follow_the_slot_count(onboard_pass, tmp_path):
    """A smaller --slot-count must not rename the same raw data: the name covers a fixed
    prefix, and a pattern that does not hold all of it is refused, not named by less."""
    _, memory = onboard_pass
    name = raw_data_fingerprint(memory)
    assert raw_data_fingerprint(_FirstSlotsOnly(memory, 10_000)) == name
    assert raw_data_fingerprint(_FirstSlotsOnly(memory, FINGERPRINT_SLOTS)) == name
    with pytest.raises(ProtocolAborted, match="cannot be named in the raw-data ledger"):
        raw_data_fingerprint(_FirstSlotsOnly(memory, FINGERPRINT_SLOTS - 1))


def test_a_pattern_file_copied_with_its_first_slot_moved_is_the_same_raw_data(
    small_pass, tmp_path
):
    """A copy of the pass whose pattern_source.json starts 256 slots later (and counts 256
    fewer) holds the same bits at the same slots: the ledger names raw data by the bits of
    slots 0-511, so the copy, holding none of them, is refused, not named anew."""
    ledger = tmp_path / "ledger"
    assert qkdsat(["distil", str(small_pass), "--out", str(tmp_path / "k1"),
                   "--raw-data-ledger", str(ledger)]) == 0  # fmt: skip
    copy = shutil.copytree(small_pass, tmp_path / "copy")
    (copy / "satellite" / RECORD_NAME).unlink()
    source = copy / "satellite" / "pattern_source.json"
    fields = json.loads(source.read_text())
    fields["first_slot"] += 256
    fields["slot_count"] -= 256
    source.write_text(json.dumps(fields))
    assert qkdsat(["distil", str(copy), "--out", str(tmp_path / "k2"),
                   "--raw-data-ledger", str(ledger)]) == 3  # fmt: skip
    report = json.loads((tmp_path / "k2" / "report.json").read_text())
    assert "cannot be named in the raw-data ledger" in report["abort_reason"]
    assert _keys(tmp_path / "k2") == [] and len(list(ledger.iterdir())) == 1


def test_a_pass_with_a_pattern_log_is_named_in_the_ledger(tmp_path):
    """A pattern log (explicit symbols, as the payload writes) reads like a source: a
    secure run with a ledger keys and names it; a second run on a copy is refused."""
    from host.formats.patterns import read_pattern_source
    from host.simulate.passgen import write_pattern_log

    logged = make_pass(tmp_path / "pass", duration_s=3.0, seed=2)
    source = logged / "satellite" / "pattern_source.json"
    write_pattern_log(logged / "satellite" / "patterns.qrec", read_pattern_source(source))
    source.unlink()
    copy = shutil.copytree(logged, tmp_path / "copy")
    ledger = tmp_path / "ledger"
    for pass_dir, out, code in ((logged, "k1", 0), (copy, "k2", 3)):
        argv = ["distil", str(pass_dir), "--out", str(tmp_path / out)]
        assert qkdsat(argv + ["--raw-data-ledger", str(ledger)]) == code
    assert _keys(tmp_path / "k1") == list(KEY_NAMES) and len(list(ledger.iterdir())) == 1
    report = json.loads((tmp_path / "k2" / "report.json").read_text())
    assert report["aborted"] and "raw-data ledger" in report["abort_reason"]
    assert _keys(tmp_path / "k2") == []


# Two runs that both checked before either wrote: the other run's file lands between this
# run's check and its write (the interleaving two processes can take). Each run writes
# first and checks again after, so at least the later checker refuses before disclosing.


def _landing_first(monkeypatch, name: str, land) -> None:
    """raw_data_record.`name` (the writer of this run's file) lets the other run's file
    land (`land()`) just before it writes."""
    from host.distil import raw_data_record

    write = getattr(raw_data_record, name)

    def landing(*args, **kwargs):
        land()
        return write(*args, **kwargs)

    monkeypatch.setattr(raw_data_record, name, landing)


@pytest.mark.parametrize(
    "insecure, writer, landed, refusal",
    [
        (False, "_create_exclusively", INSECURE_NAME, "insecure deterministic run disclosed"),
        (True, "write_atomic", RECORD_NAME, "used by a secure distillation run"),
    ],
    ids=["secure-run-racing-an-insecure-one", "insecure-run-racing-a-secure-one"],
)
def test_runs_of_both_kinds_racing_do_not_both_go_on(
    tmp_path, monkeypatch, insecure, writer, landed, refusal
):
    from host.distil.raw_data_record import claim_raw_data

    pass_dir = tmp_path / "pass"
    (pass_dir / "satellite").mkdir(parents=True)
    rivals = pass_dir / "satellite" / landed
    _landing_first(monkeypatch, writer, lambda: rivals.write_text("{}"))
    with pytest.raises(ProtocolAborted, match=refusal):
        claim_raw_data(pass_dir, "0" * 64, insecure=insecure)
    if not insecure:  # its own record stays: the pass is burnt for any later secure run
        assert (pass_dir / "satellite" / RECORD_NAME).exists()


def test_two_secure_runs_on_the_passs_two_layouts_do_not_both_go_on(tmp_path, monkeypatch):
    """Without a ledger, a run given the pass before satellite/ existed writes its record in
    the pass directory, one after in satellite/: O_EXCL guards two different files."""
    from host.distil.raw_data_record import claim_raw_data

    pass_dir = tmp_path / "pass"
    pass_dir.mkdir()

    def other_run_with_satellite():
        (pass_dir / "satellite").mkdir()
        (pass_dir / "satellite" / RECORD_NAME).write_text("{}")

    _landing_first(monkeypatch, "_create_exclusively", other_run_with_satellite)
    with pytest.raises(ProtocolAborted, match="already used"):
        claim_raw_data(pass_dir, "0" * 64)


def test_a_run_does_not_take_its_own_record_reached_by_another_layout_for_a_rival(tmp_path):
    from host.distil.raw_data_record import claim_raw_data

    pass_dir = tmp_path / "pass"
    pass_dir.mkdir()
    (pass_dir / "satellite").symlink_to(".")  # both layouts name the same directory
    assert claim_raw_data(pass_dir, "0" * 64).exists()
    with pytest.raises(ProtocolAborted, match="already used"):
        claim_raw_data(pass_dir, "0" * 64)


def test_an_insecure_run_takes_no_record_for_its_own(tmp_path, monkeypatch):
    """A rerun's marker replaces the last one by rename, which frees its inode, and the
    file system gave it straight to a secure run's new record: an insecure run that counted
    its marker's inode as its own took that record for its marker and went on (a cold
    review, with real processes). Here the record lands as the marker's own inode."""
    from host.distil import raw_data_record
    from host.distil.raw_data_record import claim_raw_data

    pass_dir = tmp_path / "pass"
    (pass_dir / "satellite").mkdir(parents=True)
    write = raw_data_record.write_atomic

    def write_then_record_on_its_inode(path, *args, **kwargs):
        write(path, *args, **kwargs)
        os.link(path, pass_dir / "satellite" / RECORD_NAME)

    monkeypatch.setattr(raw_data_record, "write_atomic", write_then_record_on_its_inode)
    with pytest.raises(ProtocolAborted, match="used by a secure distillation run"):
        claim_raw_data(pass_dir, "0" * 64, insecure=True)


def test_a_ledger_marker_that_cannot_be_written_is_a_refusal_naming_the_ledger_only(tmp_path):
    """The ledger's file names are the raw data's fingerprint: a write that fails (here a
    directory in the marker's place) is refused as the other refusals are, by the ledger's
    name (before: the OSError's text, fingerprint and all)."""
    from host.distil.raw_data_record import claim_raw_data, ledger_paths

    pass_dir, ledger = tmp_path / "pass", tmp_path / "ledger"
    (pass_dir / "satellite").mkdir(parents=True)
    ledger.mkdir(mode=0o700)
    fingerprint = "ab" * 32
    ledger_paths(ledger, fingerprint)[1].mkdir()
    with pytest.raises(ProtocolAborted) as refused:
        claim_raw_data(pass_dir, "0" * 64, insecure=True, ledger=ledger, fingerprint=fingerprint)
    assert f"raw-data ledger {ledger}: cannot write this run's marker" in str(refused.value)
    assert fingerprint not in str(refused.value)
    assert not (pass_dir / "satellite" / INSECURE_NAME).exists()

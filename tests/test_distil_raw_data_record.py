"""One key per pass: Alice marks a pass's raw data used before her first message that
depends on it (host/distil/raw_data_record.py) and refuses the pass after. Two keys hashed
from the same raw bits, each after its own disclosures, together hold about twice what
privacy amplification allows."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from distil_passgen import make_pass

from host.cli import main as qkdsat
from host.distil.raw_data_record import INSECURE_NAME, RECORD_NAME

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

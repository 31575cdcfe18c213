"""`make bench`: the SIGKILL campaign on the authentication pool (item 1 of the
distillation security issue): at least 200 random SIGKILLs of Alice or Bob in split mode
(`qkdsat distil --role alice|bob`, two processes over TCP through a recording relay), and
not one pool byte used twice across the sessions (tests/pool_kill_campaign.py checks every
tag on the wire against the pool offsets it charges)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from distil_passgen import make_pass  # noqa: E402
from pool_kill_campaign import run_campaign  # noqa: E402

KILLS = 200


@pytest.mark.timeout(7200)  # whole passes / hundreds of sessions
def test_bench_two_hundred_sigkills_reuse_no_pad(tmp_path):
    pass_dir = make_pass(tmp_path / "pass", duration_s=0.2, seed=3)
    t0 = time.perf_counter()
    stats = run_campaign(pass_dir, tmp_path / "campaign", KILLS, seed=2026)
    wall = time.perf_counter() - t0
    assert stats["kills"] >= KILLS
    assert stats["kills_alice"] > 0 and stats["kills_bob"] > 0
    print(
        f"\nauth pool SIGKILL campaign: {stats['kills']} kills (Alice {stats['kills_alice']}, "
        f"Bob {stats['kills_bob']}; {stats['survivor_kills']} survivors killed after the "
        f"grace time) over {stats['sessions']} sessions, {stats['tags_checked']} tags checked "
        f"against the pool, {stats['bytes_used']} pool bytes used, none twice; records end "
        f"at {stats['records']}; {wall:.0f} s"
    )

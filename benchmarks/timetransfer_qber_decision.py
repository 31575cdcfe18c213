"""The timing QBER's decision, old rule and new (docs/time-transfer.md, "The timing QBER's
decision" and "The timing QBER's decision on small passes, old rule and new").

    python benchmarks/timetransfer_qber_decision.py table
    python benchmarks/timetransfer_qber_decision.py alternatives
    python benchmarks/timetransfer_qber_decision.py passes --extra-db 9 --passes 600
    python benchmarks/timetransfer_qber_decision.py stream --extra-db 9 --passes 150

`table`: exact binomial (scipy.stats.binom) by sifted downlink events: the old rule (a
sample of 10 % of them, at least 256, at most 8,192; abort when errors / n > 3 %) against
estimate.qber_check's (every one up to 8,192, vouched up to qber_vouch_max_errors(n)):
how often a clean pass is not vouched for, how often an attack is; then the uplink's
levels. `alternatives`: the rules tried and not taken (a 99.9 % lower confidence bound
above 3 % to abort, a 99.9 % upper one under 3 % to vouch).

`passes` and `stream`: small passes through the real code path (simulate.simulate, then
command.run_endpoints or stream.run_streaming, the ground's sample from the CSPRNG): 1 s
(2 s streamed) slices of micius-qstt at culmination, seeds --first-seed onward, the ground
transmitter's key fixed, the downlink --extra-db weaker. An intercept-resend
(--intercept-resend, a fraction of the photons) acts on the downlink only: the uplink's
check would otherwise stop the run first. They import whatever tree PYTHONPATH names, so
the old rule runs on the tree before it (`git worktree add /tmp/old 8baf848`, then
`PYTHONPATH=/tmp/old python benchmarks/timetransfer_qber_decision.py passes ...`). Prints
a line a pass (`--each`) and a summary: passes not vouched for, by reason."""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from collections import Counter
from pathlib import Path

from scipy.stats import binom

OLD_SAMPLE_FRACTION, OLD_SAMPLE_MIN, SAMPLE_MAX = 0.1, 256, 8192
QBER_MAX = 0.03
SIFTED_COUNTS = (200, 256, 400, 500, 700, 1000, 1500, 2560, 4096, 8192, 20000, 81920)
UPLINK_LEVELS = ((500, 0.007), (1372, 0.0075), (6400, 0.005))


def old_sample_size(sifted: int) -> int:
    return min(sifted, max(OLD_SAMPLE_MIN, int(OLD_SAMPLE_FRACTION * sifted)), SAMPLE_MAX)


def limit_errors(n: int) -> int:
    """The most errors under the limit alone: errors / n <= 3 %, in integers."""
    return (3 * n) // 100


def table() -> None:
    from host.timetransfer import estimate

    def both(old_n, old_c, new_n, new_c, tail, qber):
        return f"{tail(old_c, old_n, qber):.1e} / {tail(new_c, new_n, qber):.1e}"

    print(
        "| sifted downlink events | old n | new n (vouched up to) | not vouched, clean "
        "1.2 %, old / new | clean 1.5 % | clean 2.0 % | vouched, attack 3.7 %, old / new "
        "| attack 5 % |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for sifted in SIFTED_COUNTS:
        old_n, new_n = old_sample_size(sifted), min(sifted, SAMPLE_MAX)
        old_c, new_c = limit_errors(old_n), estimate.qber_vouch_max_errors(new_n)
        refused = [both(old_n, old_c, new_n, new_c, binom.sf, q) for q in (0.012, 0.015, 0.02)]
        vouched = [both(old_n, old_c, new_n, new_c, binom.cdf, q) for q in (0.037, 0.05)]
        print(
            f"| {sifted:,} | {old_n:,} | {new_n:,} ({new_c}) | " + " | ".join(refused + vouched)
            + " |"
        )  # fmt: skip
    print()
    for n, qber in UPLINK_LEVELS:
        old = binom.sf(limit_errors(n), n, qber)
        new = binom.sf(estimate.qber_vouch_max_errors(n), n, qber)
        print(f"uplink {n} events at {qber:.2%}: not vouched, old {old:.1e}, new {new:.1e}")
    alone = [n for n in range(1, 20001) if estimate.qber_vouch_max_errors(n) < limit_errors(n)]
    print(f"the attack bound is stricter than the limit up to n = {max(alone)}; from "
          f"{max(alone) + 1} on the limit decides alone")  # fmt: skip


def alternatives() -> None:
    def lcb_abort_from(n):  # the fewest errors whose 99.9 % lower bound is above 3 %
        k = 0
        while binom.sf(k - 1, n, QBER_MAX) > 1e-3:
            k += 1
        return k

    def ucb_vouch_up_to(n):  # the most errors whose 99.9 % upper bound is under 3 %
        c = limit_errors(n)
        while c >= 0 and binom.cdf(c, n, QBER_MAX) > 1e-3:
            c -= 1
        return c

    for n in (256, 1000, 2560, 8192):
        a, u = lcb_abort_from(n), ucb_vouch_up_to(n)
        print(
            f"n {n}: LCB aborts from {a} errors, vouches 5 % {binom.cdf(a - 1, n, 0.05):.2e}, "
            f"3.7 % {binom.cdf(a - 1, n, 0.037):.2e} | UCB vouches up to {u}, refuses "
            f"clean 1.2 % {binom.sf(u, n, 0.012):.2e}, vouches 3 % {binom.cdf(u, n, 0.03):.1e}"
        )


def small_profile(extra_db: float, misalignment: float) -> dict:
    from host.timetransfer import simulate

    profile = simulate.load_profile("micius-qstt")
    for field in ("loss_db_at_645_km", "loss_db_at_1200_km"):
        profile["downlink"][field]["value"] += extra_db
    profile["downlink"]["misalignment_error"]["value"] = misalignment
    return profile


def attack_the_downlink_only() -> None:
    from host.timetransfer import simulate

    events = simulate.direction_events

    def downlink_only(direction, *args, **kwargs):
        if (
            direction == "uplink"
        ):  # args: link, orbit, duration_s, delays, sat, ground, rng, attack
            args = (*args[:7], {**args[7], "intercept_resend": 0.0}, *args[8:])
        return events(direction, *args, **kwargs)

    simulate.direction_events = downlink_only


def outcome_of(report: dict) -> str:
    """vouched, above the limit, undecided (either rule's words), or the other reason."""
    reason = report.get("abort_reason")
    if not reason:
        return "vouched"
    if "too small to vouch" in reason:
        return "undecided"
    if "timing QBER" in reason and "above" in reason:
        return "above the limit"
    return reason.split(":")[0]


def run_passes(args, streamed: bool) -> None:
    from host.errors import ProtocolAborted
    from host.timetransfer import command, files, simulate, stream
    from tests.network_keys import distilled

    attack_the_downlink_only()
    profile = small_profile(args.extra_db, args.misalignment)
    work = Path(tempfile.mkdtemp(prefix="tt-qber-decision-"))
    distilled(work / "keys0", 64_000, "a pass")
    duration_s = 2.0 if streamed else 1.0
    outcomes, sifted_counts, sifted_errors = Counter(), [], 0
    started = time.time()
    try:
        for i in range(args.passes):
            pass_dir = work / "pass"
            shutil.rmtree(pass_dir, ignore_errors=True)
            simulate.simulate(profile, pass_dir, args.first_seed + i, duration_s,
                              uplink_key=bytes(range(32)),
                              intercept_resend=args.intercept_resend)  # fmt: skip
            _, sent_basis, sent_bit = files.read_events(pass_dir)["downlink_tx"]
            _, got_basis, got_bit = files.read_events(pass_dir)["downlink_rx"]
            sifted = sent_basis == got_basis
            sifted_counts.append(int(sifted.sum()))
            sifted_errors += int((sent_bit[sifted] != got_bit[sifted]).sum())
            keys = work / "keys"
            shutil.rmtree(keys, ignore_errors=True)
            shutil.copytree(work / "keys0", keys)
            try:
                if streamed:
                    report, _ = stream.run_streaming(pass_dir, keys, args.block_s, speedup=1e3)
                else:
                    report = command.run_endpoints(files.read_scenario(pass_dir), pass_dir, keys)
            except ProtocolAborted as error:
                report = error.report
            outcomes[outcome_of(report)] += 1
            reason = report.get("abort_reason") or "vouched"
            if args.each:
                print(json.dumps({"seed": args.first_seed + i, "sifted": sifted_counts[-1],
                                  "sample": report.get("qber_sample", {}).get("downlink"),
                                  "outcome": reason}))  # fmt: skip
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps({
        "passes": args.passes, "streamed": streamed, "extra_db": args.extra_db,
        "misalignment": args.misalignment, "intercept_resend": args.intercept_resend,
        "sifted_downlink": [min(sifted_counts), max(sifted_counts)],
        "true_downlink_qber": sifted_errors / sum(sifted_counts),
        "not_vouched": args.passes - outcomes["vouched"], "outcomes": dict(outcomes),
        "seconds": round(time.time() - started, 1),
    }))  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("table")
    commands.add_parser("alternatives")
    for name in ("passes", "stream"):
        sub = commands.add_parser(name)
        sub.add_argument("--extra-db", type=float, default=9.0)
        sub.add_argument("--misalignment", type=float, default=0.005)
        sub.add_argument("--intercept-resend", type=float, default=0.0)
        sub.add_argument("--passes", type=int, default=20)
        sub.add_argument("--first-seed", type=int, default=1000 if name == "passes" else 2000)
        sub.add_argument("--block-s", type=float, default=0.5)
        sub.add_argument("--each", action="store_true")
    args = parser.parse_args()
    if args.command == "table":
        table()
    elif args.command == "alternatives":
        alternatives()
    else:
        run_passes(args, streamed=args.command == "stream")


if __name__ == "__main__":
    main()

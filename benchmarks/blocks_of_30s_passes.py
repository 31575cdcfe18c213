"""Each block's error correction on 30 s passes, to see where a pass's f comes from
(docs/distillation.md "Where a 30 s pass's worst f comes from").

    python benchmarks/blocks_of_30s_passes.py --seeds 1 2 3 4 5 6 --runs 2

Simulation seed s of --profile (30 s), distilled --runs times post-pass with the
endpoints' CSPRNG, each run on a fresh copy of the raw data (a pass's raw data is
distilled once: raw-data-used.json). Prints the pass's f, key and seconds, then per block:
its f against its own error rate, the QBER it was sized for and its sample's, the frame
length, mother rate, punctured and shortened bits, the first request and all the bits
revealed, the retry rounds, the mean iterations and the decoder's seconds. The first pass
also compiles or loads the decoders (its seconds say so). Passes are kept under --work."""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

from host.distil.finite_key import binary_entropy
from host.distil.protocol import Config
from host.distil.run import run_local


def block_line(block: dict) -> str:
    q_true = block["errors"] / block["bits"]
    block_f = block["leak_bits"] / (block["bits"] * binary_entropy(q_true))
    return (
        f"  block {block['bits']} bits: f {block_f:.3f}, QBER {q_true:.4f}, sized for "
        f"{block['qber_sized_for']:.4f} (sample {block.get('qber_sample', 0):.4f} of "
        f"{block.get('sample_bits')}), frame 2^{block['frame_bits'].bit_length() - 1}, "
        f"mother rate {block['mother_rate']}, punctured {block['punctured']}, shortened "
        f"{block['shortened']}, first request {block['first_request_bits']}, revealed "
        f"{block['revealed_bits']}, rounds {block['retry_rounds']}, iterations "
        f"{block['mean_iterations']:.0f}, decoder {block['decoder_seconds']:.2f} s"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="micius-2017")
    parser.add_argument("--tail", default="hoeffding", choices=["hoeffding", "chernoff"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--runs", type=int, default=2, help="distillations of each pass")
    parser.add_argument("--work", type=Path, default=Path("/tmp/blocks_of_30s_passes"))
    args = parser.parse_args()
    for seed in args.seeds:
        source = args.work / f"{args.profile}-{seed}"
        if not source.exists():
            argv = [sys.executable, "-m", "host.cli", "simulate", "--profile", args.profile]
            argv += ["--seed", str(seed), "--duration-s", "30", "--out", str(source)]
            subprocess.run(argv + ["--quiet"], check=True)
        for run in range(args.runs):
            copy, out = args.work / f"run-{seed}-{run}", args.work / f"out-{seed}-{run}"
            shutil.rmtree(copy, ignore_errors=True)
            shutil.rmtree(out, ignore_errors=True)
            shutil.copytree(source, copy)
            report = run_local(copy, out, Config(tail=args.tail))
            ec = report["ec"]
            print(
                f"seed {seed} run {run}: f {ec['efficiency']:.3f}, key {report['key_bits']} "
                f"bits, {report['stage_seconds']['total']:.2f} s"
            )
            for block in ec["blocks"]:
                print(block_line(block), flush=True)


if __name__ == "__main__":
    main()

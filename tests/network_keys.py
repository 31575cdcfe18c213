"""Distillation outputs for network tests, written by the distillation's own writer
(host.distil.run.finish) around fresh random keys: the format the pools read, without
the minute a real pass takes (tests/test_network_relay.py distils real passes)."""

from __future__ import annotations

import hashlib
import secrets
from pathlib import Path

import numpy as np

from host.distil.run import finish


def distilled(out_dir: Path, key_bits: int, pass_name: str) -> bytes:
    """A `qkdsat distil --out` directory with alice.key == bob.key of key_bits random bits;
    returns the key's whole bytes (what a pool takes in)."""
    bits = np.unpackbits(np.frombuffer(secrets.token_bytes((key_bits + 7) // 8), np.uint8))
    bits = bits[:key_bits]
    report = {
        "aborted": False,
        "key_bits": key_bits,
        "deterministic_randomness": False,
        "inputs": {"pass_dir": pass_name,
                   "pass_json_sha256": hashlib.sha256(pass_name.encode()).hexdigest()},
    }  # fmt: skip
    finish(Path(out_dir), report, {"alice": bits, "bob": bits.copy()})
    return np.packbits(bits[: 8 * (key_bits // 8)]).tobytes()

"""The byte-wise COBS of host/protocol/framing.py before it was vectorised (one Python step
per block), kept verbatim as the reference the fast codec must match byte for byte
(tests/test_framing.py) and as the "before" of benchmarks/bench_pattern_port.py."""

from __future__ import annotations


class ReferenceCobsError(ValueError):
    pass


def cobs_encode(data: bytes) -> bytes:
    out = bytearray()
    runs = bytes(data).split(b"\x00")
    last = len(runs) - 1
    for index, run in enumerate(runs):
        while len(run) >= 254:
            out.append(0xFF)
            out += run[:254]
            run = run[254:]
            if not run and index == last:
                return bytes(out)
        out.append(len(run) + 1)
        out += run
    return bytes(out)


def cobs_decode(data: bytes) -> bytes:
    out = bytearray()
    i = 0
    while i < len(data):
        code = data[i]
        if code == 0:
            raise ReferenceCobsError(f"zero byte at offset {i} inside a COBS block")
        end = i + code
        if end > len(data):
            raise ReferenceCobsError(
                f"COBS code at offset {i} runs past the end ({len(data)} bytes)"
            )
        block = data[i + 1 : end]
        if 0 in block:
            raise ReferenceCobsError(f"zero byte inside COBS block starting at offset {i}")
        out += block
        i = end
        if code != 0xFF and i < len(data):
            out.append(0)
    return bytes(out)

"""`qkdsat timetags`: convert ground time-tagger files to and from the detections format.

    qkdsat timetags IN --out OUT [--from FORMAT] [--to FORMAT]

Formats: qdet (internal, docs/formats.md), ptu (PicoQuant T2), qutag (quTAG binary with
its 40-byte header), qutag-raw (the same without header), csv. Guessed from the file
extension (.qdet, .ptu, .bin, .csv) when not given.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from host.errors import BadInput
from host.formats import ptu, qutag, tagcsv
from host.formats.qdet import read_detections, write_detections

FORMATS = ("qdet", "ptu", "qutag", "qutag-raw", "csv")
_BY_SUFFIX = {".qdet": "qdet", ".ptu": "ptu", ".bin": "qutag", ".csv": "csv"}
CHANNEL_NAMES = {"0": "H", "1": "V", "2": "D", "3": "A"}


def guess_format(path: str | Path, given: str | None) -> str:
    if given:
        return given
    fmt = _BY_SUFFIX.get(Path(path).suffix.lower())
    if fmt is None:
        raise BadInput(f"{path}: cannot tell the format from the extension; give --from/--to")
    return fmt


def read_tags(path: str | Path, fmt: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Detections (time_ps int64 sorted, channel int16) from any supported file."""
    fmt = guess_format(path, fmt)
    if fmt == "qdet":
        time_ps, channel, _ = read_detections(path)
    elif fmt == "ptu":
        time_ps, channel, _ = ptu.read_ptu(path)
    elif fmt in ("qutag", "qutag-raw"):
        time_ps, channel = qutag.read_qutag(path, header=fmt == "qutag")
    elif fmt == "csv":
        time_ps, channel = tagcsv.read_csv(path)
    else:
        raise BadInput(f"unknown time-tag format {fmt!r}: use one of {', '.join(FORMATS)}")
    return time_ps, channel


def write_tags(path: str | Path, time_ps, channel, fmt: str | None = None) -> None:
    fmt = guess_format(path, fmt)
    if fmt == "qdet":
        write_detections(path, time_ps, channel, {"clock": "ground", "channels": CHANNEL_NAMES})
    elif fmt == "ptu":
        ptu.write_ptu(path, time_ps, channel)
    elif fmt in ("qutag", "qutag-raw"):
        qutag.write_qutag(path, time_ps, channel, header=fmt == "qutag")
    elif fmt == "csv":
        tagcsv.write_csv(path, time_ps, channel)
    else:
        raise BadInput(f"unknown time-tag format {fmt!r}: use one of {', '.join(FORMATS)}")


def add_arguments(parser) -> None:
    parser.add_argument("input", help="time-tag file to read")
    parser.add_argument("--out", required=True, help="file to write")
    parser.add_argument(
        "--from",
        dest="from_format",
        choices=FORMATS,
        help="input format (default: from the file name's extension)",
    )
    parser.add_argument(
        "--to",
        dest="to_format",
        choices=FORMATS,
        help="output format (default: from the file name's extension)",
    )


def run(args) -> int:
    from host.outdir import check_output_file

    check_output_file(args.out)
    time_ps, channel = read_tags(args.input, args.from_format)
    try:
        write_tags(args.out, time_ps, channel, args.to_format)
    except ValueError as error:
        raise BadInput(f"{args.out}: cannot write ({error})") from None
    print(f"{args.input} -> {args.out}: {time_ps.size} detections")
    return 0

"""PicoQuant PTU files, T2 mode (docs/formats.md, "Time-tagger files"): read and write.

    "PQTTTR\\0\\0" | version (8 bytes) | tags ... "Header_End" | records (u32 each)

A tag is ident (32 bytes, NUL padded) | index i32 | type u32 | value 8 bytes; strings and
blobs put their byte length in the value and follow it with the bytes. The reader needs
`TTResultFormat_TTTRRecType`, `TTResult_NumberOfRecords` and `MeasDesc_GlobalResolution`.

T2 records, HydraHarp V2 / TimeHarp 260 / MultiHarp layout (what we write, as
rtMultiHarpT2): special (bit 31) | channel (bits 25-30) | time (bits 0-24). special=1
and channel=63 is an overflow: the time field counts wraps of 2**25 (0 meaning 1).
HydraHarp V1 (rtHydraHarpT2) has the same layout but every overflow adds 33552000.
special=1 with channel 0 is a sync, 1..15 a marker; both are skipped. PicoHarp T2 (read
only): channel (bits 28-31) | time (bits 0-27); channel 15 with marker bits 0 is an
overflow of 210698240 units.

Times are unwrapped in int64 units of the global resolution, then scaled to integer
picoseconds (never through floats when the resolution is whole picoseconds).
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

from host.errors import BadInput

MAGIC = b"PQTTTR\x00\x00"
VERSION = b"1.0.00\x00\x00"
TAG_HEAD = struct.Struct("<32siI")

TY_EMPTY8 = 0xFFFF0008
TY_BOOL8 = 0x00000008
TY_INT8 = 0x10000008
TY_BITSET64 = 0x11000008
TY_COLOR8 = 0x12000008
TY_FLOAT8 = 0x20000008
TY_TDATETIME = 0x21000008
TY_FLOAT8ARRAY = 0x2001FFFF
TY_ANSISTRING = 0x4001FFFF
TY_WIDESTRING = 0x4002FFFF
TY_BINARYBLOB = 0xFFFFFFFF
_VARIABLE = {TY_FLOAT8ARRAY, TY_ANSISTRING, TY_WIDESTRING, TY_BINARYBLOB}

RT_PICOHARP_T2 = 0x00010203
RT_HYDRAHARP_T2 = 0x00010204
RT_HYDRAHARP2_T2 = 0x01010204
RT_TIMEHARP260N_T2 = 0x00010205
RT_TIMEHARP260P_T2 = 0x00010206
RT_MULTIHARP_T2 = 0x00010207
_HYDRA_LAYOUT = {RT_HYDRAHARP_T2, RT_HYDRAHARP2_T2, RT_TIMEHARP260N_T2, RT_TIMEHARP260P_T2,
                 RT_MULTIHARP_T2}  # fmt: skip
T3_TYPES = {0x00010303, 0x00010304, 0x01010304, 0x00010305, 0x00010306, 0x00010307}

WRAP_HYDRA = 1 << 25
WRAP_HYDRA_V1 = 33552000  # HydraHarp V1 T2 (rtHydraHarpT2) wraps at this, not 2**25
WRAP_PICOHARP = 210698240
MAX_TAG_BYTES = 1 << 24
_MAX_TAGS = 100_000


def _tag(ident: str, type_code: int, value: bytes, index: int = -1, extra: bytes = b"") -> bytes:
    return TAG_HEAD.pack(ident.encode()[:32], index, type_code) + value + extra


def _int8(ident: str, value: int) -> bytes:
    return _tag(ident, TY_INT8, struct.pack("<q", value))


def _string(ident: str, text: str) -> bytes:
    data = text.encode() + b"\x00"
    data += b"\x00" * (-len(data) % 8)
    return _tag(ident, TY_ANSISTRING, struct.pack("<q", len(data)), extra=data)


def write_ptu(
    path: str | Path, time_ps: np.ndarray, channel: np.ndarray, comment: str = "qkdsat"
) -> None:
    """T2 file (rtMultiHarpT2, 1 ps resolution) holding the detections; record channel =
    detection channel (0 = H ... 3 = A). Times must be >= 0 and sorted."""
    time_ps = np.asarray(time_ps, dtype=np.int64)
    channel = np.asarray(channel, dtype=np.int64)
    if time_ps.size and (time_ps[0] < 0 or np.any(np.diff(time_ps) < 0)):
        raise ValueError("PTU T2 needs sorted, non-negative times")
    if channel.size and (channel.min() < 0 or channel.max() > 62):
        raise ValueError("PTU T2 channels are 0..62")
    wraps = time_ps // WRAP_HYDRA
    step = np.diff(wraps, prepend=np.int64(0))
    # An overflow record carries up to 2**25 - 1 wraps; big steps take several records.
    per_event = np.where(step > 0, -(-step // (WRAP_HYDRA - 1)), 0)
    total = int(per_event.sum()) + time_ps.size
    records = np.empty(total, dtype="<u4")
    event_pos = np.arange(time_ps.size) + np.cumsum(per_event)
    records[event_pos] = (channel.astype(np.uint32) << 25) | (time_ps % WRAP_HYDRA).astype(
        np.uint32
    )
    overflow_mask = np.ones(total, dtype=bool)
    overflow_mask[event_pos] = False
    counts = []
    for remaining in step[per_event > 0].tolist():
        while remaining > 0:
            counts.append(min(remaining, WRAP_HYDRA - 1))
            remaining -= counts[-1]
    records[overflow_mask] = np.uint32(0xFE000000) | np.array(counts, dtype=np.uint32)
    head = MAGIC + VERSION
    head += _string("File_Comment", comment)
    head += _int8("Measurement_Mode", 2)
    head += _int8("Measurement_SubMode", 0)
    head += _int8("TTResultFormat_TTTRRecType", RT_MULTIHARP_T2)
    head += _int8("TTResultFormat_BitsPerRecord", 32)
    head += _int8("TTResult_NumberOfRecords", total)
    head += _tag("MeasDesc_Resolution", TY_FLOAT8, struct.pack("<d", 1e-12))
    head += _tag("MeasDesc_GlobalResolution", TY_FLOAT8, struct.pack("<d", 1e-12))
    head += _tag("Header_End", TY_EMPTY8, b"\x00" * 8)
    path = Path(path)
    with open(path, "wb") as handle:
        handle.write(head)
        handle.write(records.tobytes())


def read_ptu_header(data: bytes, origin: str) -> tuple[dict, int]:
    if len(data) < 16 or data[:8] != MAGIC:
        raise BadInput(f"{origin}: not a PicoQuant PTU file (magic {data[:8]!r})")
    tags: dict[str, object] = {}
    offset = 16
    for _ in range(_MAX_TAGS):
        if offset + TAG_HEAD.size + 8 > len(data):
            raise BadInput(f"{origin}: PTU header truncated at byte {offset} (no Header_End)")
        raw_ident, index, type_code = TAG_HEAD.unpack_from(data, offset)
        ident = raw_ident.split(b"\x00", 1)[0].decode("ascii", "replace")
        value_bytes = data[offset + TAG_HEAD.size : offset + TAG_HEAD.size + 8]
        offset += TAG_HEAD.size + 8
        if index > -1:
            ident = f"{ident}({index})"
        if type_code in _VARIABLE:
            (length,) = struct.unpack("<q", value_bytes)
            if not 0 <= length <= MAX_TAG_BYTES or offset + length > len(data):
                raise BadInput(f"{origin}: PTU tag {ident} claims {length} bytes, file too short")
            blob = data[offset : offset + length]
            offset += length
            if type_code == TY_ANSISTRING:
                tags[ident] = blob.split(b"\x00", 1)[0].decode("latin-1")
            elif type_code == TY_WIDESTRING:
                tags[ident] = blob.decode("utf-16-le", "replace").split("\x00", 1)[0]
            else:
                tags[ident] = blob
        elif type_code in (TY_FLOAT8, TY_TDATETIME):
            tags[ident] = struct.unpack("<d", value_bytes)[0]
        elif type_code in (TY_INT8, TY_BITSET64, TY_COLOR8, TY_BOOL8, TY_EMPTY8):
            tags[ident] = struct.unpack("<q", value_bytes)[0]
        else:
            raise BadInput(f"{origin}: PTU tag {ident} has unknown type 0x{type_code:08X}")
        if ident == "Header_End":
            return tags, offset
    raise BadInput(f"{origin}: PTU header has no Header_End in {_MAX_TAGS} tags")


def read_ptu(path: str | Path) -> tuple[np.ndarray, np.ndarray, dict]:
    """(time_ps int64 sorted, channel int16, header tags) of a T2 PTU file."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as error:
        raise BadInput(f"{path}: cannot read ({error.strerror})") from None
    tags, offset = read_ptu_header(data, str(path))
    for required in (
        "TTResultFormat_TTTRRecType",
        "TTResult_NumberOfRecords",
        "MeasDesc_GlobalResolution",
    ):
        if required not in tags:
            raise BadInput(f"{path}: PTU header lacks {required}")
    rec_type = int(tags["TTResultFormat_TTTRRecType"])
    if rec_type in T3_TYPES:
        raise BadInput(f"{path}: T3-mode PTU (0x{rec_type:08X}); only T2 time tags are supported")
    if rec_type not in _HYDRA_LAYOUT and rec_type != RT_PICOHARP_T2:
        raise BadInput(f"{path}: unknown PTU record type 0x{rec_type:08X}")
    count = int(tags["TTResult_NumberOfRecords"])
    body = len(data) - offset
    if body < 4 * count:
        raise BadInput(
            f"{path}: truncated: header says {count} records, {body} bytes hold {body // 4}"
        )
    records = np.frombuffer(data, dtype="<u4", count=count, offset=offset).astype(np.int64)
    if rec_type == RT_PICOHARP_T2:
        chan = records >> 28
        tt = records & 0x0FFFFFFF
        overflow = (chan == 15) & ((records & 0xF) == 0)
        wraps = np.cumsum(overflow.astype(np.int64)) * WRAP_PICOHARP
        photon = chan != 15
    else:
        special = records >> 31
        chan = (records >> 25) & 0x3F
        tt = records & 0x1FFFFFF
        overflow = (special == 1) & (chan == 63)
        if rec_type == RT_HYDRAHARP_T2:  # HydraHarp V1: each overflow is one fixed wrap
            wraps = np.cumsum(overflow.astype(np.int64)) * WRAP_HYDRA_V1
        else:
            wraps = np.cumsum(np.where(overflow, np.maximum(tt, 1), 0)) * WRAP_HYDRA
        photon = special == 0
    units = wraps[photon] + tt[photon]
    resolution_ps = float(tags["MeasDesc_GlobalResolution"]) * 1e12
    if abs(resolution_ps - round(resolution_ps)) < 1e-6 and round(resolution_ps) >= 1:
        time_ps = units * int(round(resolution_ps))
    else:
        time_ps = np.rint(units * resolution_ps).astype(np.int64)
    channel = chan[photon].astype(np.int16)
    order = np.argsort(time_ps, kind="stable")
    return time_ps[order], channel[order], tags

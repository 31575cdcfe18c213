# The link key's own region (docs/ground-link.md, "Key storage"): outside the filesystem,
# so formatting storage (a board does it when littlefs will not mount) cannot erase the key
# and leave the payload without one. Two slots, written alternately, so a power cut while
# writing leaves the previous key intact:
#   slot = magic u32 | sequence u32 | key length u32 | key (64 bytes, zero padded) | crc32 u32
# (little-endian; the CRC covers the 76 bytes before it). The valid slot with the larger
# sequence is the key. A region is anything with read(offset, n) -> bytes and
# write(offset, data): a reserved RAM/flash area on the boards, a file on the unix target.
#
# After the key slots, two more slots, written alternately the same way, hold coarse
# ceilings of the link's three counters (payload/telecommands.py), so that a storage
# format, which loses their ceilings in littlefs, never lets a counter value be used twice
# under a key the format kept:
#   slot = magic u32 | sequence u32 | key id (8 bytes) | telecommand ceiling u32 |
#          telemetry ceiling u32 | nonce ceiling u64 | crc32 u32
# (little-endian; the CRC covers the 32 bytes before it; the key id is the raw form of
# auth.key_id, of the key the telecommand ceiling counts for). A torn write leaves the
# previous record, whose ceilings were still above every value used: a counter passes a
# ceiling only after the record holding the next one was written.
from micropython import const

from payload.framing import Crc32

SLOT_BYTES = const(80)
CEILINGS_AT = const(160)  # after the two key slots
CEILINGS_BYTES = const(36)
REGION_BYTES = const(232)  # 2 x 80 + 2 x 36
MAX_KEY_BYTES = const(64)
MIN_KEY_BYTES = const(16)
KEY_ID_BYTES = const(8)
_MAGIC = b"QKEY"
_CEILINGS_MAGIC = b"QCTR"


def _crc(data):
    crc = Crc32()
    crc.update(data)
    return crc.value()


def _parse(slot):
    """(sequence, key) of a valid slot, else None."""
    if len(slot) != SLOT_BYTES or bytes(slot[0:4]) != _MAGIC:
        return None
    if int.from_bytes(slot[76:80], "little") != _crc(slot[:76]):
        return None
    length = int.from_bytes(slot[8:12], "little")
    if not MIN_KEY_BYTES <= length <= MAX_KEY_BYTES:
        return None
    return int.from_bytes(slot[4:8], "little"), bytes(slot[12 : 12 + length])


def _parse_ceilings(slot):
    """(sequence, (key id, telecommand, telemetry, nonce)) of a valid record, else None."""
    if len(slot) != CEILINGS_BYTES or bytes(slot[0:4]) != _CEILINGS_MAGIC:
        return None
    if int.from_bytes(slot[32:36], "little") != _crc(slot[:32]):
        return None
    return int.from_bytes(slot[4:8], "little"), (
        bytes(slot[8:16]),
        int.from_bytes(slot[16:20], "little"),
        int.from_bytes(slot[20:24], "little"),
        int.from_bytes(slot[24:32], "little"),
    )


def _newest(slots):
    best = None
    for slot in slots:
        if slot is not None and (best is None or slot[0] > best[0]):
            best = slot
    return None if best is None else best[1]


def _older(slots):
    """(index of the slot to write, its sequence): the older or invalid slot, so that the
    newer one stays intact until this write is complete."""
    sequences = [s[0] if s is not None else -1 for s in slots]
    return (0 if sequences[0] <= sequences[1] else 1), max(sequences) + 1


class KeyStore:
    def __init__(self, region):
        self.region = region

    def _slots(self):
        return [_parse(self.region.read(i * SLOT_BYTES, SLOT_BYTES)) for i in range(2)]

    def load(self):
        """The stored key, or None when no slot holds a valid one."""
        return _newest(self._slots())

    def store(self, key):
        """Write key into the older (or invalid) slot; the previous key stays in the other
        one until this write is complete. Then a second copy over the previous key: a
        retired key left readable in the region would be what a damaged newer slot falls
        back to, with its counter space gone (its ceilings name it no more)."""
        if not MIN_KEY_BYTES <= len(key) <= MAX_KEY_BYTES:
            raise ValueError("key: need 16..64 bytes")
        target, sequence = _older(self._slots())
        slot = bytearray(SLOT_BYTES)
        slot[0:4] = _MAGIC
        slot[8:12] = len(key).to_bytes(4, "little")
        slot[12 : 12 + len(key)] = key
        for index, number in ((target, sequence), (1 - target, sequence + 1)):
            slot[4:8] = number.to_bytes(4, "little")
            slot[76:80] = _crc(slot[:76]).to_bytes(4, "little")
            try:
                self.region.write(index * SLOT_BYTES, slot)
            except OSError:
                if index == target:
                    raise  # nothing stored: the caller says so
                # the key is stored; the previous one stays readable until the next store

    def _ceiling_slots(self):
        return [
            _parse_ceilings(self.region.read(CEILINGS_AT + i * CEILINGS_BYTES, CEILINGS_BYTES))
            for i in range(2)
        ]

    def load_ceilings(self):
        """(key id, telecommand, telemetry, nonce ceiling) of the newest valid record, or
        None when there is none."""
        return _newest(self._ceiling_slots())

    def store_ceilings(self, key_id, telecommand, telemetry, nonce):
        """Write a ceilings record into the older (or invalid) slot; raises OSError (or
        MemoryError) when the region cannot be written."""
        target, sequence = _older(self._ceiling_slots())
        slot = bytearray(CEILINGS_BYTES)
        slot[0:4] = _CEILINGS_MAGIC
        slot[4:8] = sequence.to_bytes(4, "little")
        slot[8:16] = key_id
        slot[16:20] = telecommand.to_bytes(4, "little")
        slot[20:24] = telemetry.to_bytes(4, "little")
        slot[24:32] = nonce.to_bytes(8, "little")
        slot[32:36] = _crc(slot[:32]).to_bytes(4, "little")
        self.region.write(CEILINGS_AT + target * CEILINGS_BYTES, slot)


class FileRegion:
    """A key region in a file of its own (the unix target, and tests)."""

    def __init__(self, path):
        self.path = path

    def read(self, offset, count):
        try:
            with open(self.path, "rb") as f:
                f.seek(offset)
                return f.read(count)
        except OSError:
            return b""

    def write(self, offset, data):
        current = bytearray(REGION_BYTES)
        try:
            with open(self.path, "rb") as f:
                old = f.read(REGION_BYTES)
            current[: len(old)] = old
        except OSError:
            pass
        current[offset : offset + len(data)] = data
        temporary = self.path + ".tmp"
        with open(temporary, "wb") as f:
            f.write(current)
        import os

        os.rename(temporary, self.path)


class MemoryRegion:
    """A key region in memory the filesystem never touches (uctypes over an address)."""

    def __init__(self, address):
        import uctypes

        self._mem = uctypes.bytearray_at(address, REGION_BYTES)

    def read(self, offset, count):
        return bytes(self._mem[offset : offset + count])

    def write(self, offset, data):
        self._mem[offset : offset + len(data)] = data


class BufferRegion(MemoryRegion):
    """A key region in a buffer the filesystem never touches (a board whose key sector
    cannot be emulated at a fixed address: netduino2, docs/targets.md)."""

    def __init__(self, buf):
        self._mem = buf

# Product files on the payload's storage, as the ground link sees them (contract with the
# data path, docs/ground-link.md): `<storage_root>/products/<name>`, read by offset and
# length, listed with size and CRC-32, deleted by name. The data path writes them; this
# module only reads and deletes. Names are checked so a telecommand can never reach a
# file outside the products folder (the link key lives next to it).
import os

try:
    from binascii import crc32 as _c_crc32  # C implementation where the port has it
except ImportError:
    _c_crc32 = None

from payload.framing import Crc32

PRODUCTS_DIR = "products"
MAX_NAME_BYTES = 48
_READ_BYTES = 1024


def valid_name(name):
    """Letters, digits, '.', '_', '-'; not starting with '.'; 1..MAX_NAME_BYTES bytes."""
    if not 0 < len(name) <= MAX_NAME_BYTES or name[0] == 0x2E:
        return False
    for byte in name:
        if not (
            0x30 <= byte <= 0x39
            or 0x41 <= byte <= 0x5A
            or 0x61 <= byte <= 0x7A
            or byte in (0x2E, 0x5F, 0x2D)
        ):
            return False
    return True


class Products:
    def __init__(self, storage_root):
        self.folder = storage_root + "/" + PRODUCTS_DIR
        self._scratch = bytearray(_READ_BYTES)
        self._crc_cache = {}  # name -> (size, crc32): files are append-only or replaced

    def path(self, name):
        return self.folder + "/" + name.decode()

    def names(self):
        try:
            entries = os.listdir(self.folder)
        except OSError:
            return []
        entries.sort()
        return [entry.encode() for entry in entries if valid_name(entry.encode())]

    def size(self, name):
        """Size in bytes, or -1 if there is no such product."""
        try:
            stat = os.stat(self.path(name))
        except OSError:
            return -1
        if stat[0] & 0x4000:  # a directory
            return -1
        return stat[6]

    def crc32(self, name, size):
        """CRC-32 (zlib) of the first `size` bytes, cached per (name, size)."""
        cached = self._crc_cache.get(name)
        if cached is not None and cached[0] == size:
            return cached[1]
        scratch = self._scratch
        view = memoryview(scratch)
        remaining = size
        crc = 0
        state = None if _c_crc32 else Crc32()
        with open(self.path(name), "rb") as f:
            while remaining > 0:
                count = f.readinto(view[: min(remaining, len(scratch))])
                if not count:
                    raise OSError(5)  # shorter than stat said: storage is changing
                if state is None:
                    crc = _c_crc32(view[:count], crc)
                else:
                    state.update(view, count)
                remaining -= count
        if state is not None:
            crc = state.value()
        self._crc_cache[name] = (size, crc)
        return crc

    def read_into(self, name, offset, view):
        """Read up to len(view) bytes at offset into view; returns the count."""
        with open(self.path(name), "rb") as f:
            f.seek(offset)
            total = 0
            while total < len(view):
                count = f.readinto(view[total:])
                if not count:
                    break
                total += count
        return total

    def delete(self, name):
        os.remove(self.path(name))
        self._crc_cache.pop(name, None)


def chunk_crc32(view, count):
    if _c_crc32:
        return _c_crc32(view[:count])
    state = Crc32()
    state.update(view, count)
    return state.value()

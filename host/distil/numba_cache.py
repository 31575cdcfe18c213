"""numba's on-disk cache, safe for processes that compile at the same time.

numba adds an entry to a kernel's cache index (`__pycache__/*.nbi`) by reading the index,
choosing the first free data file name (`<kernel>.<N>.nbc`), then writing index and data,
without a lock (numba 0.68.1, `numba/core/caching.py::IndexDataCacheFile.save`). Alice and
Bob are two processes on one machine in the emulated missions and the tests (and `make
test` runs two workers): two of them saving new specialisations of one kernel in the same
milliseconds can lose an entry, or both take `N.nbc`, and then one key's entry loads the
other's machine code until the sources change. Importing this module wraps that save in
an exclusive `flock` on `<index>.lock`, so the read, the choice of name and both writes are
one step among processes. Loading takes no lock: numba writes each file to a temporary
name and renames it, and a load that finds no data compiles.
"""

from __future__ import annotations

import fcntl
import os

from numba.core import caching

_INDEX_CACHE = caching.IndexDataCacheFile


def _locked_save(self, key, data, _save=_INDEX_CACHE.save):
    os.makedirs(self._cache_path, exist_ok=True)
    with open(self._index_path + ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        _save(self, key, data)


if not getattr(_INDEX_CACHE.save, "qkdsat_locked", False):
    _locked_save.qkdsat_locked = True
    _INDEX_CACHE.save = _locked_save

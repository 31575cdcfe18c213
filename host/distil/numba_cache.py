"""numba's on-disk cache, safe for processes that compile at the same time.

numba adds an entry to a kernel's cache index (`__pycache__/*.nbi`) by reading the index,
choosing the first data file name the index does not name (`<kernel>.<N>.nbc`), then
writing the index and then the data, without a lock (numba 0.68.1,
`numba/core/caching.py::IndexDataCacheFile.save`). Alice and Bob are two processes on one
machine in the emulated missions and the tests (and `make test` runs two workers): two of
them saving new specialisations of one kernel in the same milliseconds could lose an
entry, or both take `N.nbc`, and then one key's entry loaded the other's machine code
until the sources changed. And after a source edit the index starts empty, so the first
new entry named `1.nbc` while that file still held the old code: a process loading in the
gap between the index and the data write ran the old code.

Importing this module replaces that save: under an exclusive `flock` on `<index>.lock`,
it reads the index, takes a name neither the index nor the disk holds (a new key) or the
key's own, writes the data, then the index. A reader (loads take no lock) then finds
either no entry (it compiles) or an entry whose data is complete and its own: numba writes
each file to a temporary name and renames it. Stale `.nbc` files are no longer reused, so
they stay until `__pycache__` is removed (~1.8 MB an edit of ldpc_qc.py). Where the lock
file cannot be opened or locked, nothing is saved (the kernel compiles again next time).
Every module with cached kernels imports this.
"""

from __future__ import annotations

import fcntl
import itertools
import os

from numba.core import caching

_INDEX_CACHE = caching.IndexDataCacheFile


def _locked_save(self, key, data):
    try:
        lock = os.open(self._index_path + ".lock", os.O_RDONLY | os.O_CREAT, 0o666)
    except OSError:
        # No lock here (another user's folder): no save, rather than numba's unlocked one,
        # which could pair a key with the data of a locked writer's; the next process
        # compiles the kernel again
        return
    try:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
        except OSError:  # a file system without flock (NFS without its lock daemon)
            return
        overloads = self._load_index()
        data_name = overloads.get(key)
        if data_name is None:
            named = set(overloads.values())
            for number in itertools.count(1):
                data_name = self._data_name(number)
                on_disk = os.path.exists(os.path.join(self._cache_path, data_name))
                if data_name not in named and not on_disk:
                    break
        self._save_data(data_name, data)  # the data first: an entry never names old code
        overloads[key] = data_name
        self._save_index(overloads)
    finally:
        os.close(lock)  # releases the flock


if not getattr(_INDEX_CACHE.save, "qkdsat_locked", False):
    _locked_save.qkdsat_locked = True
    _INDEX_CACHE.save = _locked_save

"""numba's cache index among processes that compile at once (host/distil/numba_cache.py)."""

from __future__ import annotations

import multiprocessing

from numba.core import caching

import host.distil.numba_cache  # noqa: F401 - the lock under test

PROCESSES = 6
SAVES = 40
STAMP = ("kernel.py", 1.0, 1)


def _save_many(cache_dir: str, worker: int, start) -> None:
    index = caching.IndexDataCacheFile(cache_dir, "kernel", STAMP)
    start.wait()
    for n in range(SAVES):
        index.save(("signature", worker, n), f"machine code {worker}/{n}")


def test_processes_saving_one_kernels_specialisations_at_once_lose_and_share_none(tmp_path):
    """Alice and Bob (or two test workers) compiling new specialisations of one kernel at
    the same moment: every entry is in the index, under its own data file, and loads its
    own code. numba's unlocked save kept 99-129 of the 240 entries here (3 runs)."""
    context = multiprocessing.get_context("fork")
    start = context.Barrier(PROCESSES)
    workers = [
        context.Process(target=_save_many, args=(str(tmp_path), w, start))
        for w in range(PROCESSES)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
        assert worker.exitcode == 0
    index = caching.IndexDataCacheFile(str(tmp_path), "kernel", STAMP)
    overloads = index._load_index()
    keys = {("signature", w, n) for w in range(PROCESSES) for n in range(SAVES)}
    assert set(overloads) == keys
    assert len(set(overloads.values())) == len(keys)  # no two keys share a data file
    for _, worker, n in keys:
        assert index.load(("signature", worker, n)) == f"machine code {worker}/{n}"

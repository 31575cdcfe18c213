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
    own code. numba's unlocked save kept 53-235 of the 240 entries (23 runs, idle, pinned
    to one core or beside busy loops)."""
    context = multiprocessing.get_context("fork")
    start = context.Barrier(PROCESSES, timeout=30)
    workers = [
        context.Process(target=_save_many, args=(str(tmp_path), w, start), daemon=True)
        for w in range(PROCESSES)
    ]
    try:
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(60)
            assert worker.exitcode == 0
    finally:  # a worker stuck on the lock must not hold the test run at exit
        for worker in workers:
            worker.kill()
    index = caching.IndexDataCacheFile(str(tmp_path), "kernel", STAMP)
    overloads = index._load_index()
    keys = {("signature", w, n) for w in range(PROCESSES) for n in range(SAVES)}
    assert set(overloads) == keys
    assert len(set(overloads.values())) == len(keys)  # no two keys share a data file
    for _, worker, n in keys:
        assert index.load(("signature", worker, n)) == f"machine code {worker}/{n}"


def test_after_a_source_edit_an_entry_never_names_the_old_code_still_on_disk(tmp_path):
    """A changed source stamp empties the index, but `1.nbc` still holds the old code:
    numba named it for the first new entry and wrote the index before the data, so a
    process loading in between ran the old code. The new entry takes a free name."""
    old = caching.IndexDataCacheFile(str(tmp_path), "kernel", STAMP)
    old.save(("signature",), "old machine code")
    new = caching.IndexDataCacheFile(str(tmp_path), "kernel", ("kernel.py", 2.0, 1))
    assert new.load(("signature",)) is None  # the old entry is not the new source's
    new.save(("signature",), "new machine code")
    assert new._load_index()[("signature",)] != old._data_name(1)
    assert new.load(("signature",)) == "new machine code"

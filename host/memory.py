"""The process's memory policy: numpy's transparent-huge-page advice (measured in
docs/distillation.md, "Distillation time of a full pass")."""

from __future__ import annotations

import os
import sys


def without_huge_page_advice() -> bool:
    """Stop numpy advising transparent huge pages (madvise MADV_HUGEPAGE) for the arrays it
    allocates from now on, unless NUMPY_MADVISE_HUGEPAGE is set (numpy's own switch, read at
    its import: the user's choice stands). Returns whether the advice is now off.

    Why: distillation's sync and sifting, and the simulator, allocate and free hundreds of
    MB of short-lived arrays of a few MB; advised, each fresh 2 MB page is faulted in and
    zeroed whole. On this project's 2-core VM that made the kernel's time 3-4 s of a full
    micius-2017 pass's ~10.6 CPU s of distillation (sifting 2.7 -> 1.0 CPU s, sync 2.9 ->
    1.4, the decoder unchanged) and 11.5 s of a jinan-1 simulation's 20 (4.0 without;
    docs/distillation.md, "Distillation time of a full pass"). Every command turns it off
    (host.cli.main), and every distillation run (host.distil.run._endpoints) for callers
    of the library. Only the allocator's advice changes: no result."""
    if "NUMPY_MADVISE_HUGEPAGE" in os.environ:  # numpy takes it as int() at its import
        # (a value that is no integer is numpy's to refuse, at its import, not this one's)
        return os.environ["NUMPY_MADVISE_HUGEPAGE"].strip() == "0"
    if "numpy" not in sys.modules:  # a command without numpy does not import it for this
        os.environ["NUMPY_MADVISE_HUGEPAGE"] = "0"  # read at numpy's import (ours, children)
        return True
    try:  # numpy's private switch, numpy pinned (pyproject); another numpy: advice stays
        from numpy._core.multiarray import _set_madvise_hugepage
    except ImportError:
        return False
    _set_madvise_hugepage(False)
    return True

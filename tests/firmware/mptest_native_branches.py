# Viper code whose conditional branches span more than 4 KiB of native code, compiled on
# the target. MicroPython 1.25's Thumb-2 emitter encoded a wide conditional branch (B<c>.W,
# T3) with its offset bits in the wrong fields, so every such branch of 4 KiB or more went
# elsewhere: on the Cortex-M3 images a viper function past that size hard-faulted (the
# tracking kernel, 11.4 KiB of native code, did so when it grew by the resonator run-on;
# docs/targets.md "Large viper functions"). firmware/ports/thumb-wide-conditional-branch.patch
# fixes the encoding; mpy-cross (the frozen firmware) and the on-target compiler share it.
# The unpatched QEMU image hard-faults at 600 statements below (4.8 KiB); 800 (~6.4 KiB of
# Thumb code, 1.6x the 4 KiB reach) still does, and still fits netduino2's heap at 85 %
# (docs/targets.md "Margins"; 1200, 9.7 KiB in one block, no longer did).
# On unix (x86-64 emitter) the same code is the reference.
import gc

STATEMENTS = 800


def _compile(header):
    # One-space indents and one join: the source is built once and small, so that the one
    # block of native code it compiles to finds room on netduino2's 96 KiB heap (with
    # 4-space indents and two concatenations the source held ~40 KB at its peak).
    source = "".join(
        ("@micropython.viper\ndef big(n: int) -> int:\n x = 0\n", header, "\n")
        + ("  x += 1\n",) * STATEMENTS
        + (" return x\n",)
    )
    namespace = {}
    gc.collect()
    exec(source, namespace)
    return namespace["big"]


def test_a_forward_conditional_branch_over_more_than_4_kib_of_native_code():
    big = _compile(" if n > 5:")
    assert big(1) == 0  # the branch over the whole block, taken
    assert big(9) == STATEMENTS  # not taken: the block runs


def test_a_backward_conditional_branch_over_more_than_4_kib_of_native_code():
    big = _compile(" while x < n:")
    assert big(1) == STATEMENTS  # the loop's branch back over the body: taken once
    assert big(STATEMENTS + 1) == 2 * STATEMENTS

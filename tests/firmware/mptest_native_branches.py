# Viper code whose conditional branches span more than 4 KiB of native code, compiled on
# the target. MicroPython 1.25's Thumb-2 emitter encoded a wide conditional branch (B<c>.W,
# T3) with its offset bits in the wrong fields, so every such branch of 4 KiB or more went
# elsewhere: on the Cortex-M3 images a viper function past that size hard-faulted (the
# tracking kernel, 11.4 KiB of native code, did so when it grew by the resonator run-on;
# docs/targets.md "Large viper functions"). firmware/ports/thumb-wide-conditional-branch.patch
# fixes the encoding; mpy-cross (the frozen firmware) and the on-target compiler share it.
# The unpatched QEMU image hard-faults at 600 statements below (4.8 KiB); 1200 is twice that.
# On unix (x86-64 emitter) the same code is the reference.
STATEMENTS = 1200


def _compile(header):
    source = "@micropython.viper\ndef big(n: int) -> int:\n    x = 0\n" + header + "\n"
    source += "        x += 1\n" * STATEMENTS + "    return x\n"
    namespace = {}
    exec(source, namespace)
    return namespace["big"]


def test_a_forward_conditional_branch_over_more_than_4_kib_of_native_code():
    big = _compile("    if n > 5:")
    assert big(1) == 0  # the branch over the whole block, taken
    assert big(9) == STATEMENTS  # not taken: the block runs


def test_a_backward_conditional_branch_over_more_than_4_kib_of_native_code():
    big = _compile("    while x < n:")
    assert big(1) == STATEMENTS  # the loop's branch back over the body: taken once
    assert big(STATEMENTS + 1) == 2 * STATEMENTS

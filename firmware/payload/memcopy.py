# Byte copy for the interrupt-path kernels (tdc.ring_push / ring_pop): the fastest the
# port offers, chosen at import. Viper indexes bytes at ~30 instructions a byte on
# Cortex-M3; inline Thumb assembly (where the port has it: QEMU MPS2, STM32, RP2...) moves
# them at ~6. Both take machine addresses (small ints on every target in use: RAM below
# 2**30), so calling either allocates nothing.
import micropython


@micropython.viper
def copy_viper(dst: int, src: int, count: int):
    d = ptr8(dst)
    s = ptr8(src)
    for i in range(count):
        d[i] = s[i]


@micropython.viper
def address(buf: ptr8) -> int:
    """The machine address of a buffer (for tests and callers outside viper)."""
    return int(uint(buf))


try:
    from payload._memcopy_thumb import copy_thumb as copy  # noqa: F401
except (ImportError, SyntaxError, AttributeError):
    copy = copy_viper

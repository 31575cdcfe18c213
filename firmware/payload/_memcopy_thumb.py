# Inline Thumb-2 byte copy (see memcopy.py); importing this fails where the port has no
# inline assembler (unix), and memcopy.py falls back to viper.
import micropython


@micropython.asm_thumb
def copy_thumb(r0, r1, r2):  # r0 = dst address, r1 = src address, r2 = byte count
    cmp(r2, 0)
    beq(DONE)
    label(LOOP)
    ldrb(r3, [r1, 0])
    strb(r3, [r0, 0])
    add(r0, 1)
    add(r1, 1)
    sub(r2, 1)
    bne(LOOP)
    label(DONE)

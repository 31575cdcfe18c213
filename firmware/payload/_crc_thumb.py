# Table-driven CRC loops, the frame scan and COBS in inline Thumb-2 (see framing.py);
# importing this fails where the port has no inline assembler (unix), and framing.py falls
# back to viper (~50
# instructions a byte on the Cortex-M3) or the port's C binascii.crc32. Buffers are passed
# as their addresses by the inline-assembler call; nothing allocates.
import micropython


@micropython.asm_thumb
def crc16_thumb(r0, r1, r2):  # r0 = data, r1 = byte count, r2 = 256 x u16 table; -> crc
    movw(r3, 0xFFFF)  # CRC-16/CCITT-FALSE initial value
    movw(r6, 0xFF)
    movw(r7, 0xFFFF)
    cmp(r1, 0)
    beq(DONE)
    label(LOOP)
    ldrb(r4, [r0, 0])
    lsr(r5, r3, 8)
    eor(r5, r4)
    and_(r5, r6)
    add(r5, r5, r5)
    add(r5, r5, r2)
    ldrh(r5, [r5, 0])
    lsl(r3, r3, 8)
    eor(r3, r5)
    and_(r3, r7)
    add(r0, 1)
    sub(r1, 1)
    bne(LOOP)
    label(DONE)
    mov(r0, r3)


@micropython.asm_thumb
def crc32_thumb(r0, r1, r2, r3):  # r0 = u32 state, r1 = data, r2 = count, r3 = table
    ldr(r4, [r0, 0])
    movw(r6, 0xFF)
    cmp(r2, 0)
    beq(DONE)
    label(LOOP)
    ldrb(r5, [r1, 0])
    eor(r5, r4)
    and_(r5, r6)
    lsl(r5, r5, 2)
    add(r5, r5, r3)
    ldr(r5, [r5, 0])
    lsr(r4, r4, 8)
    eor(r4, r5)
    add(r1, 1)
    sub(r2, 1)
    bne(LOOP)
    label(DONE)
    str(r4, [r0, 0])


@micropython.asm_thumb
def scan_thumb(r0, r1, r2):
    # framing._scan_until_zero in Thumb: r0 = src, r1 = dst,
    # r2 = int32[5] [i, length, capacity, fill, overflowed]; copies src[i:] to dst[fill:]
    # up to the first zero byte (bytes past capacity dropped and flagged); returns the
    # zero's index (or length), with i, fill and overflowed updated in r2.
    ldr(r3, [r2, 0])
    ldr(r4, [r2, 4])
    ldr(r5, [r2, 12])
    ldr(r6, [r2, 8])
    sub(r6, r6, r5)  # room left
    add(r1, r1, r5)  # dst + fill
    label(LOOP)
    cmp(r3, r4)
    bge(DONE)
    add(r7, r0, r3)
    ldrb(r7, [r7, 0])
    cmp(r7, 0)
    beq(DONE)
    cmp(r6, 0)
    ble(OVER)
    strb(r7, [r1, 0])
    add(r1, 1)
    sub(r6, 1)
    add(r5, 1)
    add(r3, 1)
    b(LOOP)
    label(OVER)
    mov(r7, 1)
    str(r7, [r2, 16])
    add(r3, 1)
    b(LOOP)
    label(DONE)
    str(r3, [r2, 0])
    str(r5, [r2, 12])
    mov(r0, r3)


@micropython.asm_thumb
def cobs_decode_thumb(r0, r1, r2, r3):
    # framing.cobs_decode_viper in Thumb (~10 instructions a byte on the M3, viper ~120):
    # r0 = src, r1 = length, r2 = dst, r3 = capacity; returns the decoded length, -1 for
    # input that is not COBS (a zero byte, a code running past the end), -2 past capacity.
    # Registers: r0 src pointer, r1 src end, r2 dst pointer, r3 dst end, r4 dst start,
    # r5 the block's end, r6 its code, r7 a byte.
    add(r1, r0, r1)
    add(r3, r2, r3)
    mov(r4, r2)
    label(BLOCK)
    cmp(r0, r1)
    bge(DONE)
    ldrb(r6, [r0, 0])
    cmp(r6, 0)
    beq(BAD)
    add(r0, 1)
    add(r5, r0, r6)
    sub(r5, 1)  # the block's data ends at src + code - 1
    cmp(r5, r1)
    bgt(BAD)
    label(COPY)
    cmp(r0, r5)
    bge(COPIED)
    ldrb(r7, [r0, 0])
    cmp(r7, 0)
    beq(BAD)
    cmp(r2, r3)
    bge(FULL)
    strb(r7, [r2, 0])
    add(r2, 1)
    add(r0, 1)
    b(COPY)
    label(COPIED)
    cmp(r6, 0xFF)
    beq(BLOCK)  # a full block: no zero follows it
    cmp(r0, r1)
    bge(DONE)  # the last block: its zero is the frame's end
    cmp(r2, r3)
    bge(FULL)
    mov(r7, 0)
    strb(r7, [r2, 0])
    add(r2, 1)
    b(BLOCK)
    label(BAD)
    mov(r0, 0)
    sub(r0, 1)
    b(END)
    label(FULL)
    mov(r0, 0)
    sub(r0, 2)
    b(END)
    label(DONE)
    sub(r0, r2, r4)
    label(END)


@micropython.asm_thumb
def cobs_encode_thumb(r0, r1, r2):
    # framing.cobs_encode_viper in Thumb: r0 = src, r1 = length, r2 = dst (length +
    # length // 254 + 1 bytes); returns the encoded length, no delimiter.
    # Registers: r0 src pointer, r1 src end, r2 dst start, r3 where the block's code goes,
    # r4 dst pointer, r5 the code, r6 a byte.
    add(r1, r0, r1)
    mov(r3, r2)
    add(r4, r2, 1)
    mov(r5, 1)
    label(LOOP)
    cmp(r0, r1)
    bge(END)
    ldrb(r6, [r0, 0])
    add(r0, 1)
    cmp(r6, 0)
    bne(DATA)
    strb(r5, [r3, 0])  # a zero ends the block
    mov(r3, r4)
    add(r4, 1)
    mov(r5, 1)
    b(LOOP)
    label(DATA)
    strb(r6, [r4, 0])
    add(r4, 1)
    add(r5, 1)
    cmp(r5, 0xFF)
    bne(LOOP)
    cmp(r0, r1)
    bge(LOOP)  # a full block with nothing after it: the code goes in at the end
    strb(r5, [r3, 0])  # a full block and more bytes follow: a new block
    mov(r3, r4)
    add(r4, 1)
    mov(r5, 1)
    b(LOOP)
    label(END)
    strb(r5, [r3, 0])
    sub(r0, r4, r2)


@micropython.asm_thumb
def frame_encode_thumb(r0, r1, r2, r3):
    # FrameWriter.encode's work in one call: r0 = raw (the body, with 2 bytes of room after
    # it), r1 = body length, r2 = out, r3 = the CRC-16 table. Appends the body's CRC-16
    # (big-endian) to raw, COBS-encodes body + CRC into out, adds the 0x00 delimiter and
    # returns the frame's length. The two loops are crc16_thumb's and cobs_encode_thumb's.
    push({r0, r1, r2})
    movw(r4, 0xFFFF)
    movw(r6, 0xFF)
    movw(r7, 0xFFFF)
    cmp(r1, 0)
    beq(CRCDONE)
    label(CRC)
    ldrb(r5, [r0, 0])
    lsr(r2, r4, 8)
    eor(r2, r5)
    and_(r2, r6)
    add(r2, r2, r2)
    add(r2, r2, r3)
    ldrh(r2, [r2, 0])
    lsl(r4, r4, 8)
    eor(r4, r2)
    and_(r4, r7)
    add(r0, 1)
    sub(r1, 1)
    bne(CRC)
    label(CRCDONE)
    lsr(r5, r4, 8)
    strb(r5, [r0, 0])  # r0 = raw + length
    strb(r4, [r0, 1])
    pop({r0, r1, r2})
    add(r1, 2)
    add(r1, r0, r1)
    mov(r3, r2)
    add(r4, r2, 1)
    mov(r5, 1)
    label(LOOP)
    cmp(r0, r1)
    bge(END)
    ldrb(r6, [r0, 0])
    add(r0, 1)
    cmp(r6, 0)
    bne(DATA)
    strb(r5, [r3, 0])
    mov(r3, r4)
    add(r4, 1)
    mov(r5, 1)
    b(LOOP)
    label(DATA)
    strb(r6, [r4, 0])
    add(r4, 1)
    add(r5, 1)
    cmp(r5, 0xFF)
    bne(LOOP)
    cmp(r0, r1)
    bge(LOOP)
    strb(r5, [r3, 0])
    mov(r3, r4)
    add(r4, 1)
    mov(r5, 1)
    b(LOOP)
    label(END)
    strb(r5, [r3, 0])
    mov(r6, 0)
    strb(r6, [r4, 0])  # the delimiter
    add(r4, 1)
    sub(r0, r4, r2)


@micropython.asm_thumb
def frame_decode_thumb(r0, r1, r2, r3):
    # FrameReader's work on one frame in one call (COBS decode, then the CRC-16 check):
    # r0 = the encoded frame (no delimiter), r1 = its length | dst capacity << 16, r2 = dst,
    # r3 = the CRC-16 table. Returns the body's length (the decoded bytes less the 2 CRC
    # bytes), or -1 (not COBS: a zero byte, a code running past the end), -2 (past the
    # capacity), -3 (fewer than 3 bytes decoded), -4 (CRC mismatch). The loops are
    # cobs_decode_thumb's and crc16_thumb's.
    push({r3})
    lsr(r3, r1, 16)  # capacity
    lsl(r1, r1, 16)
    lsr(r1, r1, 16)  # length
    add(r1, r0, r1)
    add(r3, r2, r3)
    mov(r4, r2)
    label(BLOCK)
    cmp(r0, r1)
    bge(DECODED)
    ldrb(r6, [r0, 0])
    cmp(r6, 0)
    beq(BAD)
    add(r0, 1)
    add(r5, r0, r6)
    sub(r5, 1)
    cmp(r5, r1)
    bgt(BAD)
    label(COPY)
    cmp(r0, r5)
    bge(COPIED)
    ldrb(r7, [r0, 0])
    cmp(r7, 0)
    beq(BAD)
    cmp(r2, r3)
    bge(FULL)
    strb(r7, [r2, 0])
    add(r2, 1)
    add(r0, 1)
    b(COPY)
    label(COPIED)
    cmp(r6, 0xFF)
    beq(BLOCK)
    cmp(r0, r1)
    bge(DECODED)
    cmp(r2, r3)
    bge(FULL)
    mov(r7, 0)
    strb(r7, [r2, 0])
    add(r2, 1)
    b(BLOCK)
    label(BAD)
    mov(r0, 1)
    b(DROP)
    label(FULL)
    mov(r0, 2)
    b(DROP)
    label(SHORT)
    mov(r0, 3)
    label(DROP)
    neg(r0, r0)
    pop({r3})
    b(END)
    label(DECODED)
    sub(r0, r2, r4)  # bytes decoded
    cmp(r0, 3)
    blt(SHORT)
    pop({r2})  # the table
    sub(r1, r0, 2)  # the body's length
    push({r1})
    mov(r0, r4)
    movw(r3, 0xFFFF)
    movw(r6, 0xFF)
    movw(r7, 0xFFFF)
    label(CRC)
    ldrb(r4, [r0, 0])
    lsr(r5, r3, 8)
    eor(r5, r4)
    and_(r5, r6)
    add(r5, r5, r5)
    add(r5, r5, r2)
    ldrh(r5, [r5, 0])
    lsl(r3, r3, 8)
    eor(r3, r5)
    and_(r3, r7)
    add(r0, 1)
    sub(r1, 1)
    bne(CRC)
    ldrb(r4, [r0, 0])  # the received CRC follows the body, big-endian
    ldrb(r5, [r0, 1])
    lsl(r4, r4, 8)
    orr(r4, r5)
    pop({r0})
    cmp(r3, r4)
    beq(END)
    mov(r0, 4)
    neg(r0, r0)
    label(END)

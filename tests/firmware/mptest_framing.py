# Firmware framing (COBS + CRC-16) against the golden vectors the host's twin also passes.
import array

import micropython
from payload import framing


def _hex(data):
    return "".join("%02x" % b for b in data)


def test_the_frozen_crc_tables_are_the_polynomials():
    # payload/_crc_tables.py is generated on the host (tools/gen_crc_tables.py); here
    # each entry is recomputed bit by bit on the target and read as the kernels read it
    # (ptr16 / ptr32 / LDRH / LDR: native byte order)
    import sys

    from payload import _crc_tables

    for n in range(256):
        crc = n << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else (crc << 1)
        got = int.from_bytes(_crc_tables.CRC16[2 * n : 2 * n + 2], sys.byteorder)
        assert got == crc & 0xFFFF, (n, got)
        crc = n
        for _ in range(8):
            crc = (crc >> 1) ^ (0x3B6E20C8 << 2) if crc & 1 else crc >> 1
        got = int.from_bytes(_crc_tables.CRC32[4 * n : 4 * n + 4], sys.byteorder)
        assert got == crc, (n, got)
    # The kernels read the constants in place (in flash on the boards), wherever the build
    # put them: from tables one byte off alignment they give the check values.
    import uctypes

    assert framing._CRC16_TABLE is _crc_tables.CRC16
    assert framing._CRC32_TABLE is _crc_tables.CRC32
    check = b"123456789"
    tables = {}
    for name in ("CRC16", "CRC32"):
        shifted = bytearray(len(getattr(_crc_tables, name)) + 1)
        shifted[1:] = getattr(_crc_tables, name)
        tables[name] = memoryview(shifted)[1:]
        assert uctypes.addressof(tables[name]) & 1
    framing._CRC16_TABLE, framing._CRC32_TABLE = tables["CRC16"], tables["CRC32"]
    try:
        crc16 = framing.crc16_viper(check, len(check))
        thumb = None
        if framing.crc16_thumb is not None:
            thumb = framing.crc16_thumb(check, len(check), tables["CRC16"])
        state = array.array("I", (0xFFFFFFFF,))
        framing._crc32_update(state, check, len(check))
    finally:
        framing._CRC16_TABLE, framing._CRC32_TABLE = _crc_tables.CRC16, _crc_tables.CRC32
    assert crc16 == 0x29B1 and thumb in (None, 0x29B1), (crc16, thumb)
    assert state[0] ^ 0xFFFFFFFF == 0xCBF43926, state[0]


def test_crc16_check_values():
    for case in load_vectors("framing.json")["crc16_ccitt_false"]:
        data = bytes.fromhex(case["data"])
        assert framing.crc16(data, len(data)) == case["crc"], case


def test_crc32_check_values_in_pieces():
    for case in load_vectors("framing.json")["crc32"]:
        data = bytes.fromhex(case["data"])
        crc = framing.Crc32()
        half = len(data) // 2
        crc.update(data[:half])
        crc.update(data[half:])
        assert crc.value() == case["crc"], (case, crc.value())


def test_cobs_encode_and_decode_published_examples():
    out = bytearray(600)
    for case in load_vectors("framing.json")["cobs"]:
        raw = bytes.fromhex(case["raw"])
        count = framing.cobs_encode(raw, len(raw), out)
        assert _hex(out[:count]) == case["encoded"], case["raw"][:20]
        encoded = bytes.fromhex(case["encoded"])
        count = framing.cobs_decode(encoded, len(encoded), out, len(out))
        assert bytes(out[:count]) == raw


def test_frame_writer_matches_golden_frames():
    vectors = load_vectors("framing.json")
    writer = framing.FrameWriter(vectors["max_body_bytes"])
    for case in vectors["frames"]:
        body = bytes.fromhex(case["body"])
        assert _hex(writer.encode(body)) == case["frame"]


def test_frame_reader_accepts_good_and_counts_bad_by_reason():
    vectors = load_vectors("framing.json")
    reader = framing.FrameReader(vectors["max_body_bytes"])
    stream = bytearray()
    for case in vectors["bad_frames"]:
        stream += bytes.fromhex(case["frame"])
    for case in vectors["frames"]:
        stream += bytes.fromhex(case["frame"])
    bodies = []
    view = memoryview(stream)
    start = 0
    while start < len(stream):
        start += reader.feed(view[start:], len(stream) - start)
        if reader.ready:
            bodies.append(_hex(reader.body))
    assert bodies == [case["body"] for case in vectors["frames"]]
    for case in vectors["bad_frames"]:
        index = framing.DROP_REASONS.index(case["reason"])
        assert reader.drops[index] == 1, (case["reason"], reader.drops)


class _TrickleLink:
    """A link that hands on one byte every other read (a USART whose next byte is not
    there yet when polled: QEMU's, on a loaded host)."""

    def __init__(self, data):
        self.data = data
        self.pos = 0
        self.reads = 0

    def readinto(self, buf):
        self.reads += 1
        if self.reads % 2 or self.pos >= len(self.data):
            return 0
        buf[0] = self.data[self.pos]
        self.pos += 1
        return 1


class _StepClock:
    """ticks_us advancing 10 us a call: the poll's wait is counted in calls."""

    def __init__(self):
        self.now = 0

    def ticks_us(self):
        # wrapped at 2^30 as a board's, never past it (a small int on a 32-bit port: no
        # allocation under heap_lock)
        now = self.now
        self.now = now + 10 if now < 0x3FFFFFFF - 10 else now - 0x3FFFFFF6
        return self.now


def test_a_ground_poll_takes_a_trickling_telecommand_whole_within_its_wait():
    from payload import app

    body = bytes(range(40))  # a stop telecommand's size
    frame = b"\x00" + bytes(framing.FrameWriter(64).encode(body))  # the host's leading 0
    reader = framing.FrameReader(64)
    chunk = bytearray(256)
    got = []

    def handler(received):
        got.append(bytes(received))

    # within the wait (~2 * 42 reads of 10 us, ~20 clock calls a byte: well under 5 ms)
    link = _TrickleLink(frame + frame)
    clock = _StepClock()
    assert not app._pump_frame(link, reader, chunk, handler, clock, 5000)  # nothing yet
    assert app._pump_frame(link, reader, chunk, handler, clock, 5000)
    assert got == [body] and link.pos == len(frame), (got, link.pos)
    # the next pass takes the next frame whole, from its leading delimiter
    link.reads = 1  # (its byte is there at the poll)
    assert app._pump_frame(link, reader, chunk, handler, clock, 5000)
    assert got == [body, body] and link.pos == 2 * len(frame), (got, link.pos, len(frame))
    # a frame cut short: the poll gives up after its wait, and the rest is taken later
    del got[:]
    link = _TrickleLink(frame[:20])
    clock = _StepClock()
    link.reads = 1
    assert app._pump_frame(link, reader, chunk, handler, clock, 500)
    assert not got and link.pos == 20 and 500 <= clock.now <= 600, clock.now
    link.data = frame
    while link.pos < len(frame):
        app._pump_frame(link, reader, chunk, handler, clock, 500)
    assert got == [body]
    # no wait: the frame's first byte alone (the poll as it was: a byte or two a pass)
    del got[:]
    link = _TrickleLink(frame)
    link.reads = 1
    assert app._pump_frame(link, reader, chunk, handler, _StepClock(), 0)
    assert not got and link.pos == 1


class _GarbageLink:
    """An uplink owned by an attacker: `pattern` over and over, `per_read` bytes on every
    other read (a byte every few ms on the radio), forever. More reads than `max_reads` in
    one call is a poll whose wait never ended (fails here, where it would hang the loop)."""

    def __init__(self, pattern, per_read, max_reads=5000):
        self.pattern = pattern
        self.per_read = per_read
        self.max_reads = max_reads
        self.pos = 0
        self.reads = 0

    def readinto(self, buf):
        self.reads += 1
        assert self.reads <= self.max_reads  # (no message: no heap under heap_lock)
        if self.reads % 2 == 0:
            return 0
        pattern = self.pattern
        for index in range(self.per_read):
            buf[index] = pattern[self.pos]
            self.pos = (self.pos + 1) % len(pattern)
        return self.per_read


def test_a_ground_poll_fed_bytes_that_never_make_a_frame_ends_at_its_wait_without_allocating():
    # The attacker's cheap stall: bytes that never complete a frame hold each pass for the
    # poll's wait and no longer, whatever they are, with the clock's 2^30 wrap inside the
    # wait, and the poll (the main loop's, every pass) allocates nothing on the way.
    from payload import app

    writer = framing.FrameWriter(64)
    bad_crc = bytearray(writer.encode(b"stop"))
    bad_crc[1] ^= 0x01  # a telecommand's frame with one bit flipped
    cases = (
        ("never-ending frame", b"\x55", 1),
        ("never-ending frame, chunks full", b"\x55", 256),
        ("lone delimiters", b"\x00", 1),
        ("damaged frames", bytes(bad_crc), 1),
        ("damaged frames, chunks full", bytes(bad_crc), 256),
    )
    wait_us = 500
    for name, pattern, per_read in cases:
        reader = framing.FrameReader(app.GROUND_MAX_BODY_BYTES)
        chunk = bytearray(256)
        link = _GarbageLink(pattern, per_read)
        clock = _StepClock()
        clock.now = 0x3FFFFFFF - 200  # the wrap comes 200 us into the wait
        got = []
        handler = got.append  # (bound here: a bound method is a heap object)
        for _ in range(3):  # three passes
            link.reads = 0
            before = clock.now
            micropython.heap_lock()
            try:
                took = app._pump_frame(link, reader, chunk, handler, clock, wait_us)
            finally:
                micropython.heap_unlock()
            spent_us = (clock.now - before) & 0x3FFFFFFF
            assert took and not got, (name, took, got)
            # the wait, and one read and clock call past it at most
            assert wait_us <= spent_us <= wait_us + 20, (name, spent_us)


class _ChunkLink:
    """A link whose reads hand on the chunks given, one a read, then nothing."""

    def __init__(self, *chunks):
        self.chunks = list(chunks)
        self.at = 0

    def readinto(self, buf):
        if self.at >= len(self.chunks):
            return 0
        data = self.chunks[self.at]
        self.at += 1
        for index in range(len(data)):  # (a slice assignment would allocate its slice)
            buf[index] = data[index]
        return len(data)


def test_the_bus_poll_hands_on_every_frame_of_a_chunk_and_allocates_nothing_between():
    # app._pump (the payload bus without a data path) shares _pump_frame's feed loop
    # (app._feed, reader.feed_from): every frame of a read is handed on in order, a frame
    # the read ends inside is finished by the next read, and between frames nothing is
    # allocated. It sliced a memoryview per frame (main at 793d087: MemoryError below).
    from payload import app

    writer = framing.FrameWriter(64)
    bodies = [bytes([i]) * (i + 1) for i in range(1, 6)]
    frames = b"".join(bytes(writer.encode(body)) for body in bodies)
    got = []
    reader = framing.FrameReader(64)
    chunk = bytearray(256)
    cut = len(frames) - 3  # inside the last frame
    link = _ChunkLink(frames[:cut], frames[cut:])

    def keep(body):  # (a view of the reader's buffer, which the next frame overwrites)
        got.append(bytes(body))

    assert app._pump(link, reader, chunk, keep)
    assert got == bodies[:4], got
    assert app._pump(link, reader, chunk, keep)
    assert got == bodies, got
    assert not app._pump(link, reader, chunk, keep)  # nothing read: no work
    # a read of damaged frames (no body handed on, so no body view made): no allocation
    damaged = bytearray(writer.encode(b"stop"))
    damaged[1] ^= 0x01
    link = _ChunkLink(bytes(damaged) * 8)
    drops = reader.dropped()
    handler = got.append  # (bound here: a bound method is a heap object)
    micropython.heap_lock()
    try:
        took = app._pump(link, reader, chunk, handler)
    finally:
        micropython.heap_unlock()
    assert took and reader.dropped() == drops + 8, (took, reader.dropped(), drops)


def test_crc_and_cobs_kernels_do_not_allocate():
    # These run on received bytes in the link's hot path: prove no heap use.
    data = bytearray(range(256))
    out = bytearray(300)
    back = bytearray(300)
    crc = framing.Crc32()
    micropython.heap_lock()
    try:
        framing.crc16(data, len(data))
        crc.update(data, len(data))
        count = framing.cobs_encode(data, len(data), out)
        framing.cobs_decode(out, count, back, len(back))
    finally:
        micropython.heap_unlock()
    assert bytes(back[:256]) == bytes(data)


def test_every_crc_implementation_the_port_has_agrees_with_the_vectors():
    # the fast loop in use (inline Thumb / C) and the viper fallback must be the same CRC
    for case in load_vectors("framing.json")["crc16_ccitt_false"]:
        data = bytes.fromhex(case["data"])
        assert framing.crc16_viper(data, len(data)) == case["crc"], case
        if framing.crc16_thumb is not None:
            assert framing.crc16_thumb(data, len(data), framing._CRC16_TABLE) == case["crc"]
    for case in load_vectors("framing.json")["crc32"]:
        data = bytes.fromhex(case["data"])
        state = framing.Crc32()
        framing._crc32_update(state._state, data, len(data))
        assert state.value() == case["crc"], case


def _cobs_cases():
    """Deterministic inputs (an LCG): runs of zeros and non-zeros, blocks of 253-255
    bytes around COBS's 254-byte code limit, and the empty input. One at a time (a
    generator): the 66 cases held at once took ~20 KB, and on the STM32 board at 85 % of
    its heap test_every_frame_decode_the_port_has_agrees found no 548-byte hole."""
    seed = 12345
    yield from (b"", b"\x00", b"\x00\x00", bytes(range(1, 255)), bytes(range(1, 256)))
    yield bytes(range(1, 255)) + b"\x00" + bytes(range(1, 255))
    for _ in range(60):
        seed = (seed * 1103515245 + 12345) & 0x7FFFFFFF
        length = (seed >> 8) % 600
        zeros = 1 + (seed >> 4) % 40  # one zero per ~zeros bytes
        data = bytearray(length)
        for i in range(length):
            seed = (seed * 1103515245 + 12345) & 0x7FFFFFFF
            data[i] = 0 if (seed >> 16) % zeros == 0 else 1 + (seed >> 8) % 255
        yield bytes(data)


def test_every_cobs_implementation_the_port_has_agrees():
    # the inline Thumb loops (QEMU, STM32) and the viper ones must give the same bytes,
    # the same lengths and the same refusals (-1 not COBS, -2 past capacity)
    out_a = bytearray(700)
    out_b = bytearray(700)
    back_a = bytearray(700)
    back_b = bytearray(700)
    fast_encode, fast_decode = framing.cobs_encode, framing.cobs_decode
    for raw in _cobs_cases():
        n = framing.cobs_encode_viper(raw, len(raw), out_a)
        assert fast_encode(raw, len(raw), out_b) == n, len(raw)
        assert out_a[:n] == out_b[:n], len(raw)
        assert framing.cobs_decode_viper(out_a, n, back_a, 700) == len(raw)
        assert fast_decode(out_a, n, back_b, 700) == len(raw)
        assert back_a[: len(raw)] == raw and back_b[: len(raw)] == raw
        if len(raw) > 2:
            # capacity one short, a zero inside, a code running past the end
            for cap in (len(raw) - 1, 0):
                assert framing.cobs_decode_viper(out_a, n, back_a, cap) == -2
                assert fast_decode(out_a, n, back_b, cap) == -2
            bad = bytearray(out_a[:n])
            bad[n // 2] = 0
            assert framing.cobs_decode_viper(bad, n, back_a, 700) == -1
            assert fast_decode(bad, n, back_b, 700) == -1
            bad = bytearray(out_a[:n])
            bad[0] = 0xFE if bad[0] < 0xFE else bad[0]
            want = framing.cobs_decode_viper(bad, n, back_a, 700)
            assert fast_decode(bad, n, back_b, 700) == want
            if want >= 0:
                assert back_a[:want] == back_b[:want]
    if framing.cobs_decode_thumb is not None:
        assert fast_decode is framing.cobs_decode_thumb  # the fast loop is the one in use


def test_the_frame_writer_gives_the_frame_crc_and_cobs_give():
    # FrameWriter.encode's one-call Thumb path (QEMU, STM32) against CRC-16 + COBS + the
    # delimiter done step by step with the viper loops
    writer = framing.FrameWriter(600)
    raw = bytearray(602)
    out = bytearray(700)
    for body in _cobs_cases():
        raw[: len(body)] = body
        crc = framing.crc16_viper(raw, len(body))
        raw[len(body)] = crc >> 8
        raw[len(body) + 1] = crc & 0xFF
        n = framing.cobs_encode_viper(raw, len(body) + 2, out)
        assert bytes(writer.encode(body)) == bytes(out[:n]) + b"\x00", len(body)


def test_every_frame_decode_the_port_has_agrees():
    # frame_decode (COBS decode + CRC check in one call: Thumb on QEMU/STM32, viper on unix)
    # against the viper steps, refusals included: not COBS, past capacity, short, bad CRC
    writer = framing.FrameWriter(600)
    back_a = bytearray(700)
    back_b = bytearray(700)
    table = framing.CRC16_TABLE
    decoders = [framing.frame_decode_viper]
    if framing.frame_decode_thumb is not None:
        decoders.append(framing.frame_decode_thumb)
        assert framing.frame_decode is framing.frame_decode_thumb  # the one in use
    checked = 0
    for body in _cobs_cases():
        frame = bytes(writer.encode(body))
        n = len(frame) - 1  # without the delimiter
        cases = [(frame[:n], 700, len(body) if len(body) else framing.DECODE_SHORT)]
        if len(body) > 2:
            bad = bytearray(frame[:n])
            bad[n // 2] = 0
            cases.append((bytes(bad), 700, framing.DECODE_NOT_COBS))
            cases.append((frame[:n], len(body), framing.DECODE_OVERSIZE))
            flipped = bytearray(frame[:n])
            flipped[n - 1] = flipped[n - 1] ^ 0x01 or 0x02  # a data byte, never made zero
            cases.append((bytes(flipped), 700, None))  # CRC or COBS refusal: the steps say
        for src, cap, want in cases:
            outs = (back_a, back_b)
            results = [
                decoders[k](src, len(src) | (cap << 16), outs[k], table)
                for k in range(len(decoders))
            ]
            if want is not None:
                assert results[0] == want, (len(body), results, want)
            else:
                assert results[0] < 0, (len(body), results)
            assert results[-1] == results[0], (len(body), results)
            if results[0] > 0:
                for k in range(len(decoders)):
                    assert bytes(outs[k][: results[0]]) == body, (k, len(body))
            checked += 1
    assert checked > 200
    frame = writer.encode(b"\x01\x02\x00\x03")
    micropython.heap_lock()
    try:
        got = framing.frame_decode(frame, (len(frame) - 1) | (700 << 16), back_a, table)
    finally:
        micropython.heap_unlock()
    assert got == 4 and back_a[:4] == b"\x01\x02\x00\x03"

# Firmware framing (COBS + CRC-16) against the golden vectors the host's twin also passes.
import micropython
from payload import framing


def _hex(data):
    return "".join("%02x" % b for b in data)


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

# The sequencer's QRNG -> symbol mapping against the golden vectors the host's twin
# (host/protocol/symbols.py) passes, its hot path under heap_lock, and configuration
# refusals with reasons.

import micropython
from payload import sequencer


def _unpack(packed, slots):
    return [(packed[i >> 1] >> (4 * (i & 1))) & 0xF for i in range(slots)]


def _words_to_bytes(words):
    out = bytearray(4 * len(words))
    for i, w in enumerate(words):
        for k in range(4):
            out[4 * i + k] = (w >> (8 * k)) & 0xFF
    return out


def test_thresholds_match_vectors():
    for case in load_vectors("symbols.json")["mappings"]:
        t = sequencer.thresholds_for(case["intensity_probabilities"], case["basis_probability_z"])
        want = case["intensity_thresholds"]
        assert t[0] == case["basis_threshold"], case["name"]
        assert t[1] == want[0], case["name"]
        assert t[2] == (want[1] if len(want) == 3 else 65536), case["name"]


def test_viper_and_bytecode_mapping_match_vectors():
    for case in load_vectors("symbols.json")["mappings"]:
        qrng = bytes.fromhex(case["qrng_bytes"])
        slots = len(case["symbols"])
        t = sequencer.thresholds_for(case["intensity_probabilities"], case["basis_probability_z"])
        for kernel in (sequencer.map_symbols, sequencer.map_symbols_bytecode):
            out = bytearray(slots // 2)
            kernel(qrng, slots, out, t)
            assert _unpack(out, slots) == case["symbols"], case["name"]


def test_edge_words():
    case = load_vectors("symbols.json")["edge_words"]
    words = case["words"]
    qrng = _words_to_bytes(words)
    slots = len(words) + (len(words) & 1)
    qrng += bytes(4 * (slots - len(words)))
    t = sequencer.thresholds_for(case["intensity_probabilities"], case["basis_probability_z"])
    out = bytearray(slots // 2)
    sequencer.map_symbols(qrng, slots, out, t)
    assert _unpack(out, slots)[: len(words)] == case["symbols"]


def test_mapping_and_frame_header_allocate_nothing():
    qrng = bytearray((i * 73) & 0xFF for i in range(4096))
    out = bytearray(512)
    t = sequencer.thresholds_for([0.5, 0.25, 0.25], 0.5)
    header = bytearray(16)
    micropython.heap_lock()
    try:
        sequencer.map_symbols(qrng, 1024, out, t)
        sequencer._put_frame_header(header, 7_000_001, 4096)
    finally:
        micropython.heap_unlock()
    reference = bytearray(512)
    sequencer.map_symbols_bytecode(qrng, 1024, reference, t)
    assert out == reference
    first_slot = 7_000_001 * 4096  # > 2**32: the u64 is built without big ints
    assert bytes(header[4:12]) == first_slot.to_bytes(8, "little")
    assert bytes(header[0:4]) == (7_000_001).to_bytes(4, "little")
    assert bytes(header[12:16]) == (4096).to_bytes(4, "little")


def _refusal(config, capacity_hz=100_000, scale_ppm=1_000_000):
    try:
        sequencer.validate(config, capacity_hz, scale_ppm)
    except sequencer.ConfigError as error:
        return str(error)
    return None


GOOD = {"intensity_probabilities": [0.5, 0.25, 0.25], "basis_probability_z": 0.5,
        "slot_rate_hz": 50_000, "frame_slots": 1024}  # fmt: skip


def test_invalid_configurations_are_refused_with_a_reason():
    assert _refusal(GOOD) is None
    for case in load_vectors("symbols.json")["invalid"]:
        config = dict(GOOD)
        config["intensity_probabilities"] = case["intensity_probabilities"]
        config["basis_probability_z"] = case["basis_probability_z"]
        assert _refusal(config) is not None, case["why"]
    cases = [
        ({"intensity_probabilities": [0.5, 0.25, 0.2]}, "sum to"),
        ({"intensity_probabilities": [0.5, 0.3, 0.1, 0.1]}, "2 or 3"),
        ({"basis_probability_z": 1.5}, "basis_probability_z"),
        ({"slot_rate_hz": 100_000_000}, "exceeds capacity"),
        ({"slot_rate_hz": -5}, "slot_rate_hz"),
        ({"frame_slots": 1023}, "frame_slots"),
        ({"frame_slots": 8192}, "frame_slots"),
        (
            {
                "intensity_probabilities": {"mu": 0.5, "nu": 0.25, "omega": 0.25},
                "intensity_names": ["mu", "nu", "vac"],
            },
            "unknown intensity class 'omega'",
        ),  # fmt: skip
    ]
    for change, reason in cases:
        config = dict(GOOD)
        config.update(change)
        message = _refusal(config)
        assert message is not None and reason in message, (change, message)


def test_rate_check_follows_the_heads_time_base():
    fast = dict(GOOD)
    fast["slot_rate_hz"] = 100_000_000
    assert _refusal(fast, scale_ppm=1_000_000) is not None  # real time: too fast
    assert _refusal(fast, scale_ppm=1_000) is None  # emulator runs 1000x slower
    assert _refusal(fast, scale_ppm=0) is None  # lockstep: the head waits
    named = dict(GOOD)
    named["intensity_probabilities"] = {"mu": 0.5, "nu": 0.25, "vac": 0.25}
    named["intensity_names"] = ["mu", "nu", "vac"]
    assert _refusal(named) is None

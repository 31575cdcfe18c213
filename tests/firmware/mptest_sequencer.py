# The sequencer's QRNG -> symbol mapping against the golden vectors the host's twin
# (host/protocol/symbols.py) passes, its hot path under heap_lock, and configuration
# refusals with reasons.

import array
import os

import board
import micropython
from payload import bus as busmod
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


class _LcgSource:
    """Pseudo-random QRNG bytes; `empty_every`: every n-th FIFO read finds none;
    `stuck_at`: from that byte on, the source repeats one value."""

    def __init__(self, seed, empty_every=0, stuck_at=-1):
        self.seed = seed
        self.reads = 0
        self.sent = 0
        self.empty_every = empty_every
        self.stuck_at = stuck_at

    def __call__(self, max_bytes):
        self.reads += 1
        if self.empty_every and self.reads % self.empty_every == 0:
            return b""
        n = min(max_bytes, 700)  # FIFO bursts shorter than asked, as a real FIFO gives
        out = bytearray(n)
        seed = self.seed
        for i in range(n):
            seed = (seed * 1103515245 + 12345) & 0x7FFFFFFF
            out[i] = seed >> 16
            if 0 <= self.stuck_at <= self.sent + i:
                out[i] = 0x5A
        self.seed = seed
        self.sent += n
        return out


class _Head:
    """Stands in for the payload bus to the optical head: frame counter, commits, laser
    control and the QRNG FIFO (the real bus client is tested in mptest_bus.py)."""

    def __init__(self, source):
        self.clock = board.clock
        self.words = array.array("I", bytes(16))
        self.frame = 0
        self.laser = None
        self.source = source

    def read(self, addr, count):
        self.words[0] = self.frame
        self.words[1] = 0
        return busmod.OK

    def read1(self, addr):
        return 0

    def write1(self, addr, value):
        if addr == busmod.REG_LASER_CTRL:
            self.laser = value
        elif addr == busmod.REG_COMMIT:
            self.frame += 1
        return busmod.OK

    def fifo_read(self, fifo, dest, offset, max_bytes):
        data = self.source(max_bytes)
        dest[offset : offset + len(data)] = data
        return len(data)

    def mem_write(self, mem, offset, data, data_offset, count):
        return busmod.OK


_runs = [0]


def _sequencer(source):
    from payload import storage

    _runs[0] += 1
    root = board.mount_storage() + "/seq%d" % _runs[0]
    try:
        os.mkdir(root)
    except OSError:
        pass
    head = _Head(source)
    seq = sequencer.Sequencer(head, storage.Storage(root))
    seq.configure(
        {"intensity_probabilities": [0.5, 0.25, 0.25], "slot_rate_hz": 1000, "frame_slots": 2048},
        0,
    )
    seq.running = True
    return seq, head


def test_health_tests_pass_random_bytes_and_catch_a_stuck_or_biased_source():
    state = array.array("i", (-1, 0, 0, 0, 0, sequencer.RCT_CUTOFF, sequencer.APT_CUTOFF))
    source = _LcgSource(7)
    for _ in range(100):  # 70 kB of good bytes: no false alarm
        data = source(700)
        assert sequencer.qrng_health(state, data, len(data)) == 0
    stuck = bytearray(source(700))
    stuck[300 : 300 + sequencer.RCT_CUTOFF] = b"\x33" * sequencer.RCT_CUTOFF
    assert sequencer.qrng_health(state, stuck, len(stuck)) & 1
    state = array.array("i", (-1, 0, 0, 0, 0, sequencer.RCT_CUTOFF, sequencer.APT_CUTOFF))
    biased = bytearray(source(700)) + bytearray(source(700))
    for i in range(0, 1024, 4):  # every 4th byte 0x77: no runs, but a quarter of a window
        biased[i] = 0x77
    biased[0] = 0x77
    assert sequencer.qrng_health(state, biased, 1024) == 2


def test_a_failed_health_test_stops_generation_and_says_why():
    seq, head = _sequencer(_LcgSource(11, stuck_at=5000))
    assert seq.step()  # frame 0 takes bytes 0..8191 of the stream: the stuck run is in it
    assert seq.qrng_fault == "rct", seq.telemetry()
    assert not seq.running and head.laser == 0  # laser told to stop at the boundary
    assert seq.frames_sent == 0  # no frame from a failing source was committed
    assert seq.telemetry()["qrng_fault"] == "rct"
    assert not seq.step()  # stays stopped


def test_an_empty_qrng_fifo_is_waited_for_not_a_bus_failure():
    source = _LcgSource(13, empty_every=3)
    seq, head = _sequencer(source)
    steps = 0
    while seq.frames_sent < 2 and steps < 50:
        seq.step()
        steps += 1
    assert seq.frames_sent == 2 and seq.bus_failures == 0, seq.telemetry()
    assert seq.qrng_empty > 0 and seq.qrng_fault is None
    assert source.sent == 2 * 4 * 2048  # every byte read was used, none thrown away


def test_the_lasers_mean_photon_numbers_are_checked_and_logged_with_the_config():
    """Optional `intensities` ({class: mean photon number}): validated against the class
    names and written into the PATTERN_CONFIG record, Alice's own record that the
    distillation compares pass.json's intensities with (docs/formats.md)."""
    import json

    named = dict(GOOD)
    named["intensity_probabilities"] = {"mu": 0.5, "nu": 0.25, "vac": 0.25}
    named["intensity_names"] = ["mu", "nu", "vac"]
    named["intensities"] = {"mu": 0.8, "nu": 0.1, "vac": 0.0}
    assert _refusal(named) is None
    cases = [
        ({"mu": 0.8, "nu": 0.1}, "intensities['vac']"),
        ({"mu": 0.8, "nu": 0.1, "vac": 0.0, "omega": 1.0}, "one mean photon number"),
        ({"mu": 0.8, "nu": -0.1, "vac": 0.0}, "intensities['nu']"),
        ({"mu": 0.8, "nu": "x", "vac": 0.0}, "intensities['nu']"),
        ([0.8, 0.1, 0.0], "intensities: need"),
    ]
    for value, reason in cases:
        config = dict(named)
        config["intensities"] = value
        message = _refusal(config)
        assert message is not None and reason in message, (value, message)
        assert len(message) <= 60, message  # the ground link's reason field

    class _Log:
        kind = 0
        texts = []

        def append(self, text, sync=False):
            self.texts.append(bytes(text))

    seq, _ = _sequencer(_LcgSource(3))
    seq.configure(named, 0)
    seq.log = _Log()
    seq._log_config()
    assert json.loads(seq.log.texts[-1])["intensities"] == named["intensities"]
    seq.configure(GOOD, 0)  # none configured: none logged
    seq._log_config()
    assert "intensities" not in json.loads(seq.log.texts[-1])


def test_head_generation_frees_the_controllers_buffers_and_a_controller_pass_gets_them_back():
    # A pass whose head generates the pattern needs neither the QRNG burst buffer nor the
    # frame's record buffer (4.1 kB of the STM32 board's heap): its pattern-log records go
    # through the store's shared buffer; a controller pass gets both back and runs
    import gc

    seq, head = _sequencer(_LcgSource(17))
    seq.running = False
    seq.store.shared_record()  # made at boot in the mission (housekeeping's log)
    gc.collect()
    before = gc.mem_free()
    seq.keep_controller_buffers(False)
    gc.collect()
    assert gc.mem_free() - before >= 4000, gc.mem_free() - before
    try:
        seq.start()
        raise AssertionError("a controller pass started without its buffers")
    except sequencer.ConfigError as error:
        assert "freed for head generation" in str(error), str(error)
    seq._log_config()  # the configuration record, through the shared buffer
    assert seq.log.next_seq == 1
    seq.keep_controller_buffers(True)
    seq.running = True  # (start's head handshake is not this stand-in's: _sequencer)
    steps = 0
    while seq.frames_sent < 2 and steps < 20:
        seq.step()
        steps += 1
    assert seq.frames_sent == 2 and seq.qrng_fault is None, seq.telemetry()


class _LaserThatNeverStops(_Head):
    """The back bank never frees and LASER_ACTIVE stays 1; each read takes ~1 ms, as a
    bus round trip, so the stop's waits end on their deadline, not their poll count."""

    def __init__(self, source):
        super().__init__(source)
        self.reads = 0

    def _round_trip(self):
        self.reads += 1
        start = self.clock.ticks_us()
        while (self.clock.ticks_us() - start) & 0x3FFFFFFF < 1000:
            pass

    def read(self, addr, count):
        self._round_trip()
        self.words[0] = self.frame
        self.words[1] = 1  # a committed frame still waiting in the back bank
        return busmod.OK

    def read1(self, addr):
        self._round_trip()
        return 1

    def try_again(self):
        pass


def test_a_laser_that_never_stops_holds_the_stop_one_deadline_not_two():
    # The stop's two waits (the committed frame out, then the laser idle) share one
    # LASER_STOP_TIMEOUT_US; each had its own, so the stop took two (payload/waits.py).
    deadline_us = 200_000
    saved = sequencer.LASER_STOP_TIMEOUT_US
    sequencer.LASER_STOP_TIMEOUT_US = deadline_us
    try:
        seq, _ = _sequencer(_LcgSource(3))
        head = _LaserThatNeverStops(_LcgSource(3))
        seq.bus = head
        start = board.clock.ticks_us()
        seq.stop()
        elapsed_us = (board.clock.ticks_us() - start) & 0x3FFFFFFF
    finally:
        sequencer.LASER_STOP_TIMEOUT_US = saved
    assert head.laser == 0 and seq.bus_failures == 1, (head.laser, seq.bus_failures)
    # one deadline and the read under way at it (~1 ms); two deadlines before: >= 400 ms
    assert deadline_us <= elapsed_us < 1.5 * deadline_us, (elapsed_us, head.reads)

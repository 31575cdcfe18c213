"""The head's pattern comes from its QRNG (emulated: AES-256-CTR keyed inside the head) and
stays on board: the generator's key and its stream never appear on the payload bus, the
ground link or in a product; the pattern memory is read back by slot lists on the
pattern-memory port only; the retired splitmix64 seed registers are gone."""

import json
import logging
import pickle
import struct
import time
from pathlib import Path

import numpy as np
import pytest

from emulator import pattern_generator
from emulator.head_qrng import (
    APT_FAILED,
    DOMAIN_FIFO_BYTES,
    DOMAIN_SLOT_WORDS,
    RCT_FAILED,
    HeadQrng,
    health_failures,
)
from emulator.link_proxy import LinkProxy
from emulator.optical_head import HeadServer, OpticalHead, TdcSources
from emulator.targets import UnixTarget
from host.link.client import CommandRejected, PayloadClient
from host.link.pattern_memory import PatternMemoryClient, PatternMemoryError
from host.protocol import payload_bus as pb
from host.protocol.framing import encode_frame
from host.protocol.symbols import pack_nibbles

VECTORS = json.loads((Path(__file__).parent / "vectors" / "payload_bus.json").read_text())
HEAD_KEY = bytes.fromhex("c0ffee" * 10 + "0102")  # a fixture: 32 bytes
LINK_KEY = bytes(range(100, 132))


def test_qrng_words_are_aes256_ctr_random_access_and_never_show_the_key():
    qrng = HeadQrng(HEAD_KEY)
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    nonce = (DOMAIN_SLOT_WORDS << 64).to_bytes(16, "big")
    stream = Cipher(algorithms.AES(HEAD_KEY), modes.CTR(nonce)).encryptor().update(bytes(4000))
    words = np.frombuffer(stream, dtype="<u4")
    slots = np.array([999, 0, 3, 4, 517, 5, 998])
    assert np.array_equal(qrng.slot_words(slots), words[slots])
    assert np.array_equal(qrng.slot_words_range(3, 990), words[3:993])
    fifo_nonce = (DOMAIN_FIFO_BYTES << 64).to_bytes(16, "big")
    fifo = Cipher(algorithms.AES(HEAD_KEY), modes.CTR(fifo_nonce)).encryptor().update(bytes(64))
    assert qrng.fifo_bytes(10) + qrng.fifo_bytes(54) == fifo  # a domain of its own
    assert HEAD_KEY.hex() not in repr(qrng) and HEAD_KEY.hex() not in repr(OpticalHead())
    with pytest.raises(TypeError):
        pickle.dumps(qrng)
    with pytest.raises(ValueError, match="at least 32"):
        HeadQrng(bytes(16))
    a, b = HeadQrng(), HeadQrng()
    assert not np.array_equal(a.slot_words_range(0, 64), b.slot_words_range(0, 64))


def test_keyed_slot_words_read_the_ctr_stream_at_any_slots():
    """host.protocol.symbols.keyed_slot_words (the head's stand-in and the simulations'
    keyed source) is word i of the AES-256-CTR stream at every slot i: slots in order far
    apart (its sparse path, where the blocks now come from neighbours, not np.unique),
    the same out of order and repeated, and a dense run; the run reader's high halves are
    those words' top 16 bits at each offset within a block."""
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    from host.protocol.symbols import keyed_run_high_halves, keyed_slot_words

    nonce = (DOMAIN_SLOT_WORDS << 64).to_bytes(16, "big")
    stream = Cipher(algorithms.AES(HEAD_KEY), modes.CTR(nonce)).encryptor().update(bytes(1 << 22))
    words = np.frombuffer(stream, dtype="<u4")
    rng = np.random.default_rng(2)
    in_order = np.cumsum(rng.geometric(1 / 300, 3000))
    for slots in (
        in_order,
        rng.permutation(in_order),
        np.repeat(in_order[:50], 3),
        np.array([7]),
        np.arange(11, 5000),
    ):
        got = keyed_slot_words(HEAD_KEY, slots)
        assert got.dtype == np.uint32 and np.array_equal(got, words[slots])
    for first in range(4):
        assert np.array_equal(
            keyed_run_high_halves(HEAD_KEY, 1001 + first, 777), words[1001 + first :][:777] >> 16
        )


def test_pattern_read_messages_match_the_vectors():
    for case in VECTORS["pattern_memory"]:
        body = bytes.fromhex(case["body"])
        if case["kind"] == "request":
            base, offsets = case["base"], np.array(case["offsets"])
            assert pb.pack_pattern_read(case["tag"], base, offsets) == body
            tag, slots = pb.unpack_pattern_read(body)
            assert tag == case["tag"] and slots.tolist() == (base + offsets).tolist()
        elif case["kind"] == "runs_request":
            base, (offsets, lengths) = case["base"], np.array(case["runs"]).T
            assert pb.pack_pattern_read_runs(case["tag"], base, offsets, lengths) == body
            tag, slots = pb.unpack_pattern_read_runs(body)
            runs = [base + np.arange(o, o + n) for o, n in case["runs"]]
            assert tag == case["tag"] and slots.tolist() == np.concatenate(runs).tolist()
            if "frame" in case:
                assert encode_frame(body).hex() == case["frame"]
        else:
            op = case.get("op", pb.OP_PATTERN_READ)
            tag, status, nibbles = pb.unpack_pattern_reply(body, op)
            assert (tag, status, nibbles.tolist()) == (
                case["tag"],
                case["status"],
                case["nibbles"],
            )
            assert pb.pack_pattern_reply(tag, status, nibbles, op=op) == body
    with pytest.raises(pb.BusProtocolError, match="count 3 does not match"):
        pb.unpack_pattern_read(bytes.fromhex(VECTORS["pattern_memory"][0]["body"])[:-4])
    runs_body = bytes.fromhex(VECTORS["pattern_memory"][3]["body"])
    with pytest.raises(pb.BusProtocolError, match="count 2 does not match"):
        pb.unpack_pattern_read_runs(runs_body[:-6])
    with pytest.raises(pb.BusProtocolError, match="a run of length 0"):
        pb.unpack_pattern_read_runs(runs_body[:-2] + bytes(2))
    too_many = pb.pack_pattern_read_runs(1, 0, [0, 20000], [16383, 1])[:-2] + bytes((0, 0x40))
    with pytest.raises(pb.BusProtocolError, match="32767 slots > 16384"):
        pb.unpack_pattern_read_runs(too_many)
    with pytest.raises(pb.BusProtocolError, match="16384 slots at most"):
        pb.pack_pattern_read_runs(1, 0, [0, 20000], [16384, 1])


def _generating_head(frames: int) -> tuple[OpticalHead, pattern_generator.PatternGenerator]:
    head = OpticalHead(seed=3, qrng_key=HEAD_KEY)
    generator = pattern_generator.attach(head)
    for offset, value in ((5, 16384), (6, 32768), (7, 49152)):
        assert head.write_reg(0x0600 + offset, value) == pb.OK
    assert head.write_reg(pb.REG_FRAME_SLOTS, 4096) == pb.OK
    assert head.write_reg(0x0600, 1) == pb.OK
    pattern_generator.fast_forward(head, head.boundary_ps(frames - 1))
    assert head.write_reg(0x0600, 0) == pb.OK
    return head, generator


def test_the_seed_registers_are_gone_and_the_bus_cannot_read_the_pattern():
    head, _ = _generating_head(4)
    for addr in range(0x0601, 0x0605):  # the retired GEN_SEED_0..3
        reply = pb.unpack_reply(head.handle(pb.read(9, addr, 1).pack()))
        assert reply.status == pb.E_BAD_ADDRESS
        reply = pb.unpack_reply(head.handle(pb.write(10 + addr % 8, addr, 1).pack()))
        assert reply.status == pb.E_BAD_ADDRESS
    # PATTERN_READ(_RUNS) is not an operation of the controller's bus
    body = pb.pack_pattern_read(11, 0, np.arange(4))
    assert pb.unpack_reply(head.handle(body)).status == pb.E_UNKNOWN_OP
    body = pb.pack_pattern_read_runs(12, 0, [0], [4])
    assert head.handle(body) == bytes((0x87, 12, pb.E_UNKNOWN_OP))


def test_the_pattern_memory_is_read_back_by_slot_lists_on_its_own_port():
    head, generator = _generating_head(300)
    truth = generator.truth()
    assert truth.slot_count == 300 * 4096
    rng = np.random.default_rng(1)
    slots = rng.integers(0, truth.slot_count, 40_000)  # unsorted, repeated: as detections come
    with HeadServer(head) as server:
        with PatternMemoryClient(server.pattern_address, truth.slot_count) as memory:
            got = memory.symbols(slots)
            assert memory.requests == 3  # 16,384 slots per request
            dense = memory.symbols(np.arange(4096, 4096 + 5000))
            with pytest.raises(IndexError):
                memory.symbols([truth.slot_count])
        with PatternMemoryClient(server.pattern_address, truth.slot_count + 10) as memory:
            with pytest.raises(PatternMemoryError, match="bad address"):
                memory.symbols([truth.slot_count + 1])  # the head refuses what it lacks
    expected = generator.run.mapping.symbols(HeadQrng(HEAD_KEY).slot_words(slots))
    assert np.array_equal(got, expected) and np.array_equal(got, truth.symbols(slots))
    assert np.array_equal(dense, truth.symbols(np.arange(4096, 9096)))
    values, counts = np.unique(got, return_counts=True)
    assert len(values) == 12  # 2 bases x 2 bits x 3 intensities, all present


class _HeadBeforeRuns(OpticalHead):
    """A head built before PATTERN_READ_RUNS: its port knows op 05 only (main's port
    before the runs op), so it answers op 07 `unknown op`."""

    def handle_pattern_port(self, body: bytes) -> bytes | None:
        if body[:1] == bytes((pb.OP_PATTERN_READ_RUNS,)):
            return pb.error_reply(body, pb.E_UNKNOWN_OP)
        return super().handle_pattern_port(body)


def test_contiguous_windows_go_over_the_port_as_runs_with_the_same_symbols():
    head, generator = _generating_head(40)
    truth = generator.truth()
    window = np.arange(70_000, 110_000)  # an intensity window of the time synchronisation
    rng = np.random.default_rng(2)
    mixed = np.concatenate([window[:9000], rng.integers(0, truth.slot_count, 3000)])
    mixed = np.concatenate([mixed, mixed[:50]])[rng.permutation(12_050)]  # repeats, shuffled
    with HeadServer(head) as server:
        with PatternMemoryClient(server.pattern_address, truth.slot_count) as memory:
            got_window = memory.symbols(window)
            assert memory.requests == 3  # 16,384 slots per request, one run each
            assert memory.bytes_sent < 3 * 40  # 18-byte bodies, not 3 x 65,548
            got_mixed = memory.symbols(mixed)
            assert memory.runs_supported
        assert head.handle_pattern_port(pb.pack_pattern_read_runs(9, 0, [0], [4])[:-1]) == (
            bytes((0x87, 9, pb.E_BAD_LENGTH))
        )
        reply = head.handle_pattern_port(pb.pack_pattern_read_runs(9, truth.slot_count, [0], [1]))
        assert reply == bytes((0x87, 9, pb.E_BAD_ADDRESS))
    assert np.array_equal(got_window, truth.symbols(window))
    assert np.array_equal(got_mixed, truth.symbols(mixed))

    old_head = _HeadBeforeRuns(seed=3, qrng_key=HEAD_KEY)
    old_head.pattern_memory = head.pattern_memory
    with HeadServer(old_head) as server:
        with PatternMemoryClient(server.pattern_address, truth.slot_count) as memory:
            assert np.array_equal(memory.symbols(window), got_window)
            assert not memory.runs_supported  # fell back to slot lists, once
            assert memory.requests == 1 + 3


def _windows(stream: bytes, size: int = 16) -> list[bytes]:
    return [stream[i : i + size] for i in range(0, len(stream) - size + 1, size)]


def test_no_key_or_stream_leaves_the_head_in_a_head_generated_pass(tmp_path, caplog):
    """A head-generated segment on the real firmware, commanded and downloaded over the
    ground link: every payload-bus body and every ground-link byte is kept and searched
    for the generator's key, its keystream and the emitted pattern. Only the pattern
    memory port (the payload processor's link, on board) carries symbols."""
    from host.mission.run import sequencer_config
    from host.simulate import profiles

    sources = TdcSources(sync_rate_hz=1e5, beacon_rate_hz=1e4)  # TDC traffic on the bus
    head = OpticalHead(seed=4, fifo_depth=2048, sources=sources, qrng_key=HEAD_KEY)
    generator = pattern_generator.attach(head)
    bus_bodies: list[bytes] = []
    serve = head.handle

    def capture(body: bytes):
        reply = serve(body)
        bus_bodies.append(bytes(body))
        bus_bodies.append(reply or b"")
        return reply

    server = HeadServer(head)
    server.endpoint.handler = capture
    storage = tmp_path / "flash"
    (storage / "link").mkdir(parents=True)
    (storage / "link" / "key").write_bytes(LINK_KEY)
    config = sequencer_config(profiles.load("micius-2017", {}), "head")
    caplog.set_level(logging.DEBUG)  # every log record of the run, any logger
    with server, UnixTarget(storage_dir=storage, bus_address=server.address) as target:
        with LinkProxy(target.ground_port, capture=True) as proxy:
            with PayloadClient(proxy.port, LINK_KEY, timeout_s=30.0) as payload:
                payload.configure(config)
                payload.start()
                pattern_generator.fast_forward(head, head.boundary_ps(generator.first_frame + 249))
                payload.stop()
                housekeeping = payload.housekeeping()
                entries = payload.list_products()
                files = [
                    payload.download(e, tmp_path / "sat")
                    for e in entries
                    if e.name != "patterns.qrec"
                ]
                # no product key on this payload: the pattern product is never served
                pattern_product = next(e for e in entries if e.name == "patterns.qrec")
                with pytest.raises(CommandRejected, match="protected"):
                    payload.download(pattern_product, tmp_path / "sat")
            ground_link = bytes(proxy.captured["down"]) + b"|" + bytes(proxy.captured["up"])
    assert housekeeping["mission"]["generator"]["frames"] == generator.frames() == 250
    products = b"|".join(f.path.read_bytes() for f in files)
    payload_bus = b"|".join(bus_bodies)
    assert len(payload_bus) > 10_000 and len(ground_link) > 10_000 and len(products) > 10_000
    qrng = HeadQrng(HEAD_KEY)
    slot_stream = qrng.slot_words_range(0, 16_384).tobytes()
    fifo_stream = qrng.fifo_bytes(16_384)
    pattern = pack_nibbles(generator.truth().symbols(np.arange(131_072)))
    secrets = [HEAD_KEY, HEAD_KEY[:16], HEAD_KEY[16:], HEAD_KEY.hex().encode()]
    secrets += _windows(slot_stream) + _windows(fifo_stream) + _windows(pattern)
    for where, data in (("payload bus", payload_bus), ("ground link", ground_link)):
        found = [s for s in secrets if s in data]
        assert not found, f"{where} carries {len(found)} pieces of the head's secrets"
    assert not [s for s in secrets if s in products]
    assert head.qrng.fifo_bytes_out == 0  # the controller never drew from the QRNG
    # the logs: the firmware's stderr and every Python log record of the run
    logs = (target.stderr_text() + caplog.text + repr(head) + repr(generator)).encode()
    assert not [s for s in secrets if s in logs or s.hex().encode() in logs]


def test_a_keyed_pattern_source_is_the_heads_stream_and_keeps_its_key_private(tmp_path):
    """The simulator's stand-in for a secret pattern (pattern_source.json, kind aes256-ctr)
    computes the same words as the emulated head and writes its key 0600, never in repr."""
    from host.formats.patterns import (
        KeyedPatternSource,
        mapping_from_thresholds,
        read_pattern_source,
        write_pattern_source,
    )

    mapping = mapping_from_thresholds(16384, 32768, 49152)
    source = KeyedPatternSource(HEAD_KEY, mapping, 0, 27_400_000_000)
    slots = np.array([27_399_999_999, 0, 17, 18, 19, 5_000_000_001])
    expected = mapping.symbols(HeadQrng(HEAD_KEY).slot_words(slots))
    assert np.array_equal(source.symbols(slots), expected)
    assert HEAD_KEY.hex() not in repr(source)
    path = tmp_path / "pattern_source.json"
    write_pattern_source(path, source)
    assert path.stat().st_mode & 0o777 == 0o600
    assert np.array_equal(read_pattern_source(path).symbols(slots), expected)
    with pytest.raises(IndexError):
        source.symbols([27_400_000_000])
    with pytest.raises(ValueError, match="32 needed"):
        KeyedPatternSource(HEAD_KEY[:16], mapping, 0, 10)


def test_a_pattern_product_with_a_splitmix64_seed_is_refused(tmp_path):
    """A product from before the head QRNG (kind 6: a seed that expands into the whole
    pass) can never make a key: every reader refuses it, naming why."""
    from host.errors import BadInput
    from host.formats.patterns import open_patterns, pattern_runs_from_log
    from host.formats.qrec import Kind, encode_record

    old = struct.pack("<I8s6I", 1, bytes(range(8)), 16384, 32768, 49152, 0, 4096, 10)
    (tmp_path / "patterns.qrec").write_bytes(encode_record(Kind.RETIRED_PATTERN_SOURCE, 0, old))
    for read in (open_patterns, lambda d: pattern_runs_from_log(d / "patterns.qrec")):
        with pytest.raises(BadInput, match="splitmix64 seed.*retired"):
            read(tmp_path)


def test_a_run_planned_ahead_gives_the_symbols_the_head_then_emits_and_reads_wait_for_them():
    # the pass at its pace (host/mission/run.py PassAtItsPace): the ground simulation takes
    # the run's symbols before the frames go by (PlannedTruth), and they must be the ones
    # the head then emits; a pattern read of slots the lagging head has not emitted yet
    # waits for them (pattern_wait_s), and is refused at once otherwise
    import threading

    head = OpticalHead(seed=3, qrng_key=HEAD_KEY)
    generator = pattern_generator.attach(head)
    for offset, value in ((5, 16384), (6, 32768), (7, 49152)):
        assert head.write_reg(0x0600 + offset, value) == pb.OK
    assert head.write_reg(pb.REG_FRAME_SLOTS, 4096) == pb.OK
    assert head.write_reg(0x0600, 1) == pb.OK
    planned = pattern_generator.PlannedTruth(generator.memory, 40 * 4096)
    slots = np.random.default_rng(4).integers(0, planned.slot_count, 20_000)
    ahead = planned.symbols(slots)
    assert generator.memory.slot_count == 0  # nothing emitted yet
    late = pb.pack_pattern_read(9, 0, np.array([39 * 4096 + 5]))
    assert head.handle_pattern_port(late) == pb.pack_pattern_reply(9, pb.E_BAD_ADDRESS)
    head.pattern_wait_s = 30.0
    emit = threading.Timer(
        0.2, pattern_generator.fast_forward, (head, head.boundary_ps(generator.first_frame + 39))
    )
    emit.start()
    reply = head.handle_pattern_port(late)  # waits for the head's clock to emit the slot
    emit.join()
    assert reply == pb.pack_pattern_reply(9, pb.OK, planned.symbols([39 * 4096 + 5]))
    assert head.write_reg(0x0600, 0) == pb.OK
    assert generator.truth().slot_count == planned.slot_count
    assert np.array_equal(ahead, generator.truth().symbols(slots))
    with pytest.raises(IndexError):
        planned.symbols([planned.slot_count])


def test_the_heads_health_tests_pass_its_stream_and_catch_a_stuck_or_biased_source():
    # SP 800-90B 4.4 with the firmware's cutoffs (sequencer.qrng_health: RCT 7, APT 27 in
    # 512): 1 MiB of the emulated source (fixed key: deterministic) passes both
    stream = HeadQrng(HEAD_KEY).slot_words_range(0, 1 << 18).astype("<u4").tobytes()
    assert health_failures(stream) == 0
    assert health_failures(stream[:100] + bytes(7) + stream[100:]) == RCT_FAILED
    assert health_failures(stream[:100] + bytes(6) + stream[100:]) == 0
    biased = bytes(b for i in range(256) for b in (0xAA, i))  # 0xAA: half of the window
    assert health_failures(biased) == APT_FAILED


def test_a_stuck_head_qrng_stops_generation_at_its_frame_and_the_controller_reports_it(
    tmp_path,
):
    """Head generation: the controller never sees the QRNG's bytes, so the head runs the
    health tests on them before mapping; a source stuck from the middle of frame 100
    fails the repetition count test there, that frame is not emitted and generation
    stops; the controller reads GEN_HEALTH at its housekeeping period, logs the run's end
    with the 100 frames before it and reports qrng_fault."""
    from host.mission.run import sequencer_config
    from host.simulate import profiles

    head = OpticalHead(seed=4, fifo_depth=2048, qrng_key=HEAD_KEY)
    generator = pattern_generator.attach(head)
    storage = tmp_path / "flash"
    (storage / "link").mkdir(parents=True)
    (storage / "link" / "key").write_bytes(LINK_KEY)
    config = sequencer_config(profiles.load("micius-2017", {}), "head")
    with HeadServer(head) as server:
        with UnixTarget(storage_dir=storage, bus_address=server.address) as target:
            with PayloadClient(target.ground_port, LINK_KEY, timeout_s=30.0) as payload:
                payload.configure(config)
                payload.start()
                slots = head.regs[pb.REG_FRAME_SLOTS]
                head.qrng.stick_from(100 * slots + slots // 2)
                pattern_generator.fast_forward(head, head.boundary_ps(generator.first_frame + 249))
                deadline = time.monotonic() + 30.0  # the controller polls every 100 ms
                while True:
                    during = payload.housekeeping()["mission"]["generator"]
                    if "qrng_fault" in during or time.monotonic() > deadline:
                        break
                    time.sleep(0.2)
                payload.stop()
                after = payload.housekeeping()["mission"]["generator"]
    # (half a frame of one byte value: the adaptive proportion test fails there too)
    assert generator.health == RCT_FAILED | APT_FAILED and not generator.enabled
    assert generator.frames() == 100  # frame 100 held the first stuck word: not emitted
    assert during["qrng_fault"] == "rct" and not during["running"], during
    assert during["frames"] == 100, during
    # the stop after it logs nothing more: the run's end was logged at the fault (record 2)
    assert after == during, after

"""The payload bus: the host twin against the golden vectors, and the emulated optical head
serving requests over a real TCP endpoint, malformed and fuzzed ones included."""

import json
import random
import socket
import struct
import time
from pathlib import Path

import numpy as np
import pytest

from emulator.optical_head import HeadServer, OpticalHead
from host.protocol import payload_bus as pb
from host.protocol.framing import FrameReader, encode_frame

VECTORS = json.loads((Path(__file__).parent / "vectors" / "payload_bus.json").read_text())


def _request_from(case):
    op = case["op"]
    if op == "read":
        return pb.read(case["tag"], case["addr"], case["count"])
    if op == "write":
        return pb.write(case["tag"], case["addr"], *case["words"])
    if op == "fifo_read":
        return pb.fifo_read(case["tag"], case["fifo"], case["max_bytes"])
    if op == "read_write":
        return pb.read_write(
            case["tag"], case["write_addr"], tuple(case["words"]), case["addr"], case["count"]
        )
    if op == "track":
        return pb.track(case["tag"], tuple(case["words"]))
    return pb.mem_write(case["tag"], case["mem"], case["offset"], bytes.fromhex(case["data"]))


@pytest.mark.parametrize("case", VECTORS["requests"], ids=lambda c: c["name"])
def test_requests_pack_and_parse_as_the_vectors(case):
    request = _request_from(case)
    body = bytes.fromhex(case["body"])
    assert request.pack() == body
    assert pb.unpack_request(body) == request
    assert encode_frame(body).hex() == case["frame"]


@pytest.mark.parametrize("case", VECTORS["replies"], ids=lambda c: c["name"])
def test_replies_parse_as_the_vectors(case):
    reply = pb.unpack_reply(bytes.fromhex(case["body"]))
    assert reply.tag == case["tag"] and reply.status == case["status"]
    assert list(reply.words) == case.get("words", [])
    assert reply.data.hex() == case.get("data", "")
    assert reply.pack().hex() == case["body"]


@pytest.mark.parametrize(
    "body, message",
    [
        (b"\x01", "need op and tag"),
        (bytes.fromhex("01110301"), "READ: 2 argument bytes"),
        (bytes.fromhex("0111030100"), "count 0"),
        (bytes.fromhex("021205010207000000"), "WRITE: count 2 does not match"),
        (bytes.fromhex("031402ff0f"), "max_bytes 4095"),
        (bytes.fromhex("0415010000000005000102"), "MEM_WRITE: length 5 does not match 2 bytes"),
        (bytes.fromhex("7f00"), "unknown op 0x7f"),
        (bytes.fromhex("06211005000005"), "READ_WRITE: missing addresses"),
        (bytes.fromhex("062110050000050b"[:-2] + "00"), "read count 0"),
        (bytes.fromhex("062110050100050a"), "READ_WRITE: write count 1 does not match 0"),
        (bytes.fromhex("082101") + bytes(24), "TRACK: 27 bytes, expected 28"),
        (bytes.fromhex("082102") + bytes(25), "TRACK: unknown flags 0x02"),
    ],
)
def test_malformed_requests_are_refused_with_the_reason(body, message):
    with pytest.raises(pb.BusProtocolError, match=message):
        pb.unpack_request(body)


class BusClient:
    """A minimal CPython bus master over TCP, as the controller's UART1 would be."""

    def __init__(self, address):
        self.sock = socket.create_connection(address, timeout=5)
        self.reader = FrameReader(pb.MAX_BODY_BYTES)
        self.pending = []

    def send_raw(self, data: bytes):
        self.sock.sendall(data)

    def call(self, request: pb.Request) -> pb.Reply:
        self.sock.sendall(encode_frame(request.pack()))
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            self.pending += self.reader.feed(self.sock.recv(65536))
            while self.pending:
                body = self.pending.pop(0)
                if body[1] == request.tag and body[0] == request.op | pb.REPLY_FLAG:
                    return pb.unpack_reply(body)
        raise TimeoutError("no reply")

    def close(self):
        self.sock.close()


@pytest.fixture
def head_client():
    head = OpticalHead(seed=7)
    with HeadServer(head) as server:
        client = BusClient(server.address)
        yield head, client
        client.close()


def test_a_frame_cut_by_a_dropped_connection_does_not_spoil_the_next_connections_first():
    """The controller's link drops mid-request and reconnects: the head answers the new
    connection's first request (its unfinished frame was counted and dropped, not glued
    in front of the next frame, whose CRC would then fail)."""
    head = OpticalHead(seed=7)
    with HeadServer(head) as server:
        cut = BusClient(server.address)
        cut.send_raw(encode_frame(pb.read(1, pb.REG_ID, 2).pack())[:5])
        time.sleep(0.3)  # the head has read the partial frame before the line drops
        cut.close()
        client = BusClient(server.address)
        reply = client.call(pb.read(2, pb.REG_ID, 2))
        client.close()
    assert reply.status == pb.OK and reply.words == (pb.HEAD_ID, pb.HEAD_VERSION)
    assert head.reader.drops["short"] == 1


def test_head_registers_reads_writes_and_errors(head_client):
    head, client = head_client
    reply = client.call(pb.read(1, pb.REG_ID, 2))
    assert reply.status == pb.OK and reply.words == (pb.HEAD_ID, pb.HEAD_VERSION)
    assert client.call(pb.write(2, pb.REG_FRAME_SLOTS, 512)).status == pb.OK
    assert client.call(pb.read(3, pb.REG_FRAME_SLOTS, 1)).words == (512,)
    assert client.call(pb.read(4, 0x7777, 1)).status == pb.E_BAD_ADDRESS
    assert client.call(pb.write(5, pb.REG_FRAME_COUNT, 9)).status == pb.E_READ_ONLY
    assert client.call(pb.write(6, pb.REG_COMMIT, 5)).status == pb.E_REFUSED  # not frame 0
    assert client.call(pb.fifo_read(7, pb.FIFO_QRNG, 16)).status == pb.E_REFUSED  # QRNG off
    assert client.call(pb.write(8, pb.REG_QRNG_CTRL, 1)).status == pb.OK
    assert len(client.call(pb.fifo_read(9, pb.FIFO_QRNG, 2048)).data) == 2048


def test_read_write_writes_then_reads_in_one_transaction(head_client):
    head, client = head_client
    # the write lands before the read: the reply already shows it
    reply = client.call(pb.read_write(1, pb.REG_FRAME_SLOTS, (256,), pb.REG_FRAME_SLOTS, 1))
    assert reply.status == pb.OK and reply.words == (256,) and reply.addr == pb.REG_FRAME_SLOTS
    # no words to write: a plain read
    reply = client.call(pb.read_write(2, pb.REG_FRAME_SLOTS, (), pb.REG_ID, 2))
    assert reply.words == (pb.HEAD_ID, pb.HEAD_VERSION)
    # a refused write stops the transaction with its status: no read done
    reply = client.call(pb.read_write(3, pb.REG_FRAME_COUNT, (9,), pb.REG_ID, 1))
    assert reply.status == pb.E_READ_ONLY and reply.words == ()
    # the write is done even when the read then fails (the reply says only the status)
    reply = client.call(pb.read_write(4, pb.REG_FRAME_SLOTS, (128,), 0x7777, 1))
    assert reply.status == pb.E_BAD_ADDRESS and head.regs[pb.REG_FRAME_SLOTS] == 128


def test_track_is_read_write_of_the_tracking_blocks_in_its_fixed_layout():
    """Two heads on the same plant, one served READ_WRITE of the sensor and command blocks,
    the other TRACK: the same sensors every period and the same plant afterwards (TRACK is
    the tracking duty's period, docs/payload-bus.md "TRACK")."""
    from emulator.optical_plant import OpticalPlant, PlantParams
    from emulator.tracking_lockstep import TrackingHead

    heads = []
    for _ in range(2):
        head = TrackingHead(seed=3)
        head.attach(OpticalPlant(PlantParams(seed=3, initial_error_urad=(300.0, -200.0)), 0.05))
        heads.append(head)
    generic, fixed = heads
    commands: tuple[int, ...] = ()
    for k in range(60):
        tag = k & 0xFF
        request = pb.read_write(
            tag, pb.TRACK_COMMANDS_ADDR, commands, pb.TRACK_SENSORS_ADDR, pb.TRACK_SENSOR_WORDS
        )
        want = pb.unpack_reply(generic.handle(request.pack()))
        got = pb.unpack_reply(fixed.handle(pb.track(tag, commands).pack()))
        assert want.status == got.status == pb.OK and got.words == want.words, k
        assert len(fixed._last_reply) == pb.TRACK_REPLY_BYTES
        # commands as the firmware computes them: signed nrad words, STATE last
        fsm = (-1500 + 37 * k) & 0xFFFFFFFF
        commands = (fsm, 2000 + k, (-40) & 0xFFFFFFFF, 15, (-50000) & 0xFFFFFFFF, 120, 4)
    assert generic.plant.k == fixed.plant.k == 59
    assert np.array_equal(generic.plant.err_x[:59], fixed.plant.err_x[:59])


def test_track_refuses_a_sensor_value_its_field_cannot_hold():
    """A quadrant above the 16-bit ADC's range is the device's fault: the head refuses the
    exchange rather than send a truncated value."""

    class Saturating(OpticalHead):
        def read_reg(self, addr):
            if pb.TRACK_SENSORS_ADDR <= addr < pb.TRACK_SENSORS_ADDR + pb.TRACK_SENSOR_WORDS:
                return 70_000 if addr == pb.TRACK_SENSORS_ADDR + 2 else 1
            return super().read_reg(addr)

    reply = pb.unpack_reply(Saturating(seed=1).handle(pb.track(5).pack()))
    assert reply.status == pb.E_REFUSED and reply.words == ()
    # without a tracking device the blocks do not exist: the head says so
    reply = pb.unpack_reply(OpticalHead(seed=1).handle(pb.track(6, (0,) * 7).pack()))
    assert reply.status == pb.E_BAD_ADDRESS


def test_a_refused_track_leaves_a_function_block_as_it_was(head_client):
    """The same for any block attached at 0x0500: a TRACK refused for its sensor value
    leaves the commands it wrote unlatched (the block's state as before the exchange)."""
    from emulator.optical_head import RegisterDevice

    class Latching(RegisterDevice):
        def __init__(self):
            self.commands, self.latched = [0] * 7, []

        def read_reg(self, offset):
            if offset >= pb.TRACK_SENSOR_WORDS:
                raise KeyError(offset)
            return 70_000 if offset == 0 and len(self.latched) == 2 else 1

        def write_reg(self, offset, value):
            self.commands[offset - 0x10] = value
            if offset == 0x16:
                self.latched.append(tuple(self.commands))
            return pb.OK

    head, client = head_client
    block = Latching()
    head.attach(pb.REG_TRACKING_BASE, block)
    assert client.call(pb.track(1, (1,) * 7)).status == pb.OK
    assert client.call(pb.track(2, (2,) * 7)).status == pb.E_REFUSED  # QA of 70,000
    assert block.latched == [(1,) * 7] and block.commands == [1] * 7


def test_a_refused_track_leaves_the_head_as_it_was_and_the_loop_resends_once():
    """The firmware's tracking duty on unix against the emulated head, whose ADC glitches
    once at two periods (a quadrant of 70,000 counts, refused). The duty counts each
    refusal and sends the same commands with its next period, so the refused exchange
    must not have latched them: the plant sees every command set once, as in a run
    without the glitch (before: it advanced a period on the refused set, then again on
    the resent one, and its trajectory parted from the clean run's)."""
    from emulator.optical_plant import PlantParams
    from emulator.tracking_lockstep import REG_TRK_SENSORS, TrackingHead, run_over_bus

    class GlitchingAdc(TrackingHead):
        def __init__(self, glitch_steps):
            super().__init__(seed=5)
            self.glitch_steps = set(glitch_steps)

        def read_reg(self, addr):
            value = super().read_reg(addr)
            if addr == REG_TRK_SENSORS + 2 and self.plant.k in self.glitch_steps:
                self.glitch_steps.discard(self.plant.k)  # once: the resent period reads
                return 70_000
            return value

    params = PlantParams(seed=5, initial_error_urad=(500.0, -300.0))  # acquires quickly
    clean = run_over_bus(params, duration_s=0.15)
    glitching = run_over_bus(params, duration_s=0.15, head=GlitchingAdc((70, 120)))
    assert clean.extra["bus_errors"] == 0 and glitching.extra["bus_errors"] == 2
    assert glitching.extra["head"].glitch_steps == set()
    # 300 periods: the clean run's 300 command sets (the first period sends none, the
    # stop's flush the last), the glitching run's 298 kernel steps' sets, each once
    assert (clean.plant.k, glitching.plant.k) == (300, 298)
    n = glitching.plant.k
    for log in ("fsm_cmd_log", "states", "err_x", "err_y", "downlink_x", "downlink_y"):
        assert np.array_equal(getattr(glitching.plant, log)[:n], getattr(clean.plant, log)[:n])
    assert glitching.transitions == clean.transitions


def test_laser_emits_the_committed_bank_and_blank_frames_when_late(head_client):
    head, client = head_client
    client.call(pb.write(1, pb.REG_FRAME_SLOTS, 8))
    client.call(pb.mem_write(2, pb.MEM_PATTERN, 0, bytes([0x10, 0x32, 0x54, 0x76])))
    assert client.call(pb.write(3, pb.REG_COMMIT, 0)).status == pb.OK
    # a committed bank is frozen until it is swapped in
    assert client.call(pb.mem_write(4, pb.MEM_PATTERN, 0, b"\xff")).status == pb.E_REFUSED
    client.call(pb.write(5, pb.REG_LASER_CTRL, 1))
    # lockstep: polling the frame counter with the bank full runs the clock one frame
    assert client.call(pb.read(6, pb.REG_FRAME_COUNT, 2)).words == (1, 0)
    assert head.emitted[0].nibbles == bytes([0x10, 0x32, 0x54, 0x76])
    assert head.emitted[0].first_slot == 0
    head.advance_to(head.boundary_ps(2))  # time passes with nothing committed
    assert head.blank_frames == [1, 2]
    assert client.call(pb.read(7, pb.REG_UNDERRUNS, 1)).words == (2,)
    assert client.call(pb.write(8, pb.REG_COMMIT, 2)).status == pb.E_REFUSED  # too late


def test_tdc_fifo_overflow_is_counted_and_every_event_accounted(head_client):
    head, client = head_client
    head.fifo_depth = 100
    head.sources.uplink_rate_hz = (1e9, 0, 0, 0)
    client.call(pb.write(1, pb.REG_TDC_CTRL, 1))
    head.advance_to(1_000_000)  # 1 us at 1 GHz: about 1000 events into a 100-event FIFO
    events = []
    for tag in range(2, 256):  # a new tag each time: a repeated tag is a retransmission
        data = client.call(pb.fifo_read(tag, pb.FIFO_TDC, 2043)).data
        if not data:
            break
        events += [struct.unpack_from("<BQ", data, i) for i in range(0, len(data), 9)]
    overflow = client.call(pb.read(1, pb.REG_TDC_OVERFLOW, 1)).words[0]
    assert len(events) == 100
    assert overflow == len(head.tdc_truth) - 100 > 800
    assert [tuple(e) for e in events] == head.tdc_truth[:100]


def test_ten_thousand_mutated_frames_are_counted_and_dropped(head_client):
    head, client = head_client
    rng = random.Random(2024)
    valid = [bytes.fromhex(c["body"]) for c in VECTORS["requests"]]
    stream = bytearray()
    for i in range(10_000):
        # even: corrupt the frame on the wire; odd: a well-framed but malformed body
        body = bytearray(rng.choice(valid))
        frame = bytearray(encode_frame(bytes(body))) if i % 2 == 0 else body
        for _ in range(rng.randint(1, 4)):
            if not frame:
                break
            kind = rng.randrange(4)
            pos = rng.randrange(len(frame))
            if kind == 0:
                frame[pos] ^= 1 << rng.randrange(8)
            elif kind == 1:
                del frame[pos]
            elif kind == 2:
                frame.insert(pos, rng.randrange(256))
            else:
                frame = frame[: pos + 1]
        stream += (frame if i % 2 == 0 else encode_frame(bytes(frame))[:-1]) + b"\x00"
    client.send_raw(bytes(stream))
    # the head is still in step: a good request right after the storm is answered
    reply = client.call(pb.read(0x42, pb.REG_ID, 1))
    assert reply.words == (pb.HEAD_ID,)
    dropped = head.reader.dropped
    assert dropped > 2500 and head.bad_requests > 1000
    errors = client.call(pb.read(0x43, pb.REG_BUS_ERRORS, 1)).words[0]
    assert errors == dropped + head.bad_requests


def test_a_repeated_request_is_answered_from_the_cache_not_executed_again(head_client):
    head, client = head_client
    head.sources.uplink_rate_hz = (1e9, 0, 0, 0)
    client.call(pb.write(1, pb.REG_TDC_CTRL, 1))
    head.advance_to(100_000)  # about 100 events
    first = client.call(pb.fifo_read(2, pb.FIFO_TDC, 180))
    again = client.call(pb.fifo_read(2, pb.FIFO_TDC, 180))  # the reply was "lost": resend
    assert again == first and len(first.data) == 180
    assert head.retransmissions == 1
    fresh = client.call(pb.fifo_read(3, pb.FIFO_TDC, 180))
    assert fresh.data != first.data  # a new tag reads on
    assert head.tdc_delivered == 40


def test_a_function_block_plugs_into_the_register_map(head_client):
    """How tracking (issue 6) adds its registers: a RegisterDevice attached at 0x0500."""
    from emulator.optical_head import RegisterDevice

    class Mirror(RegisterDevice):
        def __init__(self):
            self.regs = {0: 0, 1: 0}
            self.now_ps = -1

        def read_reg(self, offset):
            return self.regs[offset]

        def write_reg(self, offset, value):
            if offset not in self.regs:
                return pb.E_BAD_ADDRESS
            self.regs[offset] = value
            return pb.OK

        def advance_to(self, t_ps):
            self.now_ps = t_ps

    head, client = head_client
    mirror = Mirror()
    head.attach(pb.REG_TRACKING_BASE, mirror)
    assert client.call(pb.write(1, 0x0500, 7, 0xFFFFFFFE)).status == pb.OK
    assert client.call(pb.read(2, 0x0500, 2)).words == (7, 0xFFFFFFFE)
    assert client.call(pb.read(3, 0x0502, 1)).status == pb.E_BAD_ADDRESS
    assert mirror.now_ps == head.now_ps
    with pytest.raises(ValueError):
        head.attach(0x0100, mirror)  # the laser's block

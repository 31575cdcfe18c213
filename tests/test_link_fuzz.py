"""Fuzz the ground link of the real firmware: random and mutated frames (random bodies,
valid telecommands with bytes flipped, cut or extended, damaged encodings, wrong keys,
replays, raw noise). The firmware must not crash, must account for every frame (a good
frame or a frame drop by reason) and every good frame (accepted or rejected by reason),
and must accept exactly the genuine telecommands."""

import random
import threading
import time

import pytest
from linkhelpers import KEY, qemu_payload, unix_payload

from host.link.client import PayloadClient
from host.protocol import ccsds
from host.protocol.framing import encode_frame


def _fuzz_stream(count: int, seed: int) -> tuple[list[bytes], int]:
    """`count` frames' worth of bytes (each ends with a delimiter) and how many of them
    are genuine, fresh telecommands. Counters start high so they are fresh."""
    rng = random.Random(seed)
    counter = 1_000_000
    frames = []
    genuine = 0
    accepted_packets = []

    def fresh_tc(key=KEY, harmless=False):
        nonlocal counter
        counter += 1
        choices = [(17, 1, b""), (3, 27, b""), (128, 1, b"\x00\x00")]
        if not harmless:  # reading a missing product: rejected as "product" if intact
            choices.append((128, 3, b"\x01x" + bytes(6)))
        service, subtype, data = rng.choice(choices)
        return ccsds.build_tc(key, counter, service, subtype, data, ack=rng.randrange(2))

    for i in range(count):
        kind = rng.random()
        if i % 200 == 0:  # a genuine command now and then: the link still works
            packet = fresh_tc(harmless=True)
            accepted_packets.append(packet)
            frames.append(encode_frame(packet))
            genuine += 1
        elif kind < 0.25:  # random body, valid framing
            size = rng.choice([0, 1, 5, 32, 33, 60, 200, 1100, 1101, 1500])
            frames.append(encode_frame(rng.randbytes(rng.randrange(size + 1))))
        elif kind < 0.55:  # a valid telecommand, mutated, then framed correctly
            packet = bytearray(fresh_tc())
            how = rng.randrange(4)
            if how == 0:
                for at in rng.sample(range(len(packet)), rng.randrange(1, 4)):
                    packet[at] ^= 1 << rng.randrange(8)  # distinct places: no undoing
            elif how == 1:
                del packet[rng.randrange(len(packet)) :]
            elif how == 2:
                packet += rng.randbytes(rng.randrange(1, 40))
            else:  # right length and PEC, wrong content: only the tag can tell
                packet[rng.randrange(6, len(packet) - 18)] ^= 0x01
                crc = ccsds.crc16(bytes(packet[:-2]))
                packet[-2:] = crc.to_bytes(2, "big")
            frames.append(encode_frame(bytes(packet)))
        elif kind < 0.70:  # a damaged encoding (may split into several frames)
            frame = bytearray(encode_frame(fresh_tc()))
            for at in rng.sample(range(len(frame) - 1), rng.randrange(1, 4)):
                frame[at] ^= rng.randrange(1, 256)
            frames.append(bytes(frame))
        elif kind < 0.80:  # a wrong key
            frames.append(encode_frame(fresh_tc(bytes(32))))
        elif kind < 0.90 and accepted_packets:  # a replay of a genuine command
            frames.append(encode_frame(rng.choice(accepted_packets)))
        else:  # raw noise up to a delimiter
            frames.append(rng.randbytes(rng.randrange(1, 300)).replace(b"\x00", b"") + b"\x00")
    return frames, genuine


def _drain(port_serial, stop: threading.Event, received: list[int]) -> None:
    while not stop.is_set():
        chunk = port_serial.read(4096)
        received[0] += len(chunk)


def _run_fuzz(port: str, count: int, seed: int) -> None:
    frames, genuine = _fuzz_stream(count, seed)
    stream = b"".join(frames)
    segments = sum(1 for piece in stream.split(b"\x00") if piece)
    with PayloadClient(port, KEY, timeout_s=20.0) as payload:
        before = payload.housekeeping()["link"]
        payload.counter = 2_000_000_000  # past every counter in the fuzz stream
        # The payload answers most frames: drain its telemetry while sending, as a
        # ground station would, so neither side blocks on a full pty.
        stop = threading.Event()
        received = [0]
        payload.link.serial.timeout = 0.05
        drain = threading.Thread(target=_drain, args=(payload.link.serial, stop, received))
        drain.start()
        try:
            for start in range(0, len(stream), 4096):
                payload.link.serial.write(stream[start : start + 4096])
            payload.link.serial.flush()
            # wait until the payload has gone quiet
            last = -1
            while received[0] != last:
                last = received[0]
                time.sleep(1.0)
        finally:
            stop.set()
            drain.join()
        after = payload.housekeeping()["link"]
    frames_seen = _frame_count(after) - _frame_count(before)
    good_frames = after["frames"]["frames_ok"] - before["frames"]["frames_ok"]
    decided = (
        (after["tc_accepted"] - before["tc_accepted"])
        + sum(after["tc_rejected"].values())
        - sum(before["tc_rejected"].values())
    )
    # Each snapshot counts its own request as a frame before reporting, and as accepted
    # only after: the second request adds one frame, the first one acceptance.
    assert frames_seen == segments + 1
    assert decided == good_frames
    assert after["tc_accepted"] - before["tc_accepted"] == genuine + 1, (before, after)
    rejected = after["tc_rejected"]
    for reason in ("auth", "replay", "length", "pec"):
        assert rejected.get(reason, 0) > 0, rejected
    assert segments >= count


def _frame_count(link: dict) -> int:
    return sum(link["frames"].values())


def test_unix_firmware_survives_10000_fuzzed_frames_and_counts_each(tmp_path):
    with unix_payload(tmp_path, {}) as target:
        _run_fuzz(target.ground_port, 10_000, seed=1)
        assert target.running()


@pytest.mark.qemu
@pytest.mark.slow
def test_qemu_firmware_survives_fuzzed_frames_and_counts_each():
    with qemu_payload({}) as target:
        _run_fuzz(target.ground_port, 2_000, seed=2)
        assert target.running()

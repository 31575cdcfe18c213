"""The bound on the payload's TM 1,2 reports for frames that consumed no counter
(docs/ground-link.md "Verification and reason codes"), on the real firmware (unix target)
over its real pty link: a sustained flood of framing garbage, wrong tags and replayed
genuine frames gets reports at the two buckets' rates, not per ground poll; a genuine
ground's replay or auth report comes through framing garbage sent in the same write;
acceptances are never dropped."""

from __future__ import annotations

import re
import time
from pathlib import Path

from linkhelpers import KEY, Downlink, unix_payload

from host.link.client import PayloadClient
from host.protocol import ccsds
from host.protocol.framing import encode_frame

TELECOMMANDS = Path(__file__).resolve().parents[1] / "firmware/payload/telecommands.py"
GARBAGE_CODES = frozenset({1, 2, 3, 4, 5})  # short, header, length, pec, apid


def _firmware_const(name: str) -> int:
    """A constant of payload/telecommands.py, as the firmware has it."""
    text = TELECOMMANDS.read_text()
    match = re.search(rf"^{name} = const\(([0-9_]+)\)", text, re.MULTILINE)
    assert match, name
    return int(match.group(1).replace("_", ""))


GARBAGE_INTERVAL_S = _firmware_const("GARBAGE_REPORT_INTERVAL_US") / 1e6
GARBAGE_BURST = _firmware_const("GARBAGE_REPORT_BURST")
REFUSAL_INTERVAL_S = _firmware_const("REFUSAL_REPORT_INTERVAL_US") / 1e6
REFUSAL_BURST = _firmware_const("REFUSAL_REPORT_BURST")

SHORT_FRAME = encode_frame(b"\x00")  # 5 bytes on the wire: 'short'
HEADER_FRAME = encode_frame(bytes(7))  # not a TC: 'header'


def _verifications(packets):
    return [
        (at, size, ccsds.parse_verification(tm))
        for at, size, tm in packets
        if tm.service == ccsds.SVC_VERIFICATION
    ]


def test_a_sustained_flood_gets_reports_at_the_buckets_rates_and_every_acceptance(tmp_path):
    # An attacker who hears the uplink and transmits on it: framing garbage, wrong tags and
    # a recorded genuine frame replayed, a chunk every 10 ms for 4 s (many ground polls),
    # and the genuine ground's fresh commands among them. Under the old per-poll rule (2
    # reports a poll) this gave thousands of reports; now each bucket's burst plus one
    # report per interval of the time the payload was answering, and every genuine
    # command accepted and reported.
    flood_s = 4.0
    with unix_payload(tmp_path, {}) as target:
        with PayloadClient(target.ground_port, KEY, timeout_s=10.0) as payload:
            payload.ping()  # counter 1: the frame the attacker recorded
            recorded = encode_frame(ccsds.build_tc(KEY, 1, ccsds.SVC_TEST, 1))
            wrong_tag = encode_frame(ccsds.build_tc(bytes(32), 7, ccsds.SVC_TEST, 1))
            chunk = b"\x00" + SHORT_FRAME * 4 + HEADER_FRAME * 4 + wrong_tag * 2 + recorded * 2
            assert len(chunk) <= 256, len(chunk)  # one read of the firmware's
            genuine_ids = []
            sent = {"garbage": 0, "refusal": 0}
            with Downlink(payload.link.serial) as downlink:
                started = time.monotonic()
                writes = 0
                while time.monotonic() - started < flood_s:
                    data = chunk
                    if writes % 20 == 0:  # the genuine ground, every ~0.2 s
                        packet = ccsds.build_tc(
                            KEY, 100 + writes, ccsds.SVC_TEST, 1, sequence_count=writes
                        )
                        genuine_ids.append(ccsds.request_id(packet))
                        data = chunk + encode_frame(packet)
                    payload.link.serial.write(data)
                    sent["garbage"] += 8
                    sent["refusal"] += 4
                    writes += 1
                    time.sleep(0.01)
                flood_end = time.monotonic()
                downlink.wait_quiet()
            payload.counter = 1_000_000
            link = payload.housekeeping()["link"]
    packets = downlink.packets()
    reports = _verifications(packets)
    rejections = [(at, size, v) for at, size, v in reports if not v.accepted]
    garbage = [r for r in rejections if r[2].code in GARBAGE_CODES]
    refusals = [r for r in rejections if r[2].code not in GARBAGE_CODES]
    # the payload answered from the first write to the last report read, no longer
    answering_s = max(at for at, _, _ in packets) - started
    report_bytes = sum(size for _, size, _ in rejections)
    print(
        f"flood {flood_end - started:.2f} s, {writes} writes, {writes * len(chunk)} bytes up; "
        f"answering {answering_s:.2f} s: {len(garbage)} garbage + {len(refusals)} refusal "
        f"reports, {report_bytes} bytes ({report_bytes / answering_s:.0f} B/s); "
        f"unreported {link.get('tc_rejections_unreported')}"
    )
    garbage_most = int(GARBAGE_BURST + answering_s / GARBAGE_INTERVAL_S)
    refusal_most = int(REFUSAL_BURST + answering_s / REFUSAL_INTERVAL_S)
    assert len(garbage) <= garbage_most, (len(garbage), garbage_most)
    assert len(refusals) <= refusal_most, (len(refusals), refusal_most)
    # the buckets refill with time (not a cap spent once): a report per interval of the flood
    assert len(garbage) >= GARBAGE_BURST + int(flood_s / GARBAGE_INTERVAL_S) - 1, len(garbage)
    assert len(refusals) >= REFUSAL_BURST + int(flood_s / REFUSAL_INTERVAL_S) - 1, len(refusals)
    # every genuine command accepted and its acceptance sent, whatever the buckets hold
    accepted = [v.request for _, _, v in reports if v.accepted]
    assert accepted == genuine_ids, (len(accepted), len(genuine_ids))
    assert link["tc_accepted"] == 1 + len(genuine_ids)  # the ping, these (this report: after)
    counted = link["tc_rejected"]
    assert sum(counted.get(r, 0) for r in ("short", "header")) == sent["garbage"], counted
    assert sum(counted.get(r, 0) for r in ("auth", "replay")) == sent["refusal"], counted
    unreported = sent["garbage"] + sent["refusal"] - len(rejections)
    assert link["tc_rejections_unreported"] == unreported, (link, len(rejections))


def _refused_through_garbage(payload, downlink, packet, garbage_frames):
    """Write `garbage_frames` framing-garbage frames and then `packet`, in one write (one
    read of the firmware's); returns the verification reports of `packet`."""
    request = ccsds.request_id(packet)
    head = b"\x00" + (SHORT_FRAME + HEADER_FRAME) * (garbage_frames // 2)
    data = head + encode_frame(packet)
    assert len(data) <= 256, len(data)
    payload.link.serial.write(data)
    downlink.wait_quiet(0.5)
    return [v for _, _, v in _verifications(downlink.packets()) if v.request == request]


def test_a_genuine_grounds_replay_and_auth_reports_come_through_garbage_in_the_same_read(
    tmp_path,
):
    # The ground lost its counter file (its counter is behind the payload's), and then a
    # ground with the wrong key: each is rejected before its counter is consumed, and
    # needs the report (the replay report carries the payload's counter: the resync).
    # Framing garbage ahead of it in the same read, more than both buckets' bursts, after
    # a flood that emptied the garbage bucket, does not take it: before, two 5-byte
    # frames did.
    with unix_payload(tmp_path, {}) as target:
        with PayloadClient(target.ground_port, KEY, timeout_s=10.0) as payload:
            payload.counter = 500
            payload.ping()  # the payload's counter: 501
            with Downlink(payload.link.serial) as downlink:
                # the garbage bucket emptied first, over several reads
                for _ in range(5):
                    payload.link.serial.write(b"\x00" + SHORT_FRAME * 20)
                    time.sleep(0.02)
                downlink.wait_quiet(0.5)
                flood = [v for _, _, v in _verifications(downlink.packets())]
                garbage_frames = 2 * (GARBAGE_BURST + REFUSAL_BURST + 2)
                behind = ccsds.build_tc(KEY, 3, ccsds.SVC_TEST, 1, sequence_count=1)
                found = _refused_through_garbage(payload, downlink, behind, garbage_frames)
                assert [(v.code, v.last_counter) for v in found] == [(ccsds.REJECT_REPLAY, 501)]
                wrong_key = ccsds.build_tc(bytes(32), 502, ccsds.SVC_TEST, 1, sequence_count=2)
                found = _refused_through_garbage(payload, downlink, wrong_key, garbage_frames)
                assert [v.code for v in found] == [6], found  # auth
                # the ground resynced on the replay report: its next command is accepted
                resynced = ccsds.build_tc(KEY, 502, ccsds.SVC_TEST, 1, sequence_count=3)
                found = _refused_through_garbage(payload, downlink, resynced, garbage_frames)
                assert [v.accepted for v in found] == [True], found
            payload.counter = 1_000
            link = payload.housekeeping()["link"]
    assert len(flood) == GARBAGE_BURST, flood  # the flood's: its bucket's burst
    assert link["tc_rejected"]["replay"] == 1 and link["tc_rejected"]["auth"] == 1, link
    rejections = [v for _, _, v in _verifications(downlink.packets()) if not v.accepted]
    garbage = 100 + 3 * garbage_frames
    assert link["tc_rejections_unreported"] == garbage + 2 - len(rejections), link

# What a housekeeping telecommand (TC 3,27) costs the controller's CPU, counted in
# instructions on QEMU (-icount shift 0: the clock follows the instruction count, 1 ns an
# instruction). The whole request holds the ground duty's call, and in a pass every period
# of the paced loop waits for it (docs/scheduling.md "Stalls of the paced loop in a pass").
import gc
import json

import board
from payload import ccsds, storage

QEMU_ICOUNT_SHIFT = 0
# _ROOT, _fresh_root, _link, _tc (appended by the harness)
MPTEST_HELPERS = ("link_helpers.py",)

_HOUSEKEEPING_LIMIT = 1200 - ccsds.TM_HEADER_BYTES - ccsds.TM_TRAILER_BYTES


def _wrapped_us(a, b):
    return (b - a) & 0x3FFFFFFF


class _StatusMission:
    """A data path whose status() is the given one (its shape: payload.mission's)."""

    def __init__(self, status):
        self._status = status

    def status(self):
        return self._status


def _pass_like_status():
    # payload.mission.status()'s sections with 9-digit counters (small ints on a 32-bit
    # port) and a pass's names, ~1,100 bytes of report in all: what a pass's housekeeping
    # carries (1,127 bytes in bench_paced_loop_stalls' MPS2 pass)
    number = 123456789
    return {
        "pass_running": True,
        "time_scale_ppm": None,
        "sequencer": {"frames_sent": number, "frames_missed": number, "running": True},
        "tdc": {"up": [number, number], "blocks": number, "events_accepted": number,
                "lost": number, "overflows": number},  # fmt: skip
        "clock": {"offset_ps": number, "drift_ppt": number, "records": number},
        "bus": {"transactions": number, "timeouts": number, "retransmissions": number,
                "bad_replies": number, "error_status": number, "track": number,
                "frames_dropped": number},  # fmt: skip
        "storage": {"free_bytes": number, "records": number, "unstored": number},
        "generator": {"frames": number, "slots": number, "qrng_faults": number},
        "tracking": ["FINE", number, number, number, number, number, 1],
        "worst_us": {name: number for name in ("ground", "gtx", "bus", "sequencer", "tdc",
                                               "clock", "epochs", "hk", "trk-tm", "trk")},
    }  # fmt: skip


def _link_after_a_first_request(sliced):
    """(status, link, sent, command): a link whose mission reports a pass-like status, after
    a first housekeeping request (it stores the counters' ceilings: storage, measured
    apart) answered with its acceptance and report, sent emptied; command is the second
    request, the one a test measures."""
    key = b"h" * 32
    status = _pass_like_status()
    link, sent = _link(_fresh_root(key), _StatusMission(status))
    if sliced:
        link.sliced = True
    link.handle(_tc(key, 1, 3, 27))
    while sliced and link.step():
        pass
    assert [(p[7], p[8]) for p in sent] == [(1, 1), (3, 25)], [bytes(p[:9]) for p in sent]
    del sent[:]
    return status, link, sent, _tc(key, 2, 3, 27)


def _heap_walk_us(clock):
    """What the report's heap_free (gc.mem_free: a walk of the whole heap) costs, on a
    heap just collected."""
    gc.collect()
    start = clock.ticks_us()
    gc.mem_free()
    return _wrapped_us(start, clock.ticks_us())


def test_a_housekeeping_telecommand_costs_under_a_million_instructions_besides_the_heap_walk():
    # The report's JSON went through a stream written in Python: json.dump writes each
    # character of each string as a piece of its own, one Python method call each, and the
    # report was measured and then written that way: 5.6-6.8 M instructions on the 25 MHz
    # M3 (225-270 ms) for a ~1 KB report. Now json.dump writes into a BytesIO made at boot
    # (C) and the text is copied into the packet: the whole request (authentication,
    # report, JSON, the acceptance and the report packets' HMAC, PEC and framing into the
    # ground queue) stays under 1 M. The heap walk of the report's heap_free (gc.mem_free,
    # its cost grows with the heap: ~0.2 M on the STM32 board's 96 KiB, ~1.2 M on the
    # MPS2's 512 KiB) is measured apart and left out.
    status, link, sent, command = _link_after_a_first_request(sliced=False)
    clock = board.clock
    heap_walk_us = _heap_walk_us(clock)
    gc.collect()
    start = clock.ticks_us()
    link.handle(command)
    handle_us = _wrapped_us(start, clock.ticks_us())
    assert [(p[7], p[8]) for p in sent] == [(1, 1), (3, 25)], [bytes(p[:9]) for p in sent]
    packet = sent[1]
    text = packet[ccsds.TM_HEADER_BYTES : len(packet) - ccsds.TM_TRAILER_BYTES]
    report = json.loads(text)
    assert report["mission"] == status and "omitted" not in report, report.get("omitted")
    assert 1000 < len(text) <= _HOUSEKEEPING_LIMIT, len(text)
    if board.NAME != "unix":  # -icount shift 0: 1 ns an instruction
        instructions = (handle_us - heap_walk_us) * 1000
        print("@@housekeeping", handle_us * 1000, heap_walk_us * 1000, len(text))
        assert instructions <= 1_000_000, (handle_us * 1000, heap_walk_us * 1000)


def test_a_housekeeping_report_in_slices_holds_the_cpu_under_half_a_million_a_call():
    # As the application's main loop runs it (GroundLink.sliced, app.Controller.poll_ground:
    # one slice a scheduler pass, before any new frame): handle() authenticates and
    # queues the work, then step() does the heap walk, the report and its JSON, the
    # acceptance, the report, one a call. With the tracking loop paced, each is a stall
    # of the loop's periods: all but the heap walk's stay under 0.5 M instructions, and
    # the heap walk's is the walk alone (~0.2 M on the STM32 board's 96 KiB heap, ~1.2 M
    # on the MPS2's 512 KiB). Before, the whole request was one call: 7.8 M (MPS2) and
    # 7.0 M (netduino2), 1.8 M and 0.8 M with its JSON in C.
    status, link, sent, command = _link_after_a_first_request(sliced=True)
    clock = board.clock
    heap_walk = _heap_walk_us(clock) * 1000
    calls = []  # (instructions, packets sent by then)
    gc.collect()
    start = clock.ticks_us()
    link.handle(command)
    calls.append((_wrapped_us(start, clock.ticks_us()) * 1000, len(sent)))
    while link.housekeeping_stage:
        start = clock.ticks_us()
        assert link.step()
        calls.append((_wrapped_us(start, clock.ticks_us()) * 1000, len(sent)))
    assert not link.step()  # nothing left
    # nothing goes out before the JSON is complete; the acceptance, then the report
    assert [n for _, n in calls] == [0, 0, 0, 1, 2], calls
    assert [(p[7], p[8]) for p in sent] == [(1, 1), (3, 25)], [bytes(p[:9]) for p in sent]
    assert sent[0][ccsds.TM_HEADER_BYTES : ccsds.TM_HEADER_BYTES + 4] == command[:4]
    packet = sent[1]
    report = json.loads(packet[ccsds.TM_HEADER_BYTES : len(packet) - ccsds.TM_TRAILER_BYTES])
    assert report["mission"] == status and "omitted" not in report, report.get("omitted")
    assert report["link"]["tc_accepted"] == 1  # counted before this one's acceptance
    if board.NAME != "unix":  # -icount shift 0: 1 ns an instruction
        print("@@slices", heap_walk, [i for i, _ in calls])
        heap_walk_call = calls[1][0]
        others = [i for i, _ in calls[:1] + calls[2:]]
        assert max(others) <= 500_000, (heap_walk, calls)
        assert heap_walk_call <= heap_walk + 20_000, (heap_walk, calls)


class _StoreMission(_StatusMission):
    """A data path with a store: the link's durable writes (the counters' ceilings) sync
    its logs first (telecommands.GroundLink._logs_durable_first)."""

    def __init__(self, status, store):
        super().__init__(status)
        self.store = store


def test_the_replay_ceiling_is_written_once_in_64_telecommands_and_what_that_costs():
    # The telecommand counter's ceiling is stored 64 ahead (telecommands._COUNTER_STEP),
    # before the command acts: one command in 64 writes it inside handle(), after syncing
    # the data path's deferred logs. Here each command finds one unsynced record in a
    # deferred log, as a pass's housekeeping log has. Counter 1 writes the telecommand and
    # the telemetry ceilings (the first packet's), counter 65 the telecommand's again; the
    # 63 between write nothing. Measured in instructions (-icount shift 0).
    key = b"c" * 32
    root = _fresh_root(key)
    # an age bound no run reaches (the unix target runs on the host's clock: a loaded host
    # must not force an age sync between the ceilings)
    store = storage.Storage(root, clock=board.clock, sync_age_us=500_000_000)
    log = store.open_log("housekeeping", 3, 12, deferred=True)
    link, sent = _link(root, _StoreMission({}, store), keep=False)
    clock = board.clock
    costs = []
    syncs = []
    for counter in range(1, 67):
        log.append(b"r" * 12)
        ping = _tc(key, counter, 17, 1, ack=0)
        gc.collect()
        start = clock.ticks_us()
        link.handle(ping)
        costs.append(_wrapped_us(start, clock.ticks_us()))
        syncs.append(log.syncs)
    assert link.accepted == 66 and sent[0] == 66, (link.accepted, sent)
    # the log was synced by the two ceiling writes (the first ones' records with them)
    assert [i + 1 for i in range(66) if syncs[i] != (syncs[i - 1] if i else 0)] == [1, 65]
    if board.NAME != "unix":  # -icount shift 0: 1 ns an instruction
        typical = sorted(costs)[33]
        heavy = [i + 1 for i in range(66) if costs[i] > 4 * typical]
        ordinary = sorted(costs[1:64])
        print("@@ceiling", costs[0] * 1000, costs[64] * 1000, typical * 1000,
              ordinary[-1] * 1000)  # fmt: skip
        assert heavy == [1, 65], (heavy, costs)

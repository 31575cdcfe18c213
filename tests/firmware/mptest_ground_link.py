# The ground link's telecommand service (payload.telecommands) under real MicroPython:
# golden vectors shared with host/protocol/ccsds.py, authentication, replay protection,
# product access, and never raising on garbage.
import gc
import hashlib
import io
import json

from payload import auth, ccsds, keystore, scheduler, telecommands
from payload.framing import crc16

# What the firmware used to fall back to when no key was provisioned: public.
PUBLIC_KEY = hashlib.sha256(b"qkdsat development key, not for flight").digest()

# _ROOT, _fresh_root, _link, _tc, _verification, _unhex (appended by the harness)
MPTEST_HELPERS = ("link_helpers.py",)


def test_hmac_sha256_rfc4231():
    for case in load_vectors("ccsds.json")["hmac_sha256_rfc4231"]:
        mac = auth.Hmac(_unhex(case["key"])).digest(_unhex(case["data"]))
        assert mac == _unhex(case["hmac"]), case


def test_tm_writer_reproduces_vectors():
    vectors = load_vectors("ccsds.json")
    writer = ccsds.TmWriter(200, auth.Hmac(_unhex(vectors["key"])))
    for case in vectors["tm"]:
        data = _unhex(case["data"])
        writer.sequence_count = case["sequence_count"]
        writer.message_counter = case["message_counter"]
        writer.destination_id = case["destination_id"]
        writer.time_seconds = case["time_seconds"]
        writer.time_fraction = case["time_fraction"]
        writer.security_counter = case["security_counter"]
        writer.buf[19 : 19 + len(data)] = data
        length = writer.finish(case["service"], case["subtype"], len(data))
        assert bytes(writer.buf[:length]) == _unhex(case["packet"]), case["note"]


def test_host_built_telecommands_are_accepted_in_order():
    vectors = load_vectors("ccsds.json")
    key = _unhex(vectors["key"])
    root = _fresh_root(key)
    with open(root + "/products/patterns.qrec", "wb") as f:
        block = bytes(range(256))
        for _ in range(20):  # 5 kB, written without 5 kB in one piece (netduino2's heap)
            f.write(block)
    with open(root + "/link/product_key", "wb") as f:  # a pattern product is read: sealed
        f.write(bytes(32))
    link, sent = _link(root)
    assert link.key_state == "provisioned"
    for case in vectors["tc"]:
        del sent[:]
        link.handle(_unhex(case["packet"]))
        if case["service"] == 8:  # counter 0xFFFFFFFF: kept for the rekey, not consumed
            assert _verification(sent[0]) == (False, ccsds.REJECT_STATE), sent
        else:
            assert sent, case["note"]
            assert sent[0][7] != 1 or sent[0][8] == 1, (case["note"], sent)
    assert link.accepted == 3 and link.last_counter == 0x7FFFFFFF


def test_wrong_tag_and_replay_are_rejected_and_counted():
    key = b"k" * 32
    root = _fresh_root(key)
    link, sent = _link(root)
    link.handle(_tc(key, 5, 17, 1))
    assert _verification(sent[0]) == (True, 0)
    del sent[:]
    link.handle(_tc(key, 5, 17, 1))  # the same counter again
    assert _verification(sent[0]) == (False, ccsds.REJECT_REPLAY)
    assert ccsds.get_u32(sent[0], 25) == 5  # the report tells the ground where it stands
    del sent[:]
    link.handle(_tc(key, 4, 17, 1))  # an older counter
    link.handle(_tc(b"x" * 32, 9, 17, 1))  # a wrong key
    link.handle(_tc(PUBLIC_KEY, 10, 17, 1))  # the public key no longer works
    tampered = bytearray(_tc(key, 11, 17, 1))
    tampered[8] = 2  # change the subtype, fix the PEC: only the tag notices
    crc = crc16(tampered, len(tampered) - 2)
    tampered[-2:] = bytes((crc >> 8, crc & 0xFF))
    link.handle(tampered)
    reasons = [_verification(p)[1] for p in sent]
    assert reasons == [
        ccsds.REJECT_REPLAY,
        ccsds.REJECT_AUTH,
        ccsds.REJECT_AUTH,
        ccsds.REJECT_AUTH,
    ], reasons
    counters = link.link_counters()
    assert counters["tc_rejected"] == {"replay": 2, "auth": 3}, counters
    assert counters["tc_accepted"] == 1
    link.handle(_tc(key, 12, 17, 1))  # counters may skip ahead
    assert _verification(sent[-2]) == (True, 0)


def test_counter_survives_a_restart_without_a_replay_window():
    key = b"r" * 32
    root = _fresh_root(key)
    link, sent = _link(root)
    link.handle(_tc(key, 100, 17, 1))
    again, sent = _link(root)  # a reboot: state reloaded from storage
    assert again.last_counter >= 100
    again.handle(_tc(key, 100, 17, 1))
    assert _verification(sent[0]) == (False, ccsds.REJECT_REPLAY)
    # a power cut after the new ceiling was written but before the rename
    with open(root + "/link/counter.tmp", "w") as f:
        f.write("5000 " + again.key_id)
    after_cut, sent = _link(root)
    assert after_cut.last_counter == 5000
    after_cut.handle(_tc(key, 4999, 17, 1))
    assert _verification(sent[0]) == (False, ccsds.REJECT_REPLAY)


def _tm_counter(packet, length=None):
    # the telemetry security counter: the u32 before the tag and the PEC
    return ccsds.get_u32(packet, (len(packet) if length is None else length) - 22)


def test_telemetry_counter_rises_and_survives_power_cuts():
    """Every packet's counter is above the one before, also across a power cut at any
    point: the next boot counts on from the ceiling stored ahead, never below a counter
    already sent."""
    key = b"t" * 32
    root = _fresh_root(key)
    link, _ = _link(root, keep=False)
    # checked as they come, not kept: on netduino2's 96 KiB heap a list of the ~900
    # counters regrows into 4 kB pieces that the link's own allocations leave scarce
    seen = [0, 0, 0]  # packets, packets whose counter was not the packet's number, last

    def record(buf, length):
        counter = _tm_counter(buf, length)
        seen[0] += 1
        if counter != seen[0]:
            seen[1] += 1
        seen[2] = counter

    link._send = record
    for counter in range(1, 301):  # past the first stored ceiling (256 ahead)
        link.handle(_tc(key, counter, 17, 1))
    assert seen[1] == 0, seen
    assert seen[0] >= 300 and link.link_counters()["tm_counter"] == seen[2]
    again, sent = _link(root)  # power cut, reboot: the state comes back from storage
    again.handle(_tc(key, 1000, 17, 1))
    # above every value sent, and from the file's ceiling (at most 256 ahead), not the key
    # region's coarse one (65,536 ahead: a step skipped at every boot would let a boot
    # loop exhaust the counter)
    assert seen[2] < _tm_counter(sent[0]) <= seen[2] + 257
    # cut after the new ceiling's temporary file was written, before the rename
    with open(root + "/link/tm_counter.tmp", "w") as f:
        f.write("90000")
    after_cut, sent = _link(root)
    after_cut.handle(_tc(key, 1001, 17, 1))
    assert _tm_counter(sent[0]) == 90001


def test_products_list_read_delete_and_names_confined():
    key = b"p" * 32
    root = _fresh_root(key)
    data = bytes((i * 7 + 3) & 0xFF for i in range(3000))
    with open(root + "/products/tdc.qrec", "wb") as f:
        f.write(data)
    link, sent = _link(root)
    link.handle(_tc(key, 1, 128, 1, b"\x00\x00"))
    assert _verification(sent[0]) == (True, 0)
    listing = sent[1]
    assert listing[7:9] == b"\x80\x02"
    body = listing[19:-22]
    assert body[:6] == b"\x00\x01\x00\x00\x00\x01" and body[7:15] == b"tdc.qrec", body
    assert ccsds.get_u32(body, 15) == 3000
    import binascii

    assert ccsds.get_u32(body, 19) == binascii.crc32(data)
    del sent[:]
    args = b"\x08tdc.qrec" + b"\x00\x00\x0b\xb0" + b"\x04\x00"  # offset 2992, 1024 bytes
    link.handle(_tc(key, 2, 128, 3, args, ack=0))
    assert len(sent) == 1 and sent[0][7:9] == b"\x80\x04"
    chunk = sent[0][19:-22]
    # the reply is tagged with the link key (the ground refuses it otherwise)
    assert sent[0][-18:-2] == auth.Hmac(key).digest(sent[0][:-18])[:16]
    assert ccsds.get_u16(chunk, 4) == 8 and chunk[10:] == data[2992:]
    del sent[:]
    for i, name in enumerate((b"../link/key", b"/flash", b"..", b".hidden", b"a" * 49)):
        link.handle(_tc(key, 3 + i, 128, 3, bytes([len(name)]) + name + b"\0" * 6))
        assert _verification(sent[-1]) == (False, ccsds.REJECT_ARGUMENT), name
    link.handle(_tc(key, 60, 128, 5, b"\x08tdc.qrec"))
    assert _verification(sent[-1]) == (True, 0)
    link.handle(_tc(key, 61, 128, 5, b"\x08tdc.qrec"))
    assert _verification(sent[-1]) == (False, ccsds.REJECT_PRODUCT)


class _Mission:
    def __init__(self):
        self.calls = []

    def configure(self, params):
        if "rep_rate_hz" not in params:
            raise ValueError("rep_rate_hz missing")
        self.calls.append(("configure", params))

    def start(self):
        if ("start",) in self.calls:
            raise RuntimeError("already running")
        self.calls.append(("start",))

    def stop(self):
        self.calls.append(("stop",))

    def status(self):
        return {"calls": len(self.calls)}


def test_function_management_goes_to_the_mission_hook():
    key = b"m" * 32
    mission = _Mission()
    link, sent = _link(_fresh_root(key), mission)
    link.handle(_tc(key, 1, 8, 1, b'\x01{"rep_rate_hz": 1000}'))
    link.handle(_tc(key, 2, 8, 1, b'\x01{"other": 1}'))
    link.handle(_tc(key, 3, 8, 1, b"\x01[1, 2]"))
    link.handle(_tc(key, 4, 8, 1, b"\x02"))
    link.handle(_tc(key, 5, 8, 1, b"\x02"))
    link.handle(_tc(key, 6, 8, 1, b"\x03"))
    link.handle(_tc(key, 7, 8, 1, b"\x7f"))  # no such function
    results = [_verification(p) for p in sent]
    assert results == [
        (True, 0),
        (False, ccsds.REJECT_ARGUMENT),
        (False, ccsds.REJECT_ARGUMENT),
        (True, 0),
        (False, ccsds.REJECT_STATE),
        (True, 0),
        (False, ccsds.REJECT_ARGUMENT),
    ], results
    assert mission.calls == [("configure", {"rep_rate_hz": 1000}), ("start",), ("stop",)]
    assert link.housekeeping()["mission"] == {"calls": 3}


class _StatusMission:
    """A data path whose status() is given by the test (or raises it)."""

    def __init__(self, status):
        self._status = status

    def status(self):
        if isinstance(self._status, Exception):
            raise self._status
        return self._status


_HOUSEKEEPING_LIMIT = 1200 - ccsds.TM_HEADER_BYTES - ccsds.TM_TRAILER_BYTES


def _housekeeping_over_the_link(mission, loop_error=None):
    """Ask for housekeeping with a telecommand; the TM 3,25 must come back and fit one
    packet: its parsed JSON."""
    key = b"h" * 32
    link, sent = _link(_fresh_root(key), mission)
    if loop_error is not None:
        link.loop_errors = 7
        link.last_loop_error = scheduler.error_text(loop_error)  # as app.run keeps it
    link.handle(_tc(key, 1, 3, 27))
    replies = [p for p in sent if p[7] == 3]
    assert len(sent) == 2 and len(replies) == 1, [bytes(p[:9]) for p in sent]
    packet = replies[0]
    assert packet[8] == 25 and len(packet) <= 1200, (packet[8], len(packet))
    text = packet[ccsds.TM_HEADER_BYTES : len(packet) - ccsds.TM_TRAILER_BYTES]
    return json.loads(text), len(text)


def _bulky_status(digits, filler_chars=0):
    # the shape of payload.mission's status, each number `digits` long, and a string
    # to bring it near the packet's limit
    number = int("9" * digits)
    return {
        "filler": "f" * filler_chars,
        "sequencer": {"frames_sent": number, "frames_missed": number, "running": True},
        "clock": {"offset_ps": number, "drift_ppt": number, "records": number},
        "bus": {"bad_replies": number, "timeouts": number, "transactions": number},
        "worst_us": {name: number for name in ("ground", "sequencer", "bus", "epochs")},
        "tdc": {"up": [number, number], "blocks": number, "events_accepted": number},
        "pass_running": True,
    }


def test_housekeeping_is_served_compact_when_the_spaced_report_would_not_fit():
    # near the limit on every target (the STM32 board's report also says
    # "storage_formatted", and every report carries "heap_free")
    status = _bulky_status(14, filler_chars=390)
    report, length = _housekeeping_over_the_link(_StatusMission(status))
    assert "omitted" not in report, report["omitted"]
    assert report["mission"] == status
    assert report["key"] == "provisioned" and report["link"]["tc_accepted"] == 0
    spaced = len(json.dumps(report))  # with ", " and ": ": more than one packet holds
    assert length <= _HOUSEKEEPING_LIMIT < spaced, (length, spaced)


def _cut_heap_into_holes():
    """Fill the heap with 1 KB blocks (each held by one slot of a list made before), the
    space left with one-word tuples, then free every other 1 KB block: the free space is
    in holes of one such block (~1,040 bytes). Returns (slots, chain, whether a block of
    1,100 bytes could still be had); the caller drops it to give the heap back."""
    import gc

    gc.collect()
    slots = [None] * (gc.mem_free() // 1024 + 8)
    filled = 0
    chain = None
    try:
        while filled < len(slots):
            slots[filled] = bytearray(1024)
            filled += 1
    except MemoryError:
        pass
    try:
        while True:
            chain = (chain,)
    except MemoryError:
        pass
    for i in range(0, filled, 2):
        slots[i] = None
    gc.collect()
    try:
        bytearray(1100)
        whole = True
    except MemoryError:
        whole = False
    return slots, chain, whole


def test_housekeeping_needs_no_heap_block_of_its_length():
    # The report's JSON goes into its packet piece by piece: with every free block of the
    # heap cut to about 1 KB, a report longer than that still goes out. (Made whole first,
    # its text found no block on the STM32 board at 85 % of its heap during a pass.)
    key = b"h" * 32
    status = _bulky_status(14, filler_chars=390)
    packet = bytearray(1200)  # what went out, copied without a block of its own
    lengths = []

    def send(buf, length):
        packet[:length] = memoryview(buf)[:length]
        lengths.append(length)

    root = _fresh_root(key)
    region = keystore.FileRegion(root + ".keyregion")
    link = telecommands.GroundLink(board, root, send, _StatusMission(status), key_region=region)
    # a first report while the heap is whole: the counters' ceilings are stored then
    # (a littlefs file write, which wants a block of its cache's size), not below
    link.handle(_tc(key, 1, 3, 27))
    assert len(lengths) == 2, lengths
    del lengths[:]
    command = _tc(key, 2, 3, 27)
    holes = _cut_heap_into_holes()
    try:
        whole = holes[2]
        link.handle(command)
    finally:
        del holes  # the heap back
    assert not whole, "the heap still had a block of the report's length"
    assert len(lengths) == 2, lengths  # the acceptance and the report
    length = lengths[1]
    assert packet[7] == 3 and packet[8] == 25, bytes(packet[:9])
    text = packet[ccsds.TM_HEADER_BYTES : length - ccsds.TM_TRAILER_BYTES]
    report = json.loads(text)
    assert len(text) > 1000 and report["mission"] == status, len(text)


def test_a_counter_ceiling_the_heap_cannot_store_costs_no_packet():
    # Storing the telemetry counter's next ceiling opens a file, whose cache is a heap
    # block of its own (2 KB on the QEMU board's littlefs). On a heap in ~1 KB holes that
    # failed with MemoryError, which raised out of handle(): the report and the rejection
    # were both lost. It is storage that cannot be written now: counted, the packet goes.
    key = b"h" * 32
    lengths = []

    def send(buf, length):
        lengths.append(length)

    root = _fresh_root(key)
    region = keystore.FileRegion(root + ".keyregion")
    link = telecommands.GroundLink(board, root, send, None, key_region=region)
    link.handle(_tc(key, 1, 17, 1))  # a ping: both ceilings stored, heap whole
    assert len(lengths) == 2 and link.tm_counter_write_failures == 0, lengths
    del lengths[:]
    ceiling = link.tm.security_counter
    link._tm_ceiling = ceiling  # the next packet needs a new ceiling on storage
    command = _tc(key, 2, 17, 1)
    holes = _cut_heap_into_holes()
    try:
        link.handle(command)
    finally:
        del holes  # the heap back
    assert len(lengths) == 2, lengths  # the acceptance and the pong
    # stored where a file needs no large block (unix, the STM32 board's 256-byte pages);
    # on QEMU each of the two packets tried and was counted
    stored = link._tm_ceiling > ceiling
    failures = link.tm_counter_write_failures
    assert (stored, failures) in ((True, 0), (False, 2)), (stored, link.link_counters())


def test_housekeeping_json_goes_into_its_packet_without_allocating():
    # json.dump writes the report into the link's BytesIO, made at boot with a whole
    # packet's capacity, and the text is copied into the packet: nothing is allocated.
    # (Slice assignments per piece made ~30 bytes of heap a byte of JSON before: a 1 KB
    # report left ~30 KB of garbage, a collection on the STM32 board's 96 KiB heap during
    # a pass.) The bytes are json.dumps' compact text. Numbers of 9 digits: small ints on
    # a 32-bit port too (json.dump itself allocates a big int's digits).
    import gc

    import micropython

    report = {"mission": _bulky_status(9, filler_chars=600), "key": "provisioned"}
    key = b"h" * 32
    link, _ = _link(_fresh_root(key))
    out = link._json_out
    packet = link.tm.buf
    at = ccsds.TM_HEADER_BYTES
    gc.collect()
    micropython.heap_lock()
    try:
        length = telecommands._json_into(report, out)
        out.seek(0)
        out.readinto(link._tm_data)
    finally:
        micropython.heap_unlock()
    assert length > 900, length
    assert bytes(packet[at : at + length]) == json.dumps(report, separators=(",", ":")).encode()


class _OutFailingToWrite(io.IOBase):
    """A JSON output that json.dump cannot write, as a failed allocation makes it (a big
    int's digits on a 32-bit port, a fragmented heap)."""

    def seek(self, offset):
        return 0

    def tell(self):
        return 0

    def write(self, data):
        raise MemoryError("memory allocation failed, allocating 40 bytes")


def test_housekeeping_that_cannot_be_written_is_rejected_alone_not_accepted_first():
    # The acceptance went out before the JSON was written into the packet: when that
    # failed, the ground got "accepted" and then "rejected" for the same command (and its
    # client, waiting for the report after the acceptance, dropped the rejection as
    # stale and timed out). Now the JSON is complete first: a single rejection.
    key = b"h" * 32
    link, sent = _link(_fresh_root(key), _StatusMission({"pass_running": False}))
    written = link._json_out
    link._json_out = _OutFailingToWrite()
    command = _tc(key, 1, 3, 27)
    link.handle(command)
    assert [(p[7], p[8]) for p in sent] == [(1, 2)], [bytes(p[:9]) for p in sent]
    data = sent[0][ccsds.TM_HEADER_BYTES : len(sent[0]) - ccsds.TM_TRAILER_BYTES]
    assert data[:4] == command[:4]  # the request id: this command's
    assert ccsds.get_u16(data, 4) == ccsds.REJECT_STORAGE
    assert b"MemoryError" in data[6:], bytes(data[6:])
    assert link.accepted == 0 and link.rejected[ccsds.REJECT_STORAGE] == 1
    # the next one, written, goes out accepted with its whole report
    link._json_out = written
    del sent[:]
    link.handle(_tc(key, 2, 3, 27))
    assert [(p[7], p[8]) for p in sent] == [(1, 1), (3, 25)], [bytes(p[:9]) for p in sent]
    report = json.loads(sent[1][ccsds.TM_HEADER_BYTES : len(sent[1]) - ccsds.TM_TRAILER_BYTES])
    assert report["link"]["tc_accepted"] == 0  # counted before this one's acceptance
    assert report["link"]["tc_rejected"] == {"storage": 1}, report["link"]
    assert report["mission"] == {"pass_running": False}


def test_frames_behind_a_housekeeping_report_in_slices_wait_for_it_in_order():
    # The application runs a housekeeping report in slices, one a scheduler pass
    # (GroundLink.sliced, c921a93); frames of the same read are handled before the next
    # pass. Each must find the report in flight finished first: its acceptance and report
    # go out whole and before anything of the frame behind it (a replay of the same
    # command, another housekeeping request, a ping), none of them overwriting it. Found
    # untested in review (removing handle()'s drain lost the first report silently).
    key = b"h" * 32
    link, sent = _link(_fresh_root(key), _StatusMission({"pass_running": False}))
    link.sliced = True
    at = ccsds.TM_HEADER_BYTES

    def kinds():
        return [(p[7], p[8]) for p in sent]

    first = _tc(key, 1, 3, 27)
    link.handle(first)
    assert sent == [] and link.housekeeping_stage  # queued, nothing out yet
    link.handle(first)  # replayed in the same read: rejected, after the report
    assert kinds() == [(1, 1), (3, 25), (1, 2)], kinds()
    assert sent[0][at : at + 4] == first[:4] and sent[2][at : at + 4] == first[:4]
    assert _verification(sent[2]) == (False, ccsds.REJECT_REPLAY)
    del sent[:]
    second = _tc(key, 2, 3, 27)
    ping = _tc(key, 3, 17, 1)
    link.handle(second)
    link.handle(ping)  # the second report goes out whole before the ping's packets
    assert kinds() == [(1, 1), (3, 25), (1, 1), (17, 2)], kinds()
    assert sent[0][at : at + 4] == second[:4] and sent[2][at : at + 4] == ping[:4]
    report = json.loads(sent[1][at : len(sent[1]) - ccsds.TM_TRAILER_BYTES])
    assert report["link"]["tc_accepted"] == 1, report["link"]  # the first, not the ping
    assert not link.step() and link.housekeeping_stage == 0


def test_housekeeping_sheds_the_least_needed_sections_in_order_and_names_them():
    status = _bulky_status(30, filler_chars=490)
    report, length = _housekeeping_over_the_link(_StatusMission(status), OSError(5))
    assert length <= _HOUSEKEEPING_LIMIT
    assert report["omitted"] == ["mission.worst_us", "mission.tdc", "mission.bus"], report
    assert report["mission"]["clock"] == status["clock"]
    assert report["mission"]["sequencer"] == status["sequencer"]
    assert report["loop_errors"] == 7 and report["last_loop_error"] == repr(OSError(5))
    assert report["link"]["tc_rejected"] == {}

    status = {"pass_running": False, "log": ["x" * 60] * 40}  # nothing named fits
    report, length = _housekeeping_over_the_link(_StatusMission(status))
    assert report["omitted"] == ["mission"] and "mission" not in report, report
    assert report["version"].startswith("qkdsat-fw") and report["link"]["frames"] == {}


def test_housekeeping_error_texts_are_bounded():
    long_error = ValueError("the data path says " + "very " * 200 + "much")
    report, _ = _housekeeping_over_the_link(_StatusMission(long_error), long_error)
    assert "omitted" not in report
    for text in (report["mission"]["error"], report["last_loop_error"]):
        assert text.startswith("ValueError('the data path says very")
        assert len(text) == scheduler.MAX_ERROR_TEXT_CHARS, text

    def failing():
        raise long_error

    loop = scheduler.Scheduler(board.clock)  # a duty's error, as mission status shows it
    duty = loop.add("ground", failing)
    loop.run_once()
    assert duty.errors == 1 and len(duty.last_error) == scheduler.MAX_ERROR_TEXT_CHARS
    assert duty.last_error.startswith("ValueError('the data path says very")


def test_garbage_never_raises_and_every_packet_is_counted():
    key = b"g" * 32
    link, sent = _link(_fresh_root(key), keep=False)
    good = _tc(key, 1, 128, 3, b"\x01x\x00\x00\x00\x00\x00\x10")
    seed = 12345
    count = 0
    for i in range(600):
        seed = (seed * 1103515245 + 12345) & 0x7FFFFFFF
        packet = bytearray(good[: seed % (len(good) + 1)]) if i % 3 == 0 else bytearray(good)
        for _ in range(1 + seed % 3):
            seed = (seed * 1103515245 + 12345) & 0x7FFFFFFF
            if packet:
                packet[seed % len(packet)] ^= 1 + (seed >> 8) % 255
        link.handle(packet)
        count += 1
    rejected = sum(link.rejected)
    assert rejected + link.accepted == count, (rejected, link.accepted)
    assert link.accepted == 0
    assert sent[0] == count


class _SplitLink:
    """The ground link a telecommand crosses in pieces: `pieces` one a read with a read
    that finds nothing between them (the next bytes not there yet when polled)."""

    def __init__(self, pieces):
        self.pieces = list(pieces)
        self.reads = 0
        self.written = 0

    def readinto(self, buf):
        self.reads += 1
        if self.reads % 2 == 0 or not self.pieces:
            return 0
        piece = self.pieces.pop(0)
        buf[: len(piece)] = piece
        return len(piece)

    def write(self, data):
        self.written += len(data)
        return len(data)


class _BoardWith:
    """The board with some of its attributes replaced."""

    def __init__(self, **replaced):
        for name in replaced:
            setattr(self, name, replaced[name])

    def __getattr__(self, name):
        return getattr(board, name)


def test_the_controllers_ground_poll_takes_a_telecommand_in_pieces_whole_in_one_pass():
    # app.Controller.poll_ground with the board's wait (boards/netduino2: the launcher's
    # override), not only app._pump_frame (mptest_framing): a telecommand that arrives in
    # pieces is handed on in the pass its first byte came in.
    from payload import app, framing, waits

    key = bytes(range(32))
    root = _fresh_root(key)
    region = keystore.FileRegion(root + ".keyregion")
    packet = _tc(key, 1, 17, 1)  # a connection test
    frame = b"\x00" + bytes(framing.FrameWriter(64).encode(packet))
    pieces = [frame[i : i + 7] for i in range(0, len(frame), 7)]
    assert len(pieces) > 4
    plain = app.Controller(_BoardWith(ground_link=_SplitLink([]), key_region=region), root)
    board_wait_us = getattr(board, "GROUND_RX_WAIT_US", waits.GROUND_RX_WAIT_US)
    assert plain.ground_rx_wait_us == board_wait_us == max(board_wait_us, waits.GROUND_RX_WAIT_US)
    # one Controller at a time: on the STM32 board (96 KiB heap), with the rejection bound's
    # test's source in this session, the second found no 1,032-byte block beside the first
    del plain
    gc.collect()
    # a wait no host's load reaches (10 s): the test does not depend on the host's pace
    link = _SplitLink(pieces)
    controller = app.Controller(
        _BoardWith(ground_link=link, key_region=region, GROUND_RX_WAIT_US=10_000_000), root
    )
    assert controller.ground_rx_wait_us == 10_000_000
    assert controller.poll_ground()
    assert not link.pieces and controller.ground_rx.frames_ok == 1, (link.pieces, link.reads)
    assert controller.link.accepted == 1


class _RecordingLink(_SplitLink):
    """_SplitLink that keeps what the controller writes (its telemetry frames)."""

    def __init__(self, pieces):
        super().__init__(pieces)
        self.out = bytearray()

    def write(self, data):
        self.out += data
        return len(data)


def _verifications_written(link):
    """(accepted, code) of each TM 1,x in the frames written to link since the last call."""
    from payload import framing

    reader = framing.FrameReader(1300)
    out = link.out
    found = []
    index = 0
    while index < len(out):
        index = reader.feed_from(out, index, len(out))
        if reader.ready and reader.body[7] == ccsds.SVC_VERIFICATION:
            found.append(_verification(reader.body))
    link.out = bytearray()
    return found


def test_rejection_reports_are_bounded_per_second_in_two_buckets_and_each_counted():
    # Frames that consumed no counter (anyone on the uplink can make them: the frame CRC
    # and the PEC are public) get TM 1,2 reports from two token buckets over the
    # controller's clock (docs/ground-link.md "Verification and reason codes"): framing
    # garbage GARBAGE_REPORT_BURST at once and one per GARBAGE_REPORT_INTERVAL_US, auth /
    # replay / state REFUSAL_REPORT_BURST and one per REFUSAL_REPORT_INTERVAL_US. Garbage
    # never takes a refusal's report (a genuine ground out of step needs it: the replay
    # report carries the payload's counter); a frame that consumed its counter is always
    # reported; the rest are counted. The clock starts 1.2 s before its 2^30 us wrap, so
    # the flood's refills cross it. Fails with the per-poll rule (2 reports a poll), one
    # budget for both, no refill, and with replays or wrong tags exempted as consumed.
    from payload import app, framing

    # (its helpers are its own: module-level source is sent with every session)
    class SetClock:
        """The board's clock as a test sets it (advance), 1 us more on each ticks_us call so
        that a poll's waits end; wrapped at 2^30 as a board's (small ints only)."""

        def __init__(self, start_us):
            self.us = start_us

        def advance(self, us):
            self.us = (self.us + us) & 0x3FFFFFFF

        def ticks_us(self):
            self.us = (self.us + 1) & 0x3FFFFFFF
            return self.us

        def ticks_source(self):
            return SetClock.ticks_us, self

        def update(self):
            pass

        def now_us(self):
            return self.us

    class QueuedLink(_RecordingLink):
        """A link that has a queued piece for the next read, else nothing."""

        def readinto(self, buf):
            self.reads += 1
            if not self.pieces:
                return 0
            piece = self.pieces.pop(0)
            buf[: len(piece)] = piece
            return len(piece)

    assert telecommands.GARBAGE_REPORT_BURST == 1 and telecommands.REFUSAL_REPORT_BURST == 2
    assert telecommands.GARBAGE_REPORT_INTERVAL_US == 2_000_000
    assert telecommands.REFUSAL_REPORT_INTERVAL_US == 1_000_000
    key = bytes(range(32))
    root = _fresh_root(key)
    region = keystore.FileRegion(root + ".keyregion")
    writer = framing.FrameWriter(64)
    short_frame = bytes(writer.encode(b"\x00"))  # 5 bytes: 'short'
    header_frame = bytes(writer.encode(bytes(7)))  # 'header': not a TC
    unknown_service = bytes(writer.encode(_tc(key, 1, 99, 1)))  # authentic, consumes 1
    replayed = unknown_service  # recorded and sent again: 'replay'
    wrong_tag = bytes(writer.encode(_tc(b"x" * 32, 3, 17, 1)))  # 'auth'
    fresh = bytes(writer.encode(_tc(key, 2, 17, 1)))  # the genuine ground's next command
    clock = SetClock(0x3FFFFFFF - 1_200_000)
    link = QueuedLink([])
    controller = app.Controller(
        _BoardWith(ground_link=link, key_region=region, clock=clock, GROUND_RX_WAIT_US=1000),
        root,
    )
    tc = controller.link
    assert tc.reports_bounded and not tc.reject_credit_low

    def poll(chunk):
        link.pieces.append(chunk)
        assert controller.poll_ground()
        assert not link.pieces
        controller.ground_queue.drain(1_000_000)
        return _verifications_written(link)

    def wait(us):  # an empty poll every 0.1 s: the buckets' refills
        for _ in range(us // 100_000):
            clock.advance(100_000)
            assert not controller.poll_ground()

    short, header, auth = ccsds.REJECT_SHORT, ccsds.REJECT_HEADER, ccsds.REJECT_AUTH
    replay, service = ccsds.REJECT_REPLAY, ccsds.REJECT_SERVICE
    # t = 0: a read of garbage (more than fits any cap), then an authentic command whose
    # counter is consumed (unknown service): one garbage report, and the command's
    chunk = bytearray(b"\x00")
    garbage = 0
    while len(chunk) + len(short_frame) + len(header_frame) + len(unknown_service) <= 256:
        chunk += short_frame + header_frame
        garbage += 2
    assert poll(bytes(chunk + unknown_service)) == [(False, short), (False, service)]
    assert controller.ground_rx.frames_ok == garbage + 1
    # t = 0.5 s: garbage ahead of replays in one read (the garbage bucket empty): the
    # replays' reports come through, the burst of them, the third counted
    wait(500_000)
    reports = poll(short_frame * 2 + header_frame * 2 + replayed * 3)
    assert reports == [(False, replay)] * 2, reports
    # t = 0.8 s: the genuine ground's next command is accepted and reported; a wrong tag
    # after it in the same read is not exempt (its frame consumed no counter)
    wait(300_000)
    assert poll(header_frame + fresh + wrong_tag + short_frame) == [(True, 0)]
    # t = 0.85-2.75 s: a flood, a read every 0.1 s (20 polls): one garbage report once its
    # bucket is back to one interval (t = 2.05 s, 2 s after it was spent), one refusal at
    # t = 1.55 and 2.55 s (1 s after t = 0.5 s, and 1 s after that)
    clock.advance(50_000)
    flood = []
    for i in range(20):
        if i:
            clock.advance(100_000)
        for reported in poll(short_frame * 6 + wrong_tag * 2):
            flood.append((i, reported))
    expected = [(7, (False, auth)), (12, (False, short)), (17, (False, auth))]
    assert flood == expected, flood
    # quiet: the buckets fill up to their bursts, then are not refilled any more
    wait(2_100_000)
    assert not tc.reject_credit_low
    reports = poll(short_frame * 3 + wrong_tag * 3)
    assert reports == [(False, short), (False, auth), (False, auth)], reports
    # every rejection counted, the unreported ones too
    rejected = garbage + 4 + 2 + 20 * 6 + 3
    refused = 3 + 1 + 20 * 2 + 3
    reported = 1 + 2 + 3 + 3
    counters = tc.link_counters()
    assert tc.rejected[short] + tc.rejected[header] == rejected
    assert tc.rejected[replay] == 3 and tc.rejected[auth] == refused - 3
    assert tc.rejected[service] == 1 and tc.accepted == 1 and tc.last_counter == 2
    assert counters["tc_rejections_unreported"] == rejected + refused - reported, counters


def test_each_reason_before_the_counter_is_charged_to_its_own_bucket():
    # docs/ground-link.md "Verification and reason codes": framing garbage (short, header,
    # length, pec, apid, and the PUS version, checked after the PEC) spends the garbage
    # bucket; auth, replay, state "counter reserved for rekey" and storage "internal"
    # before the counter spend the refusal bucket. The test above sends short, header,
    # auth and replay only: it passed with length, pec and apid charged to the refusal
    # bucket, and with the reserved counter's rejection exempted as if consumed (a frame
    # the payload never consumes, so a recording of it could be replayed for a report
    # each time). No refill here (no ground poll): the credit is what the test sets.
    key = b"b" * 32
    root = _fresh_root(key)
    link, sent = _link(root)
    link.reports_bounded = True
    link.handle(_tc(key, 5, 17, 1))  # accepted: counter 5 consumed
    assert _verification(sent[0]) == (True, 0)
    garbage_us = telecommands.GARBAGE_REPORT_INTERVAL_US * telecommands.GARBAGE_REPORT_BURST
    refusal_us = telecommands.REFUSAL_REPORT_INTERVAL_US * telecommands.REFUSAL_REPORT_BURST
    credit = link.reject_credit

    def with_pec(frame):
        frame = bytearray(frame)
        crc = crc16(frame, len(frame) - 2)
        frame[-2] = crc >> 8
        frame[-1] = crc & 0xFF
        return bytes(frame)

    good = _tc(key, 6, 17, 1)
    length = bytearray(good)
    length[5] ^= 1  # the data length field disagrees with the frame
    tiny = bytearray(10)  # a TC primary header whose length agrees, no room for a trailer
    tiny[0], tiny[1], tiny[5] = 0x18 | (ccsds.APID >> 8), ccsds.APID & 0xFF, 10 - 7
    pec = bytearray(good)
    pec[-1] ^= 1
    apid = bytearray(good)
    apid[1] ^= 1
    pus = bytearray(good)
    pus[6] = (pus[6] & 0x0F) | ((ccsds.PUS_VERSION + 1) << 4)

    class RaisingHmac:
        def verify(self, data, tag):
            raise ValueError("verify")

    cases = (
        (bytes(length), ccsds.REJECT_LENGTH),
        (bytes(tiny), ccsds.REJECT_SHORT),
        (bytes(pec), ccsds.REJECT_PEC),
        (with_pec(apid), ccsds.REJECT_APID),
        (with_pec(pus), ccsds.REJECT_HEADER),
        (_tc(b"x" * 32, 6, 17, 1), ccsds.REJECT_AUTH),
        (_tc(key, 5, 17, 1), ccsds.REJECT_REPLAY),
        (_tc(key, 0xFFFFFF00, 17, 1), ccsds.REJECT_STATE),
        (None, ccsds.REJECT_STORAGE),  # hmac.verify raising: "internal", before the counter
    )
    garbage = (ccsds.REJECT_SHORT, ccsds.REJECT_HEADER, ccsds.REJECT_LENGTH, ccsds.REJECT_PEC)
    garbage += (ccsds.REJECT_APID,)
    hmac = link.hmac
    charged = []
    for frame, code in cases:
        credit[0], credit[1] = garbage_us, refusal_us
        del sent[:]
        if frame is None:
            link.hmac = RaisingHmac()
            link.handle(good)
            link.hmac = hmac
        else:
            link.handle(frame)
        assert [_verification(p) for p in sent] == [(False, code)], (code, sent)
        spent = "garbage" if credit[0] < garbage_us else "refusal"
        assert (credit[0] < garbage_us) != (credit[1] < refusal_us), (code, list(credit))
        charged.append((code, spent))
    expected = [(code, "garbage" if code in garbage else "refusal") for _, code in cases]
    assert charged == expected, charged
    # the reserved counter is not consumed: the same frame again is 'state' again, and
    # its reports take the refusal burst like any other, the rest counted
    credit[0], credit[1] = garbage_us, refusal_us
    del sent[:]
    reserved = cases[7][0]
    unreported = link.rejections_unreported
    burst = telecommands.REFUSAL_REPORT_BURST
    for _ in range(burst + 2):
        link.handle(reserved)
    assert [_verification(p) for p in sent] == [(False, ccsds.REJECT_STATE)] * burst, sent
    assert link.rejections_unreported == unreported + 2
    assert link.rejected[ccsds.REJECT_STATE] == 1 + burst + 2
    assert link.last_counter == 5 and link.accepted == 1

# The ground link's telecommand service (payload.telecommands) under real MicroPython:
# golden vectors shared with host/protocol/ccsds.py, authentication, replay protection,
# product access, and never raising on garbage.
import hashlib
import os

import board
from payload import auth, ccsds, keystore, scheduler, telecommands
from payload.framing import crc16

# What the firmware used to fall back to when no key was provisioned: public.
PUBLIC_KEY = hashlib.sha256(b"qkdsat development key, not for flight").digest()

_ROOT = board.mount_storage()


def _unhex(text):
    return bytes.fromhex(text)


def _mkdirs(path):
    at = ""
    for part in path.split("/"):
        if not part:
            at = "/" if not at else at
            continue
        at = at + part if at.endswith("/") or not at else at + "/" + part
        try:
            os.mkdir(at)
        except OSError:
            pass


_serial = [0]


def _fresh_root(key=None):
    _serial[0] += 1
    root = _ROOT + "/gl%d" % _serial[0]
    _mkdirs(root + "/link")
    _mkdirs(root + "/products")
    if key is not None:
        with open(root + "/link/key", "wb") as f:
            f.write(key)
    return root


def _link(root, mission=None, keep=True):
    sent = []

    def send(buf, length):
        sent.append(bytes(buf[:length]) if keep else length)

    # each test root has its own key region beside it (the board has one, outside storage)
    region = keystore.FileRegion(root + ".keyregion")
    return telecommands.GroundLink(board, root, send, mission, key_region=region), sent


def _rmtree(path):
    for entry in os.listdir(path):
        full = path + "/" + entry
        try:
            os.remove(full)
        except OSError:
            _rmtree(full)
    os.rmdir(path)


def _tc(key, counter, service, subtype, data=b"", ack=1):
    n = ccsds.TC_HEADER_BYTES + len(data) + ccsds.TC_TRAILER_BYTES
    head = bytearray(11)
    ccsds.put_u16(head, 0, 0x1800 | ccsds.APID)
    ccsds.put_u16(head, 2, 0xC000)
    ccsds.put_u16(head, 4, n - 7)
    head[6] = 0x20 | ack
    head[7] = service
    head[8] = subtype
    counter_bytes = bytearray(4)
    ccsds.put_u32(counter_bytes, 0, counter)
    signed = bytes(head) + data + bytes(counter_bytes)
    packet = signed + auth.Hmac(key).digest(signed)[:16]
    crc = crc16(packet, len(packet))
    return packet + bytes((crc >> 8, crc & 0xFF))


def _verification(packet):
    assert packet[7] == 1, packet
    code = 0 if packet[8] == 1 else (packet[23] << 8) | packet[24]
    return packet[8] == 1, code


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
        writer.buf[19 : 19 + len(data)] = data
        length = writer.finish(case["service"], case["subtype"], len(data))
        assert bytes(writer.buf[:length]) == _unhex(case["packet"]), case["note"]


def test_host_built_telecommands_are_accepted_in_order():
    vectors = load_vectors("ccsds.json")
    key = _unhex(vectors["key"])
    root = _fresh_root(key)
    with open(root + "/products/patterns.qrec", "wb") as f:
        f.write(bytes(range(256)) * 20)
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


def _rekey_tc(key, counter, next_key):
    counter_bytes = bytearray(4)
    ccsds.put_u32(counter_bytes, 0, counter)
    pad = auth.Hmac(key).digest(telecommands.REKEY_LABEL + bytes(counter_bytes))
    wrapped = bytes(next_key[i] ^ pad[i] for i in range(32))
    return _tc(key, counter, 8, 1, bytes([ccsds.FN_REKEY]) + wrapped)


def test_counter_exhaustion_does_not_lock_the_link_and_rekey_recovers():
    # The golden vectors end with counter 0xFFFFFFFF on an ordinary command: it used to
    # be accepted and lock the link for good. Counters above ORDINARY_COUNTER_MAX are
    # refused for ordinary commands (not consumed) and kept for the rekey.
    vectors = load_vectors("ccsds.json")
    key = _unhex(vectors["key"])
    root = _fresh_root(key)
    link, sent = _link(root)
    link.handle(_tc(key, 0xFFFFFF00, 17, 1))
    assert _verification(sent[-1]) == (False, ccsds.REJECT_STATE), sent
    assert link.last_counter == 0  # not consumed
    link.handle(_tc(key, 0xFFFFFEFF, 17, 1))  # the last ordinary counter
    assert _verification(sent[-2]) == (True, 0)
    next_key = bytes(range(7, 39))
    link.handle(_rekey_tc(b"wrong key" * 4, 0xFFFFFFFF, next_key))
    assert _verification(sent[-1]) == (False, ccsds.REJECT_AUTH)
    link.handle(_rekey_tc(key, 0xFFFFFFFF, next_key))
    assert _verification(sent[-1]) == (True, 0), sent[-1]
    assert link.last_counter == 0 and link.key_state == "provisioned"
    link.handle(_tc(next_key, 1, 17, 1))  # the new key, from counter 1
    assert _verification(sent[-2]) == (True, 0)
    link.handle(_tc(key, 2, 17, 1))  # the old key is gone
    assert _verification(sent[-1]) == (False, ccsds.REJECT_AUTH)
    # after a reboot: the new key from its region, its own counter (not the old 2**32-1)
    again, sent = _link(root)
    assert again.key_state == "provisioned" and again.last_counter >= 1
    again.handle(_tc(next_key, 200, 17, 1))
    assert _verification(sent[0]) == (True, 0)


def test_no_key_means_no_command_and_the_public_key_is_refused():
    root = _fresh_root()  # nothing provisioned
    link, sent = _link(root)
    assert link.key_state == "missing"
    link.handle(_tc(PUBLIC_KEY, 1, 17, 1))
    link.handle(_tc(b"\0" * 32, 2, 17, 1))
    assert [_verification(p) for p in sent] == [(False, ccsds.REJECT_AUTH)] * 2


def test_key_lives_outside_storage_so_a_format_keeps_it():
    key = b"f" * 32
    root = _fresh_root(key)
    link, sent = _link(root)
    assert link.key_state == "provisioned"
    assert "key" not in os.listdir(root + "/link")  # moved out of the filesystem
    _rmtree(root)  # what formatting the storage does to everything in it
    _mkdirs(root)
    again, sent = _link(root)
    assert again.key_state == "provisioned"
    again.handle(_tc(key, 1, 17, 1))
    assert _verification(sent[0]) == (True, 0)
    again.handle(_tc(PUBLIC_KEY, 2, 17, 1))
    assert _verification(sent[-1]) == (False, ccsds.REJECT_AUTH)


def test_a_counter_that_cannot_be_persisted_refuses_the_command():
    key = b"c" * 32
    root = _fresh_root(key)
    link, sent = _link(root)
    os.mkdir(root + "/link/counter.tmp")  # the ceiling's write now fails (a directory)
    link.handle(_tc(key, 1, 8, 1, bytes([ccsds.FN_REBOOT])))
    assert _verification(sent[0]) == (False, ccsds.REJECT_STORAGE), sent
    assert link.pending_action is None  # nothing acted
    assert link.link_counters().get("counter_write_failures") == 1
    link.handle(_tc(key, 1, 17, 1))  # still a replay: the counter was used in RAM
    assert _verification(sent[1]) == (False, ccsds.REJECT_REPLAY)
    os.rmdir(root + "/link/counter.tmp")
    link.handle(_tc(key, 2, 8, 1, bytes([ccsds.FN_REBOOT])))
    assert _verification(sent[2]) == (True, 0)
    assert link.pending_action == ccsds.FN_REBOOT


def test_maintenance_needs_an_armed_window():
    key = b"w" * 32
    link, sent = _link(_fresh_root(key))
    link.handle(_tc(key, 1, 8, 1, bytes([ccsds.FN_MAINTENANCE])))
    assert _verification(sent[-1]) == (False, ccsds.REJECT_STATE)
    link.maintenance_window_us = -1  # the window has passed
    link.handle(_tc(key, 2, 8, 1, bytes([ccsds.FN_MAINTENANCE_ARM])))
    link.handle(_tc(key, 3, 8, 1, bytes([ccsds.FN_MAINTENANCE])))
    assert _verification(sent[-1]) == (False, ccsds.REJECT_STATE)
    assert link.pending_action is None
    link.maintenance_window_us = telecommands.MAINTENANCE_WINDOW_US
    link.handle(_tc(key, 4, 8, 1, bytes([ccsds.FN_MAINTENANCE_ARM])))
    link.handle(_tc(key, 5, 8, 1, bytes([ccsds.FN_MAINTENANCE])))
    assert _verification(sent[-1]) == (True, 0)
    assert link.pending_action == ccsds.FN_MAINTENANCE
    link.wipe_key()  # what the application does before the REPL opens
    assert link.hmac is None
    link.handle(_tc(key, 6, 17, 1))
    assert _verification(sent[-1]) == (False, ccsds.REJECT_AUTH)


def test_keyboard_interrupt_in_a_duty_does_not_end_the_loop():
    calls = []

    def interrupted():
        raise KeyboardInterrupt  # what 0x03 on a REPL UART raises

    def healthy():
        calls.append(1)
        return True

    loop = scheduler.Scheduler(board.clock)
    loop.add("ground", interrupted)
    loop.add("hk", healthy)
    for _ in range(3):
        loop.run_once()
    assert len(calls) == 3
    report = loop.telemetry()["ground"]
    assert report["errors"] == 3 and "KeyboardInterrupt" in report["last_error"], report


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
    body = listing[19:-18]
    assert body[:6] == b"\x00\x01\x00\x00\x00\x01" and body[7:15] == b"tdc.qrec", body
    assert ccsds.get_u32(body, 15) == 3000
    import binascii

    assert ccsds.get_u32(body, 19) == binascii.crc32(data)
    del sent[:]
    args = b"\x08tdc.qrec" + b"\x00\x00\x0b\xb0" + b"\x04\x00"  # offset 2992, 1024 bytes
    link.handle(_tc(key, 2, 128, 3, args, ack=0))
    assert len(sent) == 1 and sent[0][7:9] == b"\x80\x04"
    chunk = sent[0][19:-18]
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
    link.handle(_tc(key, 7, 8, 1, b"\x09"))
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
    assert len(sent) == count


class _SlowLink:
    """Takes at most 16 bytes per write, like a UART with a small FIFO."""

    def __init__(self):
        self.out = bytearray()
        self.accepting = True

    def write(self, buf):
        if not self.accepting:
            return 0
        n = min(16, len(buf))
        self.out += bytes(buf[:n])
        return n


def test_long_sends_go_out_in_slices_and_a_full_queue_drops_whole_frames():
    from payload import app

    link = _SlowLink()
    queue = app.TxQueue(link, board.clock, 3000, -1, -1)  # one write per pump
    frame = bytes((i * 7 + 1) & 0xFF for i in range(1100))
    assert queue.push(frame)
    assert queue.pump() and len(link.out) == 16  # the loop goes on after one slice
    passes = 1
    while queue.pending():
        queue.pump()
        passes += 1
    assert bytes(link.out) == frame and passes == 69
    link.accepting = False  # nobody takes bytes: the queue fills, frames are dropped whole
    assert queue.push(frame) and queue.push(frame)
    assert not queue.push(frame)
    assert queue.dropped_frames == 1 and queue.pending() == 2200
    link.accepting = True
    link.out = bytearray()
    queue.drain(10_000_000)
    assert bytes(link.out) == frame + frame  # across the ring's wrap, in order

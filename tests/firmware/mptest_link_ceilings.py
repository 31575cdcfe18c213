# The link's counters across a storage format (docs/ground-link.md, "Key storage"): the
# key region keeps coarse ceilings of the telecommand, telemetry and nonce counters beside
# the key, so a format (it loses littlefs, and the fine ceilings with it, but not the key)
# never lets a counter value be used again, a torn write of the region included.
# (A file of its own: the netduino2 board compiles each test file in its 96 KiB heap.)
import board
from payload import auth, ccsds, keystore, telecommands

# _ROOT, _fresh_root, _link, _tc, _verification, _mkdirs, _remove_tree (appended)
MPTEST_HELPERS = ("link_helpers.py",)

PRODUCT_KEY = b"P" * 32
_READ_ARGS = bytes([13]) + b"patterns.qrec" + bytes([0, 0, 0, 0, 0, 64])


class _PowerCut(BaseException):
    """Not an Exception: handle() catches those; a power cut ends everything."""


class _TornRegion:
    """A key region whose armed write stops halfway (the power goes), leaving a torn slot."""

    def __init__(self, path):
        self.inner = keystore.FileRegion(path)
        self.cut_at_write = 0  # the write (1, 2, ...) that the power cut tears; 0: none
        self.writes = 0

    def read(self, offset, count):
        return self.inner.read(offset, count)

    def write(self, offset, data):
        self.writes += 1
        if self.writes == self.cut_at_write:
            self.inner.write(offset, bytes(data[: len(data) // 2]))
            raise _PowerCut()
        self.inner.write(offset, data)


def _provision_products(root):
    """The product key (the same one each time) and a pattern product to read sealed."""
    with open(root + "/link/product_key", "wb") as f:
        f.write(PRODUCT_KEY)
    with open(root + "/products/patterns.qrec", "wb") as f:
        f.write(b"\x01" * 64)


def _recorder():
    sent = []

    def send(buf, length):
        sent.append(bytes(buf[:length]))

    return sent, send


def _format(root, products=False):
    """What formatting the storage does to everything in it (not to the key region);
    then, with products, the same product key provisioned again."""
    _remove_tree(root)
    _mkdirs(root + "/link")
    _mkdirs(root + "/products")
    if products:
        _provision_products(root)


def _tm_counter(packet):
    # the telemetry security counter: the u32 before the tag and the PEC
    return ccsds.get_u32(packet, len(packet) - 22)


def _nonce_counter(packet):
    # TM 128,6: offset u32, count u16, nonce (b"PRD1" + u64 counter)
    assert packet[7] == 128 and packet[8] == 6, bytes(packet[:9])
    at = ccsds.TM_HEADER_BYTES + 6
    assert bytes(packet[at : at + 4]) == b"PRD1"
    return int.from_bytes(packet[at + 4 : at + 12], "big")


def _command(link, sent, key, counter, service=17, subtype=1, data=b"", ack=1):
    """Send as the ground client does (host/link/client.py `command`): on `replay`, jump
    past the payload's counter that the report carries and send once more. Returns the
    counter the telecommand went out with last."""
    for _ in range(2):
        before = len(sent)
        link.handle(_tc(key, counter, service, subtype, data, ack))
        rejection = None
        for packet in sent[before:]:
            if packet[7] == 1 and packet[8] == 2:
                rejection = packet
        if rejection is None or _verification(rejection)[1] != ccsds.REJECT_REPLAY:
            return counter
        counter = ccsds.get_u32(rejection, ccsds.TM_HEADER_BYTES + 6) + 1
    raise AssertionError("still a replay after the resync")


def _keep_highest_tm_counter(link):
    """[the highest telemetry counter the link sends], its packets not kept (heap)."""
    highest = [0]

    def record(buf, length):
        highest[0] = max(highest[0], ccsds.get_u32(buf, length - 22))

    link._send = record
    return highest


def test_telemetry_counter_after_a_format_is_above_every_value_sent():
    key = b"m" * 32
    root = _fresh_root(key)
    link, _ = _link(root, keep=False)
    highest = _keep_highest_tm_counter(link)
    for counter in range(1, 151):  # 300 packets: past the first littlefs ceiling (256)
        link.handle(_tc(key, counter, 17, 1))
    assert highest[0] >= 300, highest
    _format(root)
    again, sent = _link(root)
    _command(again, sent, key, 151)  # a replay report first: the ground resyncs
    assert len(sent) == 3, sent  # the replay, then the acceptance and the pong
    assert min(_tm_counter(p) for p in sent) > highest[0], [_tm_counter(p) for p in sent]


def test_telemetry_past_a_ceiling_littlefs_could_not_store_resumes_above_it():
    # The file's ceiling cannot be written (a directory where its temporary goes) while
    # the key region's can: packets go out above the file's ceiling, so its stale file
    # is removed and the next boot resumes from the region's (the file won at boot and
    # reused 258-798: second cold review)
    key = b"s" * 32
    root = _fresh_root(key)
    link, _ = _link(root, keep=False)
    highest = _keep_highest_tm_counter(link)
    link.handle(_tc(key, 1, 17, 1))  # the first ceilings stored: file and region
    os.mkdir(root + "/link/tm_counter.tmp")
    for counter in range(2, 201):  # 400 packets: past the file's first ceiling (256)
        link.handle(_tc(key, counter, 17, 1))
    assert highest[0] >= 400 and link.tm_counter_write_failures > 0
    again, sent = _link(root)
    _command(again, sent, key, 201)
    assert min(_tm_counter(p) for p in sent) > highest[0], [_tm_counter(p) for p in sent]


def test_a_nonce_after_a_format_and_the_same_product_key_again_is_new():
    # With the nonce counter only in littlefs, the format restarted it at 1: the same
    # product key provisioned again sealed new chunks under nonces already used (keystream
    # reuse over Alice's raw data).
    key = b"n" * 32
    root = _fresh_root(key)
    _provision_products(root)
    link, sent = _link(root)
    used = []
    counter = 0
    for _ in range(4):
        counter = _command(link, sent, key, counter + 1, 128, 3, _READ_ARGS, ack=0)
        used.append(_nonce_counter(sent[-1]))
    assert used == [1, 2, 3, 4], used
    _format(root, products=True)
    again, sent = _link(root)
    assert again.product_key_state == "provisioned"
    _command(again, sent, key, counter + 1, 128, 3, _READ_ARGS, ack=0)
    assert _nonce_counter(sent[-1]) > max(used), _nonce_counter(sent[-1])


def test_a_torn_write_of_the_ceilings_leaves_ceilings_above_every_used_value():
    # Steps shortened so that a few commands cross many region ceilings; the power goes
    # during the n-th region write (a torn record), then storage is formatted: whichever
    # record survives must still be above every counter accepted, packet sent and nonce
    # used, as each counter passes a ceiling only once the record holding the next is
    # complete.
    key = b"t" * 32
    steps = (telecommands.REGION_TC_STEP, telecommands.REGION_TM_STEP)
    steps += (telecommands.REGION_NONCE_STEP,)
    telecommands.REGION_TC_STEP = 3
    telecommands.REGION_TM_STEP = 5
    telecommands.REGION_NONCE_STEP = 2
    try:
        root = _fresh_root(key)
        _provision_products(root)
        region = _TornRegion(root + ".keyregion")
        accepted, tm, nonce = 0, 0, 0
        # the n-th write from each boot (the first boot's first: the key, moved into the
        # region out of the drop box)
        for cut in range(2, 14):
            region.cut_at_write = region.writes + cut
            sent, send = _recorder()
            try:
                # the boot itself writes the key's two copies at first
                link = telecommands.GroundLink(board, root, send, key_region=region)
                counter = link.last_counter
                for _ in range(20):
                    before = len(sent)
                    counter = _command(link, sent, key, counter + 1)
                    if any(p[7] == 1 and p[8] == 1 for p in sent[before:]):
                        accepted = max(accepted, counter)
                    counter = _command(link, sent, key, counter + 1, 128, 3, _READ_ARGS, 0)
                    if sent[-1][7] == 128:
                        accepted = max(accepted, counter)
                        nonce = max(nonce, _nonce_counter(sent[-1]))
                raise AssertionError("no power cut at write %d" % region.cut_at_write)
            except _PowerCut:
                pass
            tm = max([tm] + [_tm_counter(p) for p in sent])
            _format(root, products=True)
            region.cut_at_write = 0
            again = telecommands.GroundLink(board, root, lambda b, n: None, key_region=region)
            assert again.key_state == "provisioned"
            assert again.last_counter >= accepted, (cut, again.last_counter, accepted)
            assert again.tm.security_counter >= tm, (cut, again.tm.security_counter, tm)
            assert again.sealed_chunks >= nonce, (cut, again.sealed_chunks, nonce)
        assert accepted and nonce and tm, (accepted, nonce, tm)
    finally:
        telecommands.REGION_TC_STEP, telecommands.REGION_TM_STEP = steps[0], steps[1]
        telecommands.REGION_NONCE_STEP = steps[2]


def test_rekey_restarts_the_telecommand_counter_and_keeps_the_others():
    key = b"r" * 32
    next_key = bytes(range(40, 72))
    root = _fresh_root(key)
    _provision_products(root)
    link, sent = _link(root)
    counter = 0
    for _ in range(3):
        counter = _command(link, sent, key, counter + 1)
        counter = _command(link, sent, key, counter + 1, 128, 3, _READ_ARGS, 0)
    nonce = _nonce_counter(sent[-1])
    link.handle(_rekey_tc(key, counter + 1, next_key))
    assert _verification(sent[-1]) == (True, 0), sent[-1]
    tm = _tm_counter(sent[-1])
    assert link.last_counter == 0  # the new key's counter space
    with open(root + ".keyregion", "rb") as f:
        assert key not in f.read()  # the retired key is not left in the other slot
    link.handle(_tc(next_key, 1, 17, 1))
    assert _verification(sent[-2]) == (True, 0) and _tm_counter(sent[-2]) == tm + 1
    recorded = _tc(next_key, 2, 8, 1, bytes([ccsds.FN_REBOOT]))
    link.handle(recorded)
    assert link.pending_action == ccsds.FN_REBOOT
    tm = _tm_counter(sent[-1])
    _format(root, products=True)
    again, sent = _link(root)
    assert again.key_state == "provisioned" and again.last_counter >= 2
    again.handle(recorded)  # the new key's telecommands stay used
    assert _verification(sent[-1]) == (False, ccsds.REJECT_REPLAY), sent[-1]
    assert again.pending_action is None
    counter = _command(again, sent, next_key, 3, 128, 3, _READ_ARGS, 0)
    assert _nonce_counter(sent[-1]) > nonce and _tm_counter(sent[0]) > tm
    again.handle(_tc(key, counter + 1, 17, 1))  # the old key is gone
    assert _verification(sent[-1]) == (False, ccsds.REJECT_AUTH)


def test_a_format_near_exhaustion_still_leaves_the_rekey_its_counters():
    # An ordinary counter within a region step of the rekey's reserved counters: its
    # region ceiling stops at ORDINARY_COUNTER_MAX, so after a format the rekey still has
    # counters (at 0xFFFFFFFF none was left: a key locked for good, second cold review)
    key = b"x" * 32
    next_key = bytes(range(120, 152))
    root = _fresh_root(key)
    link, sent = _link(root)
    link.handle(_tc(key, telecommands.ORDINARY_COUNTER_MAX - 16, 17, 1))
    assert _verification(sent[-2]) == (True, 0), sent[-2]  # then the ping's reply
    _format(root)
    again, sent = _link(root)
    assert again.last_counter == telecommands.ORDINARY_COUNTER_MAX
    # a rekey refused (its argument cut short) uses a reserved counter up; the region's
    # ceiling is that counter, not 0xFFFFFFFF (a third cold review), so after another
    # format the next reserved counter still rekeys
    rekey = bytes([ccsds.FN_REKEY]) + bytes(5)
    again.handle(_tc(key, telecommands.ORDINARY_COUNTER_MAX + 1, 8, 1, rekey))
    assert _verification(sent[-1]) == (False, ccsds.REJECT_ARGUMENT), sent[-1]
    _format(root)
    third, sent = _link(root)
    assert third.last_counter == telecommands.ORDINARY_COUNTER_MAX + 1
    third.handle(_rekey_tc(key, telecommands.ORDINARY_COUNTER_MAX + 2, next_key))
    assert _verification(sent[-1]) == (True, 0), sent[-1]
    assert third.key_id == auth.key_id(next_key)


def test_a_power_cut_in_a_rekey_keeps_the_telemetry_and_nonce_ceilings():
    # The rekey writes the key's slot, its second copy over the retired key, then the
    # ceilings record naming the new key; a power cut tearing the copy or the record
    # leaves the previous record (the old key's name: the new key counts from 0), whose
    # telemetry and nonce ceilings still hold, and the new key.
    next_key = bytes(range(80, 112))
    for torn in (2, 3):  # the second copy, the record
        key = b"k" * 32
        root = _fresh_root(key)
        _provision_products(root)
        region = _TornRegion(root + ".keyregion")
        sent, send = _recorder()
        link = telecommands.GroundLink(board, root, send, key_region=region)
        counter = _command(link, sent, key, 1)
        counter = _command(link, sent, key, counter + 1, 128, 3, _READ_ARGS, 0)
        nonce = _nonce_counter(sent[-1])
        region.cut_at_write = region.writes + torn
        try:
            link.handle(_rekey_tc(key, counter + 1, next_key))
            raise AssertionError("no power cut")
        except _PowerCut:
            pass
        tm = max(_tm_counter(p) for p in sent)
        _format(root, products=True)
        region.cut_at_write = 0
        sent, send = _recorder()
        again = telecommands.GroundLink(board, root, send, key_region=region)
        assert again.key_id == auth.key_id(next_key) and again.last_counter == 0, torn
        _command(again, sent, next_key, 1, 128, 3, _READ_ARGS, 0)
        assert _nonce_counter(sent[-1]) > nonce and _tm_counter(sent[-1]) > tm, torn

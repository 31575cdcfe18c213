# The ground link's telecommand service (docs/ground-link.md): every frame body that the
# framing layer passes up is checked (header, length, PEC, APID, HMAC tag, replay counter)
# and then dispatched. Every telecommand gets a verification report: TM 1,1 accepted
# (when its ack flag asks for it) or TM 1,2 rejected with a reason code and a short text.
# Nothing that arrives on the link can raise out of `handle`: a handler failure is a
# rejection, counted like the rest.
import array
import gc
import io
import json
import os

import micropython
from micropython import const

from payload import aesgcm, auth, ccsds, framing, keystore
from payload.ccsds import get_u16, get_u32, put_u16, put_u32
from payload.products import Products, chunk_crc32, valid_name
from payload.scheduler import error_text
from payload.version import FIRMWARE_VERSION

LINK_DIR = "link"
# Provisioning drop box: a key written here (in maintenance, by `qkdsat flash
# --provision-key`) is moved into the board's key region at the next start and the file
# removed; the key is never kept in the filesystem.
KEY_FILE = "key"
COUNTER_FILE = "counter"
TM_COUNTER_FILE = "tm_counter"
PRODUCT_KEY_FILE = "product_key"
NONCE_FILE = "nonce"
# Pattern products hold Alice's raw data (every slot's bit, basis and intensity): served
# only sealed with AES-256-GCM under a provisioned product key, never in the clear.
PROTECTED_PREFIX = b"patterns"
_NONCE_PREFIX = b"PRD1"  # nonce = prefix + u64 chunk counter (big-endian), never reused
_NONCE_STEP = const(256)
_SEALED_FIXED = const(34)  # offset u32, count u16, nonce 12, tag 16
# Counters above this are reserved for the rekey telecommand, so a ground station that
# used up the ordinary range (or a command sent with 0xFFFFFFFF) cannot lock the link:
# the next key can still be installed, authenticated by the current one.
ORDINARY_COUNTER_MAX = 0xFFFFFEFF  # a big int on 32-bit targets: off the hot path
# The maintenance telecommand is accepted only this long after a maintenance-arm one;
# the code-update session it opens closes this long after its last accepted command.
MAINTENANCE_WINDOW_US = 60_000_000
REKEY_KEY_BYTES = const(32)
REKEY_LABEL = b"qkdsat rekey"
# The accepted counter is persisted as a ceiling this far ahead, so storage is written
# once per _COUNTER_STEP telecommands; after a reboot everything up to the ceiling counts
# as used (a gap the ground skips over, never a replay window).
_COUNTER_STEP = const(64)
# The telemetry counter's ceiling likewise, further ahead: a download sends a packet per
# chunk, and one ceiling write per 256 packets keeps flash wear and time small (one synced
# write costs ~89 ms on NOR, docs/storage.md).
_TM_COUNTER_STEP = const(256)
# Coarse ceilings of the three counters, in the key region beside the key
# (keystore.py), so that a storage format (which loses the littlefs ceilings above, not
# the key) never lets a counter value be used twice. At boot each counter starts at its
# littlefs ceiling, or at its region ceiling when the file is gone (a format); the
# region's is rewritten, before the counter passes it, this far ahead. Steps this long
# because on a board the region is a flash sector without wear levelling: a write per
# 4,096 telecommands and per 65,536 telemetry packets or sealed chunks is a handful of
# writes a year of passes (docs/ground-link.md).
# Module globals, not const: read only on a region write, and a test can shorten them to
# cross many region ceilings with real traffic.
REGION_TC_STEP = 4096
REGION_TM_STEP = 65_536
REGION_NONCE_STEP = 65_536
_U32_MAX = 0xFFFFFFFF  # a big int on 32-bit targets: only on a region write
MAX_CHUNK_BYTES = const(1024)
# TM 1,2 reports for frames that consumed no counter (anyone on the uplink can make them:
# the frame CRC and the PEC are public), bounded per time by two token buckets over the
# controller's clock (docs/ground-link.md "Verification and reason codes"). Credit is kept
# in microseconds: a report costs its bucket's interval, the credit grows 1 us a us up to
# burst x interval (small ints on a 32-bit port, nothing allocated). Framing garbage
# (short, header, length, pec, apid: no authentic content is possible in it) has its own,
# smaller budget, so it never takes the report of an authentic-looking refusal (auth,
# replay, state, storage before the counter), which a genuine ground out of step needs:
# the replay report carries the payload's counter, the ground's only way to resync.
GARBAGE_REPORT_INTERVAL_US = const(2_000_000)  # one report per 2 s
GARBAGE_REPORT_BURST = const(1)
REFUSAL_REPORT_INTERVAL_US = const(1_000_000)  # one report per s
REFUSAL_REPORT_BURST = const(2)  # a pipelined ground's first replay, and one more
_GARBAGE_CREDIT_MAX_US = const(GARBAGE_REPORT_INTERVAL_US * GARBAGE_REPORT_BURST)
_REFUSAL_CREDIT_MAX_US = const(REFUSAL_REPORT_INTERVAL_US * REFUSAL_REPORT_BURST)
# GroundLink.reject_credit's words (an array("i"), read and written by refill_reject_credit)
_CREDIT_GARBAGE = const(0)  # the garbage bucket's credit, us
_CREDIT_REFUSAL = const(1)  # the refusal bucket's credit, us
_CREDIT_TICKS = const(2)  # the clock's ticks_us at the last refill

_LIST_ENTRY_FIXED = const(9)  # name length u8, size u32, crc32 u32
_MAX_CONFIG_BYTES = const(512)

# Housekeeping is what an operator asks for when something went wrong, so it is always
# served in one packet (docs/ground-link.md): compact JSON, error texts cut to
# scheduler.MAX_ERROR_TEXT_CHARS, and when the report would still not fit, these sections
# are left out in this order, least needed first (the data path's timing diagnostics and
# subsystems; its duty_errors go only with the mission status as a whole; then the last
# loop error's text, the link counters), and named in the report's "omitted". Version,
# uptime, key states and the loop error count always stay.
HOUSEKEEPING_SHED_ORDER = (
    ("mission", "worst_us"),
    ("mission", "tracking"),
    ("mission", "generator"),
    ("mission", "tdc"),
    ("mission", "bus"),
    ("mission", "clock"),
    ("mission", "sequencer"),
    ("mission", "storage"),
    ("mission", None),
    ("last_loop_error", None),
    ("link", None),
)


# json.dump's compact separators (a module constant: a literal tuple is built per call)
_JSON_SEPARATORS = (",", ":")


def _json_into(value, out):
    """Write value's compact JSON to out (an io.BytesIO) from its start; returns its
    length. json.dump writes every character of every string as a piece of its own:
    into a BytesIO each piece is a C copy (~200 instructions a character on the M3),
    where a stream written in Python cost a method call a piece (a 1 KB housekeeping
    report measured and then written that way held the CPU ~7 M instructions). Within
    the BytesIO's preallocated capacity nothing is allocated; a longer text grows it
    (MemoryError on a heap without the room)."""
    out.seek(0)
    json.dump(value, out, separators=_JSON_SEPARATORS)
    return out.tell()


# A housekeeping report in slices (GroundLink.step), in order: the heap walk, the report
# and its JSON, the acceptance (TM 1,1), the report (TM 3,25)
_HK_HEAP_WALK = const(1)
_HK_JSON = const(2)
_HK_ACCEPT = const(3)
_HK_REPORT = const(4)


@micropython.viper
def refill_reject_credit(credit: ptr32, now: int) -> int:
    """Add the time since the last refill (`now`: ticks_us, wrapped at 2^30) to both
    buckets of `credit` (GroundLink.reject_credit), each up to its maximum; returns 1 while
    either is still below it (GroundLink.reject_credit_low), else 0. The ground poll calls
    it every pass while that is so (app.Controller.poll_ground). Viper: a few instructions
    of arithmetic, where the same as a method cost ~3.2k a pass on the M3
    (mptest_reject_bound_cost.py); every value stays below 2^30."""
    elapsed = (now - credit[_CREDIT_TICKS]) & 0x3FFFFFFF
    credit[_CREDIT_TICKS] = now
    low = 0
    garbage = credit[_CREDIT_GARBAGE]
    if elapsed < _GARBAGE_CREDIT_MAX_US - garbage:
        credit[_CREDIT_GARBAGE] = garbage + elapsed
        low = 1
    else:
        credit[_CREDIT_GARBAGE] = _GARBAGE_CREDIT_MAX_US
    refusal = credit[_CREDIT_REFUSAL]
    if elapsed < _REFUSAL_CREDIT_MAX_US - refusal:
        credit[_CREDIT_REFUSAL] = refusal + elapsed
        low = 1
    else:
        credit[_CREDIT_REFUSAL] = _REFUSAL_CREDIT_MAX_US
    return low


class Rejected(Exception):
    def __init__(self, code, detail=""):
        self.code = code
        self.detail = detail


class GroundLink:
    def __init__(
        self, board, storage_root, send, mission=None, max_packet_bytes=1200, key_region=None
    ):
        self.board = board
        self.root = storage_root
        self._send = send  # send(buf, length): one frame on the ground link
        self.mission = mission
        self.products = Products(storage_root)
        # housekeeping's JSON, written once by json.dump in C and copied into its packet
        # (made at boot: a report then needs no block of its length during a pass; a
        # text up to a whole packet long is measured without growing it)
        self._json_out = io.BytesIO(max_packet_bytes)
        self.accepted = 0
        self.rejected = [0] * len(ccsds.REJECT_NAMES)
        self.time_offset_us = None  # UTC - board clock, once a set-time arrived
        self.version_text = ("qkdsat-fw %s %s" % (FIRMWARE_VERSION, board.NAME)).encode()
        if key_region is None:
            key_region = board.key_region
        self.key_store = keystore.KeyStore(key_region)
        self.counter_write_failures = 0
        self.loop_errors = 0  # exceptions the main loop caught (app.run)
        self.last_loop_error = None
        self._maintenance_armed_us = None
        self.maintenance_window_us = MAINTENANCE_WINDOW_US
        # the code-update session (payload.codeupdate.CodeSession), once the armed
        # maintenance telecommand opened one; there is no REPL to hand the link to
        self.code_session = None
        self._load_key()
        self._load_region_ceilings()
        # Without a usable key telemetry is tagged with a public key (commands are never
        # accepted with it): the rejections then still say why to a ground that tries it.
        self.tm = ccsds.TmWriter(
            max_packet_bytes, self.hmac or auth.Hmac(auth.UNPROVISIONED_TM_KEY)
        )
        self._load_counter()
        self._load_tm_counter()
        self._load_product_key()
        # the packet's data field, where the report's JSON is read into
        self._tm_data = memoryview(self.tm.buf)[
            ccsds.TM_HEADER_BYTES : ccsds.TM_HEADER_BYTES + self.tm.max_data_bytes
        ]
        self.pending_action = None  # FN_REBOOT after the report is out
        self.frame_reader = None  # the ground link's FrameReader, for its drop counters
        self.tx_queue = None  # the ground link's transmit queue, for its drop counter
        self.bus_send = None  # send(buf, length) on the payload bus, for the bus test
        # True (the application's main loop): a housekeeping report goes out in slices,
        # one a call of step() (docs/scheduling.md "A housekeeping telecommand"); False:
        # all within handle()
        self.sliced = False
        self.housekeeping_stage = 0  # the next slice of a report in slices (_HK_*), or 0
        self._hk_request_id = bytearray(4)  # the report's telecommand's packet id, sequence
        self._hk_ack = 0
        self._hk_heap_free = 0
        self._hk_length = 0
        # True (the application, app.Controller): TM 1,2 reports for frames that did not
        # pass the replay check are bounded per time (the *_REPORT_* buckets above);
        # False: every rejection is reported. A frame with a valid CRC is anyone's to
        # make; without a bound a chunk of them made a report each.
        self.reports_bounded = False
        # the buckets' credit (us) and the clock's ticks_us when last refilled (_CREDIT_*);
        # while either is below its maximum (reject_credit_low) the ground poll refills
        # them every pass (refill_reject_credit), so an elapsed time is one pass long and
        # the 2^30 us wrap of ticks_us never folds a long quiet spell into a short one
        self.reject_credit = array.array("i", (_GARBAGE_CREDIT_MAX_US, _REFUSAL_CREDIT_MAX_US, 0))
        self.reject_credit_low = 0
        self._ticks, self._ticks_arg = board.clock.ticks_source()
        self.rejections_unreported = 0  # rejections counted but not reported (the bound)
        # True once handle()'s frame passed the replay check and consumed its counter:
        # its rejection is then always reported (only the key's holder can make one)
        self._counter_consumed = False

    # ---------------------------------------------------------------- key and counter

    def _link_path(self, name):
        return self.root + "/" + LINK_DIR + "/" + name

    def _logs_durable_first(self):
        """Sync the data path's logs before a durable write of the link (a counter or
        nonce ceiling, a key): the low-rate logs are synced by age (storage.sync_step),
        and a power cut must never leave a later durable state on the medium without the
        records committed before it (docs/storage.md, "Deferred syncs")."""
        store = getattr(self.mission, "store", None)
        if store is not None:
            store.sync()

    def _load_key(self):
        # There is no fallback key: a payload without a provisioned key rejects every
        # telecommand (reason "auth"), it never accepts commands signed with a key that
        # anyone could know.
        self.hmac = None
        self.key_id = ""
        self._key_id_raw = None
        dropped = None
        path = self._link_path(KEY_FILE)
        try:
            with open(path, "rb") as f:
                dropped = f.read()
        except OSError:
            pass
        if dropped is not None:
            if not keystore.MIN_KEY_BYTES <= len(dropped) <= keystore.MAX_KEY_BYTES:
                # unusable, and not silently ignored in favour of an older key
                self.key_state = "invalid"
                return
            try:
                self.key_store.store(dropped)
                os.remove(path)
            except OSError:
                pass  # region not writable: run on the dropped key, try again next start
        key = self.key_store.load()
        if key is None:
            key = dropped
        if key is None:
            self.key_state = "missing"
            return
        self._use_key(key)

    def _use_key(self, key):
        self.key_state = "provisioned"
        self.hmac = auth.Hmac(key)
        self.key_id = auth.key_id(key)
        self._key_id_raw = bytes.fromhex(self.key_id)
        tm = getattr(self, "tm", None)
        if tm is not None:
            tm.hmac = self.hmac  # a rekey: telemetry is tagged with the new key from now

    def _load_region_ceilings(self):
        """The key region's coarse ceilings: [key id, telecommand, telemetry, nonce], as
        stored (the telecommand ceiling counts for the key of that id only); zeros when
        no valid record is there (a region from before the record, or never written)."""
        record = None
        try:
            record = self.key_store.load_ceilings()
        except (OSError, MemoryError):
            pass
        if record is None:
            record = (bytes(keystore.KEY_ID_BYTES), 0, 0, 0)
        self._region = list(record)

    def _region_tc_ceiling(self):
        """The region's telecommand ceiling for the current key: 0 when the record names
        another key (a rekey, a new key provisioned: a new counter space)."""
        region = self._region
        return region[1] if region[0] == self._key_id_raw else 0

    def _store_region(self, index, ceiling):
        """Store a new ceiling of one counter (index into self._region: 1 telecommand, for
        the current key; 2 telemetry; 3 nonce) in the key region, the others as they are;
        False if the region cannot be written (the counter must then not pass the stored
        ceiling)."""
        record = list(self._region)
        if index == 1:
            record[0] = self._key_id_raw
        record[index] = ceiling
        try:
            self.key_store.store_ceilings(record[0], record[1], record[2], record[3])
        except (OSError, MemoryError):  # MemoryError: as in _next_tm_counter
            return False
        self._region = record
        return True

    def _load_product_key(self):
        # 32 raw bytes, or 64 hex characters. No key: pattern products are refused (there
        # is no public fallback, unlike the link key); an unusable key file likewise.
        self.gcm = None
        self._plain = None
        try:
            with open(self._link_path(PRODUCT_KEY_FILE), "rb") as f:
                key = f.read()
        except OSError:
            self.product_key_state = "none"
            return
        if len(key) in (64, 65):
            try:
                key = bytes.fromhex(key.decode().strip())
            except ValueError:
                pass
        if len(key) != 32:
            self.product_key_state = "invalid"
            return
        self.gcm = aesgcm.AesGcm(key)
        self._plain = bytearray(MAX_CHUNK_BYTES)
        self._nonce = bytearray(aesgcm.NONCE_BYTES)
        self._nonce[:4] = _NONCE_PREFIX
        self.product_key_state = "provisioned"
        # the chunk counter: persisted as a ceiling, as the telecommand counter is, and
        # coarsely in the key region. One counter for the payload's life, whatever
        # product key: the same key provisioned again after a format (which lost the file,
        # not the region) never sees a nonce again. The region's only without a file, as
        # the telecommand counter (_load_counter).
        self.sealed_chunks = self._stored_ceiling(NONCE_FILE, lambda text: int(text.strip()))
        if self.sealed_chunks < 0:
            self.sealed_chunks = self._region[3]
        self._nonce_ceiling = self.sealed_chunks

    def _next_nonce(self):
        """A nonce never used before with this key, or Rejected if that cannot be
        guaranteed (the ceiling could not be stored)."""
        counter = self.sealed_chunks + 1
        if counter > self._nonce_ceiling or counter > self._region[3]:
            self._logs_durable_first()
        if counter > self._region[3]:
            if not self._store_region(3, counter + REGION_NONCE_STEP):
                raise Rejected(ccsds.REJECT_STORAGE, "cannot store the nonce ceiling")
        if counter > self._nonce_ceiling:
            ceiling = counter + _NONCE_STEP
            try:
                temporary = self._link_path(NONCE_FILE + ".tmp")
                with open(temporary, "w") as f:
                    f.write(str(ceiling))
                os.rename(temporary, self._link_path(NONCE_FILE))
            except OSError:
                raise Rejected(ccsds.REJECT_STORAGE, "cannot store the nonce ceiling") from None
            self._nonce_ceiling = ceiling
        self.sealed_chunks = counter
        nonce = self._nonce
        for i in range(8):
            nonce[11 - i] = (counter >> (8 * i)) & 0xFF
        return nonce

    def _stored_ceiling(self, name, parse):
        """The larger of the ceilings parse() reads from link/<name> and its temporary (a
        power cut leaves the one or the other), or -1 when neither is there or parses (a
        format lost them)."""
        ceiling = -1
        for path in (name, name + ".tmp"):
            try:
                with open(self._link_path(path)) as f:
                    ceiling = max(ceiling, parse(f.read()))
            except (OSError, ValueError, IndexError):
                pass
        return ceiling

    def _load_counter(self):
        # The ceiling is written to a temporary file and renamed over the old one (atomic
        # in littlefs and POSIX), so a power cut leaves the old or the new value, never an
        # empty file that would reopen the replay window; both are read, the larger wins.
        # Each file names the key it belongs to: a new key starts a new counter space.
        # Without a file of this key (a format lost it, not the key) the key region's
        # coarse ceiling: both are written before a counter passes them, so either bounds
        # every counter used, and the file's, nearer, skips no counters at each boot.
        def this_keys(text):
            fields = text.split()
            if len(fields) > 1 and fields[1] != self.key_id:
                raise ValueError  # the counter of a previous key
            return int(fields[0])

        self.last_counter = self._stored_ceiling(COUNTER_FILE, this_keys)
        if self.last_counter < 0:
            self.last_counter = self._region_tc_ceiling()
        self._ceiling = self.last_counter

    def _load_tm_counter(self):
        # Telemetry counts on from the ceiling stored before the last power cut, so no
        # counter value is ever sent twice; one counter for the payload's life (not per
        # key: the ground's last accepted value stays valid across a rekey); from the key
        # region's coarse ceiling when there is no file (a format lost it), as the
        # telecommand counter (_load_counter)
        ceiling = self._stored_ceiling(TM_COUNTER_FILE, lambda text: int(text.split()[0]))
        if ceiling < 0:
            ceiling = self._region[2]
        self.tm.security_counter = ceiling
        self._tm_ceiling = ceiling
        self.tm_counter_write_failures = 0

    def _next_tm_counter(self):
        """Advance the telemetry counter, storing a new ceiling first when it reaches the
        stored one (the key region's coarse one and the littlefs one, each on its own). If
        storage fails the packet still goes out (counted): a counter reused
        after a later power cut is refused by the ground as a replay, which costs
        telemetry, never security."""
        counter = self.tm.security_counter + 1
        if counter > self._tm_ceiling or counter > self._region[2]:
            self._logs_durable_first()
        failed = False
        if counter > self._region[2]:
            failed = not self._store_region(2, min(counter + REGION_TM_STEP, _U32_MAX))
        if counter > self._tm_ceiling:
            ceiling = counter + _TM_COUNTER_STEP
            try:
                try:
                    os.mkdir(self.root + "/" + LINK_DIR)
                except OSError:
                    pass
                temporary = self._link_path(TM_COUNTER_FILE + ".tmp")
                with open(temporary, "w") as f:
                    f.write("%d" % ceiling)
                os.rename(temporary, self._link_path(TM_COUNTER_FILE))
                self._tm_ceiling = ceiling
            except (OSError, MemoryError):
                # MemoryError too: an open file's cache is a heap block of its own (2 KB on
                # the QEMU board's littlefs), which a fragmented heap may not have; that is
                # storage that cannot be written now, not a reason to lose the packet (it
                # raised out of handle(), the report and the rejection both lost)
                failed = True
                if counter <= self._region[2]:
                    self._drop_stale_tm_files()
        if failed:  # once a packet, whichever ceiling (or both) could not be stored
            self.tm_counter_write_failures += 1
        self.tm.security_counter = counter

    def _drop_stale_tm_files(self):
        """The packet goes out above the file's ceiling, which a boot would resume from
        (the file wins while it is there): removed, the boot resumes from the key region's,
        which bounds this packet. Storage that cannot write may not remove either: then a
        value is reused after a power cut, as before the region (refused by the ground)."""
        for name in (TM_COUNTER_FILE + ".tmp", TM_COUNTER_FILE):
            try:
                os.remove(self._link_path(name))
            except OSError:
                pass

    def _persist_counter(self, counter):
        """Make sure the ceiling on storage is above counter before the command acts;
        False if it cannot be written (the command must then not act). The key region's
        coarse ceiling first (a format loses the file, not the region); each is checked on
        its own, as either may be the lower."""
        region_ceiling = self._region_tc_ceiling()
        if counter < self._ceiling and counter < region_ceiling:
            return True
        self._logs_durable_first()
        if counter >= region_ceiling:
            # an ordinary command's ceiling stops below the counters kept for the rekey,
            # and a rekey's (one of those 256) is its own counter: a ceiling at 0xFFFFFFFF
            # would leave a format (after a rekey cut short or refused) nothing to rekey
            # with
            if counter <= ORDINARY_COUNTER_MAX:
                ceiling = min(counter + REGION_TC_STEP, ORDINARY_COUNTER_MAX)
            else:
                ceiling = counter
            if not self._store_region(1, ceiling):
                self.counter_write_failures += 1
                return False
            if counter < self._ceiling:
                return True
        ceiling = counter + _COUNTER_STEP
        try:
            try:
                os.mkdir(self.root + "/" + LINK_DIR)
            except OSError:
                pass
            temporary = self._link_path(COUNTER_FILE + ".tmp")
            with open(temporary, "w") as f:
                f.write("%d %s" % (ceiling, self.key_id))
            os.rename(temporary, self._link_path(COUNTER_FILE))
        except (OSError, MemoryError):  # MemoryError: as in _next_tm_counter
            self.counter_write_failures += 1
            return False
        self._ceiling = ceiling
        return True

    # ---------------------------------------------------------------- time

    def _stamp(self):
        tm = self.tm
        if self.time_offset_us is None:
            utc_us = self.board.clock.now_us()  # time since boot until set
        else:
            utc_us = self.board.clock.now_us() + self.time_offset_us
        seconds = utc_us // 1000000
        tm.time_seconds = seconds & 0xFFFFFFFF
        tm.time_fraction = ((utc_us - seconds * 1000000) * 65536) // 1000000

    # ---------------------------------------------------------------- reports

    def _emit(self, service, subtype, data_bytes):
        self._stamp()
        self._next_tm_counter()
        length = self.tm.finish(service, subtype, data_bytes)
        self._send(self.tm.buf, length)

    def _report(self, body, accepted, code=0, detail=""):
        buf = self.tm.buf
        at = ccsds.TM_HEADER_BYTES
        # request id: packet id and sequence control of the telecommand (zeros if the
        # packet was too short to have them)
        for i in range(4):
            buf[at + i] = body[i] if len(body) >= 4 else 0
        if accepted:
            self._emit(ccsds.SVC_VERIFICATION, 1, 4)
            return
        put_u16(buf, at + 4, code)
        data = 6
        if code == ccsds.REJECT_REPLAY:
            put_u32(buf, at + 6, self.last_counter)
            data = 10
        elif detail:
            text = detail.encode()[:64]
            buf[at + 6 : at + 6 + len(text)] = text
            data = 6 + len(text)
        self._emit(ccsds.SVC_VERIFICATION, 2, data)

    def _reject(self, body, code, detail=""):
        self.rejected[code] += 1
        self._report(body, False, code, detail)

    def _reject_frame(self, body, code, detail):
        """handle()'s rejection: reported if the frame consumed a counter (only the key's
        holder can make one), else if its bucket has a report's credit; counted in any
        case."""
        if self._counter_consumed or not self.reports_bounded:
            self._reject(body, code, detail)
            return
        credit = self.reject_credit
        if not self.reject_credit_low:
            # both full until now: the refills count from here
            credit[_CREDIT_TICKS] = self._ticks(self._ticks_arg)
            self.reject_credit_low = 1
        if code <= ccsds.REJECT_APID:  # short, header, length, pec, apid: framing garbage
            bucket, interval_us = _CREDIT_GARBAGE, GARBAGE_REPORT_INTERVAL_US
        else:  # auth, replay, state, storage: what a genuine ground out of step gets too
            bucket, interval_us = _CREDIT_REFUSAL, REFUSAL_REPORT_INTERVAL_US
        left = credit[bucket] - interval_us
        if left >= 0:
            credit[bucket] = left
            self._reject(body, code, detail)
            return
        self.rejected[code] += 1
        self.rejections_unreported += 1

    # ---------------------------------------------------------------- input

    def handle(self, body):
        """One frame body from the ground link: check, authenticate, dispatch, report."""
        while self.housekeeping_stage:  # the report before, in order (two in one read)
            self.step()
        self._counter_consumed = False
        try:
            self._handle(body)
        except Rejected as rejection:
            self._reject_frame(body, rejection.code, rejection.detail)
        except Exception as error:  # a handler bug must not take the link down
            self._reject_frame(body, ccsds.REJECT_STORAGE, "internal: %r" % (error,))

    def _handle(self, body):
        n = len(body)
        if n < ccsds.PRIMARY_BYTES:
            raise Rejected(ccsds.REJECT_SHORT)
        # version 0, type 1 (TC), secondary header flag 1
        if body[0] & 0xF8 != 0x18:
            raise Rejected(ccsds.REJECT_HEADER, "not a TC with secondary header")
        if ccsds.PRIMARY_BYTES + get_u16(body, 4) + 1 != n:
            raise Rejected(ccsds.REJECT_LENGTH, "data length field disagrees with frame")
        if n < ccsds.TC_MIN_BYTES:
            raise Rejected(ccsds.REJECT_SHORT, "no room for counter and tag")
        if ccsds.crc16(body, n - 2) != get_u16(body, n - 2):
            raise Rejected(ccsds.REJECT_PEC)
        if ((body[0] & 0x07) << 8) | body[1] != ccsds.APID:
            raise Rejected(ccsds.REJECT_APID)
        if body[6] >> 4 != ccsds.PUS_VERSION:
            raise Rejected(ccsds.REJECT_HEADER, "PUS version")
        tag_at = n - ccsds.PEC_BYTES - ccsds.TAG_BYTES
        if self.hmac is None:
            raise Rejected(ccsds.REJECT_AUTH, "key file invalid")
        if not self.hmac.verify(body[:tag_at], body[tag_at : tag_at + ccsds.TAG_BYTES]):
            raise Rejected(ccsds.REJECT_AUTH)
        counter = get_u32(body, tag_at - ccsds.COUNTER_BYTES)
        if counter <= self.last_counter:
            raise Rejected(ccsds.REJECT_REPLAY)
        params = body[ccsds.TC_HEADER_BYTES : tag_at - ccsds.COUNTER_BYTES]
        rekey = body[7] == ccsds.SVC_FUNCTION and len(params) and params[0] == ccsds.FN_REKEY
        if counter > ORDINARY_COUNTER_MAX and not rekey:
            # not consumed: the reserved counters stay usable for the rekey
            raise Rejected(ccsds.REJECT_STATE, "counter reserved for rekey")
        self.last_counter = counter  # never accepted again in this boot, whatever follows
        self._counter_consumed = True
        if not self._persist_counter(counter):
            raise Rejected(ccsds.REJECT_STORAGE, "replay counter not persisted")
        self.tm.destination_id = get_u16(body, 9)
        ack = body[6] & ccsds.ACK_ACCEPTANCE
        session = self.code_session
        if session is not None and self.board.clock.now_us() > session.expires_us:
            # the session has closed: its object and module go (not kept for the boot)
            self.code_session = None
            from payload import codeupdate

            codeupdate.unload()
        self._dispatch(body, body[7], body[8], params, ack)

    def _dispatch(self, body, service, subtype, params, ack):
        if service == ccsds.SVC_PRODUCTS and subtype == 3:
            self._read_chunk(body, params, ack)  # the hot path: checked first
        elif service == ccsds.SVC_TEST and subtype == 1:
            self._accept(body, ack)
            data = ccsds.TM_HEADER_BYTES
            text = self.version_text
            self.tm.buf[data : data + len(text)] = text
            self._emit(ccsds.SVC_TEST, 2, len(text))
        elif service == ccsds.SVC_TEST and subtype == 128:
            # payload-bus loopback test: the data goes out as one bus frame; what comes
            # back is reported as TM 17,129 (bus_reply)
            if self.bus_send is None or not len(params):
                raise Rejected(ccsds.REJECT_ARGUMENT, "bus test needs data and a bus")
            self._accept(body, ack)
            self.bus_send(params, len(params))
        elif service == ccsds.SVC_HOUSEKEEPING and subtype == 27:
            self._housekeeping(body, ack)
        elif service == ccsds.SVC_PRODUCTS and subtype == 1:
            self._list(body, params, ack)
        elif service == ccsds.SVC_PRODUCTS and subtype == 5:
            self._delete(body, params, ack)
        elif service == ccsds.SVC_FUNCTION and subtype == 1:
            self._function(body, params, ack)
        elif service == ccsds.SVC_TIME and subtype == 128:
            if len(params) != 8:
                raise Rejected(ccsds.REJECT_ARGUMENT, "set time takes u64 UTC microseconds")
            utc_us = (get_u32(params, 0) << 32) | get_u32(params, 4)
            self.time_offset_us = utc_us - self.board.clock.now_us()
            self._accept(body, ack)
        else:
            raise Rejected(ccsds.REJECT_SERVICE, "no service %d,%d" % (service, subtype))

    def bus_reply(self, body):
        """A frame from the payload bus nobody else claimed: report it (TM 17,129)."""
        length = min(len(body), self.tm.max_data_bytes)
        data = ccsds.TM_HEADER_BYTES
        self.tm.buf[data : data + length] = body[:length]
        self._emit(ccsds.SVC_TEST, 129, length)

    def _housekeeping(self, body, ack):
        """The report's JSON is complete (in self._json_out) BEFORE the acceptance goes
        out: json.dump can fail (MemoryError: a big int's digits on a 32-bit port, a
        fragmented heap), and then the ground gets the rejection alone, not "accepted"
        and then "rejected" for one command. The acceptance is built in tm.buf first,
        then the JSON is copied into the packet after it (one C copy). With `sliced`,
        the same steps go in slices, one a call of step()."""
        if self.sliced:
            for i in range(4):  # the request id (the frame's buffer is the reader's)
                self._hk_request_id[i] = body[i]
            self._hk_ack = ack
            self.housekeeping_stage = _HK_HEAP_WALK
            return
        length = self._housekeeping_json()
        self._accept(body, ack)
        self._housekeeping_emit(length)

    def _housekeeping_emit(self, length):
        out = self._json_out
        out.seek(0)
        out.readinto(self._tm_data)  # (at most the data field; `length` of it is the JSON)
        self._emit(ccsds.SVC_HOUSEKEEPING, 25, length)

    def step(self):
        """The next slice of a housekeeping report in slices; False if none is pending.
        Measured on QEMU -icount (mptest_housekeeping_cost.py): the longest slice but the
        heap walk's ~0.3 M instructions, where the whole request was ~0.6 M besides it:
        the heap walk (gc.mem_free: ~0.2 M on the STM32 board's 96 KiB, ~1.2 M on the
        MPS2's 512 KiB), the report gathered and its JSON written, the acceptance, the
        report."""
        stage = self.housekeeping_stage
        if not stage:
            return False
        request_id = self._hk_request_id
        try:
            if stage == _HK_HEAP_WALK:
                self._hk_heap_free = gc.mem_free()
                self.housekeeping_stage = _HK_JSON
            elif stage == _HK_JSON:
                self._hk_length = self._housekeeping_measured(self._hk_heap_free)[1]
                self.housekeeping_stage = _HK_ACCEPT
            elif stage == _HK_ACCEPT:
                self._accept(request_id, self._hk_ack)
                self.housekeeping_stage = _HK_REPORT
            else:
                self.housekeeping_stage = 0
                self._housekeeping_emit(self._hk_length)
        except Rejected as rejection:  # as handle() reports them
            self.housekeeping_stage = 0
            self._reject(request_id, rejection.code, rejection.detail)
        except Exception as error:
            self.housekeeping_stage = 0
            self._reject(request_id, ccsds.REJECT_STORAGE, "internal: %r" % (error,))
        return True

    def _accept(self, body, ack):
        self.accepted += 1
        if ack:
            self._report(body, True)

    # ---------------------------------------------------------------- products

    def _name_arg(self, params, at):
        if len(params) < at + 1:
            raise Rejected(ccsds.REJECT_ARGUMENT, "missing product name")
        length = params[at]
        name = bytes(params[at + 1 : at + 1 + length])
        if len(name) != length or not valid_name(name):
            raise Rejected(ccsds.REJECT_ARGUMENT, "bad product name")
        return name, at + 1 + length

    def _read_chunk(self, body, params, ack):
        name, at = self._name_arg(params, 0)
        if len(params) != at + 6:
            raise Rejected(ccsds.REJECT_ARGUMENT, "read takes name, offset u32, length u16")
        offset = get_u32(params, at)
        length = get_u16(params, at + 4)
        if not 0 < length <= MAX_CHUNK_BYTES or length > self.tm.max_data_bytes - 10:
            raise Rejected(ccsds.REJECT_ARGUMENT, "chunk length 1..%d" % MAX_CHUNK_BYTES)
        size = self.products.size(name)
        if size < 0:
            raise Rejected(ccsds.REJECT_PRODUCT, "no product " + name.decode())
        if offset > size:
            raise Rejected(ccsds.REJECT_RANGE, "offset past end (%d bytes)" % size)
        if name.startswith(PROTECTED_PREFIX):
            self._read_sealed(body, name, offset, min(length, size - offset), ack)
            return
        self._accept(body, ack)
        buf = self.tm.buf
        data = ccsds.TM_HEADER_BYTES
        view = memoryview(buf)[data + 10 : data + 10 + min(length, size - offset)]
        count = self.products.read_into(name, offset, view)
        put_u32(buf, data, offset)
        put_u16(buf, data + 4, count)
        put_u32(buf, data + 6, chunk_crc32(view, count))
        self._emit(ccsds.SVC_PRODUCTS, 4, 10 + count)

    def _read_sealed(self, body, name, offset, length, ack):
        """TM 128,6: u32 offset, u16 count, nonce (12), ciphertext (count), GCM tag (16);
        the additional data is u8 name length, name, u32 offset, u16 count, so a sealed
        chunk opens only as that product's bytes at that offset."""
        if self.gcm is None:
            raise Rejected(
                ccsds.REJECT_PROTECTED,
                "pattern products need a provisioned product key (%s)" % self.product_key_state,
            )
        if length > self.tm.max_data_bytes - _SEALED_FIXED:
            raise Rejected(ccsds.REJECT_ARGUMENT, "sealed chunk too long")
        plain = memoryview(self._plain)[:length]
        count = self.products.read_into(name, offset, plain)
        nonce = self._next_nonce()
        self._accept(body, ack)
        buf = self.tm.buf
        data = ccsds.TM_HEADER_BYTES
        put_u32(buf, data, offset)
        put_u16(buf, data + 4, count)
        buf[data + 6 : data + 18] = nonce
        aad = bytearray(len(name) + 7)
        aad[0] = len(name)
        aad[1 : 1 + len(name)] = name
        aad[1 + len(name) : 7 + len(name)] = buf[data : data + 6]
        out = memoryview(buf)[data + 18 : data + 18 + count]
        tag = memoryview(buf)[data + 18 + count : data + 34 + count]
        self.gcm.seal(nonce, aad, plain, count, out, tag)
        self._emit(ccsds.SVC_PRODUCTS, 6, _SEALED_FIXED + count)

    def _list(self, body, params, ack):
        if len(params) != 2:
            raise Rejected(ccsds.REJECT_ARGUMENT, "list takes a start index u16")
        start = get_u16(params, 0)
        names = self.products.names()
        buf = self.tm.buf
        data = ccsds.TM_HEADER_BYTES
        limit = data + self.tm.max_data_bytes
        entries = []
        used = data + 6
        index = start
        while index < len(names):
            name = names[index]
            size = self.products.size(name)
            if size >= 0:  # else deleted meanwhile: skipped, and `next` says so
                if used + len(name) + _LIST_ENTRY_FIXED > limit:
                    break
                try:
                    # a pattern product's CRC-32 would be 32 linear bits of Alice's raw
                    # data in the clear: listed as 0, its chunks are authenticated instead
                    crc = (
                        0 if name.startswith(PROTECTED_PREFIX) else self.products.crc32(name, size)
                    )
                except OSError:
                    raise Rejected(ccsds.REJECT_STORAGE, "cannot read " + name.decode()) from None
                entries.append((name, size, crc))
                used += len(name) + _LIST_ENTRY_FIXED
            index += 1
        self._accept(body, ack)
        put_u16(buf, data, len(names))
        put_u16(buf, data + 2, start)
        put_u16(buf, data + 4, index)  # where the next page starts
        at = data + 6
        for name, size, crc in entries:
            buf[at] = len(name)
            buf[at + 1 : at + 1 + len(name)] = name
            at += 1 + len(name)
            put_u32(buf, at, size)
            put_u32(buf, at + 4, crc)
            at += 8
        self._emit(ccsds.SVC_PRODUCTS, 2, at - data)

    def _delete(self, body, params, ack):
        name, at = self._name_arg(params, 0)
        if at != len(params):
            raise Rejected(ccsds.REJECT_ARGUMENT, "delete takes a name only")
        if self.products.size(name) < 0:
            raise Rejected(ccsds.REJECT_PRODUCT, "no product " + name.decode())
        try:
            self.products.delete(name)
        except OSError as error:
            raise Rejected(ccsds.REJECT_STORAGE, "delete failed: %r" % (error,)) from None
        self._accept(body, ack)

    # ---------------------------------------------------------------- functions

    def _function(self, body, params, ack):
        if len(params) < 1:
            raise Rejected(ccsds.REJECT_ARGUMENT, "missing function id")
        function = params[0]
        args = params[1:]
        if function == ccsds.FN_REKEY:
            self._rekey(body, args, ack)
            return
        if function in (ccsds.FN_CODE_PUT, ccsds.FN_CODE_COMMIT, ccsds.FN_CODE_ACTIVATE):
            self._code_update(body, function, args, ack)
            return
        if function in (ccsds.FN_REBOOT, ccsds.FN_MAINTENANCE, ccsds.FN_MAINTENANCE_ARM):
            if len(args):
                raise Rejected(ccsds.REJECT_ARGUMENT, "function takes no arguments")
            now_us = self.board.clock.now_us()
            if function == ccsds.FN_MAINTENANCE_ARM:
                self._maintenance_armed_us = now_us
                self._accept(body, ack)
                return
            if function == ccsds.FN_MAINTENANCE:
                armed = self._maintenance_armed_us
                self._maintenance_armed_us = None
                if armed is None or now_us - armed > self.maintenance_window_us:
                    raise Rejected(ccsds.REJECT_STATE, "maintenance not armed")
                if getattr(self.mission, "pass_running", False):
                    raise Rejected(ccsds.REJECT_STATE, "a pass is running: stop it first")
                self._open_code_session(now_us)
                self._accept(body, ack)
                return
            self.pending_action = function
            self._accept(body, ack)
            return
        if function not in (ccsds.FN_CONFIGURE, ccsds.FN_START, ccsds.FN_STOP):
            raise Rejected(ccsds.REJECT_ARGUMENT, "no function %d" % function)
        if self.mission is None:
            raise Rejected(ccsds.REJECT_UNAVAILABLE, "no mission in this firmware")
        if function == ccsds.FN_CONFIGURE:
            if not 0 < len(args) <= _MAX_CONFIG_BYTES:
                raise Rejected(ccsds.REJECT_ARGUMENT, "configuration: JSON object")
            try:
                config = json.loads(bytes(args))
            except ValueError:
                raise Rejected(ccsds.REJECT_ARGUMENT, "configuration is not JSON") from None
            if not isinstance(config, dict):
                raise Rejected(ccsds.REJECT_ARGUMENT, "configuration: JSON object")
            self._call_mission(self.mission.configure, config)
        elif len(args):
            raise Rejected(ccsds.REJECT_ARGUMENT, "function takes no arguments")
        elif function == ccsds.FN_START:
            self._call_mission(self.mission.start)
        else:
            self._call_mission(self.mission.stop)
        self._accept(body, ack)

    def _open_code_session(self, now_us):
        """Maintenance in flight (docs/ground-link.md): a code-update session, never the
        REPL. The application keeps running and the key stays in use: every put and
        commit is a telecommand authenticated and counted like any other."""
        from payload import codeupdate  # only now: no heap for it until maintenance

        self.code_session = codeupdate.CodeSession(
            self.root, self.maintenance_window_us, now_us, getattr(self.mission, "store", None)
        )

    def _code_update(self, body, function, args, ack):
        session = self.code_session
        if session is None:
            raise Rejected(ccsds.REJECT_STATE, "no code session (arm, then maintenance)")
        now_us = self.board.clock.now_us()
        session.check_open(now_us)
        if getattr(self.mission, "pass_running", False):
            # a pass's heap and main loop are not the session's: its import, file caches
            # and the commit's hash over the whole file would come out of them (on the
            # STM32 board ~2 kB above the 15 % margin in a tracking pass)
            raise Rejected(ccsds.REJECT_STATE, "a pass is running: stop it first")
        if function == ccsds.FN_CODE_PUT:
            session.put(args)
        elif function == ccsds.FN_CODE_COMMIT:
            session.commit(args)
        else:
            session.activate(args)
        session.touch(now_us)
        self._accept(body, ack)

    def _rekey(self, body, args, ack):
        """Install the next key, wrapped with a pad only the current key can make:
        new key XOR HMAC(current key, REKEY_LABEL || counter). The counter space starts
        again at 0 for the new key (the counter file names its key)."""
        if len(args) != REKEY_KEY_BYTES:
            raise Rejected(ccsds.REJECT_ARGUMENT, "rekey takes a 32-byte wrapped key")
        counter = bytearray(4)
        put_u32(counter, 0, self.last_counter)
        pad = self.hmac.digest(REKEY_LABEL + bytes(counter))
        key = bytes(args[i] ^ pad[i] for i in range(REKEY_KEY_BYTES))
        self._logs_durable_first()
        try:
            self.key_store.store(key)
        except OSError:
            raise Rejected(ccsds.REJECT_STORAGE, "key region not writable") from None
        self._accept(body, ack)  # reported under the old key's counter, as sent
        self._use_key(key)
        # A new key counts from 0 (the region's record names the old key until the first
        # write below renames it; the telemetry and nonce ceilings stay in every record).
        # The current key installed again keeps its region ceiling: its used counters
        # stay used.
        self.last_counter = self._region_tc_ceiling()
        self._ceiling = 0
        self._persist_counter(self.last_counter)

    def _call_mission(self, method, *args):
        # The mission validates its own parameters: ValueError is a bad argument,
        # RuntimeError a command that does not fit the current state.
        try:
            method(*args)
        except ValueError as error:
            raise Rejected(ccsds.REJECT_ARGUMENT, str(error)) from None
        except RuntimeError as error:
            raise Rejected(ccsds.REJECT_STATE, str(error)) from None

    # ---------------------------------------------------------------- housekeeping

    def link_counters(self):
        reader = self.frame_reader
        frames = {}
        if reader is not None:
            frames["frames_ok"] = reader.frames_ok
            for i in range(len(reader.drops)):
                frames["frame_" + framing.DROP_REASONS[i]] = reader.drops[i]
        counters = {
            "frames": frames,
            "tc_accepted": self.accepted,
            "tc_rejected": {
                ccsds.REJECT_NAMES[i]: self.rejected[i]
                for i in range(1, len(self.rejected))
                if self.rejected[i]
            },
            "tc_last_counter": self.last_counter,
            "tm_counter": self.tm.security_counter,
        }
        if self.counter_write_failures:
            counters["counter_write_failures"] = self.counter_write_failures
        if self.tm_counter_write_failures:
            counters["tm_counter_write_failures"] = self.tm_counter_write_failures
        if self.tx_queue is not None and self.tx_queue.dropped_frames:
            counters["tx_dropped"] = self.tx_queue.dropped_frames
        if self.rejections_unreported:
            counters["tc_rejections_unreported"] = self.rejections_unreported
        # uplink bytes lost before the frame reader, where the board's ground link says
        # (netduino2's receive ring: to a full ring, to a USART overrun)
        rx_lost = getattr(self.board.ground_link, "rx_lost", None)
        if rx_lost is not None:
            ring_full, overruns = rx_lost()
            if ring_full:
                counters["rx_ring_full"] = ring_full
            if overruns:
                counters["rx_overruns"] = overruns
        return counters

    def housekeeping(self, heap_free=None):
        """The report; heap_free: gc.mem_free() taken before (a report in slices), else
        taken here."""
        if heap_free is None:
            heap_free = gc.mem_free()
        report = {
            "version": self.version_text.decode(),
            "uptime_s": self.board.clock.now_us() // 1000000,
            "time_set": self.time_offset_us is not None,
            "key": self.key_state,
            "product_key": self.product_key_state,
            "link": self.link_counters(),
            # what the heap has left (garbage not collected first: a lower bound); the
            # boards' margin, docs/targets.md "Margins"
            "heap_free": heap_free,
        }
        if self.loop_errors:
            report["loop_errors"] = self.loop_errors
            report["last_loop_error"] = self.last_loop_error
        if getattr(self.board, "storage_formatted", False):
            report["storage_formatted"] = True
        if self.mission is not None and hasattr(self.mission, "status"):
            try:
                report["mission"] = self.mission.status()
            except Exception as error:
                report["mission"] = {"error": error_text(error)}
        return report

    def housekeeping_report(self):
        """housekeeping() as it goes out: the report and its compact JSON's length."""
        report, length = self._housekeeping_measured()
        return report

    def _housekeeping_json(self):
        """The report's compact JSON in self._json_out; returns its length."""
        return self._housekeeping_measured()[1]

    def _housekeeping_measured(self, heap_free=None):
        """housekeeping() with sections left out in HOUSEKEEPING_SHED_ORDER (named in
        "omitted") until its compact JSON fits one packet's data: (report, length), the
        JSON of the last try in self._json_out. A try that cannot be written
        (MemoryError: the text longer than the BytesIO's capacity on a heap that cannot
        grow it) counts as one that does not fit: a report needs no heap block of its
        length (on the STM32 board at 85 % of its heap a ~1 KB text failed to find one
        during a pass, docs/targets.md "Margins")."""
        report = self.housekeeping(heap_free)
        limit = self.tm.max_data_bytes
        out = self._json_out
        omitted = []
        for section, part in HOUSEKEEPING_SHED_ORDER:
            try:
                length = _json_into(report, out)
            except MemoryError:
                length = limit + 1
            if length <= limit:
                return report, length
            holder = report if part is None else report.get(section)
            key = section if part is None else part
            if not isinstance(holder, dict) or key not in holder:
                continue
            del holder[key]
            omitted.append(section if part is None else section + "." + part)
            report["omitted"] = omitted
        length = _json_into(report, out)  # (a MemoryError here: rejected as internal)
        if length > limit:  # only a packet too small for the key states
            raise Rejected(ccsds.REJECT_STORAGE, "housekeeping too long")
        return report, length

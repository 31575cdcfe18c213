# CCSDS space packets (CCSDS 133.0-B-2) with ECSS PUS-C secondary headers (ECSS-E-ST-70-41C)
# on the ground link; layout and services in docs/ground-link.md. The CPython twin is
# host/protocol/ccsds.py; both are tested against tests/vectors/ccsds.json.
#
#   TC: primary(6) | pus_version<<4|ack(1) service(1) subtype(1) source_id(2)
#       | application data | security counter u32 | HMAC tag (16) | PEC CRC-16 (2)
#   TM: primary(6) | pus_version<<4(1) service(1) subtype(1) message_counter(2)
#       destination_id(2) CUC time: seconds u32, fraction u16 (6) | source data
#       | security counter u32 | HMAC tag (16) | PEC (2)
#
# Telemetry is authenticated with the same link key as telecommands: the tag covers every
# byte before it, the packet type bit included, so a telecommand can never pass as
# telemetry or the other way round. The telemetry security counter (under the tag) rises
# by one per packet and never repeats, power cuts included (payload.telecommands keeps its
# ceiling on storage): the ground refuses a packet whose counter is not above the last
# one it accepted, so recorded telemetry cannot be replayed or reordered.
# All fields big-endian, as CCSDS. The PEC is CRC-16/CCITT-FALSE (payload.framing.crc16),
# the checksum PUS-C specifies, so spacepackets' PusTm.unpack parses our telemetry.
from micropython import const

from payload.framing import crc16

APID = const(0x0C8)
PUS_VERSION = const(2)
PRIMARY_BYTES = const(6)
TC_SECONDARY_BYTES = const(5)
TC_HEADER_BYTES = const(11)
TM_HEADER_BYTES = const(19)
COUNTER_BYTES = const(4)
TAG_BYTES = const(16)
PEC_BYTES = const(2)
TC_TRAILER_BYTES = const(22)  # counter + tag + PEC
TC_MIN_BYTES = const(33)  # header + trailer, no application data
TM_TRAILER_BYTES = const(22)  # counter + tag + PEC

ACK_ACCEPTANCE = const(1)  # PUS ack flag bit 0: report successful acceptance

# Services and subtypes (PUS-C where a standard one fits, private >= 128 otherwise)
SVC_VERIFICATION = const(1)  # TM 1,1 accepted; 1,2 rejected
SVC_HOUSEKEEPING = const(3)  # TC 3,27 report now -> TM 3,25
SVC_FUNCTION = const(8)  # TC 8,1 perform function (id below)
SVC_TIME = const(9)  # TC 9,128 set time
SVC_TEST = const(17)  # TC 17,1 are you alive -> TM 17,2 (carries the version text)
SVC_PRODUCTS = const(128)  # TC 128,1 list -> TM 128,2; 128,3 read -> 128,4 (128,6 sealed)
# 128,5 delete

FN_CONFIGURE = const(1)
FN_START = const(2)
FN_STOP = const(3)
FN_REBOOT = const(4)
FN_MAINTENANCE = const(5)  # open the code-update session (never a REPL)
FN_MAINTENANCE_ARM = const(6)  # opens the window in which FN_MAINTENANCE is accepted
FN_REKEY = const(7)  # install the next link key (wrapped), new counter space
FN_CODE_PUT = const(8)  # code session: name, offset u32, bytes into the staging file
FN_CODE_COMMIT = const(9)  # code session: name, length u32, SHA-256: rename to <name>.new
FN_CODE_ACTIVATE = const(10)  # code session: names: the committed set in place (journal)

# Rejection reasons (TM 1,2): u16 code, then up to 64 bytes of ASCII detail
REJECT_SHORT = const(1)
REJECT_HEADER = const(2)
REJECT_LENGTH = const(3)
REJECT_PEC = const(4)
REJECT_APID = const(5)
REJECT_AUTH = const(6)
REJECT_REPLAY = const(7)
REJECT_SERVICE = const(8)
REJECT_ARGUMENT = const(9)
REJECT_PRODUCT = const(10)
REJECT_RANGE = const(11)
REJECT_STATE = const(12)
REJECT_UNAVAILABLE = const(13)
REJECT_STORAGE = const(14)
REJECT_PROTECTED = const(15)
REJECT_NAMES = (
    "",
    "short",
    "header",
    "length",
    "pec",
    "apid",
    "auth",
    "replay",
    "service",
    "argument",
    "product",
    "range",
    "state",
    "unavailable",
    "storage",
    "protected",
)


def get_u16(buf, at):
    return (buf[at] << 8) | buf[at + 1]


def get_u32(buf, at):
    # may be a big int on 32-bit targets; only used outside interrupts
    return (get_u16(buf, at) << 16) | get_u16(buf, at + 2)


def put_u16(buf, at, value):
    buf[at] = (value >> 8) & 0xFF
    buf[at + 1] = value & 0xFF


def put_u32(buf, at, value):
    put_u16(buf, at, (value >> 16) & 0xFFFF)
    put_u16(buf, at + 2, value & 0xFFFF)


class TmWriter:
    """Builds telemetry packets in one preallocated buffer.

    A handler writes its source data into `buf` from `DATA` on and calls `finish(n)`,
    which fills in the headers, `security_counter`, the HMAC tag (with `hmac`, a
    payload.auth.Hmac) and the PEC and returns the packet length. The owner sets
    `security_counter` before each finish (payload.telecommands: persisted ahead).
    """

    DATA = TM_HEADER_BYTES

    def __init__(self, max_packet_bytes, hmac):
        self.buf = bytearray(max_packet_bytes)
        self._view = memoryview(self.buf)
        self.hmac = hmac
        self.max_data_bytes = max_packet_bytes - TM_HEADER_BYTES - TM_TRAILER_BYTES
        self.sequence_count = 0
        self.message_counter = 0
        self.destination_id = 0
        self.time_seconds = 0
        self.time_fraction = 0
        self.security_counter = 0

    def finish(self, service, subtype, data_bytes):
        buf = self.buf
        length = TM_HEADER_BYTES + data_bytes + TM_TRAILER_BYTES
        # version 0, type 0 (TM), secondary header present, APID
        buf[0] = 0x08 | (APID >> 8)
        buf[1] = APID & 0xFF
        put_u16(buf, 2, 0xC000 | self.sequence_count)  # unsegmented
        put_u16(buf, 4, length - PRIMARY_BYTES - 1)
        buf[6] = PUS_VERSION << 4
        buf[7] = service
        buf[8] = subtype
        put_u16(buf, 9, self.message_counter)
        put_u16(buf, 11, self.destination_id)
        put_u32(buf, 13, self.time_seconds)
        put_u16(buf, 17, self.time_fraction)
        tag_at = length - TAG_BYTES - PEC_BYTES
        put_u32(buf, tag_at - COUNTER_BYTES, self.security_counter)
        buf[tag_at : tag_at + TAG_BYTES] = self.hmac.digest(self._view[:tag_at])[:TAG_BYTES]
        put_u16(buf, length - PEC_BYTES, crc16(buf, length - PEC_BYTES))
        self.sequence_count = (self.sequence_count + 1) & 0x3FFF
        self.message_counter = (self.message_counter + 1) & 0xFFFF
        return length

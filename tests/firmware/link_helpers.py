# Set-up shared by the ground-link test files (MPTEST_HELPERS = ("link_helpers.py",)):
# the harness appends this after the test file's own source.
import os

import board
from payload import auth, ccsds, keystore, telecommands
from payload.framing import crc16

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


def _remove_tree(path):
    try:
        entries = list(os.ilistdir(path))
    except OSError:
        try:
            os.remove(path)
        except OSError:
            pass
        return
    for entry in entries:
        _remove_tree(path + "/" + entry[0])
    os.rmdir(path)


def _fresh_root(key=None):
    # The last test's root goes first: on the STM32 board's 16 KiB store (littlefs through
    # EraseAhead, 256-byte blocks: a directory takes two) the roots of a whole session
    # would not fit side by side.
    if _serial[0]:
        _remove_tree(_ROOT + "/t" + str(_serial[0]))
        _remove_tree(_ROOT + "/t" + str(_serial[0]) + ".keyregion")
    _serial[0] += 1
    root = _ROOT + "/t" + str(_serial[0])
    _mkdirs(root + "/link")
    _mkdirs(root + "/products")
    if key is not None:
        with open(root + "/link/key", "wb") as f:
            f.write(key)
    return root


def _link(root, mission=None, keep=True):
    # keep=False: count the packets only (a growing list needs RAM in one piece, which
    # the netduino2 heap does not always have)
    sent = [] if keep else [0]

    def send(buf, length):
        if keep:
            sent.append(bytes(buf[:length]))
        else:
            sent[0] += 1

    # each test root has its own key region beside it (the board has one, outside storage)
    region = keystore.FileRegion(root + ".keyregion")
    return telecommands.GroundLink(board, root, send, mission, key_region=region), sent


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


def _rekey_tc(key, counter, next_key):
    """The rekey telecommand: next_key wrapped with the pad only the current key makes."""
    counter_bytes = bytearray(4)
    ccsds.put_u32(counter_bytes, 0, counter)
    pad = auth.Hmac(key).digest(telecommands.REKEY_LABEL + bytes(counter_bytes))
    wrapped = bytes(next_key[i] ^ pad[i] for i in range(32))
    return _tc(key, counter, 8, 1, bytes([ccsds.FN_REKEY]) + wrapped)


def _verification(packet):
    assert packet[7] == 1, packet
    code = 0 if packet[8] == 1 else (packet[23] << 8) | packet[24]
    return packet[8] == 1, code

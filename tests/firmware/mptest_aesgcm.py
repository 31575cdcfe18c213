# AES-256-GCM in viper (payload.aesgcm) against FIPS 197 / SP 800-38D vectors and the
# host's `cryptography` (tests/vectors/aesgcm.json), and the ground link's sealed pattern
# products: refused without a provisioned product key, sealed exactly as the host opens.
import os
import sys

import board
from payload import aesgcm, ccsds, keystore, telecommands

# _ROOT, _serial, _unhex, _tc (appended by the harness)
MPTEST_HELPERS = ("link_helpers.py",)
_LINK_KEY = b"k" * 32


def test_aes256_block_is_fips197():
    case = load_vectors("aesgcm.json")["aes256_block"]
    out = bytearray(16)
    aesgcm.AesGcm(_unhex(case["key"])).encrypt_block(_unhex(case["plaintext"]), out)
    assert bytes(out) == _unhex(case["ciphertext"])


def test_the_frozen_tables_are_aes():
    # payload/_aes_tables.py is generated on the host (tools/gen_aes_tables.py); here the
    # S-box comes from walking GF(2^8)* (p by 3, q = p^-1 by 3^-1) and the T-tables from
    # it, on the target, word by word as _aes_ctr reads them (ptr32: native byte order).
    from payload import _aes_tables

    sbox = bytearray(256)
    p = q = 1
    while True:
        p = p ^ ((p << 1) & 0xFF) ^ (0x1B if p & 0x80 else 0)
        q ^= q << 1
        q ^= q << 2
        q ^= q << 4
        q &= 0xFF
        if q & 0x80:
            q ^= 0x09
        x = q ^ (q << 1 | q >> 7) ^ (q << 2 | q >> 6) ^ (q << 3 | q >> 5) ^ (q << 4 | q >> 4)
        sbox[p] = (x ^ 0x63) & 0xFF
        if p == 1:
            break
    sbox[0] = 0x63
    xtime = bytes(((v << 1) ^ (0x1B if v & 0x80 else 0)) & 0xFF for v in range(256))
    assert _aes_tables.SBOX == sbox and _aes_tables.XTIME == xtime
    for x in range(256):
        s1 = sbox[x]
        s2 = xtime[s1]
        column = (s2, s1, s1, s2 ^ s1)
        for k in range(4):
            b = [column[(i - k) % 4] for i in range(4)]
            want = (b[0] << 24) | (b[1] << 16) | (b[2] << 8) | b[3]
            at = 4 * (256 * k + x)
            got = int.from_bytes(_aes_tables.TE[at : at + 4], sys.byteorder)
            assert got == want, (k, x, got, want)
    # The cipher reads the constant in place (in flash on the boards), wherever the build
    # put it: from a table one byte off word alignment it gives the same block.
    import uctypes

    shifted = bytearray(len(_aes_tables.TE) + 1)
    shifted[1:] = _aes_tables.TE
    table = memoryview(shifted)[1:]
    assert aesgcm._TE is _aes_tables.TE and uctypes.addressof(table) & 3
    gcm = aesgcm.AesGcm(bytes(range(32)))
    block = bytes(range(16))
    want = bytearray(16)
    gcm.encrypt_block(block, want)
    got = bytearray(16)
    aesgcm._aes_ctr(gcm._rk, table, aesgcm._SBOX, bytearray(block), bytes(16), got, 16)
    assert got == want and want != block


def test_gcm_vectors():
    for case in load_vectors("aesgcm.json")["gcm"]:
        plain = _unhex(case["plaintext"])
        out = bytearray(len(plain))
        tag = bytearray(16)
        gcm = aesgcm.AesGcm(_unhex(case["key"]))
        gcm.seal(_unhex(case["nonce"]), _unhex(case["aad"]), plain, len(plain), out, tag)
        assert bytes(out) == _unhex(case["ciphertext"]), case["note"]
        assert bytes(tag) == _unhex(case["tag"]), case["note"]


def _root(product_key):
    _serial[0] += 1
    root = _ROOT + "/gcm%d" % _serial[0]
    for sub in ("", "/link", "/products"):
        try:
            os.mkdir(root + sub)
        except OSError:
            pass
    with open(root + "/link/key", "wb") as f:
        f.write(_LINK_KEY)
    if product_key is not None:
        with open(root + "/link/product_key", "wb") as f:
            f.write(product_key)
    return root


def _read_args(name, offset, length):
    args = bytearray(bytes([len(name)]) + name + bytes(6))
    ccsds.put_u32(args, 1 + len(name), offset)
    ccsds.put_u16(args, 5 + len(name), length)
    return bytes(args)


def _link_tc(counter, service, subtype, data):
    # under the link key, no acknowledgement flags
    return _tc(_LINK_KEY, counter, service, subtype, data, ack=0)


def _board_link(root, fresh=True):
    # the board's own key region (link_helpers._link gives each root a file region), its
    # counters' ceilings cleared as on a new payload (fresh): they outlive a root, and an
    # earlier test's, under the same link key, would make this one's counters replays
    if fresh:
        tail = keystore.REGION_BYTES - keystore.CEILINGS_AT
        board.key_region.write(keystore.CEILINGS_AT, bytes(tail))
    sent = []
    link = telecommands.GroundLink(board, root, lambda b, n: sent.append(bytes(b[:n])))
    return link, sent


def test_pattern_products_are_refused_without_a_product_key():
    for key in (None, b"short"):
        root = _root(key)
        with open(root + "/products/patterns.qrec", "wb") as f:
            f.write(b"\x01" * 100)
        with open(root + "/products/tdc.qrec", "wb") as f:
            f.write(b"\x02" * 100)
        link, sent = _board_link(root)
        assert link.housekeeping()["product_key"] == ("none" if key is None else "invalid")
        link.handle(_link_tc(1, 128, 3, _read_args(b"patterns.qrec", 0, 64)))
        assert sent[0][7:9] == b"\x01\x02", sent  # rejected ...
        assert ccsds.get_u16(sent[0], 23) == ccsds.REJECT_PROTECTED  # ... as protected
        assert b"\x01" * 16 not in b"".join(sent)
        del sent[:]
        link.handle(_link_tc(2, 128, 3, _read_args(b"tdc.qrec", 0, 64)))
        assert sent[-1][7:9] == b"\x80\x04"  # other products are served as before


def test_a_sealed_chunk_is_what_the_host_opens():
    case = load_vectors("aesgcm.json")["sealed_chunk"]
    root = _root(_unhex(case["product_key"]))
    with open(root + "/products/" + case["name"], "wb") as f:
        f.write(_unhex(case["product"]))
    link, sent = _board_link(root)
    assert link.housekeeping()["product_key"] == "provisioned"
    name = case["name"].encode()
    link.handle(_link_tc(1, 128, 3, _read_args(name, case["offset"], case["length"])))
    reply = sent[-1]
    assert reply[7:9] == b"\x80\x06", reply[:12]
    assert reply[19:-22] == _unhex(case["tm_data"])
    # the listing does not carry the pattern product's CRC-32
    del sent[:]
    link.handle(_link_tc(2, 128, 1, b"\x00\x00"))
    listing = sent[-1][19:-22]
    at = 6 + 1 + len(name)
    assert listing[7:at] == name and ccsds.get_u32(listing, at + 4) == 0
    # a second read gets a fresh nonce; after a restart too (the ceiling is stored)
    link.handle(_link_tc(3, 128, 3, _read_args(name, 0, 16)))
    nonce_a = sent[-1][25:37]
    link, sent = _board_link(root, fresh=False)  # a restart, the region kept
    link.handle(_link_tc(100, 128, 3, _read_args(name, 0, 16)))  # past the stored TC ceiling
    nonce_b = sent[-1][25:37]
    assert nonce_a[:4] == nonce_b[:4] == b"PRD1"
    assert ccsds.get_u32(nonce_a, 8) == 2 and ccsds.get_u32(nonce_b, 8) > 2


def test_sealing_a_chunk_allocates_nothing():
    import micropython

    gcm = aesgcm.AesGcm(bytes(range(32)))
    plain = bytearray(1024)
    out = bytearray(1024)
    tag = bytearray(16)
    nonce = bytearray(12)
    aad = bytearray(20)
    micropython.heap_lock()
    try:
        gcm.seal(nonce, aad, plain, 1000, out, tag)
    finally:
        micropython.heap_unlock()
    reference = bytearray(16)
    gcm.seal(nonce, aad, plain, 1000, out, reference)
    assert tag == reference

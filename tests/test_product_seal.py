"""Pattern products over the RF ground link: never served without a provisioned product
key; with one, sealed chunk by chunk with AES-256-GCM (firmware/payload/aesgcm.py) and
opened on the ground with `cryptography`; a chunk that does not authenticate is refused."""

import json
import os
import zlib
from pathlib import Path

import pytest
from linkhelpers import KEY, product_set

from emulator.link_proxy import LinkProxy
from emulator.targets import UnixTarget
from host.link.client import CommandRejected, LinkError, PayloadClient
from host.protocol import ccsds
from host.protocol.framing import FrameReader

VECTORS = json.loads((Path(__file__).parent / "vectors" / "aesgcm.json").read_text())
PRODUCT_KEY = bytes(range(200, 232))
PATTERN = product_set(8, {"patterns.qrec": 5000})["patterns.qrec"]


def _sealed_vector():
    case = VECTORS["sealed_chunk"]
    tm = ccsds.Tm(128, 6, 0, 0, 0, 0, 0, bytes.fromhex(case["tm_data"]))
    return case, tm


def test_the_sealed_vector_opens_to_the_product_bytes():
    case, tm = _sealed_vector()
    sealed = ccsds.parse_sealed_chunk(tm)
    product = bytes.fromhex(case["product"])
    plain = ccsds.open_sealed_chunk(bytes.fromhex(case["product_key"]), case["name"], sealed)
    assert plain == product[case["offset"] :] and sealed.nonce == b"PRD1" + bytes(7) + b"\x01"
    assert product[1000:1016] not in tm.data  # the ciphertext does not carry the plaintext


def test_a_tampered_or_misplaced_chunk_is_refused():
    case, tm = _sealed_vector()
    key = bytes.fromhex(case["product_key"])
    data = tm.data
    for at in (0, 5, 6, 17, 18, 300, len(data) - 1):  # offset, count, nonce, body, tag
        altered = bytearray(data)
        altered[at] ^= 0x01
        try:
            sealed = ccsds.parse_sealed_chunk(ccsds.Tm(128, 6, 0, 0, 0, 0, 0, bytes(altered)))
        except ccsds.PacketError:
            continue  # a count that disagrees with the length never gets to the cipher
        with pytest.raises(ccsds.ChunkRefused, match="does not authenticate"):
            ccsds.open_sealed_chunk(key, case["name"], sealed)
    sealed = ccsds.parse_sealed_chunk(tm)
    with pytest.raises(ccsds.ChunkRefused):
        ccsds.open_sealed_chunk(key, "patterns2.qrec", sealed)  # another product's name
    with pytest.raises(ccsds.ChunkRefused):
        ccsds.open_sealed_chunk(bytes(32), case["name"], sealed)  # another key


def _payload(tmp_path, product_key):
    storage = tmp_path / "flash"
    (storage / "products").mkdir(parents=True)
    (storage / "link").mkdir()
    (storage / "link" / "key").write_bytes(KEY)
    if product_key is not None:
        (storage / "link" / "product_key").write_bytes(product_key)
    (storage / "products" / "patterns.qrec").write_bytes(PATTERN)
    (storage / "products" / "tdc.qrec").write_bytes(b"tdc" * 100)
    return UnixTarget(storage_dir=storage)


def _sealed_chunks(down: bytes) -> list[ccsds.SealedChunk]:
    """The sealed chunks (TM 128,6) among the frames captured on the downlink."""
    chunks = []
    for body in FrameReader(ccsds.GROUND_MAX_BODY_BYTES).feed(down):
        tm = ccsds.parse_tm(body, KEY)
        if (tm.service, tm.subtype) == (ccsds.SVC_PRODUCTS, 6):
            chunks.append(ccsds.parse_sealed_chunk(tm))
    return chunks


def _windows(data: bytes) -> list[bytes]:
    return [data[i : i + 16] for i in range(0, len(data) - 15, 16)]


def test_no_pattern_product_is_served_without_a_provisioned_key(tmp_path):
    with _payload(tmp_path, None) as target:
        with LinkProxy(target.ground_port, capture=True) as proxy:
            with PayloadClient(proxy.port, KEY, product_key=PRODUCT_KEY) as payload:
                entries = {e.name: e for e in payload.list_products()}
                assert entries["patterns.qrec"].crc32 == 0  # no CRC of the secret either
                with pytest.raises(CommandRejected, match="protected: pattern products need"):
                    payload.download(entries["patterns.qrec"], tmp_path / "sat")
                payload.download(entries["tdc.qrec"], tmp_path / "sat")  # others as before
                assert payload.housekeeping()["product_key"] == "none"
            down = bytes(proxy.captured["down"])
    assert not (tmp_path / "sat" / "patterns.qrec").exists()
    assert not [w for w in _windows(PATTERN) if w in down]


def test_a_sealed_product_round_trips_and_only_ciphertext_crosses_the_link(tmp_path):
    with _payload(tmp_path, PRODUCT_KEY) as target:
        with LinkProxy(target.ground_port, capture=True) as proxy:
            with PayloadClient(proxy.port, KEY, product_key=PRODUCT_KEY) as payload:
                entry = next(e for e in payload.list_products() if e.name == "patterns.qrec")
                result = payload.download(entry, tmp_path / "sat", chunk_bytes=700)
            down = bytes(proxy.captured["down"])
        with PayloadClient(target.ground_port, KEY) as keyless:
            with pytest.raises(LinkError, match="give the product key"):
                keyless.download(entry, tmp_path / "keyless")
    assert result.sealed and result.path.read_bytes() == PATTERN
    assert os.stat(result.path).st_mode & 0o777 == 0o600
    assert not [w for w in _windows(PATTERN) if w in down]
    # one nonce per chunk, none used twice (PRD1 + the u64 count of sealed chunks)
    nonces = [chunk.nonce for chunk in _sealed_chunks(down)]
    assert len(nonces) >= len(PATTERN) // 700 and all(n[:4] == b"PRD1" for n in nonces)
    assert len(set(nonces)) == len(nonces)


def test_chunks_sealed_under_another_key_are_refused_and_nothing_is_kept(tmp_path):
    with _payload(tmp_path, bytes(32)) as target:
        with PayloadClient(target.ground_port, KEY, product_key=PRODUCT_KEY) as payload:
            entry = next(e for e in payload.list_products() if e.name == "patterns.qrec")
            with pytest.raises(LinkError, match="lost while downloading"):
                payload.download(entry, tmp_path / "sat", stall_timeout_s=2.0)
            assert payload.refused_chunks >= 4
    part = tmp_path / "sat" / "patterns.qrec.part"
    assert not part.exists() or part.stat().st_size == 0
    assert not (tmp_path / "sat" / "patterns.qrec").exists()


def test_a_noisy_cut_link_still_gives_the_sealed_product_byte_for_byte(tmp_path):
    """Bit flips and a cut mid-download: damaged packets are dropped (HMAC, GCM), the
    download stops clearly and resumes from the verified (opened) bytes kept 0600."""
    from emulator.link_proxy import LinkFaults

    noisy = LinkFaults(flip_rate=2e-5, frame_loss_rate=0.01)
    satellite = tmp_path / "sat"
    with _payload(tmp_path, PRODUCT_KEY) as target:
        with LinkProxy(target.ground_port, down=noisy, up=noisy, seed=9) as proxy:
            with PayloadClient(proxy.port, KEY, product_key=PRODUCT_KEY, timeout_s=1.0) as p:
                entry = next(e for e in p.list_products() if e.name == "patterns.qrec")
                proxy.cut_after(2_500)
                with pytest.raises(LinkError, match="resume"):
                    p.download(entry, satellite, chunk_bytes=256, stall_timeout_s=1.0)
                part = satellite / "patterns.qrec.part"
                assert PATTERN.startswith(part.read_bytes())
                assert part.stat().st_mode & 0o777 == 0o600
                # its record holds the CRC of the opened prefix: Alice's raw data too
                meta = satellite / "patterns.qrec.part.json"
                assert meta.stat().st_mode & 0o777 == 0o600, oct(meta.stat().st_mode)
                proxy.restore()
                result = p.download(entry, satellite, chunk_bytes=256)
    assert result.sealed and result.resumed_from > 0
    assert (satellite / "patterns.qrec").read_bytes() == PATTERN


def test_a_pattern_products_partial_file_is_never_readable_by_others(tmp_path, monkeypatch):
    """The partial file of a pattern product is 0600 (its folder 0700) before the first
    chunk is asked for, whatever the umask; and one left readable by an older client is
    not resumed: a descriptor opened on it then would read every byte opened into it later
    (the same inode is renamed into place; a cold review read Alice's pattern so)."""
    satellite = tmp_path / "sat"
    part = satellite / "patterns.qrec.part"
    previous_umask = os.umask(0o022)
    try:
        with _payload(tmp_path, PRODUCT_KEY) as target:
            with PayloadClient(target.ground_port, KEY, product_key=PRODUCT_KEY) as payload:
                entry = next(e for e in payload.list_products() if e.name == "patterns.qrec")
                modes = []
                send = payload.send_tc

                def note_modes(service, subtype, data=b"", ack=True):
                    if service == ccsds.SVC_PRODUCTS and subtype == 3 and not modes:
                        modes.append(
                            (part.stat().st_mode & 0o777, satellite.stat().st_mode & 0o777)
                        )
                    return send(service, subtype, data, ack)

                monkeypatch.setattr(payload, "send_tc", note_modes)
                payload.download(entry, satellite, chunk_bytes=700)
                assert modes == [(0o600, 0o700)]
                # an older client's partial download of the first 1,400 bytes: made with
                # the umask's mode, a descriptor opened on it then, narrowed to 0600 at its
                # first chunk, its record valid (without this client's private_part)
                (satellite / "patterns.qrec").unlink()
                part.write_bytes(b"")
                part.chmod(0o644)
                spy = os.open(part, os.O_RDONLY)
                part.chmod(0o600)
                part.write_bytes(PATTERN[:1400])
                meta = satellite / "patterns.qrec.part.json"
                record = {"name": entry.name, "size": entry.size, "crc32": entry.crc32}
                record.update(verified_bytes=1400, verified_crc32=zlib.crc32(PATTERN[:1400]))
                meta.write_text(json.dumps(record))
                try:
                    result = payload.download(entry, satellite, chunk_bytes=700)
                    spied = os.pread(spy, len(PATTERN), 0)
                finally:
                    os.close(spy)
    finally:
        os.umask(previous_umask)
    assert result.resumed_from == 0 and result.path.read_bytes() == PATTERN
    assert spied == PATTERN[:1400]  # nothing opened later reached that descriptor


def test_a_partial_file_planted_by_another_user_is_not_resumed(tmp_path):
    """A pattern product's partial file and record that say all the right things (0600,
    private_part) but belong to another user, who can write the folder: the download
    starts again in a file of its own, so the opened product is never renamed into a
    file that user owns (a third cold review)."""
    satellite = tmp_path / "sat"
    satellite.mkdir(mode=0o777)
    with _payload(tmp_path, PRODUCT_KEY) as target:
        with PayloadClient(target.ground_port, KEY, product_key=PRODUCT_KEY) as payload:
            entry = next(e for e in payload.list_products() if e.name == "patterns.qrec")
            part = satellite / "patterns.qrec.part"
            part.write_bytes(b"")
            part.chmod(0o600)
            PayloadClient._save_meta(satellite / "patterns.qrec.part.json", entry, 0, 0)
            os.chown(part, 65534, 65534)  # nobody's
            result = payload.download(entry, satellite, chunk_bytes=700)
    assert result.path.read_bytes() == PATTERN
    assert result.path.stat().st_uid == os.getuid()

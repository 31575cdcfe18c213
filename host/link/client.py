"""The ground side of the payload link (docs/ground-link.md): authenticated telecommands
out, telemetry in, over a serial port (a board's UART/USB port or an emulated target's
pty), and resumable, CRC-verified product downloads.

    with PayloadClient(port, key) as payload:
        payload.ping()                      # "qkdsat-fw 0.1.0 qemu"
        for entry in payload.list_products():
            payload.download(entry, Path("PASS_DIR/satellite"))
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import stat
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from host.link.framed_serial import FramedSerial, LinkTimeout
from host.protocol import ccsds
from host.protocol.ccsds import PacketError, ProductEntry, Tm
from host.protocol.framing import encode_frame


class LinkError(RuntimeError):
    """The link failed (no answer, lost mid-transfer); the message says what and where."""


class LinkFailed(LinkError):
    """No answer within the timeout, or the link lost mid-transfer: the line, not the
    command (qkdsat payload exit 4)."""


class CommandRejected(LinkError):
    def __init__(self, what: str, verification: ccsds.Verification):
        detail = f": {verification.detail}" if verification.detail else ""
        super().__init__(f"{what} rejected by the payload ({verification.reason}{detail})")
        self.verification = verification


class CorruptDownload(LinkError):
    """A product whose bytes did not match the CRC-32 the payload listed: not kept."""


@dataclass
class DownloadResult:
    name: str
    path: Path
    size: int
    crc32: int
    resumed_from: int
    retransmissions: int
    bad_chunks: int
    seconds: float
    sealed: bool = False  # served AES-256-GCM sealed (a pattern product), opened here


def read_counter_state(path: Path) -> tuple[int, int | None]:
    """(the last telecommand security counter sent with this key, the last telemetry
    counter accepted from the payload or None) from a station's counter file:
    `<telecommand> [<telemetry>]`, decimal (a file of one number: before session 30).
    ValueError names what is wrong."""
    fields = path.read_text().split()
    if len(fields) > 2 or not all(f.isdigit() for f in fields):
        raise ValueError(
            "expected one integer (the telecommand counter) and optionally a second (the "
            f"telemetry counter), found {' '.join(fields)[:40]!r}"
        )
    numbers = [int(f) for f in fields]
    return (numbers[0] if numbers else 0), (numbers[1] if len(numbers) == 2 else None)


def write_counter_state(path: Path, telecommand: int, telemetry: int | None) -> None:
    """The counter file, replaced whole (a temporary renamed over it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(f"{telecommand}" + ("" if telemetry is None else f" {telemetry}") + "\n")
    os.replace(tmp, path)


class PayloadClient:
    def __init__(
        self,
        port: str,
        key: bytes,
        *,
        product_key: bytes | None = None,
        counter_file: Path | None = None,
        baudrate: int = 115200,
        source_id: int = 0,
        timeout_s: float = 3.0,
        retries: int = 3,
    ):
        if retries < 0:
            raise ValueError(f"retries {retries}: a command is sent at least once")
        self.link = FramedSerial(port, baudrate, max_body_bytes=ccsds.GROUND_MAX_BODY_BYTES)
        self.key = key
        self.product_key = product_key  # AES-256-GCM: opens sealed (pattern) products
        self.refused_chunks = 0  # sealed chunks that did not authenticate: never kept
        self.source_id = source_id
        self.timeout_s = timeout_s
        self.counter_file = counter_file
        self.counter, last_tm = 0, None
        if counter_file is not None and counter_file.exists():
            self.counter, last_tm = read_counter_state(counter_file)
        # Where the 14-bit sequence count starts is not a secret, but a fixed start gave
        # every session's first command the same request id, which an old session's
        # recorded acceptance quoted (the telemetry counter below is the real guard)
        self.sequence_count = secrets.randbelow(0x4000)
        self.bad_packets = 0
        self.unauthenticated_packets = 0  # of bad_packets: wrong HMAC tag, refused
        self.stale_packets = 0
        # the payload's telemetry security counter: replayed or reordered packets refused,
        # from the last one this station accepted in any session (its counter file)
        self.tm_counter = ccsds.TelemetryCounter(last_tm)
        self.last_refusal: str | None = None
        self.retries = retries

    def close(self) -> None:
        self._save_counter()
        self.link.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ------------------------------------------------------------------ packets

    def _save_counter(self) -> None:
        if self.counter_file is not None:
            write_counter_state(self.counter_file, self.counter, self.tm_counter.last)

    def send_tc(self, service: int, subtype: int, data: bytes = b"", ack: bool = True) -> bytes:
        """Send one telecommand; returns its request id (what reports quote). `data` may be
        a function of the counter (the rekey telecommand's wrapped key depends on it)."""
        self.counter += 1
        rekey = service == ccsds.SVC_FUNCTION and callable(data)
        if self.counter > (2**32 - 1 if rekey else ccsds.ORDINARY_COUNTER_MAX):
            raise LinkError("security counter exhausted: install the next key (rekey)")
        if callable(data):
            data = data(self.counter)
        packet = ccsds.build_tc(
            self.key,
            self.counter,
            service,
            subtype,
            data,
            sequence_count=self.sequence_count,
            source_id=self.source_id,
            ack=ccsds.ACK_ACCEPTANCE if ack else 0,
        )
        self.sequence_count = (self.sequence_count + 1) & 0x3FFF
        # A leading delimiter ends whatever partial frame the payload may hold (line noise,
        # a REPL tool that poked the port), so it cannot swallow this telecommand.
        frame = b"\x00" + encode_frame(packet)
        self.link.write(frame)
        return ccsds.request_id(packet)

    def receive_tm(self, timeout_s: float) -> Tm:
        """The next telemetry packet that parses; bad ones are counted and skipped."""
        deadline = time.monotonic() + timeout_s
        refused = None  # why the last packet of this wait was refused: said on timeout
        while True:
            remaining = deadline - time.monotonic()
            try:
                if remaining <= 0:
                    raise LinkTimeout(
                        f"no telemetry from {self.link.port_name} in {timeout_s:.1f} s"
                    )
                body = self.link.receive(remaining)
            except LinkTimeout as error:
                if refused is None:
                    raise
                raise LinkTimeout(f"{error}; refused: {refused}", refused=refused) from None
            try:
                return self.tm_counter.accept(ccsds.parse_tm(body, self.key))
            except PacketError as error:
                self.bad_packets += 1
                self.unauthenticated_packets += isinstance(error, ccsds.TagMismatch)
                refused = self.last_refusal = str(error)

    @property
    def replayed_packets(self) -> int:
        """Authentic telemetry refused for a counter not above the last accepted one."""
        return self.tm_counter.refused

    def command(
        self,
        what: str,
        service: int,
        subtype: int,
        data: bytes = b"",
        reply: int | None = None,
        idempotent: bool = False,
    ) -> Tm | None:
        """Send a telecommand and wait for its acceptance (and its reply TM `service,reply`).

        At most `retries` + 1 sends in all. A replay rejection means this ground
        station's counter is behind the payload's (another station, a lost state file):
        take the payload's counter and send again, once. A command damaged in transit is
        sent again; one that got no answer, or whose reply was lost after its acceptance,
        only if it is `idempotent` (a read), since an action may have happened with only
        its report lost. Any other rejection raises CommandRejected; no answer raises
        LinkFailed, saying to how many of the sends.
        """
        resynced = False
        unanswered = 0  # sends whose acceptance report did not come in time
        for attempt in range(self.retries + 1):
            last = attempt == self.retries
            request = self.send_tc(service, subtype, data)
            try:
                verification = self._await_verification(what, request, (unanswered, attempt))
            except LinkFailed:
                unanswered += 1
                if last or not idempotent:
                    raise
                continue
            if verification.accepted:
                self._save_counter()
                if reply is None:
                    return None
                try:
                    answer = self._await_reply(what, service, reply)
                    self._save_counter()  # its telemetry counter too: never accepted again
                    return answer
                except LinkFailed:
                    if last or not idempotent:
                        raise LinkFailed(
                            f"{what}: accepted by the payload on {self.link.port_name}, but "
                            f"its reply did not come within {self.timeout_s:.1f} s (sent "
                            f"{attempt + 1} times; a line that loses long frames?)"
                        ) from None
                    continue  # the reply was lost after the acceptance: ask again (a read)
            if verification.last_counter is not None and not resynced:
                self.counter = max(self.counter, verification.last_counter)
                resynced = True
                if not last:
                    continue
            elif verification.damaged_in_transit and not last:
                continue  # the payload never saw a valid command: send it again
            raise CommandRejected(what, verification)
        raise AssertionError("unreachable: the last send returns or raises")

    def _receive_or_fail(self, what: str, deadline: float, sends=(0, 0)) -> Tm:
        """The next TM before the deadline, or LinkFailed saying how long was waited and
        why the last packet of the wait was refused, if one was (a wrong key). sends:
        (the command's earlier sends that got no answer, all its earlier sends)."""
        try:
            return self.receive_tm(max(0.0, deadline - time.monotonic()) + 1e-3)
        except LinkTimeout as error:
            unanswered, sent = sends[0] + 1, sends[1] + 1  # this send included
            waited = f"within {self.timeout_s:.1f} s"
            if sent > 1:
                of = "any" if unanswered == sent else f"{unanswered}"
                waited = f"to {of} of {sent} sends, {self.timeout_s:.1f} s each"
            refused = error.refused
            hint = " (check the port, the baud rate and the key)"
            if refused and "telemetry security counter" in refused and self.counter_file:
                # a replay by an intruder, or a payload whose counter did start again (a new
                # board, emulated ones included, given this key): only the operator can tell
                hint = (
                    f" (its telemetry counter is below the last this station accepted, kept "
                    f"in {self.counter_file}: someone replays recorded telemetry, or this "
                    "payload's counter is another's (a new board given this key); only in "
                    "that case, and if this payload is new, remove the second number from "
                    "that file)"
                )
            raise LinkFailed(
                f"{what}: no answer from the payload on {self.link.port_name} {waited}"
                + (f" (the last packet refused: {refused})" if refused else "")
                + hint
            ) from None

    def _await_verification(self, what: str, request: bytes, sends=(0, 0)) -> ccsds.Verification:
        deadline = time.monotonic() + self.timeout_s
        while True:
            tm = self._receive_or_fail(what, deadline, sends)
            if tm.service != ccsds.SVC_VERIFICATION:
                self.stale_packets += 1
                continue
            try:
                verification = ccsds.parse_verification(tm)
            except PacketError:
                self.bad_packets += 1
                continue
            if verification.request == request:
                return verification
            self.stale_packets += 1

    def _await_reply(self, what: str, service: int, reply: int) -> Tm:
        deadline = time.monotonic() + self.timeout_s
        while True:
            tm = self._receive_or_fail(what, deadline)
            if tm.service == service and tm.subtype == reply:
                return tm
            self.stale_packets += 1

    # ------------------------------------------------------------------ telecommands

    def ping(self) -> str:
        """The firmware's version text (PUS are-you-alive, TC 17,1)."""
        tm = self.command("ping", ccsds.SVC_TEST, 1, reply=2, idempotent=True)
        return tm.data.decode(errors="replace")

    def housekeeping(self) -> dict:
        tm = self.command("housekeeping", ccsds.SVC_HOUSEKEEPING, 27, reply=25, idempotent=True)
        try:
            return json.loads(tm.data)
        except ValueError as error:
            raise LinkError(f"housekeeping report is not JSON: {error}") from None

    def configure(self, params: dict) -> None:
        text = json.dumps(params, separators=(",", ":")).encode()
        self.command("configure", ccsds.SVC_FUNCTION, 1, bytes([ccsds.FN_CONFIGURE]) + text)

    def start(self) -> None:
        self.command("start", ccsds.SVC_FUNCTION, 1, bytes([ccsds.FN_START]))

    def stop(self) -> None:
        self.command("stop", ccsds.SVC_FUNCTION, 1, bytes([ccsds.FN_STOP]))

    def reboot(self) -> None:
        self.command("reboot", ccsds.SVC_FUNCTION, 1, bytes([ccsds.FN_REBOOT]))

    def open_code_session(self) -> None:
        """Open the payload's code-update session (docs/ground-link.md "Maintenance in
        flight"): arm, then maintenance within the payload's window, both authenticated.
        The application keeps running; no REPL opens. The session closes
        ccsds.CODE_SESSION_S after its last accepted command."""
        self.command("maintenance arm", ccsds.SVC_FUNCTION, 1, bytes([ccsds.FN_MAINTENANCE_ARM]))
        self.command("maintenance", ccsds.SVC_FUNCTION, 1, bytes([ccsds.FN_MAINTENANCE]))

    def upload_code(
        self, name: str, data: bytes, chunk_bytes: int = ccsds.MAX_CHUNK_BYTES
    ) -> None:
        """Replace the code file `name` (relative to the payload's storage root:
        main.py, board.mpy, payload/<module>.mpy ...) with data, in an open code session:
        chunks into the payload's staging file, then a commit that the payload accepts
        only if the length and SHA-256 match, renaming it to `<name>.new` in one step; it
        runs only once activate_code names it. Any failure leaves the old file
        (CommandRejected says why)."""
        target = ccsds.name_arg(name)
        for offset in range(0, max(len(data), 1), chunk_bytes):
            chunk = data[offset : offset + chunk_bytes]
            self.command(
                f"put {name} at {offset}",
                ccsds.SVC_FUNCTION,
                1,
                bytes([ccsds.FN_CODE_PUT]) + target + offset.to_bytes(4, "big") + chunk,
                idempotent=True,  # a repeated chunk is recognised by the payload
            )
        self.command(
            f"commit {name}",
            ccsds.SVC_FUNCTION,
            1,
            bytes([ccsds.FN_CODE_COMMIT])
            + target
            + len(data).to_bytes(4, "big")
            + hashlib.sha256(data).digest(),
        )

    def activate_code(self, names: list[str]) -> None:
        """Put the committed files `names` (each uploaded with upload_code in this or an
        earlier session) in place as one set: the payload writes a journal naming them,
        then renames each; a reset part-way is finished at the next boot before any of
        them is imported (docs/ground-link.md "Maintenance in flight")."""
        self.command(
            "activate",
            ccsds.SVC_FUNCTION,
            1,
            bytes([ccsds.FN_CODE_ACTIVATE]) + b"".join(ccsds.name_arg(name) for name in names),
        )

    def rekey(self, next_key: bytes) -> None:
        """Install next_key on the payload (authenticated by the current key, which wraps
        it); both sides then count from 0 again. Works with the counter exhausted: the
        counters above ccsds.ORDINARY_COUNTER_MAX are kept for this command. The old key's
        counter file keeps its last value; the new key's counter is not saved anywhere
        until the caller sets counter_file."""
        old_key = self.key

        def wrapped(counter: int) -> bytes:
            return bytes([ccsds.FN_REKEY]) + ccsds.wrap_next_key(old_key, counter, next_key)

        self.command("rekey", ccsds.SVC_FUNCTION, 1, wrapped)
        self._save_counter()
        self.key = next_key
        self.counter = 0
        self.counter_file = None

    def set_time(self, utc_us: int | None = None) -> int:
        if utc_us is None:
            utc_us = time.time_ns() // 1000
        self.command("set time", ccsds.SVC_TIME, 128, utc_us.to_bytes(8, "big"))
        return utc_us

    def delete(self, name: str) -> None:
        self.command(f"delete {name}", ccsds.SVC_PRODUCTS, 5, ccsds.name_arg(name))

    def list_products(self) -> list[ProductEntry]:
        entries: list[ProductEntry] = []
        index = 0
        while True:
            tm = self.command(
                "list", ccsds.SVC_PRODUCTS, 1, index.to_bytes(2, "big"), reply=2, idempotent=True
            )
            total, start, next_index, page = ccsds.parse_list(tm)
            if start != index:
                raise LinkError(f"product list page starts at {start}, asked for {index}")
            entries += page
            if next_index >= total or next_index == index:
                return entries
            index = next_index

    # ------------------------------------------------------------------ download

    def download(
        self,
        entry: ProductEntry,
        folder: Path,
        *,
        chunk_bytes: int = ccsds.MAX_CHUNK_BYTES,
        window: int = 4,
        request_timeout_s: float = 1.0,
        stall_timeout_s: float | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> DownloadResult:
        """Fetch one product into folder/<name>, resuming a previous partial download.

        Chunks are requested `window` at a time (the link stays busy while the payload
        reads storage); each chunk is checked against its own CRC-32 and appended only in
        order, so `<name>.part` always holds verified bytes and `<name>.part.json` says
        how many. The finished file must match the CRC-32 the payload listed, else it is
        deleted and CorruptDownload raised. A lost link raises LinkError; calling again
        continues from the last verified chunk.
        """
        if not 0 < chunk_bytes <= ccsds.MAX_CHUNK_BYTES:
            raise ValueError(f"chunk_bytes must be 1..{ccsds.MAX_CHUNK_BYTES}")
        stall_timeout_s = stall_timeout_s or max(10.0, 4 * self.timeout_s)
        started = time.monotonic()
        # a pattern product is Alice's raw data once opened: its folder, if made here, and
        # its partial file are the owner's alone from their creation
        protected = entry.name.startswith(ccsds.PROTECTED_PREFIX)
        folder.mkdir(mode=0o700 if protected else 0o777, parents=True, exist_ok=True)
        final = folder / entry.name
        part = folder / (entry.name + ".part")
        meta_path = folder / (entry.name + ".part.json")
        if protected:
            self._drop_unsafe_part(part, meta_path)
        verified, crc = self._resume_point(entry, part, meta_path)
        resumed_from = verified
        if progress:
            progress(verified)
        outstanding: dict[int, tuple[float, int]] = {}  # offset -> (deadline, send index)
        arrived: dict[int, bytes] = {}
        next_offset = verified
        sent = 0
        retransmissions = 0
        bad_chunks = 0
        last_progress = time.monotonic()
        reads: dict[bytes, int] = {}  # request id -> offset, for rejections
        sealed = False

        def request(offset: int) -> None:
            nonlocal sent
            length = min(chunk_bytes, entry.size - offset)
            request_id = self.send_tc(
                ccsds.SVC_PRODUCTS, 3, ccsds.read_args(entry.name, offset, length), ack=False
            )
            reads[request_id] = offset
            if len(reads) > 4 * window:
                reads.pop(next(iter(reads)))
            outstanding[offset] = (time.monotonic() + request_timeout_s, sent)
            sent += 1

        if verified == 0:
            # a new file, made here: nobody else's, and nobody's descriptor open on it
            part.unlink(missing_ok=True)
            flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
        else:
            flags = os.O_RDWR | os.O_NOFOLLOW  # the verified prefix of an earlier run
        fd = os.open(part, flags, 0o600 if protected else 0o666)
        with os.fdopen(fd, "r+b") as out:
            out.truncate(verified)
            out.seek(verified)
            while verified < entry.size:
                while len(outstanding) + len(arrived) < window and next_offset < entry.size:
                    request(next_offset)
                    next_offset += chunk_bytes
                now = time.monotonic()
                if now - last_progress > stall_timeout_s:
                    self._save_meta(meta_path, entry, verified, crc)
                    raise LinkFailed(
                        f"link to {self.link.port_name} lost while downloading {entry.name}: "
                        f"{verified} of {entry.size} bytes verified and kept in {part}; "
                        "run the same download again to resume"
                    )
                for offset, (deadline, _) in list(outstanding.items()):
                    if now > deadline:
                        request(offset)
                        retransmissions += 1
                try:
                    tm = self.receive_tm(0.05)
                except LinkTimeout:
                    continue
                if tm.service == ccsds.SVC_VERIFICATION:
                    try:
                        verification = ccsds.parse_verification(tm)
                    except PacketError:
                        self.bad_packets += 1
                        continue
                    if not verification.accepted and verification.request in reads:
                        if verification.last_counter is not None:  # counter behind: resync
                            self.counter = max(self.counter, verification.last_counter)
                            continue
                        if verification.damaged_in_transit:
                            continue  # a lost request: its timeout sends it again
                        self._save_meta(meta_path, entry, verified, crc)
                        raise CommandRejected(f"read {entry.name}", verification)
                    continue
                if tm.service != ccsds.SVC_PRODUCTS or tm.subtype not in (4, 6):
                    self.stale_packets += 1
                    continue
                try:
                    if tm.subtype == 6:
                        chunk = self._open_sealed(entry, tm, part)
                        sealed = True
                    else:
                        chunk = ccsds.parse_chunk(tm)
                except ccsds.ChunkRefused:
                    self.refused_chunks += 1
                    bad_chunks += 1  # its request times out and is sent again
                    continue
                except PacketError:
                    bad_chunks += 1
                    continue
                if zlib.crc32(chunk.data) != chunk.crc32:
                    bad_chunks += 1  # its request times out and is sent again
                    continue
                if chunk.offset not in outstanding:
                    continue  # a duplicate answer to a retransmitted request
                expected = min(chunk_bytes, entry.size - chunk.offset)
                if len(chunk.data) != expected:
                    self._save_meta(meta_path, entry, verified, crc)
                    raise CorruptDownload(
                        f"{entry.name} changed on the payload: {len(chunk.data)} bytes at "
                        f"offset {chunk.offset}, expected {expected}; list the products again"
                    )
                _, index = outstanding.pop(chunk.offset)
                arrived[chunk.offset] = chunk.data
                # The payload answers in order: anything asked before this one and still
                # missing was lost; ask again now instead of waiting for its timeout.
                for offset, (_, other) in list(outstanding.items()):
                    if other < index:
                        request(offset)
                        retransmissions += 1
                while verified in arrived:
                    data = arrived.pop(verified)
                    out.write(data)
                    crc = zlib.crc32(data, crc)
                    verified += len(data)
                    last_progress = time.monotonic()
                    if progress:
                        progress(len(data))
                out.flush()
                self._save_meta(meta_path, entry, verified, crc)
        # a sealed product is listed without its CRC-32 (it would be 32 bits of its
        # plaintext in the clear); every chunk of it authenticated at its offset instead
        if crc != entry.crc32 and not (sealed and entry.crc32 == 0):
            part.unlink()
            meta_path.unlink(missing_ok=True)
            raise CorruptDownload(
                f"{entry.name}: CRC-32 of the {entry.size} downloaded bytes is {crc:#010x}, "
                f"the payload listed {entry.crc32:#010x}; the file was not kept"
            )
        os.replace(part, final)
        meta_path.unlink(missing_ok=True)
        self._save_counter()
        return DownloadResult(
            entry.name,
            final,
            entry.size,
            crc,
            resumed_from,
            retransmissions,
            bad_chunks,
            time.monotonic() - started,
            sealed,
        )

    def _open_sealed(self, entry: ProductEntry, tm: Tm, part: Path) -> ccsds.Chunk:
        if self.product_key is None:
            raise LinkError(
                f"{entry.name} is served sealed (AES-256-GCM): give the product key "
                "(--product-key) to download it"
            )
        os.chmod(part, 0o600)  # any sealed product, 0600 from creation if named patterns*
        sealed = ccsds.parse_sealed_chunk(tm)
        data = ccsds.open_sealed_chunk(self.product_key, entry.name, sealed)
        return ccsds.Chunk(sealed.offset, data, zlib.crc32(data))

    @staticmethod
    def _save_meta(path: Path, entry: ProductEntry, verified: int, crc: int) -> None:
        meta = {"name": entry.name, "size": entry.size, "crc32": entry.crc32}
        # private_part: the part was 0600 from its creation (_drop_unsafe_part)
        private = entry.name.startswith(ccsds.PROTECTED_PREFIX)
        meta.update(verified_bytes=verified, verified_crc32=crc, private_part=private)
        tmp = path.with_suffix(".tmp")
        # 0600 like the part: the CRC of a sealed product's opened prefix is 32 linear
        # bits of Alice's raw data (the payload lists that product's CRC as 0 for this)
        tmp.unlink(missing_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(json.dumps(meta))
        os.replace(tmp, path)

    @staticmethod
    def _drop_unsafe_part(part: Path, meta_path: Path) -> None:
        """Remove a pattern product's partial download unless this client made it (0600
        from its creation, its record says so): an older client made it with the umask's
        mode and narrowed it only at the first chunk, and a descriptor opened on it in
        between would read every byte opened into it later (the inode is the one renamed
        into place), however its mode reads now. The download then starts again in a new
        file rather than resume."""
        try:
            info = os.lstat(part)
        except FileNotFoundError:
            return
        try:
            ours = json.loads(meta_path.read_text()).get("private_part") is True
        except (OSError, ValueError, AttributeError):
            ours = False
        # and this user's: one planted by another user who can write the folder would
        # stay theirs, the opened product renamed into it
        ours = ours and info.st_uid == os.getuid()
        if not ours or not stat.S_ISREG(info.st_mode) or info.st_mode & 0o077:
            part.unlink()
            meta_path.unlink(missing_ok=True)

    @staticmethod
    def _resume_point(entry: ProductEntry, part: Path, meta_path: Path) -> tuple[int, int]:
        """(verified bytes, their CRC-32) of an earlier partial download of this very
        product (same size and CRC listed), re-checked from disk; else (0, 0)."""
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError):
            return 0, 0
        if (meta.get("size"), meta.get("crc32")) != (entry.size, entry.crc32):
            return 0, 0  # a different product under this name
        verified = int(meta.get("verified_bytes", 0))
        try:
            with open(part, "rb") as f:
                data = f.read(verified)
        except OSError:
            return 0, 0
        if len(data) != verified or zlib.crc32(data) != meta.get("verified_crc32"):
            return 0, 0
        return verified, zlib.crc32(data)

"""ETSI GS QKD 014 (v1.1.1) key delivery at a station: an HTTPS server with mutual TLS
(docs/network.md).

An SAE is identified by the common name of the client certificate it presents (signed by
the configured CA); only registered SAE IDs are served. The master SAE asks enc_keys for
a slave SAE: the keys are taken from the station's pool (write-ahead, host/network/pool.py),
kept for the slave in the store and returned with fresh UUID key_IDs. The slave asks
dec_keys with those key_IDs: each key is served once, to that slave only, and erased from
the store in the same transaction. Errors as the standard: 400 bad request (malformed
JSON or parameters, unknown or already served key_ID), 401 an SAE that is not registered
or asks for a key_ID made for another SAE (or under another master), 503 the pool is
short. The audit log records who asked what and the key_IDs, never key material.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import http.client
import ipaddress
import json
import os
import socket
import sqlite3
import ssl
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from host.errors import BadInput
from host.network.pool import PoolShort, StationPool

API_PREFIX = "/api/v1/keys/"
DEFAULT_KEY_SIZE_BITS = 256
MIN_KEY_SIZE_BITS = 64
MAX_KEY_SIZE_BITS = 8192
MAX_KEYS_PER_REQUEST = 128
MAX_REQUEST_BYTES = 1 << 16
# The slave's KME takes a delivery's bytes no later than this after the delivery's
# connection began: the master's KME waits PeerKME.DEADLINE_S (30 s) from its own
# connection, a little earlier, so a take later than this could store keys for which the
# master got a 503 (its own bytes lost), kept under key_IDs nobody holds.
PEER_TAKE_BY_S = 22.5
MAX_STORED_KEYS = 100_000


class RequestError(Exception):
    def __init__(self, status: int, message: str, details: list | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.details = details or []


# ------------------------------------------------------------------ storage


class SQLiteStore:
    """Keys delivered to a master SAE and not yet to its slave, in SQLite (the default,
    embedded). The file is created 0600; secure_delete overwrites served keys in the
    file's pages. PostgresStore runs the same statements on PostgreSQL."""

    PARAM = "?"
    BLOB = "BLOB"
    REAL = "REAL"

    def __init__(self, path: str | Path):
        self.path = str(path)
        if not os.path.exists(self.path):
            os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        # a store made by someone else (an installer, a restored backup) is used only if
        # private, as the pools are: its pending keys are secret (SQLite's journal takes
        # the database's mode)
        mode = os.stat(self.path).st_mode
        if mode & 0o077:
            raise BadInput(
                f"key store {self.path}: readable or writable by group or others "
                f"(mode {mode & 0o777:o}); it holds keys: chmod 600 {self.path}"
            )
        self._create()

    def _create(self) -> None:
        db = self._connect()
        try:
            db.execute(
                "CREATE TABLE IF NOT EXISTS pending_keys (key_id TEXT PRIMARY KEY, "
                "master_sae TEXT NOT NULL, slave_sae TEXT NOT NULL, size_bits INTEGER NOT NULL, "
                f"key {self.BLOB} NOT NULL, created_unix {self.REAL} NOT NULL)"
            )
            self._commit(db)
        finally:
            db.close()

    def _connect(self):
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        db.execute("PRAGMA secure_delete = ON")
        db.execute("PRAGMA journal_mode = DELETE")
        db.execute("PRAGMA synchronous = FULL")
        return db

    def _begin(self, db) -> None:
        db.execute("BEGIN IMMEDIATE")  # the write lock now: no two takes interleave

    def _commit(self, db) -> None:
        if db.in_transaction:
            db.execute("COMMIT")

    def _rollback(self, db) -> None:
        db.execute("ROLLBACK")

    def _sql(self, text: str) -> str:
        return text.replace("?", self.PARAM)

    def add(self, master: str, slave: str, keys: list[tuple[str, bytes]]) -> None:
        db = self._connect()
        try:
            self._begin(db)
            cursor = db.cursor()
            cursor.executemany(
                self._sql("INSERT INTO pending_keys VALUES (?, ?, ?, ?, ?, ?)"),
                [(key_id, master, slave, 8 * len(key), key, time.time()) for key_id, key in keys],
            )
            self._commit(db)
        finally:
            db.close()

    def take(self, master: str, slave: str, key_ids: list[str]) -> list[tuple[str, bytes]]:
        """All the keys asked for, removed in one transaction, or none (RequestError)."""
        db = self._connect()
        try:
            self._begin(db)
            cursor = db.cursor()
            found = []
            for key_id in key_ids:
                cursor.execute(
                    self._sql(
                        "SELECT key, master_sae, slave_sae FROM pending_keys WHERE key_id = ?"
                        + self.LOCK_ROW
                    ),
                    (key_id,),
                )
                row = cursor.fetchone()
                if row is None:
                    self._rollback(db)
                    raise RequestError(400, "key_ID unknown or already served", [key_id])
                if (row[1], row[2]) != (master, slave):
                    # GS QKD 014 5.4: 401 Unauthorized, a key made for another pair of SAEs
                    self._rollback(db)
                    raise RequestError(
                        401, "key_ID not delivered to this SAE by that master SAE", [key_id]
                    )
                found.append((key_id, bytes(row[0])))
            cursor.executemany(
                self._sql("DELETE FROM pending_keys WHERE key_id = ?"), [(k,) for k in key_ids]
            )
            self._commit(db)
            return found
        finally:
            db.close()

    LOCK_ROW = ""

    def count(self) -> int:
        db = self._connect()
        try:
            cursor = db.cursor()
            cursor.execute("SELECT COUNT(*) FROM pending_keys")
            return int(cursor.fetchone()[0])
        finally:
            db.close()


class PostgresStore(SQLiteStore):
    """The same store on PostgreSQL (a postgresql:// URL), through psycopg 3. A take
    locks its rows (SELECT ... FOR UPDATE): a concurrent replay waits, then finds them
    gone."""

    PARAM = "%s"
    BLOB = "BYTEA"
    REAL = "DOUBLE PRECISION"
    LOCK_ROW = " FOR UPDATE"
    CONNECT_TIMEOUT_S = 5

    def __init__(self, url: str):
        try:
            import psycopg
        except ImportError as error:
            raise BadInput("a PostgreSQL URL needs the psycopg package") from error
        self._psycopg = psycopg
        self.url = url
        self.path = _redact(url)
        try:
            self._create()
        except psycopg.Error as error:
            raise BadInput(f"PostgreSQL {self.path}: {_one_line(error)}") from None

    def _connect(self):
        return self._psycopg.connect(self.url, connect_timeout=self.CONNECT_TIMEOUT_S)

    def _begin(self, db) -> None:
        pass  # psycopg opens a transaction on the first statement

    def _commit(self, db) -> None:
        db.commit()

    def _rollback(self, db) -> None:
        db.rollback()


def _redact(url: str) -> str:
    """The URL without its password, for messages and logs."""
    parts = urlsplit(url)
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
        return parts._replace(netloc=netloc).geturl()
    return url


def _one_line(error) -> str:
    return " ".join(str(error).split())[:300]


def open_store(location: str) -> SQLiteStore:
    """A postgresql:// (or postgres://) URL, or an SQLite file path."""
    if location.startswith(("postgresql://", "postgres://")):
        return PostgresStore(location)
    return SQLiteStore(location)


# ------------------------------------------------------------------ the KME


class KeyManager:
    """The KME's logic, apart from HTTP: what the handler calls."""

    def __init__(self, kme_id: str, pool_path, store: SQLiteStore, sae_ids, audit_path, peer=None):
        self.kme_id = kme_id
        self.peer: PeerKME | None = peer
        self.pool_path = Path(pool_path)
        self.store = store
        self.sae_ids = set(sae_ids)
        # client certificates are told apart by their common name alone (one CA): an
        # application named as a KME would be taken for the peer (deliver: keys stored
        # under key IDs it chose) or for this KME
        kmes = {kme_id} | ({peer.kme_id} if peer is not None else set())
        if kmes & self.sae_ids:
            raise BadInput(
                f"SAE IDs {sorted(kmes & self.sae_ids)} are also KME IDs: a client "
                "certificate names one or the other, never both"
            )
        self.audit_path = Path(audit_path)
        self._audit_lock = threading.Lock()
        with StationPool(self.pool_path):
            pass  # the pool must exist and be sound before the server starts

    def audit(self, entry: dict) -> None:
        line = json.dumps({"utc_unix": round(time.time(), 3), **entry}, sort_keys=True) + "\n"
        with self._audit_lock:
            fd = os.open(self.audit_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            try:
                os.write(fd, line.encode())
                os.fsync(fd)
            finally:
                os.close(fd)

    def _peer(self, caller: str | None, url_sae: str) -> None:
        if caller not in self.sae_ids:
            raise RequestError(401, "client certificate names no registered SAE")
        if url_sae not in self.sae_ids:
            raise RequestError(400, f"unknown SAE_ID {url_sae!r}")
        if url_sae == caller:
            raise RequestError(400, "an SAE cannot exchange keys with itself")

    def status(self, caller: str, slave: str) -> dict:
        self._peer(caller, slave)
        with StationPool(self.pool_path) as pool:
            available_bytes = pool.available_for(pool.holder)  # what enc_keys here can take
        return {
            "source_KME_ID": self.kme_id,
            "target_KME_ID": self.peer.kme_id if self.peer else self.kme_id,
            "master_SAE_ID": caller,
            "slave_SAE_ID": slave,
            "key_size": DEFAULT_KEY_SIZE_BITS,
            "stored_key_count": 8 * available_bytes // DEFAULT_KEY_SIZE_BITS,
            "max_key_count": MAX_STORED_KEYS,
            "max_key_per_request": MAX_KEYS_PER_REQUEST,
            "max_key_size": MAX_KEY_SIZE_BITS,
            "min_key_size": MIN_KEY_SIZE_BITS,
            "max_SAE_ID_count": 0,
        }

    def enc_keys(self, caller: str, slave: str, request: dict) -> dict:
        self._peer(caller, slave)
        number = _integer(request, "number", 1)
        size = _integer(request, "size", DEFAULT_KEY_SIZE_BITS)
        if not 1 <= number <= MAX_KEYS_PER_REQUEST:
            raise RequestError(400, f"number must be in 1..{MAX_KEYS_PER_REQUEST}", [number])
        if not MIN_KEY_SIZE_BITS <= size <= MAX_KEY_SIZE_BITS or size % 8:
            raise RequestError(
                400,
                f"size must be a multiple of 8 in {MIN_KEY_SIZE_BITS}..{MAX_KEY_SIZE_BITS}",
                [size],
            )
        if request.get("additional_slave_SAE_IDs"):
            raise RequestError(400, "additional_slave_SAE_IDs not supported (max_SAE_ID_count 0)")
        if request.get("extension_mandatory"):
            raise RequestError(400, "extension_mandatory not supported")
        if self.store.count() + number > MAX_STORED_KEYS:
            raise RequestError(503, "the key store is full: the slave SAE must fetch keys")
        key_ids = [str(uuid.uuid4()) for _ in range(number)]
        with contextlib.ExitStack() as connection:
            delivery = None
            if self.peer is not None:
                # The slave's KME holds the same bytes at the same offset (the two pools
                # of a relayed pair): it is told which key_IDs they became, never the
                # keys. Reached (its pinned server) before anything is taken here.
                try:
                    delivery = connection.enter_context(self.peer.connected())
                except PeerError as error:
                    raise RequestError(
                        503, f"the slave's KME is not reached: {error}; no key taken"
                    ) from None
            try:
                with StationPool(self.pool_path) as pool:
                    if delivery is not None:
                        delivery.check_time_left()
                    # this end's share of the pair: the other end's KME (or its sends)
                    # take the other share, so no key here is ever a key there
                    # (pool.split_fill)
                    offset = pool.position(pool.holder)
                    material = pool.take(
                        number * size // 8, f"etsi014 enc_keys {key_ids[0]}", offset,
                        pool.holder,
                    )  # fmt: skip
            except PoolShort as short:
                raise RequestError(
                    503,
                    f"key pool short: {8 * short.available_bytes} bits available, "
                    f"{number * size} asked",
                ) from None
            except PeerError as error:
                raise RequestError(503, f"{error}; no key taken") from None
            step = size // 8
            keys = [
                (key_id, material[i * step : (i + 1) * step]) for i, key_id in enumerate(key_ids)
            ]
            del material
            if delivery is None:
                self.store.add(caller, slave, keys)
            else:
                # Until the peer confirms, the master gets nothing; if it never does (it
                # went down, refused, or its answer missed the deadline), the bytes taken
                # here are lost (counted in the pool), never served.
                try:
                    delivery.send(caller, slave, key_ids, offset, size)
                except PeerError as error:
                    raise RequestError(
                        503, f"the slave's KME did not take the keys: {error}"
                    ) from None
        return {"keys": [{"key_ID": k, "key": base64.b64encode(v).decode()} for k, v in keys]}

    def _authenticate_peer(self, caller: str | None, certificate_sha256: str) -> None:
        """RequestError 401 unless the caller is the peer KME: its name, and its client
        certificate (SHA-256 of its DER) the peer's own (PeerKME.certificate_sha256), not
        only one carrying its name."""
        if self.peer is None or caller != self.peer.kme_id:
            raise RequestError(401, "client certificate names no peer KME of this KME")
        if certificate_sha256 != self.peer.certificate_sha256:
            # the presented one's digest (public) for the audit log's follow-up
            raise RequestError(
                401,
                f"client certificate named {caller} is not the peer KME's pinned one "
                f"(presented SHA-256 {certificate_sha256[:16] or 'none'}...)",
            )

    def deliver(
        self, caller: str | None, certificate_sha256: str, read_request, started_s: float
    ) -> dict:
        """The peer KME's enc_keys: store for the slave the `number` keys of `size` bits
        that start at byte `offset` of this KME's pool, under the peer's key_IDs.
        certificate_sha256: the caller's client certificate, which must be the peer's
        pinned one (_authenticate_peer); read_request() reads the delivery's body, only
        once that passed, so a stranger learns nothing of how the body is parsed.
        started_s: time.monotonic() when the request's connection began; a take later
        than PEER_TAKE_BY_S after it is refused (the peer may have given up waiting)."""
        self._authenticate_peer(caller, certificate_sha256)
        request = read_request()
        try:
            master, slave = str(request["master_SAE_ID"]), str(request["slave_SAE_ID"])
            key_ids = [str(uuid.UUID(str(k))) for k in request["key_IDs"]]
            offset, size = int(request["offset"]), int(request["size"])
        except (KeyError, TypeError, ValueError) as error:
            raise RequestError(400, f"malformed key delivery ({error})") from None
        if master not in self.sae_ids or slave not in self.sae_ids or master == slave:
            raise RequestError(400, "unknown master or slave SAE_ID")
        if not 1 <= len(key_ids) <= MAX_KEYS_PER_REQUEST or len(set(key_ids)) != len(key_ids):
            raise RequestError(400, f"1..{MAX_KEYS_PER_REQUEST} distinct key_IDs")
        if not MIN_KEY_SIZE_BITS <= size <= MAX_KEY_SIZE_BITS or size % 8 or offset < 0:
            raise RequestError(400, "size or offset out of range")
        count = len(key_ids) * size // 8
        try:
            with StationPool(self.pool_path) as pool:
                late_s = time.monotonic() - started_s
                if late_s > PEER_TAKE_BY_S:  # this pool's lock held it that long
                    raise RequestError(
                        503,
                        f"the delivery reached the pool {late_s:.1f} s after its connection, "
                        f"past {PEER_TAKE_BY_S:g} s (the peer waits {PeerKME.DEADLINE_S:g} s "
                        f"in all): nothing taken",
                    )
                # at the peer's offset: bytes below it are skipped (lost), bytes already
                # used are refused by the pool: nothing is served twice
                # in the share of the pair's other end, whose KME made these keys
                material = pool.take(
                    count, f"etsi014 from {caller} {key_ids[0]}", offset, pool.peer
                )
        except PoolShort as short:
            raise RequestError(503, f"key pool short: {8 * short.available_bytes} bits") from None
        except BadInput as error:
            raise RequestError(400, str(error)) from None
        step = size // 8
        keys = [(key_id, material[i * step : (i + 1) * step]) for i, key_id in enumerate(key_ids)]
        del material
        self.store.add(master, slave, keys)
        return {"key_IDs": key_ids}

    def dec_keys(self, caller: str, master: str, request: dict) -> dict:
        self._peer(caller, master)
        try:
            key_ids = [str(item["key_ID"]) for item in request["key_IDs"]]
        except (KeyError, TypeError) as error:
            raise RequestError(400, 'key_IDs must be a list of {"key_ID": ...}') from error
        if not 1 <= len(key_ids) <= MAX_KEYS_PER_REQUEST or len(set(key_ids)) != len(key_ids):
            raise RequestError(400, f"1..{MAX_KEYS_PER_REQUEST} distinct key_IDs")
        for key_id in key_ids:
            try:
                uuid.UUID(key_id)
            except ValueError:
                raise RequestError(400, "key_ID is not a UUID", [key_id]) from None
        keys = self.store.take(master, caller, key_ids)
        return {"keys": [{"key_ID": k, "key": base64.b64encode(v).decode()} for k, v in keys]}


def _integer(request: dict, name: str, default: int) -> int:
    value = request.get(name, default)
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(400, f"{name} must be an integer", [str(value)[:40]])
    return value


# ------------------------------------------------------------------ HTTP


class Handler(BaseHTTPRequestHandler):
    server_version = "qkdsat-kme/1"
    protocol_version = "HTTP/1.1"
    timeout = 30  # seconds a connection may idle
    # Seconds from the start of a request (an idle keep-alive wait, the TLS handshake,
    # the request line, headers and body) to the end of its reading: `timeout` bounds only
    # each wait for bytes, so a stranger sending a byte of a ClientHello every 29 s held
    # a thread for good, and as many threads as connections it opened. Past it the
    # connection is cut (shut down under the thread's read); the answer is not bounded.
    request_deadline_s = 30.0

    def log_message(self, *args) -> None:  # the audit log replaces the access log
        pass

    def handle_one_request(self) -> None:
        self._started_s = time.monotonic()
        cut = threading.Timer(self.request_deadline_s, self._cut)
        cut.daemon = True
        self._reading = cut
        cut.start()
        try:
            super().handle_one_request()
        finally:
            cut.cancel()

    def _request_read(self) -> None:
        """The request is read: its deadline no longer applies (the answer may wait for the
        peer KME or the database)."""
        self._reading.cancel()

    def _cut(self) -> None:
        """From the timer's thread: end the reads of a request past its deadline. The plain
        socket's shutdown (not SSLSocket's, which drops its TLS state under the reader)."""
        try:
            socket.socket.shutdown(self.connection, socket.SHUT_RDWR)
        except OSError:
            pass  # already closed

    def _caller_certificate_sha256(self) -> str:
        der = self.connection.getpeercert(binary_form=True)
        return hashlib.sha256(der).hexdigest() if der else ""

    def _caller(self) -> str | None:
        cert = self.connection.getpeercert()
        for rdn in (cert or {}).get("subject", ()):
            for name, value in rdn:
                if name == "commonName":
                    return value
        return None

    def _handle(self, method: str) -> None:
        kme: KeyManager = self.server.kme
        caller = self._caller()
        parts = urlsplit(self.path)
        entry = {"sae": caller, "method": method, "path": parts.path}
        if method == "GET":
            self._request_read()
        try:
            if parts.path == PEER_DELIVER_PATH and method == "POST":
                certificate = self._caller_certificate_sha256()
                body = kme.deliver(caller, certificate, lambda: _json_body(self), self._started_s)
                entry["key_IDs"] = body["key_IDs"]
                raise _Answered(body)
            if not parts.path.startswith(API_PREFIX):
                raise RequestError(400, "not an ETSI GS QKD 014 path")
            sae_id, _, operation = parts.path[len(API_PREFIX) :].partition("/")
            if method == "GET":
                query = parse_qs(parts.query, keep_blank_values=True)
                request = {k: v[0] for k, v in query.items() if k != "key_ID"}
                if "key_ID" in query:
                    request["key_IDs"] = [{"key_ID": k} for k in query["key_ID"]]
            else:
                request = _json_body(self)
            if operation == "status" and method == "GET":
                body = kme.status(caller, sae_id)
            elif operation == "enc_keys":
                body = kme.enc_keys(caller, sae_id, request)
                entry["key_IDs"] = [k["key_ID"] for k in body["keys"]]
            elif operation == "dec_keys":
                body = kme.dec_keys(caller, sae_id, request)
                entry["key_IDs"] = [k["key_ID"] for k in body["keys"]]
            else:
                raise RequestError(400, f"unknown operation {operation!r}")
            status = 200
        except _Answered as answered:
            status, body = 200, answered.body
        except RequestError as error:
            status, body = error.status, {"message": error.message}
            if error.details:
                body["details"] = [{"detail": str(d)} for d in error.details]
            entry["message"] = error.message
        except BadInput as error:  # the pool itself is unusable: a server-side failure
            status, body = 503, {"message": "key pool unavailable"}
            entry["message"] = str(error)
        except Exception as error:  # a server fault: answered, audited, never a key
            status, body = 503, {"message": "internal error"}
            entry["message"] = f"{type(error).__name__}: {error}"[:300]
        entry["status"] = status
        kme.audit(entry)
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        self._handle("GET")

    def do_POST(self) -> None:
        self._handle("POST")


class _Answered(Exception):
    def __init__(self, body: dict):
        self.body = body


def _json_body(handler) -> dict:
    try:
        length = int(handler.headers.get("Content-Length") or 0)
    except ValueError:
        raise RequestError(400, "Content-Length is not a number") from None
    if not 0 <= length <= MAX_REQUEST_BYTES:
        raise RequestError(400, "request body too large")
    data = handler.rfile.read(length)
    handler._request_read()
    try:
        request = json.loads(data or b"{}")
    except (ValueError, UnicodeDecodeError) as error:
        raise RequestError(400, f"body is not JSON: {error}") from None
    if not isinstance(request, dict):
        raise RequestError(400, "body must be a JSON object")
    return request


# ------------------------------------------------------------------ the peer KME

PEER_DELIVER_PATH = "/qkdsat/v1/kme/deliver"


class PeerError(Exception):
    pass


class PeerKME:
    """The KME at the other end of a relayed pair of pools (A/B.pool here, B/A.pool
    there: the same bytes at the same offsets). After an enc_keys here, `deliver` tells it
    over mutual TLS which offsets became which key_IDs, so that it serves them to the
    slave SAE by dec_keys. Only key_IDs and offsets cross; this KME authenticates with its
    own certificate (common name = its KME ID). The peer's own client certificate
    (`peer_cert_pem`, from the PKI that made both: `kms pki --kme A,B`) is pinned: a
    delivery from it is taken, and from no other certificate the CA signed under its name
    (one issued by hand with the CA's key, or a rogue copy). So is the peer's server
    certificate (`peer_server_cert_pem`, naming the peer's host): a delivery goes to the
    server holding it, and to no other the CA signed for that host."""

    TIMEOUT_S = 10  # each wait for bytes
    # the whole delivery, connection to answer: TIMEOUT_S bounds only each wait, so a man
    # in the middle passing the peer's answer a byte every 9 s held the master SAE's
    # enc_keys (and its server thread) for as long as he liked
    DEADLINE_S = 30.0

    def __init__(
        self, url: str, kme_id: str, ca_pem, cert_pem, key_pem, peer_cert_pem,
        peer_server_cert_pem,
    ):  # fmt: skip
        self.host, self.port = peer_address(url)
        self.kme_id = kme_id
        self.certificate_sha256 = _certificate_sha256(peer_cert_pem, kme_id, ca_pem)
        self.server_certificate_sha256 = _certificate_sha256(
            peer_server_cert_pem, self.host, ca_pem, server=True
        )
        self.context = ssl.create_default_context(cafile=str(ca_pem))
        self.context.minimum_version = ssl.TLSVersion.TLSv1_2
        self.context.load_cert_chain(str(cert_pem), str(key_pem))

    @contextlib.contextmanager
    def connected(self):
        """A connection to the peer's own server (its pinned certificate), open before
        this KME takes anything from its pool: a peer that is down, or a server holding
        another certificate, costs no pool bytes. Yields a _Delivery. DEADLINE_S runs
        from the start: the TCP connection (TIMEOUT_S an address) and the TLS handshake
        (TIMEOUT_S in all: CPython's, the timer cannot cut a socket being wrapped) are
        refused once past it, before the take; from there it cuts the request and the
        answer."""
        connection = http.client.HTTPSConnection(
            self.host, self.port, context=self.context, timeout=self.TIMEOUT_S
        )
        overdue = threading.Event()

        def cut() -> None:  # from the timer's thread: end the reads under the deadline
            overdue.set()
            sock = connection.sock  # once: close() may clear it meanwhile
            if sock is not None:
                try:
                    socket.socket.shutdown(sock, socket.SHUT_RDWR)
                except OSError:
                    pass

        delivery = _Delivery(self, connection, overdue, time.monotonic())
        deadline = threading.Timer(self.DEADLINE_S, cut)
        deadline.daemon = True
        deadline.start()
        try:
            with delivery.peer_errors():
                connection.connect()
                if overdue.is_set():  # past the deadline before there was a socket to cut
                    raise OSError("cut")
            # the key_IDs and offsets go to the peer's own server only (the CA may have
            # signed another certificate for its host): checked before a byte is sent
            presented = hashlib.sha256(connection.sock.getpeercert(binary_form=True) or b"")
            if presented.hexdigest() != self.server_certificate_sha256:
                raise PeerError(
                    f"{self.host}:{self.port} presented a server certificate (SHA-256 "
                    f"{presented.hexdigest()[:16]}...) the CA signed for {self.host}, not "
                    f"{self.kme_id}'s pinned one: nothing sent"
                )
            yield delivery
        finally:
            deadline.cancel()
            connection.close()

    def deliver(self, master: str, slave: str, key_ids: list, offset: int, size: int) -> None:
        with self.connected() as delivery:
            delivery.send(master, slave, key_ids, offset, size)


class _Delivery:
    """One delivery's connection to the peer KME, reached and pinned (PeerKME.connected)."""

    def __init__(self, peer: PeerKME, connection, overdue: threading.Event, started_s: float):
        self.peer, self.connection, self.overdue = peer, connection, overdue
        self.started_s = started_s

    @contextlib.contextmanager
    def peer_errors(self):
        """A socket or HTTP failure as PeerError: the deadline's cut, or unreachable."""
        try:
            yield
        except (OSError, http.client.HTTPException) as error:
            if self.overdue.is_set():
                raise PeerError(
                    f"{self.peer.kme_id} did not answer within {self.peer.DEADLINE_S:g} s"
                ) from None
            raise PeerError(f"{self.peer.kme_id} unreachable ({error})") from None

    def check_time_left(self) -> None:
        """PeerError unless half the deadline is left, called with the pool's lock held and
        before its take: a take that waited that long on the lock is refused with nothing
        taken, where it would have been taken and lost to a delivery cut short (the peer
        cuts a request not read within its own 30 s, Handler.request_deadline_s)."""
        waited_s = time.monotonic() - self.started_s
        if self.overdue.is_set() or waited_s > self.peer.DEADLINE_S / 2:
            raise PeerError(
                f"{waited_s:.1f} s of the delivery's {self.peer.DEADLINE_S:g} s were gone "
                f"at the pool's take (connecting, then waiting for the pool's lock): "
                f"nothing sent"
            )

    def send(self, master: str, slave: str, key_ids: list, offset: int, size: int) -> None:
        """The delivery: which key_IDs the bytes at `offset` became. PeerError unless the
        peer answers 200 in full within the deadline."""
        peer, connection = self.peer, self.connection
        body = json.dumps({"master_SAE_ID": master, "slave_SAE_ID": slave, "key_IDs": key_ids,
                           "offset": offset, "size": size}).encode()  # fmt: skip
        with self.peer_errors():
            connection.request(
                "POST", PEER_DELIVER_PATH, body, {"Content-Type": "application/json"}
            )
            response = connection.getresponse()
            answer = response.read()
            if self.overdue.is_set():
                raise OSError("cut")  # read to a cut: an answer short of its end
        if response.status != 200:
            try:
                message = json.loads(answer)["message"]
            except (ValueError, KeyError, TypeError):
                message = f"HTTP {response.status}"
            raise PeerError(f"{peer.kme_id} refused: {message}")


def peer_address(url: str) -> tuple[str, int]:
    """(host, port) of --peer-url, which must be https://HOST:PORT; BadInput otherwise."""
    try:
        parts = urlsplit(url)
        scheme, host, port = parts.scheme, parts.hostname, parts.port
    except ValueError:  # a port out of range or not a number, a bracket left open
        scheme = host = port = None
    if scheme != "https" or not host or not port:
        raise BadInput(f"--peer-url {url!r}: expected https://HOST:PORT")
    return host, port


def _certificate_sha256(pem_path, name: str, ca_pem, server: bool = False) -> str:
    """SHA-256 of the DER of the one certificate in pem_path, which must be issued by the
    CA of ca_pem and name `name`: a KME ID for its client certificate, or (server=True)
    the peer's host for its server certificate, which must be one (a server's extended
    key usage, the host among its alternative names). A stale or foreign pin is refused at
    start, not found out on every delivery; BadInput naming the file otherwise."""
    from cryptography import x509
    from cryptography.exceptions import InvalidSignature
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    holder = "the peer KME's server" if server else "the peer KME"
    try:
        der = ssl.PEM_cert_to_DER_cert(Path(pem_path).read_text())
        certificate = x509.load_der_x509_certificate(der)
        ca = x509.load_pem_x509_certificate(Path(ca_pem).read_bytes())
        certificate.verify_directly_issued_by(ca)
    except (OSError, ValueError, TypeError, UnicodeDecodeError, InvalidSignature) as error:
        reason = str(error) or "its signature is not the CA's"  # InvalidSignature: no text
        raise BadInput(
            f"{pem_path}: not a certificate of {holder} {name} issued by {ca_pem} ({reason})"
        ) from None
    names = [n.value for n in certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    # a host name as TLS compares it (urlsplit gives it in lower case); an ID exactly
    same = (lambda a, b: a.casefold() == b.casefold()) if server else (lambda a, b: a == b)
    if len(names) != 1 or not same(names[0], name):
        raise BadInput(f"{pem_path}: names {names}, not {holder} {name}")
    try:
        usages = list(certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    except x509.ExtensionNotFound:
        usages = []
    wanted = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    if wanted not in usages:
        kind = "server" if server else "client"
        raise BadInput(
            f"{pem_path}: not a {kind} certificate (extended key usage), not {holder}'s"
        )
    if server:
        try:
            alternative = certificate.extensions.get_extension_for_class(
                x509.SubjectAlternativeName
            ).value
            dns = alternative.get_values_for_type(x509.DNSName)
            addresses = alternative.get_values_for_type(x509.IPAddress)
        except x509.ExtensionNotFound:
            dns, addresses = [], []
        try:
            held = ipaddress.ip_address(name) in addresses
        except ValueError:  # a host name
            held = any(same(entry, name) for entry in dns)
        if not held:
            hosts = dns + [str(address) for address in addresses]
            raise BadInput(f"{pem_path}: its alternative names {hosts} do not hold {name}")
    return hashlib.sha256(der).hexdigest()


def tls_context(ca_pem, cert_pem, key_pem) -> ssl.SSLContext:
    """Server side: TLS 1.2+, a client certificate signed by the CA required."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(cert_pem), str(key_pem))
    context.load_verify_locations(str(ca_pem))
    context.verify_mode = ssl.CERT_REQUIRED
    return context


def make_server(kme: KeyManager, host: str, port: int, context: ssl.SSLContext):
    server = _Server((host, port), Handler)
    server.daemon_threads = True
    # the handshake runs in the request's thread: a slow or failing client holds no other
    server.socket = context.wrap_socket(
        server.socket, server_side=True, do_handshake_on_connect=False
    )
    server.kme = kme
    return server


class _Server(ThreadingHTTPServer):
    # Connections served at once (a thread each): past it a new one is closed at once. With
    # Handler.request_deadline_s each is bounded in time; this bounds them in number, so
    # that a stranger opening connections by the thousand (no certificate needed: the
    # handshake runs in the connection's thread) cannot take the server's memory.
    # Not audited: an fsync'd line per refused connection would be a cost of its own.
    max_connections = 64

    def server_activate(self) -> None:
        super().server_activate()
        self._slots = threading.BoundedSemaphore(self.max_connections)

    def process_request(self, request, client_address) -> None:
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request, client_address) -> None:
        """A client refused in the TLS handshake (no certificate, another CA): audited."""
        import sys

        error = sys.exc_info()[1]
        self.kme.audit(
            {"peer": client_address[0], "refused": f"{type(error).__name__}: {error}"[:200]}
        )

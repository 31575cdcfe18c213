"""A TCP server that speaks framed bodies (docs/framing.md): the emulated hardware's end
of the payload bus. The target's UART1 connects to it (QEMU: `-serial tcp:...`; unix:
QKDSAT_BUS). Start it before the target, which connects once at boot."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable

from host.protocol.framing import FrameReader, encode_frame

Handler = Callable[[bytes], bytes | None]


class FrameEndpoint:
    """Serves one connection at a time; `handler(body)` returns a reply body or None."""

    def __init__(self, handler: Handler, host: str = "127.0.0.1", max_body_bytes: int = 1024):
        self.handler = handler
        self.max_body_bytes = max_body_bytes
        self._server = socket.create_server((host, 0))
        # set here, not in the thread: a stop() before the thread first runs closed the
        # socket under it (OSError: bad file descriptor in the thread)
        self._server.settimeout(0.1)
        self.address: tuple[str, int] = self._server.getsockname()[:2]
        self._thread = threading.Thread(target=self._serve, daemon=True, name="bus-endpoint")
        self._stop = threading.Event()
        self.reader = FrameReader(max_body_bytes)
        self.connections = 0

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._server.close()
        self._thread.join(timeout=2)

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._server.accept()
            except (TimeoutError, OSError):
                continue
            self.connections += 1
            self.reader.new_stream()
            with conn:
                # Request/reply traffic: Nagle + delayed ACK would add ~40 ms per reply.
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                conn.settimeout(0.1)
                while not self._stop.is_set():
                    try:
                        chunk = conn.recv(65536)
                    except TimeoutError:
                        continue
                    except OSError:
                        break
                    if not chunk:
                        break
                    for body in self.reader.feed(chunk):
                        reply = self.handler(body)
                        if reply is not None:
                            conn.sendall(encode_frame(reply))


def echo(body: bytes) -> bytes:
    return body

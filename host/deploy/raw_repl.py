"""MicroPython's raw REPL over a serial port: enter it, execute code, get stdout and the
traceback apart. The protocol is the one mpremote and pyboard.py speak:

    Ctrl-C Ctrl-C   interrupt whatever runs
    Ctrl-A          enter the raw REPL   <- "raw REPL; CTRL-B to exit\\r\\n>"
    code Ctrl-D     execute              <- "OK" stdout \\x04 stderr \\x04 ">"
    Ctrl-B          back to the friendly REPL
"""

from __future__ import annotations

import time

import serial

HARD_DEADLINE_FACTOR = 3  # see RawRepl._read_until


class RawReplError(RuntimeError):
    pass


class ExecutionFailed(RawReplError):
    """The code raised; `traceback` is MicroPython's own text."""

    def __init__(self, stdout: str, traceback: str):
        super().__init__(traceback.strip().splitlines()[-1] if traceback.strip() else "error")
        self.stdout = stdout
        self.traceback = traceback


class RawRepl:
    def __init__(self, port: str, baudrate: int = 115200, timeout_s: float = 10.0):
        self.serial = serial.Serial(port, baudrate=baudrate, timeout=0.05)
        self.timeout_s = timeout_s
        self._pending = bytearray()

    def close(self) -> None:
        self.serial.close()

    def __enter__(self):
        self.enter()
        return self

    def __exit__(self, *exc):
        try:
            self.serial.write(b"\x02")  # back to the friendly REPL
        finally:
            self.close()

    def _read_until(self, marker: bytes, timeout_s: float) -> bytes:
        """Bytes up to and including marker; what came after stays buffered.

        Output that keeps coming extends the wait by a second at a time (a long exec that
        prints), but never beyond HARD_DEADLINE_FACTOR * timeout_s: a noisy line (a wrong
        baud rate) delivers bytes all the time and must not keep the wait open for good."""
        started = time.monotonic()
        deadline = started + timeout_s
        hard_deadline = started + HARD_DEADLINE_FACTOR * timeout_s
        while True:
            found = self._pending.find(marker)
            if found >= 0:
                end = found + len(marker)
                data = bytes(self._pending[:end])
                del self._pending[:end]
                return data
            try:
                chunk = self.serial.read(max(1, self.serial.in_waiting))
            except (serial.SerialException, OSError) as error:
                raise RawReplError(f"{self.serial.port}: link lost ({error})") from None
            now = time.monotonic()
            if chunk:
                self._pending += chunk
                deadline = min(max(deadline, now + 1.0), hard_deadline)
            if now > deadline:
                raise RawReplError(
                    f"timed out after {timeout_s:.1f} s waiting for {marker!r}; "
                    f"received {bytes(self._pending[-200:])!r}"
                )

    def enter(self, attempt_s: float = 1.5) -> None:
        """Interrupt the running program and enter the raw REPL.

        Retried: a board may still be booting, and QEMU's pty drops output until it has
        noticed (on a timer) that the host opened the port.
        """
        deadline = time.monotonic() + self.timeout_s
        while True:
            self.serial.write(b"\r\x03\x03")
            time.sleep(0.1)
            self.serial.reset_input_buffer()
            self._pending.clear()
            self.serial.write(b"\r\x01")
            try:
                self._read_until(b"raw REPL; CTRL-B to exit\r\n>", attempt_s)
                return
            except RawReplError:
                if time.monotonic() > deadline:
                    raise

    def exec(self, code: str | bytes, timeout_s: float | None = None) -> str:
        """Run code; return its stdout, or raise ExecutionFailed with the traceback."""
        if isinstance(code, str):
            code = code.encode()
        timeout_s = timeout_s or self.timeout_s
        # Write in chunks: the raw REPL has no flow control on some ports.
        for start in range(0, len(code), 256):
            self.serial.write(code[start : start + 256])
        self.serial.write(b"\x04")
        # "OK" comes once the board has read the whole program, which the write above only
        # queued (a pty takes it at once): QEMU hands its UART one byte per turn of its
        # main loop, at the host's pace. A 12.9 kB program took 0.4-1.2 s on this machine
        # at load ~8 and more than 5 s (the fixed wait this was) under heavier load: 17
        # firmware tests failed in one run on netduino2. The exec's own budget bounds it.
        self._read_until(b"OK", timeout_s)
        out = self._read_until(b"\x04", timeout_s)[:-1]
        err = self._read_until(b"\x04>", timeout_s)[:-2]
        stdout = out.decode(errors="replace")
        if err:
            raise ExecutionFailed(stdout, err.decode(errors="replace"))
        return stdout

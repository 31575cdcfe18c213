# In-flight maintenance (docs/ground-link.md "Maintenance in flight"): a code-update
# session, opened by the armed maintenance telecommand, that can only replace the
# application's own code files. There is no command to read, list, execute or evaluate
# anything: a file is put in chunks into one staging file, the commit renames it to
# `<name>.new` only when its length and SHA-256 are those the ground sent, and the
# activation puts a whole set of committed files in place through a journal that main.py
# finishes at boot if a reset cuts it (roll-forward). The general interpreter (the REPL)
# exists only behind the maintenance strap at boot.
#
# Imported when a session opens (GroundLink._open_code_session), not at boot: the module
# costs the application's heap nothing until then.
import hashlib
import os

from micropython import const

from payload.ccsds import (
    REJECT_ARGUMENT,
    REJECT_RANGE,
    REJECT_STATE,
    REJECT_STORAGE,
    get_u32,
)
from payload.storage import CODE_STAGING_FILE, CODE_WAITING_SUFFIX, file_bytes
from payload.telecommands import Rejected

# One staging file at the storage root, outside the code directory (payload/): a cut-off
# upload leaves it beside the old code, which still imports; never under link/ or
# products/, which the session cannot name. Its name and the waiting files' suffix are
# storage's, which counts both against the products' quota from boot on.
STAGING_FILE = CODE_STAGING_FILE
# The activation's journal: main.py (its reader) finishes it at boot, before it imports
# anything of the set; written whole through a temporary file renamed into place.
JOURNAL_FILE = "deploy.journal"
_JOURNAL_TEMPORARY = "deploy.journal.part"
NEW_SUFFIX = CODE_WAITING_SUFFIX  # a committed file waiting for the activation
SHA256_BYTES = const(32)
_HASH_BLOCK_BYTES = const(256)
_PACKAGE = b"payload/"
# Files `qkdsat flash` deploys at the storage root beside the package
_TOP_LEVEL_NAMES = (b"main.py", b"board.py", b"board.mpy")


def allowed_name(name):
    """True only for the application's code files: main.py, board.py / board.mpy, and
    payload/<module>.py / .mpy with a module name of [a-z0-9_] (so no '/', no '..', no
    absolute path, never link/ or products/)."""
    if name in _TOP_LEVEL_NAMES:
        return True
    if not name.startswith(_PACKAGE):
        return False
    stem = name[len(_PACKAGE) :]
    if stem.endswith(b".mpy"):
        stem = stem[:-4]
    elif stem.endswith(b".py"):
        stem = stem[:-3]
    else:
        return False
    if not stem:
        return False
    for c in stem:
        if not (97 <= c <= 122 or 48 <= c <= 57 or c == 95):  # a-z 0-9 _
            return False
    return True


def unload():
    """Forget this module, when its session has closed (GroundLink): the module and the
    session object otherwise kept ~1.6 kB of the STM32 board's heap (measured) for the
    rest of the boot, from the tracking pass's margin. The next session imports it again."""
    import sys

    import payload

    sys.modules.pop(__name__, None)
    payload.__dict__.pop("codeupdate", None)


def _name_arg(params, at):
    if len(params) < at + 1:
        raise Rejected(REJECT_ARGUMENT, "missing file name")
    length = params[at]
    name = bytes(params[at + 1 : at + 1 + length])
    if len(name) != length or not allowed_name(name):
        raise Rejected(REJECT_ARGUMENT, "not a code file name: " + repr(name)[:40])
    return name, at + 1 + length


class CodeSession:
    """Open while `expires_us` is ahead of the clock: each accepted put or commit moves
    it window_us on from now."""

    def __init__(self, root, window_us, now_us, store=None):
        """store: the storage.Storage of the products: the staging file and the code
        files share its flash, so the staging file and the committed files waiting for
        the activation draw on its quota (its counted_files, which hold them from boot on),
        and an activation takes what the code grew by out of it."""
        self.root = root
        self.window_us = window_us
        self.expires_us = now_us + window_us
        self.staged_name = None  # the file the staging file is for
        self.staged_bytes = 0
        self.committed = 0
        self.activated = 0
        self.store = store
        if store is not None and self._staging() not in store.counted_files:
            store.counted_files.append(self._staging())
        self._drop()  # what a session cut off before its commit left (its space)

    def check_open(self, now_us):
        if now_us > self.expires_us:
            raise Rejected(REJECT_STATE, "code session closed (arm, then maintenance)")
        try:
            os.stat(self.root + "/" + JOURNAL_FILE)
        except OSError:
            return
        # An activation that failed half-way stands in its journal, which the next boot
        # finishes: a file committed meanwhile under one of its names would be renamed in
        # by that boot, never activated by the ground
        raise Rejected(REJECT_STATE, "an activation is unfinished: reboot to finish it")

    def touch(self, now_us):
        self.expires_us = now_us + self.window_us

    def _staging(self):
        return self.root + "/" + STAGING_FILE

    def put(self, params):
        """name, offset u32, bytes: appended to the staging file. Offset 0 starts the
        file again; an offset equal to what is staged continues it; a chunk that ends
        exactly at it is a repeat (its report was lost) and changes nothing: the commit's
        SHA-256 decides."""
        name, at = _name_arg(params, 0)
        if len(params) < at + 4:
            raise Rejected(REJECT_ARGUMENT, "put takes name, offset u32, bytes")
        offset = get_u32(params, at)
        data = params[at + 4 :]
        if offset == 0:
            mode = "wb"
        elif name != self.staged_name or offset > self.staged_bytes:
            raise Rejected(
                REJECT_RANGE, "offset %d: %d bytes staged" % (offset, self._staged_for(name))
            )
        elif offset + len(data) == self.staged_bytes:
            return  # a repeat
        elif offset != self.staged_bytes:
            raise Rejected(
                REJECT_RANGE, "offset %d: %d bytes staged" % (offset, self.staged_bytes)
            )
        else:
            mode = "ab"
        store = self.store
        if store is not None:
            # (uncounted, a code upload during a pass filled the flash under the products'
            # quota: their commits failed with ENOSPC instead of the store reporting full)
            # the staged bytes counted; a new file (offset 0): the old one's room back
            room = store.room_bytes(self._staging() if mode == "wb" else None)
            if len(data) > room:
                raise Rejected(
                    REJECT_STORAGE, "storage quota: %d bytes left" % (room if room > 0 else 0)
                )
        try:
            with open(self._staging(), mode) as f:
                f.write(data)
        except OSError as error:
            self.staged_name = None
            self.staged_bytes = 0
            raise Rejected(REJECT_STORAGE, "staging: %r" % (error,)) from None
        self.staged_name = name
        self.staged_bytes = offset + len(data)

    def _staged_for(self, name):
        return self.staged_bytes if name == self.staged_name else 0

    def commit(self, params):
        """name, total length u32, SHA-256: the staged file becomes `<name>.new` in one
        rename, or nothing changes (the staging file is dropped on a mismatch). Nothing
        that boots changes until the activation."""
        name, at = _name_arg(params, 0)
        if len(params) != at + 4 + SHA256_BYTES:
            raise Rejected(REJECT_ARGUMENT, "commit takes name, length u32, SHA-256")
        total = get_u32(params, at)
        expected = bytes(params[at + 4 :])
        staged = self._staged_for(name)
        if staged != total:
            raise Rejected(REJECT_RANGE, "%d of %d bytes staged, old file kept" % (staged, total))
        try:
            digest = self._digest()
        except OSError as error:
            raise Rejected(REJECT_STORAGE, "staging: %r" % (error,)) from None
        if digest != expected:
            self._drop()
            raise Rejected(REJECT_ARGUMENT, "SHA-256 mismatch, old file kept")
        waiting = self._path(name) + NEW_SUFFIX
        try:
            if name.startswith(_PACKAGE):
                try:
                    os.mkdir(self.root + "/payload")
                except OSError:
                    pass  # exists
            os.rename(self._staging(), waiting)  # atomic on littlefs and POSIX
        except OSError as error:
            raise Rejected(REJECT_STORAGE, "rename: %r, old file kept" % (error,)) from None
        self.staged_name = None
        self.staged_bytes = 0
        self.committed += 1
        store = self.store
        if store is not None:
            # the staged bytes left the staging file and wait as <name>.new, counted too
            # (a .new committed before is replaced, its room back)
            if waiting not in store.counted_files:
                store.counted_files.append(waiting)
            store.room_bytes()  # recount

    def activate(self, params):
        """names (each: length u8, name), every one committed (its `<name>.new` there):
        the journal naming them is written whole, then each `<name>.new` is renamed over
        `<name>`, then the journal is removed. A reset after the journal is written and
        before its end is finished by main.py at the next boot, before it imports any of
        them: the set boots whole, old before the journal, new after it."""
        names = []
        at = 0
        while at < len(params):
            name, at = _name_arg(params, at)
            if name not in names:
                names.append(name)
        if not names:
            raise Rejected(REJECT_ARGUMENT, "activate takes the committed files' names")
        for name in names:
            try:
                os.stat(self._path(name) + NEW_SUFFIX)
            except OSError:
                raise Rejected(
                    REJECT_STATE, "%s not committed, nothing activated" % name.decode()[:40]
                ) from None
        journal = self.root + "/" + JOURNAL_FILE
        temporary = self.root + "/" + _JOURNAL_TEMPORARY
        body = b"\n".join(names)
        try:
            with open(temporary, "wb") as f:
                f.write(hashlib.sha256(body).digest())
                f.write(body)
            os.rename(temporary, journal)
        except OSError as error:
            try:
                os.remove(temporary)
            except OSError:
                pass
            raise Rejected(REJECT_STORAGE, "journal: %r, nothing activated" % (error,)) from None
        store = self.store
        try:
            for name in names:
                target = self._path(name)
                freed = file_bytes(target)
                taken = file_bytes(target + NEW_SUFFIX)
                os.rename(target + NEW_SUFFIX, target)
                if store is not None:
                    # the new file is code now, no longer a counted waiting file: the
                    # quota loses what the code grew by (the old file's flash is the
                    # products' again)
                    store.quota_bytes += freed - taken
            if store is not None:
                store.room_bytes()  # recount: the waiting files are gone
            os.remove(journal)
        except OSError as error:
            # the journal stands: the next boot finishes the set before importing it
            raise Rejected(
                REJECT_STORAGE, "activation: %r, the next boot finishes it" % (error,)
            ) from None
        self.activated += len(names)

    def _path(self, name):
        return self.root + "/" + name.decode()

    def _digest(self):
        sha = hashlib.sha256()
        block = bytearray(_HASH_BLOCK_BYTES)
        with open(self._staging(), "rb") as f:
            while True:
                count = f.readinto(block)
                if not count:
                    break
                sha.update(memoryview(block)[:count])
        return sha.digest()

    def _drop(self):
        """Remove the staging file (its room back to the store's quota)."""
        self.staged_name = None
        self.staged_bytes = 0
        try:
            os.remove(self._staging())
        except OSError:
            pass

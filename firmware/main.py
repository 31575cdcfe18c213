# Entry point on every target: the QEMU image runs this frozen module at boot, a board
# runs it from flash, the unix target runs it as a script.
import micropython

# First: a 0x03 on a board's REPL UART (the ground link) raises KeyboardInterrupt, which
# during the boot, before app.run locks the console, ended this module in the REPL.
micropython.kbd_intr(-1)

# The code-update session's journal (payload/codeupdate.py writes it, this reads it): a
# SHA-256 of the body, then the body, the code file names of one activated set, one a
# line. Written whole (a temporary file renamed) before the first `<name>.new` is renamed
# over `<name>`, so a power cut or watchdog reset part-way through an activation leaves a
# journal that names the whole set, and the boot finishes it here, before anything of the
# set (board, payload) is imported: old and new modules never boot mixed.
DEPLOY_JOURNAL = "deploy.journal"


def _finish_deploy():
    import os
    import sys

    root = sys.path[0]  # where the code is imported from: the script's directory, or ""
    prefix = root + "/" if root else ""
    journal = prefix + DEPLOY_JOURNAL
    try:
        with open(journal, "rb") as f:
            content = f.read()
    except OSError:
        return  # no journal (or no filesystem yet: a frozen image mounts it later)
    import hashlib

    body = content[32:]
    if len(content) > 32 and hashlib.sha256(body).digest() == content[:32]:
        for name in body.split(b"\n"):
            target = prefix + name.decode()
            try:
                os.rename(target + ".new", target)
            except OSError:
                pass  # its .new is gone: renamed before the cut
    # else torn or damaged: ignored. It is written whole before any rename, so a damaged
    # one means no rename began and the old set is whole.
    try:
        os.remove(journal)
    except OSError:
        pass


try:
    _finish_deploy()
except BaseException:  # noqa: BLE001 - never a REPL from the boot; the old set may run
    pass
del _finish_deploy  # its heap back: it runs once a boot

try:
    import board
except BaseException as error:  # noqa: BLE001 - a board that cannot import resets, no REPL
    # (an exception here ended this module with the REPL on the ground link); no board, so
    # machine.reset. The unix port has none: the exception ends the process, as it did.
    try:
        import machine

        machine.reset()
    except BaseException:  # noqa: BLE001 - no machine.reset: raise the board's error
        pass
    raise error

if board.boot_mode() == "app":
    try:
        from payload import app
    except BaseException:  # noqa: BLE001 - an image that cannot import resets, never a REPL
        board.reset()
        raise
    app.run(board)
else:
    # Maintenance strap set: fall through to the REPL (mpremote, firmware tests).
    micropython.kbd_intr(3)
    print("qkdsat firmware: maintenance mode, REPL on the ground link")

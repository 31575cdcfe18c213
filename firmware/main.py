# Entry point on every target: the QEMU image runs this frozen module at boot, a board
# runs it from flash, the unix target runs it as a script.
import micropython

# First: a 0x03 on a board's REPL UART (the ground link) raises KeyboardInterrupt, which
# during the boot, before app.run locks the console, ended this module in the REPL.
micropython.kbd_intr(-1)

import board  # noqa: E402

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

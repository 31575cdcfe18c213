# Entry point on every target: the QEMU image runs this frozen module at boot, a board
# runs it from flash, the unix target runs it as a script.
import board

if board.boot_mode() == "app":
    from payload import app

    app.run(board)
else:
    # Maintenance strap set: fall through to the REPL (mpremote, firmware tests).
    print("qkdsat firmware: maintenance mode, REPL on the ground link")

"""Getting code onto a MicroPython controller: raw REPL (tests) and mpremote (flash)."""

# Frozen into the STM32 image (make firmware-netduino2: MicroPython's ports/qemu board
# NETDUINO2, an STM32F205 Cortex-M3 under QEMU's netduino2 machine). Paths relative to
# this file. Frozen bytecode stays in flash: only the objects it makes use the 96 KiB heap.
freeze("../..", "main.py")
package("payload", base_path="../..")
freeze(".", "board.py")

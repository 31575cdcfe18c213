# Frozen into the QEMU MPS2_AN385 image (make firmware). $(MPY_DIR) is MicroPython's tree;
# paths below are relative to this file.
freeze("../..", "main.py")
package("payload", base_path="../..")
freeze(".", "board.py")

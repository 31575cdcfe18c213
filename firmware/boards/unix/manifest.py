# Frozen into the unix-port binary. The firmware itself runs on this target as .mpy files
# compiled by mpy-cross (emulator/targets.py::unix_firmware_tree, MICROPYPATH that tree), so
# only the standard library is frozen.
include("$(MPY_DIR)/extmod/asyncio")

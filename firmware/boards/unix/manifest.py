# Frozen into the unix-port binary. The firmware itself runs from source on this target
# (MICROPYPATH=firmware:firmware/boards/unix), so only the standard library is frozen.
include("$(MPY_DIR)/extmod/asyncio")

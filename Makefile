# qkdsat: payload firmware (MicroPython) and ground tools (CPython) for a QKD microsatellite.
#   make setup     install everything (apt, venv, MicroPython from Debian source) and build
#   make test      every test (host, firmware on unix and QEMU, end to end)
#   make demo      the main job on an emulated pass
#   make bench     benchmarks, printed as ratios against baselines measured in the same run
#   make firmware  rebuild the QEMU images (MPS2-AN385 and the STM32 netduino2) with the
#                  current firmware/ frozen in

include tools/micropython.env

ROOT := $(abspath .)
VENV := $(ROOT)/.venv
PY := $(VENV)/bin/python
MPY_SRC := $(ROOT)/build/micropython-$(MPY_UPSTREAM_VERSION)
BIN := $(ROOT)/build/bin
QEMU_BUILD ?= $(ROOT)/build/qemu
FIRMWARE_MANIFEST ?= $(ROOT)/firmware/boards/qemu/manifest.py
NETDUINO2_BUILD ?= $(ROOT)/build/netduino2
# The STM32F205 has 128 KiB of SRAM: the port's default heap (140 KiB) does not fit.
NETDUINO2_HEAP_BYTES := 98304
# C modules built into both QEMU images (not the unix port): irqtimer, the hardware timer
# interrupt the tracking loop's period runs from (docs/scheduling.md)
USER_C_MODULES_DIR := $(ROOT)/firmware/cmodules
# A C module's new names renumber the qstrs, and MicroPython regenerates the frozen
# modules' C only when a frozen file changed: drop it when a C module is newer.
stale_frozen = find $(USER_C_MODULES_DIR) -newer $(1)/frozen_content.c 2>/dev/null | grep -q . \
	&& rm -f $(1)/frozen_content.c || true

# MicroPython names its version after `git describe`; keep git from finding this project's
# repository above the unpacked source, so builds say v1.25.0 rather than our commit.
export GIT_CEILING_DIRECTORIES := $(ROOT)/build

# MicroPython's build needs a micropython-lib folder; Debian's source strips it.
MPY_LIB_DIR := $(MPY_SRC)/lib/micropython-lib

.PHONY: setup test test-fast demo mission bench firmware firmware-mps2 firmware-netduino2 \
	lint format flash clean \
	clean-micropython micropython-builds lock

setup:
	@bash tools/setup.sh

# Both cores: the tests run in two pytest-xdist workers, a test file's tests in one worker
# (its module fixtures are made once). The tests marked realtime, whose outcome depends on
# a pass clock paced by the wall clock (the streaming pipeline or the firmware keeping up),
# run after, with no other test beside them. Both runs always run (unless interrupted:
# pytest's exit 2) and either failing fails the target. A crashed worker fails the first
# run at once (--max-worker-restart 0): with --dist loadfile, xdist 3.8.0 can otherwise
# hand the crashed test from worker to worker for ever. --strict-markers: a misspelt
# realtime mark is an error, not a test run in the wrong phase. The slowest tests of each
# run are listed so that the suite's time (25 minutes at most) is watched.
test: firmware
	status=0; \
	$(PY) -m pytest -q --strict-markers -n 2 --dist loadfile --max-worker-restart 0 \
		-m "not realtime" --durations=30 || status=$$?; \
	[ $$status -eq 2 ] && exit 2; \
	$(PY) -m pytest -q --strict-markers -m realtime --durations=10 || status=1; \
	[ $$status -eq 0 ]

test-fast:
	$(PY) -m pytest -q -m "not slow"

# The main job (docs/mission.md), for both profiles: the whole pass with the pattern made
# in the optical head from its QRNG, Alice on the payload processor and Bob at the ground
# station distilling over the emulated optical link. The controller-driven segment stays
# an option: qkdsat mission --generation controller (bus-bound: too few events, exit 3).
# The distillation streams during the pass in real time (a pass takes its own duration).
# When the pipeline falls behind the detections (a loaded machine: docs/mission.md), the
# satellite sets before the keys (jinan-1's link ends ~2 s after its QKD window,
# micius-2017's ~77 s after): exit 3 with the reason in mission.json, accepted here.
demo mission: firmware
	$(VENV)/bin/qkdsat mission --target unix --profile micius-2017 --out build/mission \
		|| test $$? -eq 3  # no key: the pipeline fell behind the pass (see above)
	$(VENV)/bin/qkdsat mission --target unix --profile jinan-1 --out build/mission-jinan \
		|| test $$? -eq 3

bench: firmware
	$(PY) -m pytest -q benchmarks -p no:randomly -s

lint:
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format:
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

flash:
	@test -n "$(PORT)" || { echo "usage: make flash PORT=/dev/ttyACM0"; exit 2; }
	$(VENV)/bin/qkdsat flash --port $(PORT)

lock:
	rm -rf build/lockvenv && python3 -m venv build/lockvenv
	build/lockvenv/bin/pip install -q -e '.[dev]'
	{ echo "# Every Python package the project installs, pinned (pip freeze of a fresh venv)."; \
	  echo "# Regenerate with: make lock"; \
	  build/lockvenv/bin/pip freeze --exclude-editable; } > requirements.lock

# ------------------------------------------------------------------ MicroPython builds

micropython-builds: $(BIN)/mpy-cross $(BIN)/micropython firmware

$(BIN)/mpy-cross:
	@test -d $(MPY_SRC) || { echo "MicroPython source missing: run 'make setup'"; exit 1; }
	$(MAKE) -s -C $(MPY_SRC)/mpy-cross -j2
	mkdir -p $(BIN) && cp $(MPY_SRC)/mpy-cross/build/mpy-cross $@

# The unix port runs the firmware from .mpy files compiled when a target starts and the
# sources changed (emulator/targets.py::unix_firmware_tree, build/unix-mpy), not frozen in,
# so it is built once; asyncio is frozen in as on the boards that have it.
$(BIN)/micropython: $(BIN)/mpy-cross firmware/boards/unix/manifest.py
	$(MAKE) -s -C $(MPY_SRC)/ports/unix -j2 BUILD=$(ROOT)/build/unix \
		MPY_LIB_DIR=$(MPY_LIB_DIR) MICROPY_PY_BTREE=0 MICROPY_PY_SSL=0 MICROPY_PY_FFI=0 \
		FROZEN_MANIFEST=$(ROOT)/firmware/boards/unix/manifest.py
	mkdir -p $(BIN) && cp $(ROOT)/build/unix/micropython $@

# Always re-run: MicroPython's own make only rebuilds what changed in firmware/.
firmware: firmware-mps2 firmware-netduino2

firmware-mps2: $(BIN)/mpy-cross
	@test -d $(MPY_SRC) || { echo "MicroPython source missing: run 'make setup'"; exit 1; }
	@$(call stale_frozen,$(QEMU_BUILD))
	$(MAKE) -s -C $(MPY_SRC)/ports/qemu -j2 BOARD=MPS2_AN385 BUILD=$(QEMU_BUILD) \
		MPY_LIB_DIR=$(MPY_LIB_DIR) MICROPY_VFS_LFS2=1 \
		MICROPY_HEAP_SIZE=$(CONTROLLER_HEAP_BYTES) \
		LDSCRIPT=$(ROOT)/firmware/boards/qemu/mps2_an385.ld \
		"CFLAGS_EXTRA=-D'mp_hal_time_ns()=(0ULL)'" \
		USER_C_MODULES=$(USER_C_MODULES_DIR) \
		FROZEN_MANIFEST=$(FIRMWARE_MANIFEST)

# The STM32 board (docs/targets.md): ports/qemu's NETDUINO2 (STM32F205, Cortex-M3) with
# firmware/boards/netduino2 frozen in.
firmware-netduino2: $(BIN)/mpy-cross
	@test -d $(MPY_SRC) || { echo "MicroPython source missing: run 'make setup'"; exit 1; }
	@$(call stale_frozen,$(NETDUINO2_BUILD))
	$(MAKE) -s -C $(MPY_SRC)/ports/qemu -j2 BOARD=NETDUINO2 BUILD=$(NETDUINO2_BUILD) \
		MPY_LIB_DIR=$(MPY_LIB_DIR) MICROPY_VFS_LFS2=1 \
		MICROPY_HEAP_SIZE=$(NETDUINO2_HEAP_BYTES) \
		LDSCRIPT=$(ROOT)/firmware/boards/netduino2/stm32f205.ld \
		"CFLAGS_EXTRA=-D'mp_hal_time_ns()=(0ULL)'" \
		USER_C_MODULES=$(USER_C_MODULES_DIR) \
		FROZEN_MANIFEST=$(ROOT)/firmware/boards/netduino2/manifest.py

clean:
	rm -rf build/qemu build/netduino2 build/unix-mpy build/mission build/mission-jinan build/mission-head \
		.pytest_cache

clean-micropython:
	rm -rf build/micropython-* build/unix build/qemu build/netduino2 build/bin

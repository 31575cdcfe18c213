# irqtimer: a hardware timer whose interrupt calls a Python callable as a hard IRQ
# (docs/scheduling.md "The loop on a timer interrupt"). Built into both QEMU images by the
# Makefile (USER_C_MODULES=firmware/cmodules); not into the unix port, which has no timer
# interrupt and keeps the scheduler's cooperative pacing.
IRQTIMER_MOD_DIR := $(USERMOD_DIR)
SRC_USERMOD_C += $(IRQTIMER_MOD_DIR)/irqtimer.c

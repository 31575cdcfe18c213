# semihosting_guard: the HardFault a semihosting call (BKPT 0xAB) takes on a part with no
# debugger is answered as a refused call instead (semihosting_guard.c), so one image boots
# in QEMU with -semihosting and on the board without a probe (docs/targets.md "Boot
# strap"). Built into both QEMU images, like irqtimer. No Python names: a new name
# renumbers the runtime's names (irqtimer.c's header), and nothing here is called from
# Python.
SEMIHOSTING_GUARD_MOD_DIR := $(USERMOD_DIR)
SRC_USERMOD_C += $(SEMIHOSTING_GUARD_MOD_DIR)/semihosting_guard.c
# The port's vector table (ports/qemu/mcu/arm/startup.c) names HardFault_Handler, which
# its errorhandler.c defines: the linker points that reference at this module's
# __wrap_HardFault_Handler, from reset on, without a patch to the port. The port's own
# handler (the register dump) stays reachable as __real_HardFault_Handler.
LDFLAGS_USERMOD += -Wl,--wrap=HardFault_Handler

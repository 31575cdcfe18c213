// semihosting_guard: a semihosting call (BKPT 0xAB) on a Cortex-M with no debugger
// attached answered as a refused call, so that the image boots without a probe.
//
// The image makes semihosting calls from reset on: the port's startup opens the host's
// console (SYS_OPEN, ports/qemu/mcu/arm/startup.c _start -> mp_semihosting_init), the
// netduino2 board reads the emulator's command line (SYS_GET_CMDLINE, boards/netduino2/
// board.py _launcher_words), and machine.reset() asks the host to exit (SYS_EXIT). Under
// QEMU with -semihosting the emulator answers them. On the part with no debugger (halting
// debug off, DEMCR.MON_EN clear) a BKPT escalates to HardFault, as it does on QEMU 7.2's
// netduino2 without -semihosting (measured, docs/targets.md): the port's handler printed
// its register dump and looped, before main ran.
//
// Here the HardFault handler looks at the instruction the fault stacked: a BKPT 0xAB
// (0xBEAB) is skipped and its call returns -1 in r0 (what a semihosting host answers for
// a call that failed), so the board takes its flight values. SYS_EXIT with no host to
// exit to is a system reset (SCB AIRCR SYSRESETREQ): machine.reset() resets the part, as
// a board port's does. Any other HardFault goes on to the port's handler unchanged.
//
// Only a fault with no configurable fault's status (CFSR clear) may be a call: a BKPT
// escalated is a debug event, which sets none of CFSR's bits, whereas a UsageFault,
// MemManage or BusFault escalated to HardFault does, and its stacked PC may well be a BKPT
// 0xAB (an INVSTATE branch to one, an imprecise bus fault from the store before one): that
// fault goes to the port's dump with the registers it faulted with. And the instruction is
// read only where the image has code (flash from the vector table up to _sidata, RAM from
// _sdata to _ebss, where the heap keeps viper and asm_thumb code), a whole halfword,
// with no sum that wraps: a fault on a fetch from elsewhere (0xFFFFFFFE, a call through
// an erased flash word) must not fault again in this handler (a lockup on the part, and
// QEMU's mps2-an385 aborts with "Lockup: can't escalate 3 to HardFault").
#include <stdint.h>

#define SCB_AIRCR (*(volatile uint32_t *)0xE000ED0C)
#define SCB_CFSR (*(volatile uint32_t *)0xE000ED28)
#define SCB_HFSR (*(volatile uint32_t *)0xE000ED2C)
#define SCB_DFSR (*(volatile uint32_t *)0xE000ED30)
#define AIRCR_VECTKEY (0x05FAu << 16)
#define AIRCR_SYSRESETREQ (1u << 2)
#define HFSR_DEBUGEVT (1u << 31)
#define HFSR_FORCED (1u << 30)
#define DFSR_BKPT (1u << 1)

#define SEMIHOSTING_BKPT (0xBEABu)  // BKPT 0xAB, Thumb
#define SYS_EXIT (0x18u)
#define SYS_EXIT_EXTENDED (0x20u)
#define REFUSED (0xFFFFFFFFu)  // -1

// the exception frame the core stacked: r0-r3, r12, lr, pc, xPSR
#define FRAME_R0 (0)
#define FRAME_PC (6)

extern const uint32_t isr_vector[];  // the port's vector table: the image's first word
extern uint32_t _sidata, _sdata, _ebss;

// Semihosting calls refused since reset (a debugger reads it; 0 under QEMU -semihosting)
volatile uint32_t semihosting_guard_refused;

// Whether the halfword at address lies wholly in [start, end). Written with no sum: pc + 2
// <= end held for pc = 0xFFFFFFFE, whose pc + 2 wraps to 0.
static uint32_t halfword_inside(uint32_t address, uint32_t start, uint32_t end) {
    return address >= start && address < end && end - address >= 2;
}

// Whether a HardFault with this stacked PC and configurable fault status may be a
// semihosting call, and the PC may be read (the instruction is the rest of the test).
// Portable C, so the host can test it (tests/test_semihosting_guard.py).
uint32_t semihosting_guard_may_be_call(uint32_t pc, uint32_t cfsr) {
    if (cfsr != 0 || (pc & 1)) {
        return 0;
    }
    return halfword_inside(pc, (uint32_t)(uintptr_t)isr_vector, (uint32_t)(uintptr_t)&_sidata)
           || halfword_inside(pc, (uint32_t)(uintptr_t)&_sdata, (uint32_t)(uintptr_t)&_ebss);
}

#if defined(__ARM_ARCH_ISA_THUMB)

void __real_HardFault_Handler(void);

// Whether the fault stopped at a semihosting call: the instruction at the stacked PC,
// read only when it may be one.
__attribute__((used)) uint32_t semihosting_guard_is_call(const uint32_t *frame) {
    uint32_t pc = frame[FRAME_PC];
    if (!semihosting_guard_may_be_call(pc, SCB_CFSR)) {
        return 0;
    }
    return *(const volatile uint16_t *)pc == SEMIHOSTING_BKPT;
}

// Answer the call as refused and return past it (called with lr still the EXC_RETURN, so
// its return is the exception's return).
__attribute__((used)) void semihosting_guard_refuse(uint32_t *frame) {
    uint32_t operation = frame[FRAME_R0];
    if (operation == SYS_EXIT || operation == SYS_EXIT_EXTENDED) {
        __asm volatile ("dsb");
        SCB_AIRCR = AIRCR_VECTKEY | AIRCR_SYSRESETREQ;
        __asm volatile ("dsb");
        for (;;) {
        }
    }
    frame[FRAME_R0] = REFUSED;
    frame[FRAME_PC] += 2;
    // write-one-to-clear: a later fault's status is its own
    SCB_HFSR = HFSR_DEBUGEVT | HFSR_FORCED;
    SCB_DFSR = DFSR_BKPT;
    semihosting_guard_refused++;
}

// The vector table's HardFault entry (the link's --wrap, micropython.mk). The port's
// handler reads the frame at sp, so sp is unchanged when it is reached.
__attribute__((naked)) void __wrap_HardFault_Handler(void) {
    __asm volatile (
        "tst lr, #4\n"
        "ite eq\n"
        "mrseq r0, msp\n"
        "mrsne r0, psp\n"
        "push {r0, lr}\n"
        "bl semihosting_guard_is_call\n"
        "mov r1, r0\n"
        "pop {r0, lr}\n"
        "cbz r1, 1f\n"
        "b semihosting_guard_refuse\n"
        "1:\n"
        "b __real_HardFault_Handler\n"
        );
}

#endif

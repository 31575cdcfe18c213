// irqtimer: one hardware timer whose update interrupt calls a Python callable as a hard
// IRQ, for MicroPython 1.25's ports/qemu (which has no machine.Timer): the tracking loop's
// period preempts whatever the cooperative scheduler is running, a littlefs commit (one C
// call) included (docs/scheduling.md "The loop on a timer interrupt").
//
//   irqtimer.start(period_us, callback, arg)  callback(arg) every period_us, in the IRQ
//   irqtimer.stop()
//   irqtimer.counters() -> (fired, errors, overruns, worst_latency_us, worst_busy_us)
//   irqtimer.reset_worst()
//   irqtimer.last_error() -> the exception that disabled the callback, or None
//   irqtimer.TIMER    the timer and its IRQ number, for telemetry and docs
//   irqtimer.open(buf, words) / close()  the tracking link's receive interrupt
//   irqtimer.read(until_us)  poll the link for the rest of a frame, bounded (see below)
//   irqtimer.ground_open(ring, words) / ground_close() / ground_read(buf)  STM32 only: the
//   ground link's receive interrupt into a ring (below)
//
// (Names the image already has: a new name renumbers the runtime's names, which moved the
// paced loop's cost through the map-lookup cache: with rx_start, rx_stop and rx_wait the
// MPS2 period cost 10,640 instructions, past its 10,625 limit, before main's period lost
// its lookups, and after it 310 more with the cache overwritten than warm, past that
// test's 150; tests/firmware/mptest_paced_loop_cost.py.)
//
// The tracking link (a UART of its own, not the payload bus the data path shares) is
// written by the period in the timer interrupt and received by its RX interrupt: each
// byte into buf at words[0] (the fill; the period resets it after taking a frame), bytes
// past the end counted in words[1] and dropped (STM32: and the bytes a USART overrun lost,
// SR.ORE), every byte counted in words[2] (wrapping at 2^30). The timer and RX interrupts
// share a priority, so neither preempts the other: the period sees the fill and the
// buffer consistent. MPS2: CMSDK UART2 (0x40006000, RX IRQ 4); STM32: USART3 (0x40004800,
// IRQ 39). The board enables the UART (board.tracking_link).
//
// The ground link (STM32 only: USART1, IRQ 37, the port's REPL UART) is received by its RXNE
// interrupt into a ring: the USART holds one byte, and a byte that arrives while the main
// loop is busy elsewhere for longer than a byte time (a bus transaction, a storage commit:
// ms) overruns it on the part (docs/targets.md "The ground link's receive interrupt").
// ground_open(ring, words): ring a bytearray of a power-of-two length; words an array('i')
// of 5: [bytes put into the ring, bytes taken out (both modulo 2^32: their difference is
// the fill), bytes received, bytes lost to a full ring, USART overruns (SR.ORE)], the
// counters wrapping at 2^30. ground_read(buf) moves what the ring holds into buf (C, no
// allocation) and returns the count. The interrupt only puts (word 0), ground_read only
// takes (word 1): each word has one writer. Its priority is above the timer's, so a
// tracking period in the interrupt (~150 us at 2 kHz) does not hold off the ground's bytes
// (87 us each at 115,200 baud). Only the application opens it (board.ground_link
// .start_receiving): the REPL reads USART1's data register itself and would get nothing.
//
// The callback runs as the stm32 port's Timer callbacks do: the scheduler and the heap
// locked (an allocation raises MemoryError), under an nlr guard; an exception stops the
// timer, is kept for last_error() and counted. It must not block and must not touch what
// the interrupted code may be using (the payload bus of the data path): see
// payload/tracking_duty.py.
//
// The port's vector table has only the 16 system exceptions, so start() copies them into
// a RAM table with room for the SoC's IRQs and points SCB->VTOR at it (once).
//
// Timers (both emulated by QEMU, both left free by the boards, whose clock is TIMER0/TIM2):
//   MPS2-AN385: CMSDK APB TIMER1 at 0x40001000, IRQ 9, 32-bit down-counter at PCLK 25 MHz.
//   STM32F2 (netduino2): the core's SysTick at the 120 MHz processor clock (why not a TIM:
//   below).
#include <stdint.h>

#include "py/gc.h"
#include "py/mperrno.h"
#include "py/nlr.h"
#include "py/objstr.h"
#include "py/runtime.h"
#include "py/stackctrl.h"

#define SCB_VTOR (*(volatile uint32_t *)0xE000ED08)
#define NVIC_ISER ((volatile uint32_t *)0xE000E100)
#define NVIC_ICER ((volatile uint32_t *)0xE000E180)
#define NVIC_ICPR ((volatile uint32_t *)0xE000E280)
#define NVIC_IPR ((volatile uint8_t *)0xE000E400)
#define SYSTEM_VECTORS (16)
#define RAM_VECTORS (128)  // 16 + the F205's 81 IRQs, rounded to a power of two (VTOR)
#define IRQ_PRIORITY (0x40)

#if defined(QEMU_SOC_MPS2)
#define IRQTIMER_NAME "CMSDK TIMER1 (IRQ 9)"
#define TIMER_IRQ (9)
typedef struct {
    volatile uint32_t CTRL;  // bit 0 enable, bit 3 interrupt enable
    volatile uint32_t VALUE;
    volatile uint32_t RELOAD;
    volatile uint32_t INTSTATUS;  // write 1: clear
} cmsdk_timer_t;
#define TIMER ((cmsdk_timer_t *)0x40001000)
typedef struct {
    volatile uint32_t DATA;
    volatile uint32_t STATE;  // bit 1 RX full
    volatile uint32_t CTRL;  // bit 3 RX interrupt enable
    volatile uint32_t INTSTATUS;  // bit 1 RX interrupt (write 1: clear)
} cmsdk_uart_t;
#define TRACK_UART ((cmsdk_uart_t *)0x40006000)  // UART2: QEMU's third -serial
#define TRACK_UART_IRQ (4)
#define TICKS_PER_US (25)  // PCLK
#define MAX_PERIOD_US (0xFFFFFFFFu / TICKS_PER_US)
#elif defined(QEMU_SOC_STM32)
// The core's SysTick, not a TIM: QEMU 7.2's stm32f2xx_timer schedules each alarm at now plus
// the counter's absolute tick count (hit_time = ticks + now_ticks), so its update interrupt
// comes ever later (measured: 56 interrupts in 95 ms at a 100 us period, the 56th ~1.7 ms
// after the one before). SysTick is part of every Cortex-M3/M4 and modelled by QEMU on the
// virtual clock; on the real part a TIM (TIM3, IRQ 29) does the same with the STM32's own
// registers (docs/targets.md).
#define IRQTIMER_NAME "SysTick (exception 15)"
#define SYSTICK_EXCEPTION (15)
typedef struct {
    volatile uint32_t CSR;  // bit 0 enable, bit 1 interrupt, bit 2 processor clock
    volatile uint32_t RVR;  // 24-bit reload
    volatile uint32_t CVR;  // current value (down-counter); a write clears it
} systick_t;
#define SYSTICK ((systick_t *)0xE000E010)
#define SCB_ICSR (*(volatile uint32_t *)0xE000ED04)
#define ICSR_PENDSTSET (1u << 26)
#define ICSR_PENDSTCLR (1u << 25)
#define SCB_SHPR3 (*(volatile uint32_t *)0xE000ED20)
#ifndef IRQTIMER_CPU_HZ
#define IRQTIMER_CPU_HZ (120000000u)  // the netduino2 machine's system clock (the F205's)
#endif
#define TICKS_PER_US (IRQTIMER_CPU_HZ / 1000000u)
#define MAX_PERIOD_US (0x1000000u / TICKS_PER_US)
typedef struct {
    volatile uint32_t SR;  // bit 5 RXNE
    volatile uint32_t DR;
    volatile uint32_t BRR;
    volatile uint32_t CR1;  // bit 5 RXNEIE
} stm32_usart_t;
#define TRACK_UART ((stm32_usart_t *)0x40004800)  // USART3: QEMU's third -serial
#define TRACK_UART_IRQ (39)
#define GROUND_UART ((stm32_usart_t *)0x40011000)  // USART1: QEMU's first -serial
#define GROUND_UART_IRQ (37)
#define USART_SR_ORE (1u << 3)
#define USART_SR_RXNE (1u << 5)
#define USART_CR1_RXNEIE (1u << 5)
#define GROUND_IRQ_PRIORITY (0x20)  // above IRQ_PRIORITY: preempts the tracking period
#else
#error "irqtimer: no timer for this SoC (QEMU_SOC_MPS2 or QEMU_SOC_STM32)"
#endif

#define COUNTER_WRAP (0x3FFFFFFFu)  // a small int on a 32-bit port

#if defined(QEMU_SOC_STM32)
// One step of an STM32 USART receive interrupt (the tracking link's and the ground link's):
// 1 with *byte the received byte, 0 when there is nothing more. overrun (NULL: not
// counted) gets one per byte an overrun lost. ORE alongside a byte: the byte after DR's was
// lost. ORE without a byte: a byte finished between an SR read and its DR read (here or in
// a polled read before the interrupt was enabled), which cleared RXNE only (ORE clears on a
// DR read after an SR read that showed it). RXNEIE raises the interrupt for ORE as well:
// returning without this read re-enters the handler at once, and the main loop gets no
// cycle until the next byte comes (on a silent link, the watchdog). DR's byte is the one
// already taken. (QEMU keeps ORE through a DR read: counted once, *last_sr.)
static int stm32_usart_take(stm32_usart_t *usart, uint8_t *byte, uint32_t *last_sr,
    volatile int32_t *overrun) {
    uint32_t sr = usart->SR;
    if (!(sr & (USART_SR_RXNE | USART_SR_ORE))) {
        return 0;
    }
    *byte = usart->DR;  // after SR: clears RXNE and ORE
    if (!(sr & USART_SR_RXNE)) {
        if (overrun != NULL && !(*last_sr & USART_SR_ORE)) {
            *overrun = (*overrun + 1) & COUNTER_WRAP;
        }
        return 0;
    }
    if ((sr & USART_SR_ORE) && overrun != NULL) {
        *overrun = (*overrun + 1) & COUNTER_WRAP;
    }
    *last_sr = sr;
    return 1;
}
#endif

// The callback runs on the stack of the code it interrupts, which the port checks only
// against its limit (10,240 bytes, ports/qemu/main.c); the STM32 board's stack region is
// exactly that long, the RAM disk standing in for its flash right below it. So the module
// takes a reserve off the main program's limit when it is first imported (the boards
// import it at boot): the callback may use STACK_FOR_CALLBACK of it beyond the main
// program's deepest, and the rest is for C code past the last check (a raise at the
// limit wrote 236 bytes past it on netduino2). Without it a recursion of the main program
// to its limit stopped the timer (the callback raised RuntimeError) and wrote below the
// stack region (tests/firmware/mptest_irq_stack.py).
#define STACK_RESERVE (2048)
#define STACK_FOR_CALLBACK (1024)

// The RAM vector table (VTOR needs it aligned to its size, 512 bytes). In .data, which the
// netduino2 linker script places first, at the start of RAM: no alignment padding in the
// STM32's 2 KB left beside the heap.
static uint32_t irqtimer_vectors[RAM_VECTORS]
__attribute__((section(".data.irqtimer_vectors"), aligned(RAM_VECTORS * 4))) = {0};

static volatile uint32_t irqtimer_fired;
static volatile uint32_t irqtimer_errors;
static volatile uint32_t irqtimer_overruns;
static volatile uint32_t irqtimer_worst_latency_ticks;
static volatile uint32_t irqtimer_worst_busy_ticks;
static uint32_t irqtimer_period_ticks;
static volatile uint8_t irqtimer_running;
static uint8_t irqtimer_stack_reserved;  // once per boot: main.c sets the limit once

MP_REGISTER_ROOT_POINTER(mp_obj_t irqtimer_callback);
MP_REGISTER_ROOT_POINTER(mp_obj_t irqtimer_arg);
MP_REGISTER_ROOT_POINTER(mp_obj_t irqtimer_last_error);
// An object whose finaliser stops the timer: the raw REPL's soft reset frees the heap
// (gc_sweep_all runs every finaliser) with the callback in it, and the timer must not call
// into the next session's heap.
MP_REGISTER_ROOT_POINTER(mp_obj_t irqtimer_guard);
// the tracking link's receive buffer and its words (fill, dropped, received)
MP_REGISTER_ROOT_POINTER(mp_obj_t irqtimer_rx_buf);
MP_REGISTER_ROOT_POINTER(mp_obj_t irqtimer_rx_words);
static uint8_t *irqtimer_rx_data;
static size_t irqtimer_rx_capacity;
static volatile int32_t *irqtimer_rx_state;

static void irqtimer_rx_disable(void) {
    NVIC_ICER[TRACK_UART_IRQ / 32] = 1u << (TRACK_UART_IRQ % 32);
    #if defined(QEMU_SOC_MPS2)
    TRACK_UART->CTRL &= ~8u;
    TRACK_UART->INTSTATUS = 2;
    #else
    TRACK_UART->CR1 &= ~(1u << 5);
    #endif
    NVIC_ICPR[TRACK_UART_IRQ / 32] = 1u << (TRACK_UART_IRQ % 32);
    irqtimer_rx_state = NULL;
}

static void irqtimer_rx_isr(void) {
    volatile int32_t *state = irqtimer_rx_state;
    #if defined(QEMU_SOC_STM32)
    uint32_t last_sr = 0;
    #endif
    for (;;) {
        #if defined(QEMU_SOC_MPS2)
        TRACK_UART->INTSTATUS = 2;  // clear first: a byte that comes after the check raises it
        if (!(TRACK_UART->STATE & 2)) {
            break;
        }
        uint8_t byte = TRACK_UART->DATA;
        #else
        // an overrun's lost byte is counted as dropped (words[1])
        uint8_t byte;
        if (!stm32_usart_take(TRACK_UART, &byte, &last_sr, state == NULL ? NULL : &state[1])) {
            break;
        }
        #endif
        if (state == NULL) {
            continue;  // not started: drained, not kept
        }
        uint32_t fill = (uint32_t)state[0];
        if (fill < irqtimer_rx_capacity) {
            irqtimer_rx_data[fill] = byte;
            state[0] = fill + 1;
        } else {
            state[1] = (state[1] + 1) & COUNTER_WRAP;
        }
        state[2] = (state[2] + 1) & COUNTER_WRAP;
    }
}

#if defined(QEMU_SOC_STM32)
// the ground link's ring and its words (see ground_open above)
MP_REGISTER_ROOT_POINTER(mp_obj_t irqtimer_ground_ring);
MP_REGISTER_ROOT_POINTER(mp_obj_t irqtimer_ground_words);
static uint8_t *irqtimer_ground_data;
static uint32_t irqtimer_ground_mask;  // the ring's length - 1
static volatile int32_t *irqtimer_ground_state;

static void irqtimer_ground_disable(void) {
    NVIC_ICER[GROUND_UART_IRQ / 32] = 1u << (GROUND_UART_IRQ % 32);
    GROUND_UART->CR1 &= ~USART_CR1_RXNEIE;
    NVIC_ICPR[GROUND_UART_IRQ / 32] = 1u << (GROUND_UART_IRQ % 32);
    irqtimer_ground_state = NULL;
}

static void irqtimer_ground_isr(void) {
    volatile int32_t *state = irqtimer_ground_state;
    uint32_t last_sr = 0;
    for (;;) {
        uint8_t byte;  // an overrun's lost byte is counted in words[4]
        if (!stm32_usart_take(GROUND_UART, &byte, &last_sr, state == NULL ? NULL : &state[4])) {
            break;
        }
        if (state == NULL) {
            continue;  // not open: drained, not kept
        }
        uint32_t put = (uint32_t)state[0];
        if (put - (uint32_t)state[1] <= irqtimer_ground_mask) {
            irqtimer_ground_data[put & irqtimer_ground_mask] = byte;
            __asm volatile ("" ::: "memory");  // the byte before the count that shows it
            state[0] = (int32_t)(put + 1);
        } else {
            state[3] = (state[3] + 1) & COUNTER_WRAP;  // the ring is full: this byte lost
        }
        state[2] = (state[2] + 1) & COUNTER_WRAP;
    }
}
#endif

static void irqtimer_hw_stop(void) {
    #if defined(QEMU_SOC_MPS2)
    TIMER->CTRL = 0;
    TIMER->INTSTATUS = 1;
    NVIC_ICER[TIMER_IRQ / 32] = 1u << (TIMER_IRQ % 32);
    NVIC_ICPR[TIMER_IRQ / 32] = 1u << (TIMER_IRQ % 32);
    #else
    SYSTICK->CSR = 0;
    SCB_ICSR = ICSR_PENDSTCLR;
    #endif
    irqtimer_running = 0;
}

// Ticks since the period's expiry (the interrupt's latency at entry, the callback's end
// at exit), and whether the timer expired again since it was cleared. Both timers count
// down to 0, which raises the interrupt, and reload at the next tick: 0 is the expiry.
static inline uint32_t irqtimer_elapsed_ticks(void) {
    #if defined(QEMU_SOC_MPS2)
    uint32_t value = TIMER->VALUE;
    return value == 0 ? 0 : TIMER->RELOAD + 1 - value;
    #else
    uint32_t value = SYSTICK->CVR;
    return value == 0 ? 0 : SYSTICK->RVR + 1 - value;
    #endif
}

static inline int irqtimer_expired_again(void) {
    #if defined(QEMU_SOC_MPS2)
    return TIMER->INTSTATUS & 1;
    #else
    return (SCB_ICSR & ICSR_PENDSTSET) != 0;
    #endif
}

static void irqtimer_isr(void) {
    #if defined(QEMU_SOC_MPS2)
    TIMER->INTSTATUS = 1;  // clear first: an expiry during the callback is seen at its end
    #endif
    uint32_t entry = irqtimer_elapsed_ticks();
    if (!irqtimer_running) {
        return;
    }
    if (entry > irqtimer_worst_latency_ticks) {
        irqtimer_worst_latency_ticks = entry;
    }
    uint32_t n = irqtimer_fired;
    irqtimer_fired = n < COUNTER_WRAP ? n + 1 : 0;
    mp_sched_lock();
    gc_lock();
    // the reserve below the main program's limit is the callback's (see STACK_RESERVE)
    size_t stack_limit = MP_STATE_THREAD(stack_limit);
    if (irqtimer_stack_reserved) {
        MP_STATE_THREAD(stack_limit) = stack_limit + STACK_FOR_CALLBACK;
    }
    nlr_buf_t nlr;
    if (nlr_push(&nlr) == 0) {
        mp_call_function_1(MP_STATE_VM(irqtimer_callback), MP_STATE_VM(irqtimer_arg));
        nlr_pop();
        MP_STATE_THREAD(stack_limit) = stack_limit;
    } else {
        MP_STATE_THREAD(stack_limit) = stack_limit;
        // as the stm32 port's Timer: an uncaught exception stops the callback (kept, counted)
        irqtimer_hw_stop();
        MP_STATE_VM(irqtimer_last_error) = MP_OBJ_FROM_PTR(nlr.ret_val);
        n = irqtimer_errors;
        irqtimer_errors = n < COUNTER_WRAP ? n + 1 : 0;
    }
    gc_unlock();
    mp_sched_unlock();
    uint32_t end = irqtimer_elapsed_ticks();
    if (irqtimer_running && irqtimer_expired_again()) {
        // the next period came due before this one's callback returned: it runs late
        end += irqtimer_period_ticks;
        n = irqtimer_overruns;
        irqtimer_overruns = n < COUNTER_WRAP ? n + 1 : 0;
    }
    if (end - entry > irqtimer_worst_busy_ticks && end >= entry) {
        irqtimer_worst_busy_ticks = end - entry;
    }
}

// Any other IRQ (none is enabled by the port): masked, so it cannot fire again.
static void irqtimer_unexpected_irq(void) {
    uint32_t ipsr;
    __asm volatile ("mrs %0, ipsr" : "=r" (ipsr));
    if (ipsr >= SYSTEM_VECTORS) {
        uint32_t irq = ipsr - SYSTEM_VECTORS;
        NVIC_ICER[irq / 32] = 1u << (irq % 32);
    }
}

static void irqtimer_install_vectors(void) {
    uint32_t active = SCB_VTOR;
    if (active == (uint32_t)irqtimer_vectors) {
        return;
    }
    // (through a volatile pointer: the port's table sits at address 0)
    const volatile uint32_t *current = (const volatile uint32_t *)(uintptr_t)active;
    for (int i = 0; i < SYSTEM_VECTORS; ++i) {
        irqtimer_vectors[i] = current[i];
    }
    for (int i = SYSTEM_VECTORS; i < RAM_VECTORS; ++i) {
        irqtimer_vectors[i] = (uint32_t)irqtimer_unexpected_irq;
    }
    irqtimer_vectors[SYSTEM_VECTORS + TRACK_UART_IRQ] = (uint32_t)irqtimer_rx_isr;
    #if defined(QEMU_SOC_STM32)
    irqtimer_vectors[SYSTEM_VECTORS + GROUND_UART_IRQ] = (uint32_t)irqtimer_ground_isr;
    #endif
    #if defined(QEMU_SOC_MPS2)
    irqtimer_vectors[SYSTEM_VECTORS + TIMER_IRQ] = (uint32_t)irqtimer_isr;
    #else
    irqtimer_vectors[SYSTICK_EXCEPTION] = (uint32_t)irqtimer_isr;
    #endif
    __asm volatile ("dsb\n isb" ::: "memory");
    SCB_VTOR = (uint32_t)irqtimer_vectors;
    __asm volatile ("dsb\n isb" ::: "memory");
}

static mp_obj_t irqtimer_guard_del(mp_obj_t self_in) {
    (void)self_in;
    irqtimer_hw_stop();
    irqtimer_rx_disable();
    MP_STATE_VM(irqtimer_rx_buf) = MP_OBJ_NULL;
    MP_STATE_VM(irqtimer_rx_words) = MP_OBJ_NULL;
    #if defined(QEMU_SOC_STM32)
    irqtimer_ground_disable();
    MP_STATE_VM(irqtimer_ground_ring) = MP_OBJ_NULL;
    MP_STATE_VM(irqtimer_ground_words) = MP_OBJ_NULL;
    #endif
    MP_STATE_VM(irqtimer_guard) = MP_OBJ_NULL;
    MP_STATE_VM(irqtimer_callback) = MP_OBJ_NULL;
    MP_STATE_VM(irqtimer_arg) = MP_OBJ_NULL;
    MP_STATE_VM(irqtimer_last_error) = MP_OBJ_NULL;
    return mp_const_none;
}
static MP_DEFINE_CONST_FUN_OBJ_1(irqtimer_guard_del_obj, irqtimer_guard_del);

static const mp_rom_map_elem_t irqtimer_guard_locals_table[] = {
    { MP_ROM_QSTR(MP_QSTR___del__), MP_ROM_PTR(&irqtimer_guard_del_obj) },
};
static MP_DEFINE_CONST_DICT(irqtimer_guard_locals, irqtimer_guard_locals_table);

static MP_DEFINE_CONST_OBJ_TYPE(
    irqtimer_guard_type, MP_QSTR_irqtimer, MP_TYPE_FLAG_NONE,
    locals_dict, &irqtimer_guard_locals
    );

static void irqtimer_guarded(void) {
    if (MP_STATE_VM(irqtimer_guard) == MP_OBJ_NULL) {
        MP_STATE_VM(irqtimer_guard) = MP_OBJ_FROM_PTR(
            mp_obj_malloc_with_finaliser(mp_obj_base_t, &irqtimer_guard_type));
    }
}

static mp_obj_t irqtimer_start(mp_obj_t period_in, mp_obj_t callback_in, mp_obj_t arg_in) {
    mp_int_t period_us = mp_obj_get_int(period_in);
    if (period_us < 10 || (mp_uint_t)period_us > MAX_PERIOD_US) {
        mp_raise_ValueError(MP_ERROR_TEXT("period_us out of range"));
    }
    if (!mp_obj_is_callable(callback_in)) {
        mp_raise_TypeError(MP_ERROR_TEXT("callback not callable"));
    }
    irqtimer_hw_stop();
    irqtimer_guarded();
    irqtimer_install_vectors();
    MP_STATE_VM(irqtimer_callback) = callback_in;
    MP_STATE_VM(irqtimer_arg) = arg_in;
    MP_STATE_VM(irqtimer_last_error) = mp_const_none;
    irqtimer_fired = 0;
    irqtimer_errors = 0;
    irqtimer_overruns = 0;
    irqtimer_worst_latency_ticks = 0;
    irqtimer_worst_busy_ticks = 0;
    #if defined(QEMU_SOC_MPS2)
    NVIC_IPR[TIMER_IRQ] = IRQ_PRIORITY;
    irqtimer_period_ticks = (uint32_t)period_us * TICKS_PER_US;
    TIMER->RELOAD = irqtimer_period_ticks - 1;
    TIMER->VALUE = irqtimer_period_ticks - 1;
    TIMER->INTSTATUS = 1;
    irqtimer_running = 1;
    NVIC_ISER[TIMER_IRQ / 32] = 1u << (TIMER_IRQ % 32);
    TIMER->CTRL = 1 | 8;  // enable, interrupt enable
    #else
    SCB_SHPR3 = (SCB_SHPR3 & 0x00FFFFFFu) | ((uint32_t)IRQ_PRIORITY << 24);
    irqtimer_period_ticks = (uint32_t)period_us * TICKS_PER_US;
    SYSTICK->RVR = irqtimer_period_ticks - 1;
    SYSTICK->CVR = 0;
    irqtimer_running = 1;
    SYSTICK->CSR = 1 | 2 | 4;  // enable, interrupt, processor clock
    #endif
    return mp_const_none;
}
static MP_DEFINE_CONST_FUN_OBJ_3(irqtimer_start_obj, irqtimer_start);

static mp_obj_t irqtimer_stop(void) {
    irqtimer_hw_stop();
    MP_STATE_VM(irqtimer_callback) = mp_const_none;
    MP_STATE_VM(irqtimer_arg) = mp_const_none;
    return mp_const_none;
}
static MP_DEFINE_CONST_FUN_OBJ_0(irqtimer_stop_obj, irqtimer_stop);

static mp_obj_t irqtimer_ticks_to_us(uint32_t ticks) {
    ticks /= TICKS_PER_US;
    return MP_OBJ_NEW_SMALL_INT(ticks & COUNTER_WRAP);
}

static mp_obj_t irqtimer_counters(void) {
    mp_obj_t items[5] = {
        MP_OBJ_NEW_SMALL_INT(irqtimer_fired),
        MP_OBJ_NEW_SMALL_INT(irqtimer_errors),
        MP_OBJ_NEW_SMALL_INT(irqtimer_overruns),
        irqtimer_ticks_to_us(irqtimer_worst_latency_ticks),
        irqtimer_ticks_to_us(irqtimer_worst_busy_ticks),
    };
    return mp_obj_new_tuple(5, items);
}
static MP_DEFINE_CONST_FUN_OBJ_0(irqtimer_counters_obj, irqtimer_counters);

static mp_obj_t irqtimer_reset_worst(void) {
    irqtimer_worst_latency_ticks = 0;
    irqtimer_worst_busy_ticks = 0;
    return mp_const_none;
}
static MP_DEFINE_CONST_FUN_OBJ_0(irqtimer_reset_worst_obj, irqtimer_reset_worst);

static mp_obj_t irqtimer_fired_count(void) {
    return MP_OBJ_NEW_SMALL_INT(irqtimer_fired);
}
static MP_DEFINE_CONST_FUN_OBJ_0(irqtimer_fired_obj, irqtimer_fired_count);

static mp_obj_t irqtimer_get_last_error(void) {
    return MP_STATE_VM(irqtimer_last_error) == MP_OBJ_NULL
           ? mp_const_none : MP_STATE_VM(irqtimer_last_error);
}
static MP_DEFINE_CONST_FUN_OBJ_0(irqtimer_last_error_obj, irqtimer_get_last_error);

static mp_obj_t irqtimer_is_running(void) {
    return mp_obj_new_bool(irqtimer_running);
}
static MP_DEFINE_CONST_FUN_OBJ_0(irqtimer_running_obj, irqtimer_is_running);

static mp_obj_t irqtimer_rx_start(mp_obj_t buf_in, mp_obj_t words_in) {
    mp_buffer_info_t buf, words;
    mp_get_buffer_raise(buf_in, &buf, MP_BUFFER_WRITE);
    mp_get_buffer_raise(words_in, &words, MP_BUFFER_WRITE);
    if (words.len < 3 * sizeof(int32_t) || words.typecode != 'i') {
        mp_raise_ValueError(MP_ERROR_TEXT("words: array('i') of 3"));
    }
    irqtimer_rx_disable();
    irqtimer_guarded();
    irqtimer_install_vectors();
    MP_STATE_VM(irqtimer_rx_buf) = buf_in;  // (kept alive while the interrupt writes it)
    MP_STATE_VM(irqtimer_rx_words) = words_in;
    irqtimer_rx_data = buf.buf;
    irqtimer_rx_capacity = buf.len;
    volatile int32_t *state = words.buf;
    state[0] = state[1] = state[2] = 0;
    NVIC_IPR[TRACK_UART_IRQ] = IRQ_PRIORITY;
    irqtimer_rx_state = state;
    #if defined(QEMU_SOC_MPS2)
    TRACK_UART->INTSTATUS = 2;
    TRACK_UART->CTRL |= 8u;
    #else
    TRACK_UART->CR1 |= 1u << 5;
    #endif
    NVIC_ISER[TRACK_UART_IRQ / 32] = 1u << (TRACK_UART_IRQ % 32);
    return mp_const_none;
}
static MP_DEFINE_CONST_FUN_OBJ_2(irqtimer_rx_start_obj, irqtimer_rx_start);

static mp_obj_t irqtimer_rx_stop(void) {
    irqtimer_rx_disable();
    MP_STATE_VM(irqtimer_rx_buf) = mp_const_none;
    MP_STATE_VM(irqtimer_rx_words) = mp_const_none;
    return mp_const_none;
}
static MP_DEFINE_CONST_FUN_OBJ_0(irqtimer_rx_stop_obj, irqtimer_rx_stop);

// Poll the tracking link until a frame's delimiter ends the receive buffer or the period
// has run until_us since its expiry; returns the fill. For the period in the timer
// interrupt (the RX interrupt cannot run then: same priority): a reply on its way is taken
// this period instead of the next. QEMU hands a UART its bytes at the host's pace, and
// faster to a guest that polls than to one that computes (docs/scheduling.md).
static mp_obj_t irqtimer_rx_wait(mp_obj_t until_in) {
    volatile int32_t *state = irqtimer_rx_state;
    if (state == NULL) {
        return MP_OBJ_NEW_SMALL_INT(0);
    }
    uint32_t until_ticks = (uint32_t)mp_obj_get_int(until_in) * TICKS_PER_US;
    for (;;) {
        int32_t fill = state[0];
        if (fill > 0 && irqtimer_rx_data[fill - 1] == 0) {
            break;
        }
        if (!irqtimer_running || irqtimer_elapsed_ticks() >= until_ticks) {
            break;
        }
        irqtimer_rx_isr();
    }
    return MP_OBJ_NEW_SMALL_INT(state[0]);
}
static MP_DEFINE_CONST_FUN_OBJ_1(irqtimer_rx_wait_obj, irqtimer_rx_wait);

#if defined(QEMU_SOC_STM32)
static mp_obj_t irqtimer_ground_open(mp_obj_t ring_in, mp_obj_t words_in) {
    mp_buffer_info_t ring, words;
    mp_get_buffer_raise(ring_in, &ring, MP_BUFFER_WRITE);
    mp_get_buffer_raise(words_in, &words, MP_BUFFER_WRITE);
    if (ring.len == 0 || (ring.len & (ring.len - 1)) != 0) {
        mp_raise_ValueError(MP_ERROR_TEXT("ring: a power of two long"));
    }
    if (words.len < 5 * sizeof(int32_t) || words.typecode != 'i') {
        mp_raise_ValueError(MP_ERROR_TEXT("words: array('i') of 5"));
    }
    irqtimer_ground_disable();
    irqtimer_guarded();
    irqtimer_install_vectors();
    MP_STATE_VM(irqtimer_ground_ring) = ring_in;  // (kept alive while the interrupt writes it)
    MP_STATE_VM(irqtimer_ground_words) = words_in;
    irqtimer_ground_data = ring.buf;
    irqtimer_ground_mask = ring.len - 1;
    volatile int32_t *state = words.buf;
    for (int i = 0; i < 5; ++i) {
        state[i] = 0;
    }
    NVIC_IPR[GROUND_UART_IRQ] = GROUND_IRQ_PRIORITY;
    irqtimer_ground_state = state;
    GROUND_UART->CR1 |= USART_CR1_RXNEIE;  // a byte already in DR raises it at once
    NVIC_ISER[GROUND_UART_IRQ / 32] = 1u << (GROUND_UART_IRQ % 32);
    return mp_const_none;
}
static MP_DEFINE_CONST_FUN_OBJ_2(irqtimer_ground_open_obj, irqtimer_ground_open);

static mp_obj_t irqtimer_ground_close(void) {
    irqtimer_ground_disable();
    MP_STATE_VM(irqtimer_ground_ring) = mp_const_none;
    MP_STATE_VM(irqtimer_ground_words) = mp_const_none;
    return mp_const_none;
}
static MP_DEFINE_CONST_FUN_OBJ_0(irqtimer_ground_close_obj, irqtimer_ground_close);

static mp_obj_t irqtimer_ground_read(mp_obj_t buf_in) {
    mp_buffer_info_t buf;
    mp_get_buffer_raise(buf_in, &buf, MP_BUFFER_WRITE);
    volatile int32_t *state = irqtimer_ground_state;
    if (state == NULL) {
        return MP_OBJ_NEW_SMALL_INT(0);
    }
    uint32_t taken = (uint32_t)state[1];
    uint32_t count = (uint32_t)state[0] - taken;
    __asm volatile ("" ::: "memory");  // the bytes after the count that shows them
    if (count > buf.len) {
        count = buf.len;
    }
    uint8_t *out = buf.buf;
    for (uint32_t i = 0; i < count; ++i) {
        out[i] = irqtimer_ground_data[(taken + i) & irqtimer_ground_mask];
    }
    __asm volatile ("" ::: "memory");  // copied before their room is given back
    state[1] = (int32_t)(taken + count);
    return MP_OBJ_NEW_SMALL_INT(count);
}
static MP_DEFINE_CONST_FUN_OBJ_1(irqtimer_ground_read_obj, irqtimer_ground_read);
#endif

static MP_DEFINE_STR_OBJ(irqtimer_name_obj, IRQTIMER_NAME);

// At the module's first import (MICROPY_MODULE_BUILTIN_INIT): the stack reserve, once a
// boot (a soft reset keeps the limit main.c set at boot, and this flag)
static mp_obj_t irqtimer_init(void) {
    if (!irqtimer_stack_reserved
        && MP_STATE_THREAD(stack_limit) > STACK_RESERVE + STACK_RESERVE) {
        mp_stack_set_limit(MP_STATE_THREAD(stack_limit) - STACK_RESERVE);
        irqtimer_stack_reserved = 1;
    }
    return mp_const_none;
}
static MP_DEFINE_CONST_FUN_OBJ_0(irqtimer_init_obj, irqtimer_init);

static const mp_rom_map_elem_t irqtimer_module_globals_table[] = {
    { MP_ROM_QSTR(MP_QSTR___name__), MP_ROM_QSTR(MP_QSTR_irqtimer) },
    { MP_ROM_QSTR(MP_QSTR___init__), MP_ROM_PTR(&irqtimer_init_obj) },
    { MP_ROM_QSTR(MP_QSTR_start), MP_ROM_PTR(&irqtimer_start_obj) },
    { MP_ROM_QSTR(MP_QSTR_stop), MP_ROM_PTR(&irqtimer_stop_obj) },
    { MP_ROM_QSTR(MP_QSTR_counters), MP_ROM_PTR(&irqtimer_counters_obj) },
    { MP_ROM_QSTR(MP_QSTR_reset_worst), MP_ROM_PTR(&irqtimer_reset_worst_obj) },
    { MP_ROM_QSTR(MP_QSTR_fired), MP_ROM_PTR(&irqtimer_fired_obj) },
    { MP_ROM_QSTR(MP_QSTR_last_error), MP_ROM_PTR(&irqtimer_last_error_obj) },
    { MP_ROM_QSTR(MP_QSTR_running), MP_ROM_PTR(&irqtimer_running_obj) },
    { MP_ROM_QSTR(MP_QSTR_TIMER), MP_ROM_PTR(&irqtimer_name_obj) },
    { MP_ROM_QSTR(MP_QSTR_open), MP_ROM_PTR(&irqtimer_rx_start_obj) },
    { MP_ROM_QSTR(MP_QSTR_close), MP_ROM_PTR(&irqtimer_rx_stop_obj) },
    { MP_ROM_QSTR(MP_QSTR_read), MP_ROM_PTR(&irqtimer_rx_wait_obj) },
    #if defined(QEMU_SOC_STM32)
    { MP_ROM_QSTR(MP_QSTR_ground_open), MP_ROM_PTR(&irqtimer_ground_open_obj) },
    { MP_ROM_QSTR(MP_QSTR_ground_close), MP_ROM_PTR(&irqtimer_ground_close_obj) },
    { MP_ROM_QSTR(MP_QSTR_ground_read), MP_ROM_PTR(&irqtimer_ground_read_obj) },
    #endif
};
static MP_DEFINE_CONST_DICT(irqtimer_module_globals, irqtimer_module_globals_table);

const mp_obj_module_t irqtimer_user_cmodule = {
    .base = { &mp_type_module },
    .globals = (mp_obj_dict_t *)&irqtimer_module_globals,
};

MP_REGISTER_MODULE(MP_QSTR_irqtimer, irqtimer_user_cmodule);

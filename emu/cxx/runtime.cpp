// The block runtime: every CUDA thread of a block is a fiber on the calling OS thread, run
// round-robin in thread order; a fiber switches only at a sync point (__syncthreads, a warp
// collective, mma) or when it returns, so a launch is deterministic. LLAMA_CPT_EMU_SCHEDULE
// changes that order (see `Schedule`), so that a missing barrier whose race thread order happens
// to avoid shows as a wrong result. Blocks run one after the
// other in x, y, z order. Static __shared__ arrays are thread_local (cuda_emu.h), which is per
// block because an OS thread runs one block at a time.
//
// Sanitizer builds (emu/cxx/tests/sanitizers.sh) annotate the switches: ASan learns each fiber's
// stack; TSan sees each CUDA thread as its own fiber, switched without implied synchronisation, and
// gets the happens-before edges the hardware gives: a barrier, a completed warp collective, the
// start and end of a block. So a shared-memory access pair not ordered by a barrier is a race.
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <mutex>
#include <thread>
#include <vector>

#include "cuda_emu.h"

// The annotations are on when this file is built with the sanitizer, or with LCPT_EMU_TSAN alone:
// the TSan build leaves the runtime uninstrumented (its bookkeeping is not the kernels' business)
// and instruments only the kernels.
#if defined(__SANITIZE_ADDRESS__) && !defined(LCPT_EMU_ASAN)
#define LCPT_EMU_ASAN 1
#endif
#if defined(__SANITIZE_THREAD__) && !defined(LCPT_EMU_TSAN)
#define LCPT_EMU_TSAN 1
#endif
#if defined(LCPT_EMU_ASAN)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif
#if defined(LCPT_EMU_TSAN)
#include <sanitizer/tsan_interface.h>
#endif

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

namespace lcpt_emu {


namespace {

// CUresult codes used here (cuda.h).
constexpr int CUDA_ERROR_INVALID_VALUE = 1;
constexpr int CUDA_ERROR_LAUNCH_FAILED = 719;


enum class State { Runnable, AtBarrier, AtWarp, Done };

struct Worker;

struct Fiber {
    ThreadState ts;
    Worker* worker = nullptr;  // the OS thread's scheduler this fiber belongs to
    unsigned linear = 0;
    State state = State::Done;
    // Stack: STACK_BYTES above a guard page in a FIBER_REGION-aligned region that starts with the
    // FiberHeader (cuda_emu.h); mmap'ed once and reused by every block.
    unsigned char* stack = nullptr;
    void* mapping = nullptr;
#if defined(__x86_64__)
    void* sp = nullptr;
#else
    ucontext_t ctx;
#endif
    // The warp collective this fiber waits at.
    unsigned mask = 0;
    void* lane_data = nullptr;
    WarpCompleteFn complete = nullptr;
    const char* what = nullptr;
    AsyncCopies async{nullptr, 0, 0, 0};  // its cp.async copies not yet waited for
#if defined(LCPT_EMU_ASAN)
    void* fake_stack = nullptr;
#endif
#if defined(LCPT_EMU_TSAN)
    void* tsan_fiber = nullptr;
#endif
};

// The order a pass runs the block's fibers in, from LLAMA_CPT_EMU_SCHEDULE:
//   thread-order (default)  thread 0, 1, 2, …
//   reverse                 the warps last to first, each warp's lanes in order
//   random[:SEED]           a seeded shuffle of the warps and of each warp's lanes, drawn again
//                           at every pass (each time the runtime starts over the block)
// A correct kernel gives the same result in every order: only barriers and warp collectives
// order its threads. Read once per process.
struct Schedule {
    enum Kind { ThreadOrder, Reverse, Random } kind = ThreadOrder;
    unsigned long long seed = 1;

    static const Schedule& get() {
        static const Schedule s = parse(getenv("LLAMA_CPT_EMU_SCHEDULE"));
        return s;
    }
    static Schedule parse(const char* v) {
        Schedule s;
        if (!v || !*v || strcmp(v, "thread-order") == 0) return s;
        if (strcmp(v, "reverse") == 0) {
            s.kind = Reverse;
            return s;
        }
        if (strncmp(v, "random", 6) == 0 && (v[6] == 0 || v[6] == ':')) {
            s.kind = Random;
            if (v[6] == ':') s.seed = strtoull(v + 7, nullptr, 10);
            return s;
        }
        fprintf(stderr, "llama-cpt emulator: LLAMA_CPT_EMU_SCHEDULE=%s: expected thread-order, reverse or random[:SEED]\n", v);
        abort();
    }
};

// The per-OS-thread scheduler state.
struct Worker {
    std::vector<Fiber*> fibers;
    unsigned nthreads = 0;
    const char* kernel = "";
    BlockState block;
    BlockThreadFn fn = nullptr;
    void* params = nullptr;
    bool failed = false;
    char message[1024];
    // Counts of the block's fibers by state (the Runnable ones are `runnable`), and per warp the
    // lanes waiting at a collective and the lanes that returned (or do not exist), as bit masks.
    unsigned runnable = 0, at_barrier = 0, done = 0;
    unsigned warp_waiting[32], warp_gone[32];
    // The pass order (`Schedule`): order[p] is the thread run p-th, pos[t] where thread t runs.
    std::vector<unsigned> order, pos;
    unsigned long long rng = 0;
    bool from_scheduler = false;  // the running fiber was switched to by the scheduler, not by a fiber
#if defined(__x86_64__)
    void* sched_sp = nullptr;
#else
    ucontext_t sched_ctx;
#endif
#if defined(LCPT_EMU_ASAN)
    void* sched_fake_stack = nullptr;
    const void* sched_stack_bottom = nullptr;
    size_t sched_stack_size = 0;
#endif
#if defined(LCPT_EMU_TSAN)
    void* tsan_sched = nullptr;
#endif
    // Addresses TSan uses as synchronisation objects (never read or written).
    char sync_block_start, sync_block_end, sync_barrier, sync_warp[32];

    ~Worker() {
        for (Fiber* f : fibers) {
            munmap(f->mapping, 2 * FIBER_REGION);
#if defined(LCPT_EMU_TSAN)
            __tsan_destroy_fiber(f->tsan_fiber);
#endif
            free(f->async.items);
            delete f;
        }
    }
    static size_t page() { return static_cast<size_t>(sysconf(_SC_PAGESIZE)); }
};

// The running fiber, from its stack (cuda_emu.h); only called on a fiber.
Fiber* this_fiber() { return static_cast<Fiber*>(const_cast<void*>(fiber_header()->fiber)); }

// The calling OS thread's scheduler, created on its first launch and destroyed when it exits. The
// hot paths reach it through the running fiber, not through thread_local lookups.
Worker& this_worker() {
    struct Owner {
        Worker* w = nullptr;
        ~Owner() { delete w; }
    };
    thread_local Owner owner;
    if (!owner.w) owner.w = new Worker;
    return *owner.w;
}

void fail(Worker& w, const char* fmt, va_list ap) {
    if (w.failed) return;
    w.failed = true;
    vsnprintf(w.message, sizeof w.message, fmt, ap);
}

void fail(Worker& w, const char* fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fail(w, fmt, ap);
    va_end(ap);
}

}  // namespace
}  // namespace lcpt_emu

extern "C" __attribute__((visibility("hidden"))) void lcpt_emu_fiber_main(lcpt_emu::Fiber* f);

#if defined(__x86_64__)
// Saves the callee-saved registers of the running context on its stack, stores its stack pointer
// in *save_sp and resumes the context whose stack pointer is new_sp (System V x86-64).
extern "C" __attribute__((visibility("hidden"))) void lcpt_emu_switch(void** save_sp, void* new_sp);
// A new fiber "returns" here from its first switch, with its Fiber* in r12.
extern "C" __attribute__((visibility("hidden"))) void lcpt_emu_fiber_entry();
asm(R"(
    .text
    .p2align 4
    .globl lcpt_emu_switch
    .hidden lcpt_emu_switch
    .type lcpt_emu_switch, @function
lcpt_emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size lcpt_emu_switch, .-lcpt_emu_switch

    .p2align 4
    .globl lcpt_emu_fiber_entry
    .hidden lcpt_emu_fiber_entry
    .type lcpt_emu_fiber_entry, @function
lcpt_emu_fiber_entry:
    movq %r12, %rdi
    call lcpt_emu_fiber_main
    ud2
    .size lcpt_emu_fiber_entry, .-lcpt_emu_fiber_entry
)");
#endif

namespace lcpt_emu {
namespace {

// Prepares f to start the kernel from the top the next time it is switched to.
void reset_fiber(Fiber* f) {
    f->async.count = 0;
    f->async.committed = 0;
    unsigned char* top = f->stack + STACK_BYTES;
#if defined(LCPT_EMU_ASAN)
    // Frames abandoned by the previous block may leave poisoned shadow behind.
    ASAN_UNPOISON_MEMORY_REGION(f->stack, STACK_BYTES);
    f->fake_stack = nullptr;
#endif
#if defined(__x86_64__)
    // Popped by lcpt_emu_switch: r15 r14 r13 r12(=f) rbx rbp, then the return address; the entry
    // then starts on a 16-byte aligned stack as the ABI wants before a call.
    void** sp = reinterpret_cast<void**>(top - 72);
    for (int k = 0; k < 9; ++k) sp[k] = nullptr;
    sp[3] = f;
    sp[6] = reinterpret_cast<void*>(&lcpt_emu_fiber_entry);
    f->sp = sp;
#else
    getcontext(&f->ctx);
    f->ctx.uc_stack.ss_sp = f->stack;
    f->ctx.uc_stack.ss_size = STACK_BYTES;
    f->ctx.uc_link = nullptr;
    makecontext(&f->ctx, reinterpret_cast<void (*)()>(&lcpt_emu_fiber_main), 1, f);
#endif
}

Fiber* new_fiber(Worker& w) {
    const size_t page = Worker::page();
    // Twice the region, so that an aligned region lies inside.
    void* mem = mmap(nullptr, 2 * FIBER_REGION, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (mem == MAP_FAILED) return nullptr;
    unsigned char* region = reinterpret_cast<unsigned char*>((reinterpret_cast<uintptr_t>(mem) + FIBER_REGION - 1) & ~(uintptr_t)(FIBER_REGION - 1));
    mprotect(region + page, page, PROT_NONE);  // a stack overflow faults instead of overwriting the header
    Fiber* f = new Fiber;
    f->mapping = mem;
    f->stack = region + 2 * page;
    f->worker = &w;
    FiberHeader* h = reinterpret_cast<FiberHeader*>(region);
    h->thread = &f->ts;
    h->block = &w.block;
    h->fiber = f;
    h->async = &f->async;
#if defined(LCPT_EMU_TSAN)
    f->tsan_fiber = __tsan_create_fiber(0);
#endif
    return f;
}

void set_state(Worker& w, Fiber* f, State to) {
    auto count = [&](State st) -> unsigned& { return st == State::Runnable ? w.runnable : st == State::AtBarrier ? w.at_barrier : w.done; };
    if (f->state != State::AtWarp) --count(f->state);
    if (to != State::AtWarp) ++count(to);
    f->state = to;
}

// The first Runnable fiber at or after position `from` of the pass order, or null.
Fiber* next_runnable(Worker& w, unsigned from) {
    if (w.runnable == 0) return nullptr;
    for (unsigned p = from; p < w.nthreads; ++p)
        if (Fiber* f = w.fibers[w.order[p]]; f->state == State::Runnable) return f;
    return nullptr;
}

// Draws the pass order: at a block's start, and again at every pass under `random`.
void draw_order(Worker& w, bool block_start) {
    const Schedule& s = Schedule::get();
    const unsigned n = w.nthreads;
    if (block_start) {
        w.order.resize(n);
        w.pos.resize(n);
        if (s.kind == Schedule::Reverse) {
            unsigned p = 0;
            for (unsigned warp = (n + 31) / 32; warp-- > 0;)
                for (unsigned t = warp * 32; t < std::min(n, warp * 32 + 32); ++t) w.order[p++] = t;
        } else {
            for (unsigned t = 0; t < n; ++t) w.order[t] = t;
        }
        // The same seed gives the same orders for the same block of the same launch sequence.
        const uint3 b = w.block.block_idx;
        w.rng = s.seed * 0x9E3779B97F4A7C15ull ^ (b.x * 0x100000001B3ull + b.y * 0x1000193ull + b.z + 1);
    }
    if (s.kind == Schedule::Random) {
        // xorshift64*; Fisher-Yates shuffles of the warps, then of each warp's lanes. A warp's
        // lanes stay together: one warp then runs ahead of the others by up to a whole pass (as
        // under `reverse`), which a shuffle of all threads would even out at every collective.
        auto below = [&w](unsigned i) {
            w.rng ^= w.rng >> 12;
            w.rng ^= w.rng << 25;
            w.rng ^= w.rng >> 27;
            return static_cast<unsigned>((w.rng * 0x2545F4914F6CDD1Dull >> 32) % i);
        };
        const unsigned warps = (n + 31) / 32;
        unsigned warp_order[32];
        for (unsigned k = 0; k < warps; ++k) warp_order[k] = k;
        for (unsigned i = warps; i > 1; --i) std::swap(warp_order[i - 1], warp_order[below(i)]);
        unsigned p = 0;
        for (unsigned k = 0; k < warps; ++k) {
            const unsigned first = p, base = warp_order[k] * 32;
            for (unsigned t = base; t < std::min(n, base + 32); ++t) w.order[p++] = t;
            for (unsigned i = p - first; i > 1; --i) std::swap(w.order[first + i - 1], w.order[first + below(i)]);
        }
    }
    for (unsigned p = 0; p < n; ++p) w.pos[w.order[p]] = p;
}

// Scheduler -> fiber f, which starts a pass over the block; returns when the pass ends (the last
// fiber of the pass switches back).
void switch_in(Worker& w, Fiber* f) {
    w.from_scheduler = true;
#if defined(LCPT_EMU_ASAN)
    __sanitizer_start_switch_fiber(&w.sched_fake_stack, f->stack, STACK_BYTES);
#endif
#if defined(LCPT_EMU_TSAN)
    __tsan_switch_to_fiber(f->tsan_fiber, __tsan_switch_to_fiber_no_sync);
#endif
#if defined(__x86_64__)
    lcpt_emu_switch(&w.sched_sp, f->sp);
#else
    swapcontext(&w.sched_ctx, &f->ctx);
#endif
#if defined(LCPT_EMU_ASAN)
    __sanitizer_finish_switch_fiber(w.sched_fake_stack, nullptr, nullptr);
#endif
}

// Fiber f (blocked or returned) hands over to the next Runnable fiber after it in the pass order,
// or ends the pass by switching back to the scheduler; returns when f is switched to again
// (never once f is Done). Handing over directly halves the switches of a warp collective.
void switch_out(Worker& w, Fiber* f) {
    Fiber* next = w.failed ? nullptr : next_runnable(w, w.pos[f->linear] + 1);
#if defined(LCPT_EMU_ASAN)
    void** fake = f->state == State::Done ? nullptr : &f->fake_stack;
    if (next)
        __sanitizer_start_switch_fiber(fake, next->stack, STACK_BYTES);
    else
        __sanitizer_start_switch_fiber(fake, w.sched_stack_bottom, w.sched_stack_size);
#endif
#if defined(LCPT_EMU_TSAN)
    __tsan_switch_to_fiber(next ? next->tsan_fiber : w.tsan_sched, __tsan_switch_to_fiber_no_sync);
#endif
    if (next) {
        w.from_scheduler = false;
#if defined(__x86_64__)
        lcpt_emu_switch(&f->sp, next->sp);
#else
        swapcontext(&f->ctx, &next->ctx);
#endif
    } else {
#if defined(__x86_64__)
        lcpt_emu_switch(&f->sp, w.sched_sp);
#else
        swapcontext(&f->ctx, &w.sched_ctx);
#endif
    }
#if defined(LCPT_EMU_ASAN)
    const void* from_bottom = nullptr;
    size_t from_size = 0;
    __sanitizer_finish_switch_fiber(f->fake_stack, &from_bottom, &from_size);
    if (w.from_scheduler) {
        w.sched_stack_bottom = from_bottom;
        w.sched_stack_size = from_size;
    }
#endif
}

const char* state_name(State s) {
    switch (s) {
        case State::Runnable: return "runs";
        case State::AtBarrier: return "waits at __syncthreads";
        case State::AtWarp: return "waits at a warp collective";
        case State::Done: return "has returned";
    }
    return "?";
}

// Names where every blocked thread is, for a deadlock message.
void fail_deadlock(Worker& w) {
    char detail[700];
    size_t len = 0;
    int shown = 0;
    unsigned at_barrier = 0, done = 0;
    for (unsigned t = 0; t < w.nthreads; ++t) {
        const Fiber* f = w.fibers[t];
        if (f->state == State::AtBarrier) ++at_barrier;
        if (f->state == State::Done) ++done;
        if (f->state == State::AtWarp && shown < 4 && len < sizeof detail - 200) {
            unsigned missing = 0;
            for (unsigned l = 0; l < 32; ++l) {
                const unsigned tid = (t & ~31u) + l;
                if ((f->mask >> l & 1) && (tid >= w.nthreads || w.fibers[tid]->state != State::AtWarp)) {
                    missing = l;
                    break;
                }
            }
            const unsigned mt = (t & ~31u) + missing;
            len += snprintf(detail + len, sizeof detail - len, "; thread %u (warp %u lane %u) waits at %s (mask 0x%08x) for lane %u, which %s", t,
                            t / 32, t % 32, f->what, f->mask, missing, mt < w.nthreads ? state_name(w.fibers[mt]->state) : "does not exist");
            ++shown;
        }
    }
    fail(w, "kernel %s block (%u,%u,%u): deadlock: %u of %u threads wait at __syncthreads, %u have returned%s", w.kernel, w.block.block_idx.x,
         w.block.block_idx.y, w.block.block_idx.z, at_barrier, w.nthreads, done, detail);
}

// Runs the current block to completion (or failure): passes over the fibers in the pass order until
// all returned; between passes a barrier that every live thread reached opens.
void run_block(Worker& w) {
#if defined(LCPT_EMU_TSAN)
    __tsan_release(&w.sync_block_start);
#endif
    for (unsigned t = 0; t < w.nthreads; ++t) {
        Fiber* f = w.fibers[t];
        reset_fiber(f);
        f->state = State::Runnable;
    }
    w.runnable = w.nthreads;
    w.at_barrier = w.done = 0;
    draw_order(w, true);
    for (unsigned warp = 0; warp < 32; ++warp) {
        w.warp_waiting[warp] = 0;
        // Lanes past the end of the block never arrive.
        const unsigned first = warp * 32;
        w.warp_gone[warp] = first >= w.nthreads ? ~0u : w.nthreads - first >= 32 ? 0u : ~0u << (w.nthreads - first);
    }
    for (;;) {
        if (Schedule::get().kind == Schedule::Random) draw_order(w, false);
        if (Fiber* f = next_runnable(w, 0)) switch_in(w, f);
        if (w.failed) return;
        if (w.done == w.nthreads) break;
        if (w.runnable) continue;
        // Nobody can run: either the barrier completes (threads that returned count as arrived,
        // as exited warps do on the hardware) or the block is stuck.
        if (w.at_barrier > 0 && w.at_barrier + w.done == w.nthreads) {
            for (unsigned t = 0; t < w.nthreads; ++t)
                if (w.fibers[t]->state == State::AtBarrier) set_state(w, w.fibers[t], State::Runnable);
            continue;
        }
        fail_deadlock(w);
        return;
    }
#if defined(LCPT_EMU_TSAN)
    __tsan_acquire(&w.sync_block_end);
#endif
}

}  // namespace

void syncthreads() {
    Fiber* f = this_fiber();
    Worker& w = *f->worker;
    set_state(w, f, State::AtBarrier);
#if defined(LCPT_EMU_TSAN)
    __tsan_release(&w.sync_barrier);
#endif
    switch_out(w, f);
#if defined(LCPT_EMU_TSAN)
    __tsan_acquire(&w.sync_barrier);
#endif
}

void warp_collective(unsigned mask, void* lane_data, WarpCompleteFn complete, const char* what) {
    Fiber* f = this_fiber();
    Worker& w = *f->worker;
    const unsigned lane = f->linear & 31, warp = f->linear / 32, base = warp * 32;
    if (!(mask >> lane & 1))
        kernel_error("thread %u (warp %u lane %u) calls %s with mask 0x%08x, which does not name the calling lane", f->linear, warp, lane, what, mask);
    if (const unsigned gone = mask & w.warp_gone[warp]) {
        const unsigned l = static_cast<unsigned>(__builtin_ctz(gone));
        if (base + l >= w.nthreads)
            kernel_error("thread %u (warp %u lane %u): %s with mask 0x%08x names lane %u, which does not exist (block of %u threads)", f->linear, warp,
                         lane, what, mask, l, w.nthreads);
        kernel_error("thread %u (warp %u lane %u): %s with mask 0x%08x names lane %u, which has returned and never arrives", f->linear, warp, lane, what,
                     mask, l);
    }
    set_state(w, f, State::AtWarp);
    f->mask = mask;
    f->lane_data = lane_data;
    f->complete = complete;
    f->what = what;
    w.warp_waiting[warp] |= 1u << lane;
#if defined(LCPT_EMU_TSAN)
    __tsan_release(&w.sync_warp[warp]);
#endif
    if ((w.warp_waiting[warp] & mask) != mask) {
        switch_out(w, f);
#if defined(LCPT_EMU_TSAN)
        __tsan_acquire(&w.sync_warp[warp]);
#endif
        return;
    }
    // The last lane to arrive does the exchange for all of them and goes on without a switch.
#if defined(LCPT_EMU_TSAN)
    __tsan_acquire(&w.sync_warp[warp]);
#endif
    void* datas[32] = {};
    for (unsigned l = 0; l < 32; ++l) {
        if (!(mask >> l & 1)) continue;
        const Fiber* o = w.fibers[base + l];
        if (o->mask != mask || o->complete != complete)
            kernel_error("thread %u (warp %u lane %u) is at %s (mask 0x%08x) while lane %u waits at %s (mask 0x%08x)", f->linear, warp, lane, what, mask,
                         l, o->what, o->mask);
        datas[l] = o->lane_data;
    }
    complete(datas, mask);
    w.warp_waiting[warp] &= ~mask;
    // Every lane of the mask was AtWarp (not counted): all become Runnable.
    Fiber* const* lanes = w.fibers.data() + base;
    for (unsigned l = 0; l < 32; ++l)
        if (mask >> l & 1) lanes[l]->state = State::Runnable;
    w.runnable += static_cast<unsigned>(__builtin_popcount(mask));
#if defined(LCPT_EMU_TSAN)
    __tsan_release(&w.sync_warp[warp]);
#endif
}

void grow_async(AsyncCopies* q) {
    const unsigned capacity = q->capacity ? 2 * q->capacity : 64;
    void* items = realloc(q->items, capacity * sizeof(AsyncCopy));
    if (!items) kernel_error("cannot hold %u cp.async copies of one thread", capacity);
    q->items = static_cast<AsyncCopy*>(items);
    q->capacity = capacity;
}

void kernel_error(const char* fmt, ...) {
    Worker& w = *this_fiber()->worker;
    char what[700];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(what, sizeof what, fmt, ap);
    va_end(ap);
    fail(w, "kernel %s block (%u,%u,%u): %s", w.kernel, w.block.block_idx.x, w.block.block_idx.y, w.block.block_idx.z, what);
    Fiber* f = this_fiber();
    if (f->state == State::AtWarp) w.warp_waiting[f->linear / 32] &= ~(1u << (f->linear & 31));
    set_state(w, f, State::Done);
    switch_out(w, f);
    abort();  // never resumed
}

extern "C" unsigned char lcpt_emu_poison_byte(void) {
    static const unsigned char byte = [] {
        const char* s = getenv("LLAMA_CPT_EMU_POISON");
        if (!s || !*s) return static_cast<unsigned char>(0xff);
        char* end = nullptr;
        const long v = strtol(s, &end, 0);
        if (*end != 0 || v < 0 || v > 255) {
            fprintf(stderr, "emulated CUDA: LLAMA_CPT_EMU_POISON=%s: expected a byte, 0..255 (e.g. 0x7f)\n", s);
            exit(2);
        }
        return static_cast<unsigned char>(v);
    }();
    return byte;
}

namespace {

// One launch, shared by the threads that run its blocks: each takes the next block index until
// none is left or a block failed. Blocks are independent, so which thread runs which block does
// not change the result.
struct GridJob {
    const char* name;
    BlockThreadFn fn;
    void* params;
    dim3 grid, block;
    unsigned dyn_smem;
    unsigned long long blocks;
    std::atomic<unsigned long long> next{0};
    std::atomic<bool> failed{false};
    std::atomic<unsigned long long> vector_accesses{0};
    std::mutex error_lock;
    unsigned long long error_block = ~0ull;  // the failed block with the lowest index reports
    int error_code = 0;
    char message[1024] = {};
};

void record_error(GridJob& job, unsigned long long b, int code, const char (&message)[1024]) {
    std::lock_guard<std::mutex> g(job.error_lock);
    if (b < job.error_block) {
        job.error_block = b;
        job.error_code = code;
        memcpy(job.message, message, sizeof job.message);
    }
    job.failed = true;
}

// Runs blocks of `job` on the calling OS thread until none is left.
void run_blocks(GridJob& job) {
    Worker& w = this_worker();
    w.failed = false;
    w.message[0] = 0;
#if defined(LCPT_EMU_TSAN)
    if (!w.tsan_sched) w.tsan_sched = __tsan_get_current_fiber();
#endif
    const unsigned nthreads = job.block.x * job.block.y * job.block.z;
    while (w.fibers.size() < nthreads) {
        Fiber* f = new_fiber(w);
        if (!f) {
            fail(w, "kernel %s: cannot map a %zu-byte fiber stack for thread %zu", job.name, STACK_BYTES, w.fibers.size());
            record_error(job, 0, CUDA_ERROR_LAUNCH_FAILED, w.message);
            return;
        }
        w.fibers.push_back(f);
    }
    w.nthreads = nthreads;
    w.kernel = job.name;
    w.fn = job.fn;
    w.params = job.params;
    for (unsigned t = 0; t < nthreads; ++t) {
        Fiber* f = w.fibers[t];
        f->linear = t;
        f->ts.thread_idx = uint3{t % job.block.x, (t / job.block.x) % job.block.y, t / (job.block.x * job.block.y)};
        f->ts.linear = t;
    }
    // Exactly the launch's size, so that a sanitizer build sees one byte past it; filled with the
    // poison (a NaN pattern by default) because shared memory starts with whatever the previous
    // block left.
    unsigned char* smem = static_cast<unsigned char*>(malloc(job.dyn_smem ? job.dyn_smem : 1));
    if (!smem) {
        fail(w, "kernel %s: cannot allocate %u bytes of dynamic shared memory", job.name, job.dyn_smem);
        record_error(job, 0, CUDA_ERROR_LAUNCH_FAILED, w.message);
        return;
    }
    memset(smem, lcpt_emu_poison_byte(), job.dyn_smem);
    w.block.block_dim = job.block;
    w.block.grid_dim = job.grid;
    w.block.dynamic_smem = smem;
    w.block.dynamic_smem_bytes = job.dyn_smem;
    w.block.vector_accesses = 0;
    const unsigned long long gx = job.grid.x, gxy = gx * job.grid.y;
    for (;;) {
        if (job.failed) break;
        const unsigned long long b = job.next.fetch_add(1);
        if (b >= job.blocks) break;
        w.block.block_idx = uint3{static_cast<unsigned>(b % gx), static_cast<unsigned>(b % gxy / gx), static_cast<unsigned>(b / gxy)};
        run_block(w);
        if (w.failed) {
            record_error(job, b, CUDA_ERROR_LAUNCH_FAILED, w.message);
            break;
        }
    }
    job.vector_accesses += w.block.vector_accesses;
    free(smem);
}

// Helper OS threads that run blocks of a large grid beside the launching thread:
// LLAMA_CPT_EMU_THREADS in all (default: the CPU count, at most 8; 1 runs every block on the
// launching thread). One launch at a time uses them; a concurrent launch (another stream) runs on
// its own thread alone. The TSan build runs blocks on the launching thread only: its
// happens-before edges are the ones the runtime annotates.
class Pool {
  public:
    static Pool& get() {
        static Pool* pool = new Pool;  // never destroyed: helpers may outlive static destructors
        return *pool;
    }
    unsigned size() const { return static_cast<unsigned>(helpers_) + 1; }
    // Runs job on the calling thread and, if the pool is free, on the helpers; returns when every
    // thread is done with it.
    void run(GridJob& job) {
        std::unique_lock<std::mutex> use(use_, std::try_to_lock);
        if (!use.owns_lock() || helpers_ == 0 || job.blocks < 2) {
            run_blocks(job);
            return;
        }
        const int n = static_cast<int>(std::min<unsigned long long>(helpers_, job.blocks - 1));
        {
            std::lock_guard<std::mutex> g(m_);
            job_ = &job;
            wanted_ = n;
            busy_ = n;
            ++generation_;
        }
        cv_.notify_all();
        run_blocks(job);
        std::unique_lock<std::mutex> g(m_);
        done_cv_.wait(g, [&] { return busy_ == 0; });
        job_ = nullptr;
    }

  private:
    Pool() {
#if defined(LCPT_EMU_TSAN)
        helpers_ = 0;
#else
        long n = sysconf(_SC_NPROCESSORS_ONLN);
        if (const char* e = getenv("LLAMA_CPT_EMU_THREADS")) n = atol(e);
        if (n < 1) n = 1;
        if (n > 8) n = 8;
        helpers_ = static_cast<int>(n) - 1;
        for (int i = 0; i < helpers_; ++i) std::thread([this] { helper(); }).detach();
#endif
    }
    void helper() {
        unsigned long long seen = 0;
        for (;;) {
            GridJob* job;
            {
                std::unique_lock<std::mutex> g(m_);
                cv_.wait(g, [&] { return generation_ != seen && wanted_ > 0; });
                seen = generation_;
                --wanted_;
                job = job_;
            }
            run_blocks(*job);
            std::lock_guard<std::mutex> g(m_);
            if (--busy_ == 0) done_cv_.notify_all();
        }
    }
    int helpers_ = 0;
    std::mutex use_, m_;
    std::condition_variable cv_, done_cv_;
    GridJob* job_ = nullptr;
    int wanted_ = 0, busy_ = 0;
    unsigned long long generation_ = 0;
};

}  // namespace

unsigned long long& vector_access_count() {
    static thread_local unsigned long long n = 0;  // the launching thread's
    return n;
}

int run_grid(const char* name, BlockThreadFn fn, void* params, dim3 grid, dim3 block, unsigned dyn_smem, char* err, size_t errlen) {
    const unsigned long long nthreads = static_cast<unsigned long long>(block.x) * block.y * block.z;
    if (nthreads == 0 || nthreads > 1024 || grid.x == 0 || grid.y == 0 || grid.z == 0) {
        if (err && errlen)
            snprintf(err, errlen, "kernel %s: launch of grid (%u,%u,%u) blocks of (%u,%u,%u) threads: empty grid or more than 1024 threads per block", name,
                     grid.x, grid.y, grid.z, block.x, block.y, block.z);
        return CUDA_ERROR_INVALID_VALUE;
    }
    GridJob job;
    job.name = name;
    job.fn = fn;
    job.params = params;
    job.grid = grid;
    job.block = block;
    job.dyn_smem = dyn_smem;
    job.blocks = static_cast<unsigned long long>(grid.x) * grid.y * grid.z;
    Pool::get().run(job);
    vector_access_count() += job.vector_accesses;
    if (!job.failed) return 0;
    if (err && errlen) snprintf(err, errlen, "%s", job.message);
    return job.error_code;
}

}  // namespace lcpt_emu

extern "C" void lcpt_emu_fiber_main(lcpt_emu::Fiber* f) {
    using namespace lcpt_emu;
    Worker& w = *f->worker;
#if defined(LCPT_EMU_ASAN)
    __sanitizer_finish_switch_fiber(nullptr, &w.sched_stack_bottom, &w.sched_stack_size);
#endif
#if defined(LCPT_EMU_TSAN)
    __tsan_acquire(&w.sync_block_start);
#endif
    w.fn(w.params);
    // The hardware would land them some time; a kernel that relies on that reads them never.
    if (f->async.count)
        kernel_error("thread %u returned with %u cp.async copies never waited for (cp.async.wait_group)", f->linear, f->async.count);
#if defined(LCPT_EMU_TSAN)
    __tsan_release(&w.sync_block_end);
#endif
    set_state(w, f, State::Done);
    w.warp_gone[f->linear / 32] |= 1u << (f->linear & 31);
    switch_out(w, f);
    abort();  // a returned fiber is reset before it runs again
}

// fno_host_shim.h: just enough of CUDA for a C++ host compiler to build kernels/*.cu as plain
// functions, and to run them as real thread blocks. Used by the CUDA driver stand-in
// (tests/host/fakecuda/), which runs the kernels behind cuLaunchKernel.
//
// fno_host_run runs a launch of `grid` blocks of `block` threads, the blocks one after
// another. Every CUDA thread is a fiber (a user-level context with its own stack) on the calling
// host thread, so a launch is deterministic and costs a few nanoseconds per thread switch.
// Within a block the warps take turns: one warp runs until each of its threads has reached the
// next __syncthreads or returned, then the next warp runs, and the barrier opens when every warp
// has had its turn. Even blocks run their warps in ascending order, odd blocks in descending
// order. That is a schedule a GPU may choose, and the one that exposes a missing barrier every
// time: a warp that reads what another warp writes (or overwrites what another still has to
// read) without a __syncthreads between them gets the wrong value, deterministically.
// The lanes of a warp run in lane order up to the next warp-level exchange (__shfl_down_sync),
// which waits for every running lane of the warp, as a converged warp does on a GPU. A thread
// that returns no longer counts at either barrier, as an exited GPU thread.
// A warp whose lanes wait at different barriers (some at __syncthreads, some at a shuffle) is
// reported and the process aborts: on a GPU that is undefined behaviour.
// f16 is GCC's _Float16 (round to nearest even); bf16 rounds to nearest even by its bits, as
// __float2bfloat16_rn does.
#pragma once
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include <vector>

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

#define __global__
#define __device__
#define __forceinline__ inline
#define __restrict__ __restrict
// One block runs at a time, so a function's statics are its block's shared memory. They live in
// one section, which every block starts with filled with NaN bytes (undefined contents on a GPU:
// a kernel that reads shared memory it has not written, or expects it to start at zero or to
// keep a previous block's values, reads NaN).
#define __shared__ static __attribute__((section("fno_shared")))
extern "C" char __start_fno_shared[] __attribute__((weak, visibility("hidden")));
extern "C" char __stop_fno_shared[] __attribute__((weak, visibility("hidden")));
inline void fno_fill_shared() {
    if (__start_fno_shared && __stop_fno_shared > __start_fno_shared) memset(__start_fno_shared, 0xff, (size_t)(__stop_fno_shared - __start_fno_shared));
}

struct fno_dim3 {
    unsigned x, y, z;
};
// The running fiber's coordinates: one fiber runs at a time, and the scheduler sets these before
// it resumes one. (Every resume is an opaque call, so the compiler reloads them after it.)
inline fno_dim3 threadIdx = {0, 0, 0}, blockIdx = {0, 0, 0}, blockDim = {1, 1, 1}, gridDim = {1, 1, 1};

#define FNO_HOST_MAX_BLOCK 1024
#define FNO_HOST_WARP 32
#define FNO_HOST_STACK (256 * 1024)

// ---------------------------------------------------------------------------------------------
// Context switching. On x86-64 a hand-written switch of the callee-saved registers (the SSE and
// x87 control words are the same in every fiber: kernels never change them); elsewhere ucontext.

#if defined(__x86_64__)
// fno_fiber_switch(&save_sp, load_sp): saves the caller's registers on its stack and its stack
// pointer in *save_sp, then continues the context whose stack pointer is load_sp.
// fno_fiber_start: where a new fiber's first switch returns to; calls r13(r12) and never returns.
__asm__(R"(
    .pushsection .text
    .weak fno_fiber_switch
    .type fno_fiber_switch,@function
fno_fiber_switch:
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
    .size fno_fiber_switch,.-fno_fiber_switch
    .weak fno_fiber_start
    .type fno_fiber_start,@function
fno_fiber_start:
    movq %r12, %rdi
    callq *%r13
    ud2
    .size fno_fiber_start,.-fno_fiber_start
    .popsection
)");
extern "C" void fno_fiber_switch(void** save_sp, void* load_sp);
extern "C" void fno_fiber_start();

struct FnoContext {
    void* sp = nullptr;
};
// Prepares `c` so that switching to it calls entry(arg) on the stack [stack, stack + size).
inline void fno_context_make(FnoContext& c, char* stack, size_t size, void (*entry)(void*), void* arg) {
    // The first switch pops six registers and returns into fno_fiber_start with the stack
    // 16-byte aligned, so that its call gives the entry the alignment the ABI promises.
    uint64_t* top = (uint64_t*)(((uintptr_t)(stack + size)) & ~(uintptr_t)15);
    uint64_t* sp = top - 8;
    sp[0] = 0;                           // unused (keeps the alignment)
    sp[1] = 0;                           // r15
    sp[2] = 0;                           // r14
    sp[3] = (uint64_t)entry;             // r13
    sp[4] = (uint64_t)arg;               // r12
    sp[5] = 0;                           // rbx
    sp[6] = 0;                           // rbp
    sp[7] = (uint64_t)&fno_fiber_start;  // return address
    c.sp = sp + 1;
}
inline void fno_context_switch(FnoContext& from, FnoContext& to) { fno_fiber_switch(&from.sp, to.sp); }
#else
struct FnoContext {
    ucontext_t uc;
};
inline void fno_context_make(FnoContext& c, char* stack, size_t size, void (*entry)(void*), void* arg) {
    getcontext(&c.uc);
    c.uc.uc_stack.ss_sp = stack;
    c.uc.uc_stack.ss_size = size;
    c.uc.uc_link = nullptr;
    makecontext(&c.uc, (void (*)())entry, 1, arg);  // one pointer argument: fine on LP64 glibc
}
inline void fno_context_switch(FnoContext& from, FnoContext& to) { swapcontext(&from.uc, &to.uc); }
#endif

// ---------------------------------------------------------------------------------------------
// The scheduler of one launch.

// When set (the stand-in driver's race check), called before and after each block of a launch.
inline void (*fno_block_begin)(unsigned block) = nullptr;
inline void (*fno_block_end)(unsigned block) = nullptr;

class FnoScheduler {
  public:
    enum State : uint8_t { Ready, AtWarp, AtBlock, Done };

    void launch(unsigned grid, unsigned block, void (*thread)(const void*), const void* ctx) {
        thread_ = thread;
        ctx_ = ctx;
        block_ = block;
        warps_ = block / FNO_HOST_WARP;
        gridDim = {grid, 1, 1};
        blockDim = {block, 1, 1};
        for (unsigned b = 0; b < grid; b++) {
            if (fno_block_begin) fno_block_begin(b);
            run_block(b);
            if (fno_block_end) fno_block_end(b);
        }
    }

    // Forgets a launch left in the middle (a fault jumped out of it): every stack goes back.
    void abandon() {
        for (unsigned t = 0; t < FNO_HOST_MAX_BLOCK; t++) {
            if (fibers_[t].stack) release_stack(t);
            fibers_[t].state = Done;
        }
    }

    // Called by the running fiber.
    void park(State s) {
        Fiber& f = fibers_[current_];
        f.state = s;
        fno_context_switch(f.ctx, main_);
    }
    unsigned current() const { return current_; }

  private:
    struct Fiber {
        FnoContext ctx;
        char* stack = nullptr;
        State state = Done;
    };

    static void entry(void* self) {
        FnoScheduler* s = (FnoScheduler*)self;
        s->thread_(s->ctx_);
        s->release_stack(s->current_);
        s->park(Done);
        abort();  // a finished fiber is never resumed
    }

    // Stacks are lent to threads when they first run and taken back when they return, so a
    // launch whose threads never wait needs only one.
    char* take_stack() {
        if (!free_.empty()) {
            char* s = free_.back();
            free_.pop_back();
            return s;
        }
        // A guard page below each stack turns an overflow into a crash, not a silent overwrite.
        const size_t page = 4096;
        char* m = (char*)mmap(nullptr, FNO_HOST_STACK + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (m == MAP_FAILED) {
            fprintf(stderr, "fno_host_shim: cannot map a fiber stack\n");
            abort();
        }
        mprotect(m, page, PROT_NONE);
        return m + page;
    }
    void release_stack(unsigned t) {
        free_.push_back(fibers_[t].stack);
        fibers_[t].stack = nullptr;
    }

    void resume(unsigned t) {
        Fiber& f = fibers_[t];
        current_ = t;
        threadIdx = {t, 0, 0};
        fno_context_switch(main_, f.ctx);
    }

    unsigned warp_at(unsigned b, unsigned pos) const { return b % 2 == 1 ? warps_ - 1 - pos : pos; }

    void run_block(unsigned b) {
        blockIdx = {b, 0, 0};
        fno_fill_shared();
        for (unsigned t = 0; t < block_; t++) {
            Fiber& f = fibers_[t];
            f.state = Ready;
            f.stack = nullptr;
        }
        for (;;) {
            for (unsigned pos = 0; pos < warps_; pos++) run_warp(warp_at(b, pos));
            // Every thread has returned or waits at __syncthreads: open the barrier.
            bool any = false;
            for (unsigned t = 0; t < block_; t++) {
                if (fibers_[t].state == AtBlock) {
                    fibers_[t].state = Ready;
                    any = true;
                }
            }
            if (!any) return;
        }
    }

    // One warp's turn: its lanes run in order until each waits at __syncthreads or has returned;
    // a warp-level exchange releases the lanes once every running one has reached it.
    void run_warp(unsigned w) {
        for (;;) {
            for (unsigned t = w * FNO_HOST_WARP; t < (w + 1) * FNO_HOST_WARP; t++) {
                Fiber& f = fibers_[t];
                if (f.state != Ready) continue;
                if (f.stack == nullptr) {
                    f.stack = take_stack();
                    fno_context_make(f.ctx, f.stack, FNO_HOST_STACK, &FnoScheduler::entry, this);
                }
                resume(t);
            }
            unsigned at_warp = 0, at_block = 0;
            for (unsigned t = w * FNO_HOST_WARP; t < (w + 1) * FNO_HOST_WARP; t++) {
                at_warp += fibers_[t].state == AtWarp;
                at_block += fibers_[t].state == AtBlock;
            }
            if (at_warp == 0) return;
            if (at_block > 0) {
                fprintf(stderr, "fno_host_shim: block %u warp %u: %u lanes wait at __syncthreads and %u at a warp shuffle (divergent barriers)\n",
                        blockIdx.x, w, at_block, at_warp);
                abort();
            }
            for (unsigned t = w * FNO_HOST_WARP; t < (w + 1) * FNO_HOST_WARP; t++) {
                if (fibers_[t].state == AtWarp) fibers_[t].state = Ready;
            }
        }
    }

    void (*thread_)(const void*) = nullptr;
    const void* ctx_ = nullptr;
    unsigned block_ = 0, warps_ = 0, current_ = 0;
    FnoContext main_;
    Fiber fibers_[FNO_HOST_MAX_BLOCK];
    std::vector<char*> free_;
};

inline FnoScheduler fno_scheduler;
inline float fno_shfl_slots[FNO_HOST_MAX_BLOCK];

inline void __syncthreads() { fno_scheduler.park(FnoScheduler::AtBlock); }

// Lane l gets lane l + o's value, or its own where l + o is past the warp, as on a GPU.
inline float __shfl_down_sync(unsigned, float v, int o) {
    const unsigned t = fno_scheduler.current(), lane = t % FNO_HOST_WARP;
    fno_shfl_slots[t] = v;
    fno_scheduler.park(FnoScheduler::AtWarp);
    const float r = lane + o < FNO_HOST_WARP ? fno_shfl_slots[t + o] : v;
    fno_scheduler.park(FnoScheduler::AtWarp);  // every lane has read before the slots are written again
    return r;
}

// Runs `thread(ctx)` as every thread of `grid` blocks of `block` threads (block a multiple of 32,
// at most 1024), block after block, on the calling thread. One launch at a time: the scheduler
// and shared memory are global, so the caller serialises launches (the stand-in's device lock).
inline void fno_host_run(unsigned grid, unsigned block, void (*thread)(const void*), const void* ctx) {
    if (grid == 0 || block == 0 || block % FNO_HOST_WARP != 0 || block > FNO_HOST_MAX_BLOCK) {
        fprintf(stderr, "fno_host_run: bad launch geometry: %u blocks of %u threads\n", grid, block);
        abort();
    }
    fno_scheduler.launch(grid, block, thread, ctx);
}

struct float2 {
    float x, y;
};
inline float2 make_float2(float x, float y) { return float2{x, y}; }

typedef _Float16 __half;
inline __half __float2half_rn(float x) { return (_Float16)x; }
inline float __half2float(__half h) { return (float)h; }

struct __nv_bfloat16 {
    uint16_t bits;
};
inline __nv_bfloat16 __float2bfloat16_rn(float x) {
    uint32_t u;
    memcpy(&u, &x, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return __nv_bfloat16{(uint16_t)((u >> 16) | 0x40u)};  // NaN stays NaN
    u += 0x7fffu + ((u >> 16) & 1u);
    return __nv_bfloat16{(uint16_t)(u >> 16)};
}
inline float __bfloat162float(__nv_bfloat16 b) {
    uint32_t u = (uint32_t)b.bits << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }

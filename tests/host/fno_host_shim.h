// fno_host_shim.h: just enough of CUDA for a C++ host compiler to build kernels/*.cu as plain
// functions (tests/kernels_on_the_host.rs), and to run them as real thread blocks.
//
// fno_host_launch runs a launch of `grid` blocks of `block` threads, the blocks one after
// another, each CUDA thread a host thread (threadIdx / blockIdx / blockDim / gridDim are
// thread-local). Within a block the warps take turns: one warp runs until each of its threads
// has reached the next __syncthreads or returned, then the next warp runs, and the barrier opens
// when every warp has had its turn. Even blocks run their warps in ascending order, odd blocks in
// descending order. That is a schedule a GPU may choose, and the one that exposes a missing
// barrier every time: a warp that reads what another warp writes (or overwrites what another
// still has to read) without a __syncthreads between them gets the wrong value, deterministically.
// The 32 lanes of a warp run together; __shfl_down_sync exchanges values through a slot per
// thread between two barriers of the warp. A thread that returns no longer counts at either
// barrier, as an exited GPU thread.
// f16 is GCC's _Float16 (round to nearest even); bf16 rounds to nearest even by its bits, as
// __float2bfloat16_rn does.
#pragma once
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <atomic>
#include <condition_variable>
#include <mutex>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __forceinline__ inline
#define __restrict__ __restrict
// One block runs at a time, so a function's statics are its block's shared memory.
#define __shared__ static

struct fno_dim3 {
    unsigned x, y, z;
};
inline thread_local fno_dim3 threadIdx = {0, 0, 0}, blockIdx = {0, 0, 0}, blockDim = {1, 1, 1}, gridDim = {1, 1, 1};

#define FNO_HOST_MAX_BLOCK 1024
#define FNO_HOST_MAX_WARPS (FNO_HOST_MAX_BLOCK / 32)

// A barrier of the lanes of one warp that are still running. Only the warp whose turn it is
// runs, so its waiting lanes spin (yielding) instead of sleeping: a warp shuffle costs a few
// yields rather than 32 wake-ups.
class FnoWarpBarrier {
  public:
    void reset(unsigned lanes) {
        std::lock_guard<std::mutex> g(m_);
        active_ = lanes;
        arrived_ = 0;
    }
    void sync() {
        unsigned gen;
        {
            std::lock_guard<std::mutex> g(m_);
            gen = gen_.load();
            if (++arrived_ == active_) {
                release();
                return;
            }
        }
        while (gen_.load() == gen) std::this_thread::yield();
    }
    void leave() {
        std::lock_guard<std::mutex> g(m_);
        --active_;
        if (arrived_ > 0 && arrived_ == active_) release();
    }

  private:
    void release() {  // with m_ held
        arrived_ = 0;
        gen_.fetch_add(1);
    }
    std::mutex m_;
    unsigned active_ = 0, arrived_ = 0;
    std::atomic<unsigned> gen_{0};
};

inline FnoWarpBarrier fno_warp_barriers[FNO_HOST_MAX_WARPS];

// The blocks of a launch, one after another, and the warps of a block taking turns between its
// __syncthreads (see the top of this file).
class FnoScheduler {
  public:
    // A launch of `grid` blocks of `warps` warps: block 0 starts.
    void launch(unsigned grid, unsigned warps) {
        std::lock_guard<std::mutex> g(m_);
        grid_ = grid;
        warps_ = warps;
        block_ = 0;
        start_block();
    }
    // Warp w's thread waits for block b and its warp's first turn there (false: the launch is
    // over).
    bool enter(unsigned w, unsigned b) {
        std::unique_lock<std::mutex> l(m_);
        cv_[w].wait(l, [&] { return block_ >= grid_ || (block_ == b && current_ == (int)w); });
        return block_ < grid_;
    }
    // __syncthreads: warp w's thread parks until the barrier opens and its warp's turn comes.
    void sync(unsigned w) {
        std::unique_lock<std::mutex> l(m_);
        const unsigned phase = phase_;
        parked_[w]++;
        settle(w);
        cv_[w].wait(l, [&] { return phase_ != phase && current_ == (int)w; });
    }
    // Warp w's thread has returned from the kernel.
    void leave(unsigned w) {
        std::lock_guard<std::mutex> g(m_);
        lanes_[w]--;
        running_--;
        settle(w);
    }

  private:
    unsigned warp_at(unsigned pos) const { return block_ % 2 == 1 ? warps_ - 1 - pos : pos; }
    void start_block() {
        running_ = 32 * warps_;
        for (unsigned w = 0; w < warps_; w++) {
            lanes_[w] = 32;
            fno_warp_barriers[w].reset(32);
        }
        open_phase();
    }
    // Every warp parked at the barrier (or gone): open it and give the first warp its turn.
    void open_phase() {
        phase_++;
        for (unsigned w = 0; w < warps_; w++) parked_[w] = 0;
        pos_ = 0;
        next_turn();
    }
    // The turn goes to the next warp in order with threads still running, if any.
    void next_turn() {
        current_ = -1;
        for (; pos_ < warps_; pos_++) {
            const unsigned w = warp_at(pos_);
            if (lanes_[w] > 0) {
                current_ = (int)w;
                cv_[w].notify_all();
                return;
            }
        }
    }
    // After a thread of warp w parked or returned: when all of w's running threads are parked,
    // w's turn ends; after the last warp's turn the barrier opens, or, when every thread has
    // returned, the next block starts.
    void settle(unsigned w) {
        if (current_ != (int)w || parked_[w] < lanes_[w]) return;
        pos_++;
        next_turn();
        if (current_ >= 0) return;
        if (running_ > 0) {
            open_phase();
        } else if (++block_ < grid_) {
            start_block();
        } else {
            for (unsigned v = 0; v < warps_; v++) cv_[v].notify_all();
        }
    }
    std::mutex m_;
    std::condition_variable cv_[FNO_HOST_MAX_WARPS];
    unsigned lanes_[FNO_HOST_MAX_WARPS] = {}, parked_[FNO_HOST_MAX_WARPS] = {};
    unsigned grid_ = 0, warps_ = 0, block_ = 0, running_ = 0, pos_ = 0, phase_ = 0;
    int current_ = -1;
};

inline FnoScheduler fno_scheduler;
inline float fno_shfl_slots[FNO_HOST_MAX_BLOCK];

inline void __syncthreads() { fno_scheduler.sync(threadIdx.x / 32); }

// Lane l gets lane l + o's value, or its own where l + o is past the warp, as on a GPU.
inline float __shfl_down_sync(unsigned, float v, int o) {
    const unsigned t = threadIdx.x, lane = t % 32;
    FnoWarpBarrier& warp = fno_warp_barriers[t / 32];
    fno_shfl_slots[t] = v;
    warp.sync();
    const float r = lane + o < 32 ? fno_shfl_slots[t + o] : v;
    warp.sync();  // every lane has read before the slots are written again
    return r;
}

// Runs `thread(ctx)` as every thread of `grid` blocks of `block` threads (block a multiple of 32,
// at most 1024), block after block. Launches run one at a time, as on one stream (the scheduler,
// the barriers and shared memory are global).
extern "C" void fno_host_launch(unsigned grid, unsigned block, void (*thread)(const void*), const void* ctx) {
    if (grid == 0 || block == 0 || block % 32 != 0 || block > FNO_HOST_MAX_BLOCK) abort();
    static std::mutex one_launch;
    std::lock_guard<std::mutex> serial(one_launch);
    fno_scheduler.launch(grid, block / 32);
    std::vector<std::thread> threads;
    for (unsigned t = 0; t < block; t++) {
        threads.emplace_back([=] {
            const unsigned warp = t / 32;
            threadIdx = {t, 0, 0};
            blockDim = {block, 1, 1};
            gridDim = {grid, 1, 1};
            for (unsigned b = 0; fno_scheduler.enter(warp, b); b++) {
                blockIdx = {b, 0, 0};
                thread(ctx);
                fno_warp_barriers[warp].leave();
                fno_scheduler.leave(warp);
            }
        });
    }
    for (auto& th : threads) th.join();
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

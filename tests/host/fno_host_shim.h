// fno_host_shim.h: just enough of CUDA for a C++ host compiler to build kernels/*.cu as plain
// functions (tests/kernels_on_the_host.rs). Every kernel runs with one thread per block: the test
// sets blockIdx / gridDim through fno_host_block() and calls the kernel once per block, so a
// grid-stride loop with gridDim = blockDim = 1 visits every element, and block_sum (common.cuh's
// FNO_HOST branch) is the identity. f16 is GCC's _Float16 (round to nearest even); bf16 rounds to
// nearest even by its bits, as __float2bfloat16_rn does.
#pragma once
#include <math.h>
#include <stdint.h>
#include <string.h>

#define FNO_HOST 1
#define __global__
#define __device__
#define __forceinline__ inline
#define __restrict__ __restrict
#define __shared__ static

struct fno_dim3 {
    unsigned x, y, z;
};
inline thread_local fno_dim3 threadIdx = {0, 0, 0}, blockIdx = {0, 0, 0}, blockDim = {1, 1, 1}, gridDim = {1, 1, 1};

extern "C" void fno_host_block(unsigned block, unsigned grid) {
    blockIdx.x = block;
    gridDim.x = grid;
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

inline void __syncthreads() {}
inline float __shfl_down_sync(unsigned, float v, int) { return v; }
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }

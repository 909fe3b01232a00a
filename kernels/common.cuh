// common.cuh: what every fnokern kernel shares.
//
// - Element types: f32 (float), f16 (__half), bf16 (__nv_bfloat16); arithmetic is always fp32
//   (to_f32 / from_f32 round to nearest even).
// - block_sum: a deterministic block-wide fp32 sum (warp shuffles, then one warp over the warp
//   sums). The order of additions depends only on blockDim, never on timing, so a kernel that
//   reduces with it gives the same bits on every run.
// - tests/host/ compiles these files with a C++ host compiler and runs each block as host threads
//   (barriers and warp shuffles emulated), to check them against the CPU backend without a GPU.
// - Kernels take pointers and either plain scalars or one struct of params.cuh by value;
//   launchers (src/backend/<family>/cuda.rs) check every shape and pointer before launching, and
//   kernels keep only a bounds guard.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include "params.cuh"

#define FNO_WARP 32

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_f32(float x);
template <> __device__ __forceinline__ float from_f32<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_f32<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// Sum of v over the block; every thread gets the result. blockDim.x must be a multiple of 32 and
// at most 1024. Uses 32 floats of shared memory.
__device__ __forceinline__ float block_sum(float v) {
    __shared__ float warp_sums[FNO_WARP];
    for (int o = FNO_WARP / 2; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
    const int lane = threadIdx.x % FNO_WARP, warp = threadIdx.x / FNO_WARP;
    __syncthreads();  // warp_sums may still be read by a previous call
    if (lane == 0) warp_sums[warp] = v;
    __syncthreads();
    const int warps = blockDim.x / FNO_WARP;
    float s = (threadIdx.x < warps) ? warp_sums[threadIdx.x] : 0.0f;
    if (warp == 0) {
        for (int o = FNO_WARP / 2; o > 0; o >>= 1) s += __shfl_down_sync(0xffffffffu, s, o);
        if (lane == 0) warp_sums[0] = s;
    }
    __syncthreads();
    return warp_sums[0];
}

// GELU, the exact form x Phi(x) = 0.5 x (1 + erf(x / sqrt 2)), and its derivative
// Phi(x) + x phi(x): elementwise.cu's unary ops, and the activations conv.cu and binary_f32 write
// beside their outputs.
__device__ __forceinline__ float gelu(float v) { return 0.5f * v * (1.f + erff(v * 0.70710678118654752f)); }

__device__ __forceinline__ float gelu_grad(float v) {
    const float cdf = 0.5f * (1.f + erff(v * 0.70710678118654752f));
    const float pdf = 0.39894228040143268f * expf(-0.5f * v * v);
    return cdf + v * pdf;
}

// The spectrum glue of fft.cu, which spectral.cu's mode mix also applies to what it writes for
// cuFFT's C2R. c_ky: 1 on the DC column and, for even W, the Nyquist column; 2 elsewhere.
__device__ __forceinline__ float hermitian_weight(int ky, int W) { return (ky == 0 || (W % 2 == 0 && ky == W / 2)) ? 1.f : 2.f; }

// Element (kx, ky) of a half spectrum made ready for a C2R transform that then computes the CPU's
// irfft2 (g.adjoint = 0) or the adjoint of rfft2 (1): times k_ky = g.norm (or g.norm / c_ky), and
// on the DC and Nyquist columns the Hermitian part along kx, (v + conj(m)) / 2, where m is the
// element at ((H - kx) % H, ky) (m is not read elsewhere).
__device__ __forceinline__ float2 irfft_ready(float2 v, float2 m, int ky, const SpectrumGeom& g) {
    const float w = hermitian_weight(ky, g.w);
    const float k = g.adjoint ? g.norm / w : g.norm;
    if (w == 1.f) v = make_float2(0.5f * (v.x + m.x), 0.5f * (v.y - m.y));
    return make_float2(v.x * k, v.y * k);
}

// Grid-stride loop over [0, n).
#define FNO_FOR(i, n) for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < (int64_t)(n); i += (int64_t)gridDim.x * blockDim.x)

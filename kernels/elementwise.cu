// elementwise.cu: the element-wise glue, one thread per element (grid-stride).
//
//   gelu_fwd_f32:   y = x Phi(x) = 0.5 x (1 + erf(x / sqrt 2))           (the exact form)
//   gelu_bwd_f32:   dx = dy (Phi(x) + x phi(x)),  phi(x) = exp(-x^2 / 2) / sqrt(2 pi)
//   round_f16_f32 / round_bf16_f32: y = x rounded to the nearest f16 / bf16 (ties to even; beyond
//                   f16's 65504 it is inf), stored as f32 (the CPU's emulation of low precision)
//   add_f32:        y = a + b;   affine_f32: y = alpha x + beta
//   cast_*:         f32 <-> f16 / bf16 storage conversions (round to nearest even)
// Shapes: all operands [n]. CPU reference: unary_f / unary_df and map1 / map2 in
//   src/backend/cpu/mod.rs.
#include "common.cuh"

extern "C" __global__ void gelu_fwd_f32(const float* __restrict__ x, float* __restrict__ y, int64_t n) {
    FNO_FOR(i, n) {
        const float v = x[i];
        y[i] = 0.5f * v * (1.f + erff(v * 0.70710678118654752f));
    }
}

extern "C" __global__ void gelu_bwd_f32(const float* __restrict__ x, const float* __restrict__ dy, float* __restrict__ dx, int64_t n) {
    FNO_FOR(i, n) {
        const float v = x[i];
        const float cdf = 0.5f * (1.f + erff(v * 0.70710678118654752f));
        const float pdf = 0.39894228040143268f * expf(-0.5f * v * v);
        dx[i] = dy[i] * (cdf + v * pdf);
    }
}

extern "C" __global__ void round_f16_f32(const float* __restrict__ x, float* __restrict__ y, int64_t n) {
    FNO_FOR(i, n) y[i] = __half2float(__float2half_rn(x[i]));
}

extern "C" __global__ void round_bf16_f32(const float* __restrict__ x, float* __restrict__ y, int64_t n) {
    FNO_FOR(i, n) y[i] = __bfloat162float(__float2bfloat16_rn(x[i]));
}

extern "C" __global__ void add_f32(const float* __restrict__ a, const float* __restrict__ b, float* __restrict__ y, int64_t n) {
    FNO_FOR(i, n) y[i] = a[i] + b[i];
}

extern "C" __global__ void affine_f32(const float* __restrict__ x, float* __restrict__ y, int64_t n, float alpha, float beta) {
    FNO_FOR(i, n) y[i] = alpha * x[i] + beta;
}

extern "C" __global__ void cast_f32_f16(const float* __restrict__ x, __half* __restrict__ y, int64_t n) {
    FNO_FOR(i, n) y[i] = __float2half_rn(x[i]);
}

extern "C" __global__ void cast_f16_f32(const __half* __restrict__ x, float* __restrict__ y, int64_t n) {
    FNO_FOR(i, n) y[i] = __half2float(x[i]);
}

extern "C" __global__ void cast_f32_bf16(const float* __restrict__ x, __nv_bfloat16* __restrict__ y, int64_t n) {
    FNO_FOR(i, n) y[i] = __float2bfloat16_rn(x[i]);
}

extern "C" __global__ void cast_bf16_f32(const __nv_bfloat16* __restrict__ x, float* __restrict__ y, int64_t n) {
    FNO_FOR(i, n) y[i] = __bfloat162float(x[i]);
}

// elementwise.cu: the element-wise glue, one thread per element (grid-stride).
//
//   unary_f32(op):     y = f(x);   unary_bwd_f32(op): dx = dy f'(x), for the ops of
//                      backend::Unary in its order: 0 GELU, 1 |x|, 2 sqrt, 3 x^2, 4 ln x,
//                      5 wrap to [-pi, pi), 6 round to f16, 7 round to bf16. GELU is the exact
//                      form x Phi(x) = 0.5 x (1 + erf(x / sqrt 2)), GELU' = Phi(x) + x phi(x);
//                      |x|' = sign(x) with 0 at 0; rounding and wrapping pass gradients through.
//                      Rounding goes to the nearest f16 / bf16 (ties to even; beyond f16's 65504
//                      it is inf), stored as f32 (the emulation of low precision, as on the CPU).
//   binary_f32(op):  y = a + b, a - b, a * b (op 0, 1, 2); when `act` is not null also
//                    act = GELU(y) (a block's sum and its activation in one pass)
//   add_assign_f32:  acc += x;   affine_f32: y = alpha x + beta;   scale_in_place_f32: x *= s
//   scale_by_f32:    y = x * s[0] (or x / s[0]), s a one-element device buffer
//   fill_scalar_f32: y = g[0] everywhere;   clamp_f32: x = min(max(x, -c), c) in place
// Shapes: all operands [n]. CPU reference: unary_f / unary_df, map1 / map2 and the Backend impl
//   in src/backend/cpu/mod.rs.
#include "common.cuh"

#define FNO_TWO_PI 6.283185307179586f

__device__ __forceinline__ float unary_value(int op, float v) {
    switch (op) {
        case 0: return gelu(v);
        case 1: return fabsf(v);
        case 2: return sqrtf(v);
        case 3: return v * v;
        case 4: return logf(v);
        case 5: return v - FNO_TWO_PI * roundf(v / FNO_TWO_PI);
        case 6: return __half2float(__float2half_rn(v));
        default: return __bfloat162float(__float2bfloat16_rn(v));
    }
}

__device__ __forceinline__ float unary_grad(int op, float v) {
    switch (op) {
        case 0: return gelu_grad(v);
        case 1: return v > 0.f ? 1.f : (v < 0.f ? -1.f : 0.f);
        case 2: return 0.5f / sqrtf(v);
        case 3: return 2.f * v;
        case 4: return 1.f / v;
        default: return 1.f;
    }
}

extern "C" __global__ void unary_f32(const float* __restrict__ x, float* __restrict__ y, int64_t n, int op) {
    FNO_FOR(i, n) y[i] = unary_value(op, x[i]);
}

extern "C" __global__ void unary_bwd_f32(const float* __restrict__ x, const float* __restrict__ dy, float* __restrict__ dx, int64_t n, int op) {
    FNO_FOR(i, n) dx[i] = dy[i] * unary_grad(op, x[i]);
}

extern "C" __global__ void binary_f32(const float* __restrict__ a, const float* __restrict__ b, float* __restrict__ y, float* __restrict__ act, int64_t n, int op) {
    FNO_FOR(i, n) {
        const float v = op == 0 ? a[i] + b[i] : (op == 1 ? a[i] - b[i] : a[i] * b[i]);
        y[i] = v;
        if (act) act[i] = gelu(v);
    }
}

extern "C" __global__ void add_assign_f32(float* __restrict__ acc, const float* __restrict__ x, int64_t n) {
    FNO_FOR(i, n) acc[i] += x[i];
}

extern "C" __global__ void affine_f32(const float* __restrict__ x, float* __restrict__ y, int64_t n, float alpha, float beta) {
    FNO_FOR(i, n) y[i] = alpha * x[i] + beta;
}

extern "C" __global__ void scale_in_place_f32(float* __restrict__ x, int64_t n, float s) {
    FNO_FOR(i, n) x[i] *= s;
}

extern "C" __global__ void scale_by_f32(const float* __restrict__ x, const float* __restrict__ s, float* __restrict__ y, int64_t n, int divide) {
    const float k = s[0];
    FNO_FOR(i, n) y[i] = divide ? x[i] / k : x[i] * k;
}

extern "C" __global__ void fill_scalar_f32(const float* __restrict__ g, float* __restrict__ y, int64_t n) {
    const float v = g[0];
    FNO_FOR(i, n) y[i] = v;
}

extern "C" __global__ void clamp_f32(float* __restrict__ x, int64_t n, float c) {
    FNO_FOR(i, n) x[i] = fminf(fmaxf(x[i], -c), c);
}


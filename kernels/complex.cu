// complex.cu: interleaved complex (re, im) f32 glue for the physics model.
//
//   complex_mul_f32:       y = z * p, or z * conj(p) (conj = 1); p [H W] broadcast over the planes
//   complex_abs_f32:       y = |z| = hypot(re, im)
//   complex_abs_bwd_f32:   dz = dy (re, im) / |z|, 0 at z = 0
//   complex_angle_f32:     y = atan2(im, re)
//   complex_angle_bwd_f32: dz = dy (-im, re) / |z|^2, 0 at z = 0
// Shapes: z, y, dz [P, H, W, 2] (P planes), p [H, W, 2], |z| outputs [P, H, W].
// Geometry: one thread per complex element (grid-stride).
// CPU reference: src/backend/complex/cpu.rs.
#include "common.cuh"

extern "C" __global__ void complex_mul_f32(const float2* __restrict__ z, const float2* __restrict__ p, float2* __restrict__ y, int64_t n, int64_t hw, int conj) {
    FNO_FOR(i, n) {
        const float2 a = z[i];
        float2 b = p[i % hw];
        if (conj) b.y = -b.y;
        y[i] = make_float2(a.x * b.x - a.y * b.y, a.x * b.y + a.y * b.x);
    }
}

extern "C" __global__ void complex_abs_f32(const float2* __restrict__ z, float* __restrict__ y, int64_t n) {
    FNO_FOR(i, n) y[i] = hypotf(z[i].x, z[i].y);
}

extern "C" __global__ void complex_abs_bwd_f32(const float2* __restrict__ z, const float* __restrict__ dy, float2* __restrict__ dz, int64_t n) {
    FNO_FOR(i, n) {
        const float2 v = z[i];
        const float m = hypotf(v.x, v.y);
        dz[i] = m > 0.f ? make_float2(dy[i] * v.x / m, dy[i] * v.y / m) : make_float2(0.f, 0.f);
    }
}

extern "C" __global__ void complex_angle_f32(const float2* __restrict__ z, float* __restrict__ y, int64_t n) {
    FNO_FOR(i, n) y[i] = atan2f(z[i].y, z[i].x);
}

extern "C" __global__ void complex_angle_bwd_f32(const float2* __restrict__ z, const float* __restrict__ dy, float2* __restrict__ dz, int64_t n) {
    FNO_FOR(i, n) {
        const float2 v = z[i];
        const float m2 = v.x * v.x + v.y * v.y;
        dz[i] = m2 > 0.f ? make_float2(-dy[i] * v.y / m2, dy[i] * v.x / m2) : make_float2(0.f, 0.f);
    }
}

// complex.cu: interleaved complex (re, im) f32 glue for the physics model and the real FFTs.
//
//   complex_mul_f32:       y = z * p, or z * conj(p) (conj = 1); p [H W] broadcast over the planes
//   complex_abs_f32:       y = |z| = hypot(re, im)
//   complex_abs_bwd_f32:   dz = dy (re, im) / |z|, 0 at z = 0
//   complex_angle_f32:     y = atan2(im, re)
//   complex_angle_bwd_f32: dz = dy (-im, re) / |z|^2, 0 at z = 0
//   spectrum_col_scale_f32: z[p, kx, ky] *= c_ky / (H W) in place, c = 1 on the DC column (and the
//                          Nyquist column when W is even), 2 elsewhere: with an R2C transform
//                          before it, the adjoint of irfft2
//   irfft_prep_f32:        out = z with every column times k_ky, then the DC (and Nyquist) columns
//                          replaced by their Hermitian part along kx,
//                          out[kx] = (z[kx] + conj(z[(H - kx) % H])) / 2, so that a C2R transform
//                          of out is exactly the CPU's irfft2 (column inverse, imaginary parts of
//                          the DC/Nyquist bins dropped, row C2R). k_ky = norm, or norm / c_ky for
//                          the adjoint of rfft2 (adjoint = 1).
// Shapes: z, y, dz [P, H, W, 2] (P planes), p [H, W, 2], |z| outputs [P, H, W]; spectra
//   [P, H, Wh, 2] with Wh = W / 2 + 1.
// Geometry: one thread per complex element (grid-stride).
// CPU reference: src/backend/cpu/complex.rs and src/backend/cpu/spectral.rs (rfft2 / irfft2).
#include "common.cuh"

extern "C" __global__ void complex_mul_f32(const float2* __restrict__ z, const float2* __restrict__ p, float2* __restrict__ y, int64_t n, int64_t HW, int conj) {
    FNO_FOR(i, n) {
        const float2 a = z[i];
        float2 b = p[i % HW];
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

// c_ky: 1 on the DC column and, for even W, the Nyquist column; 2 elsewhere.
__device__ __forceinline__ float hermitian_weight(int ky, int W) { return (ky == 0 || (W % 2 == 0 && ky == W / 2)) ? 1.f : 2.f; }

extern "C" __global__ void spectrum_col_scale_f32(float2* __restrict__ z, int64_t planes, int H, int Wh, int W) {
    const int64_t n = planes * H * Wh;
    const float hw = (float)H * (float)W;
    FNO_FOR(i, n) {
        const float k = hermitian_weight(i % Wh, W) / hw;
        z[i].x *= k;
        z[i].y *= k;
    }
}

extern "C" __global__ void irfft_prep_f32(const float2* __restrict__ z, float2* __restrict__ out, int64_t planes, int H, int Wh, int W, int adjoint, float norm) {
    const int64_t n = planes * H * Wh;
    FNO_FOR(i, n) {
        const int ky = i % Wh;
        const int64_t t = i / Wh;
        const int kx = t % H;
        const int64_t p = t / H;
        const float w = hermitian_weight(ky, W);
        const float k = adjoint ? norm / w : norm;
        float2 v = z[i];
        if (w == 1.f) {  // DC or Nyquist column: its Hermitian part along kx
            const float2 m = z[(p * H + (H - kx) % H) * Wh + ky];
            v = make_float2(0.5f * (v.x + m.x), 0.5f * (v.y - m.y));
        }
        out[i] = make_float2(v.x * k, v.y * k);
    }
}

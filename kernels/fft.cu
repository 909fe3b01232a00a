// fft.cu: the spectrum glue around cuFFT's transforms that makes them compute exactly the CPU's
// rfft2 / irfft2 and their adjoints (src/backend/fft/).
//
//   spectrum_col_scale_f32: z[p, kx, ky] *= c_ky / (H W) in place, c = 1 on the DC column (and the
//                          Nyquist column when W is even), 2 elsewhere: with an R2C transform
//                          before it, the adjoint of irfft2
//   irfft_prep_f32:        out = z with every column times k_ky, then the DC (and Nyquist) columns
//                          replaced by their Hermitian part along kx,
//                          out[kx] = (z[kx] + conj(z[(H - kx) % H])) / 2, so that a C2R transform
//                          of out is exactly the CPU's irfft2 (column inverse, imaginary parts of
//                          the DC/Nyquist bins dropped, row C2R). k_ky = norm, or norm / c_ky for
//                          the adjoint of rfft2 (adjoint = 1).
// Shapes: spectra [P, H, Wh, 2] with Wh = W / 2 + 1 (SpectrumGeom g of params.cuh).
// Geometry: one thread per complex element (grid-stride).
// CPU reference: src/backend/fft/cpu.rs.
#include "common.cuh"


extern "C" __global__ void spectrum_col_scale_f32(float2* __restrict__ z, SpectrumGeom g) {
    const int64_t n = g.planes * g.h * g.wh;
    const float hw = (float)g.h * (float)g.w;
    FNO_FOR(i, n) {
        const float k = hermitian_weight(i % g.wh, g.w) / hw;
        z[i].x *= k;
        z[i].y *= k;
    }
}

extern "C" __global__ void irfft_prep_f32(const float2* __restrict__ z, float2* __restrict__ out, SpectrumGeom g) {
    const int64_t n = g.planes * g.h * g.wh;
    FNO_FOR(i, n) {
        const int ky = i % g.wh;
        const int64_t t = i / g.wh;
        const int kx = t % g.h;
        const int64_t p = t / g.h;
        const float2 v = z[i];
        out[i] = irfft_ready(v, hermitian_weight(ky, g.w) == 1.f ? z[(p * g.h + (g.h - kx) % g.h) * g.wh + ky] : v, ky, g);
    }
}

// spectral.cu: the spectral mode multiply of the Fourier layer, forward and both backward products.
//
//   forward:   Y[b, o, rows[r], c]  = sum_i  X[b, i, rows[r], c] * W[i, o, r, c]
//   dX:        dX[b, i, rows[r], c] = sum_o  dY[b, o, rows[r], c] * conj(W[i, o, r, c])
//   dW:        dW[i, o, r, c]       = sum_b  conj(X[b, i, rows[r], c]) * dY[b, o, rows[r], c]
// for r < R kept rows and c < My kept columns; kept row r is rows[r] = r for r < pos, else
// H - R + r (the non-negative frequencies, then the negative ones). Every other mode of Y and dX is
// zero: their kernels run over the whole output and write those zeros too, so the output needs no
// clearing first. Complex values are float2 (re, im).
//
// Shapes (SpectralGeom g of params.cuh): X, dX [B, Ci, H, Wh] complex (the half spectrum of
//         rfft2), Y, dY [B, Co, H, Wh], W, dW [Ci, Co, R, My].
// Geometry: one thread per output element (Y, dX: every mode of the half spectrum; dW: every kept
//         mode), grid-stride; the innermost index is the column c, so a warp reads consecutive
//         columns of X, W and dY (coalesced). The reduction over i, o or b
//         runs in order inside the thread: results do not depend on the launch.
// With `ready` not null, the forward and dX also write their result made ready for cuFFT's C2R
// (fft.cu's irfft_prep_f32 applied in the same pass, SpectrumGeom sg: the forward's irfft2, dX's
// adjoint of rfft2), so that the spectral convolution runs no separate glue launch.
// CPU reference: src/backend/spectral/cpu.rs.
#include "common.cuh"

__device__ __forceinline__ float2 cmul(float2 a, float2 b) { return make_float2(a.x * b.x - a.y * b.y, a.x * b.y + a.y * b.x); }
// Output mode t of a grid [outer, mid, R, My]: its column c, kept row r, the indices along the mid
// and outer axes, and `at`, the mode's offset inside an H x Wh plane.
struct Mode {
    int c, r, mid, outer;
    int64_t at;
};
__device__ __forceinline__ Mode mode_of(int64_t t, int mid_n, const SpectralGeom& g) {
    Mode m;
    m.c = t % g.my;
    m.r = (t / g.my) % g.r;
    m.mid = (t / ((int64_t)g.my * g.r)) % mid_n;
    m.outer = t / ((int64_t)g.my * g.r * mid_n);
    const int row = m.r < g.pos ? m.r : g.h - g.r + m.r;
    m.at = (int64_t)row * g.wh + m.c;
    return m;
}

__device__ __forceinline__ float2 cmul_conj_b(float2 a, float2 b) { return make_float2(a.x * b.x + a.y * b.y, a.y * b.x - a.x * b.y); }

// Element t of a spectrum [outer, mid, H, Wh]: the indices along the outer and mid axes, its
// offset `at` inside the H x Wh plane, and its kept row r and column c (r = -1: not a kept mode).
struct Elem {
    int r, c, mid, outer;
    int64_t at;
};
__device__ __forceinline__ Elem elem_of(int64_t t, int mid_n, const SpectralGeom& g) {
    Elem e;
    e.c = t % g.wh;
    const int row = (t / g.wh) % g.h;
    e.mid = (t / ((int64_t)g.wh * g.h)) % mid_n;
    e.outer = t / ((int64_t)g.wh * g.h * mid_n);
    e.at = (int64_t)row * g.wh + e.c;
    e.r = row < g.pos ? row : (row >= g.h - g.r + g.pos ? row - (g.h - g.r) : -1);
    if (e.c >= g.my) e.r = -1;
    return e;
}

// The kept index of row `row` at column c (-1: not a kept mode).
__device__ __forceinline__ int kept_row(int row, int c, const SpectralGeom& g) {
    if (c >= g.my) return -1;
    return row < g.pos ? row : (row >= g.h - g.r + g.pos ? row - (g.h - g.r) : -1);
}

// The mix's sum at mode (row, c) of sample b, in order (0 off the kept modes): the forward's
// Y[b, o] = sum over i of X[b, i] W[i, o] (DX false, src X, `at_ch` = o), or dX[b, i] = sum over
// o of dY[b, o] conj(W[i, o]) (DX true, src dY, `at_ch` = i).
template <bool DX>
__device__ __forceinline__ float2 mix_at(const float2* __restrict__ src, const float2* __restrict__ w, const SpectralGeom& g, int b, int at_ch, int row, int c) {
    const int r = kept_row(row, c, g), terms = DX ? g.co : g.ci;
    const int64_t plane = (int64_t)g.h * g.wh, at = (int64_t)row * g.wh + c;
    float2 acc = make_float2(0.f, 0.f);
    if (r >= 0) {
        for (int s = 0; s < terms; ++s) {
            const int i = DX ? at_ch : s, o = DX ? s : at_ch;
            const float2 v = src[((int64_t)b * terms + s) * plane + at], wv = w[(((int64_t)i * g.co + o) * g.r + r) * g.my + c];
            const float2 p = DX ? cmul_conj_b(v, wv) : cmul(v, wv);
            acc.x += p.x;
            acc.y += p.y;
        }
    }
    return acc;
}

// Every mode of the forward's Y (DX false) or of dX (DX true), and with `ready` the same made
// ready for the C2R after it (the partner row's sum is taken for the DC and Nyquist columns).
template <bool DX>
__device__ __forceinline__ void mix_all(const float2* __restrict__ src, const float2* __restrict__ w, float2* __restrict__ out, float2* __restrict__ ready, const SpectralGeom& g, const SpectrumGeom& sg) {
    const int channels = DX ? g.ci : g.co;
    const int64_t n = (int64_t)g.b * channels * g.h * g.wh;
    FNO_FOR(t, n) {
        const Elem e = elem_of(t, channels, g);
        const int row = (int)(e.at / g.wh);
        const float2 v = mix_at<DX>(src, w, g, e.outer, e.mid, row, e.c);
        out[t] = v;
        if (ready) {
            const float2 m = hermitian_weight(e.c, sg.w) == 1.f ? mix_at<DX>(src, w, g, e.outer, e.mid, (g.h - row) % g.h, e.c) : v;
            ready[t] = irfft_ready(v, m, e.c, sg);
        }
    }
}

extern "C" __global__ void spectral_mix_fwd_f32(const float2* __restrict__ x, const float2* __restrict__ w, float2* __restrict__ y, float2* __restrict__ ready, SpectralGeom g, SpectrumGeom sg) {
    mix_all<false>(x, w, y, ready, g, sg);
}

extern "C" __global__ void spectral_mix_bwd_input_f32(const float2* __restrict__ dy, const float2* __restrict__ w, float2* __restrict__ dx, float2* __restrict__ ready, SpectralGeom g, SpectrumGeom sg) {
    mix_all<true>(dy, w, dx, ready, g, sg);
}

extern "C" __global__ void spectral_mix_bwd_weight_f32(const float2* __restrict__ x, const float2* __restrict__ dy, float2* __restrict__ dw, SpectralGeom g) {
    const int64_t n = (int64_t)g.ci * g.co * g.r * g.my;
    FNO_FOR(t, n) {
        const Mode m = mode_of(t, g.co, g);
        const int o = m.mid, i = m.outer;
        const int64_t plane = (int64_t)g.h * g.wh, at = m.at;
        float2 acc = make_float2(0.f, 0.f);
        for (int b = 0; b < g.b; ++b) {
            // conj(X) dY = conj(X conj(dY)) -> (re, -im) of cmul_conj_b(X, dY)
            const float2 p = cmul_conj_b(x[((int64_t)b * g.ci + i) * plane + at], dy[((int64_t)b * g.co + o) * plane + at]);
            acc.x += p.x;
            acc.y -= p.y;
        }
        dw[t] = acc;
    }
}

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
// Geometry: Y and dX (mix_all): the first blocks one thread per (group of MIX_BB = 16 samples,
//         output channel, kept mode), kept mode fastest, summing all the group's samples at once,
//         so each weight is read once per group rather than once per sample; the other blocks
//         write the zero modes (grid-stride); src/backend/spectral/cuda.rs's mix_config sizes the
//         grid. dW: one thread per kept weight, grid-stride, column c innermost. Reads of
//         consecutive columns of X, W and dY are coalesced. The reduction over i, o or b runs in
//         order inside the thread: results do not depend on the launch.
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

// The forward's Y[b, o] = sum over i of X[b, i] W[i, o] (DX false, src X, out channel o) or dX[b,
// i] = sum over o of dY[b, o] conj(W[i, o]) (DX true, src dY, out channel i) at kept mode (r, c)
// of `row`, for the MIX_BB samples from b0 (fewer at the end of the batch), in order of the
// reduced channel: acc[j] for sample b0 + j. Each weight is read once for all those samples.
// Every src value is first multiplied by k (1, or dY's column scale: see dy_scale).
#define MIX_BB 16

// The factor dY's column c is read with: 1 when dy_w is 0 (dY as given), else the column scale
// c_c / (H W) that irfft2's adjoint applies after its R2C transform (fft.cu's
// spectrum_col_scale_f32, computed the same way), for a dY handed over straight from the R2C of
// width-dy_w images: the backward's two mix products apply it as they read, instead of a launch.
__device__ __forceinline__ float dy_scale(int c, int h, int dy_w) { return dy_w ? hermitian_weight(c, dy_w) / ((float)h * (float)dy_w) : 1.f; }
template <bool DX>
__device__ __forceinline__ void mix_sums(const float2* __restrict__ src, const float2* __restrict__ w, const SpectralGeom& g, int b0, int nb, int ch, int r, int row, int c, float k, float2* acc) {
    const int terms = DX ? g.co : g.ci;
    const int64_t plane = (int64_t)g.h * g.wh, at = (int64_t)row * g.wh + c;
#pragma unroll
    for (int j = 0; j < MIX_BB; ++j) acc[j] = make_float2(0.f, 0.f);
    for (int s = 0; s < terms; ++s) {
        const int i = DX ? ch : s, o = DX ? s : ch;
        const float2 wv = w[(((int64_t)i * g.co + o) * g.r + r) * g.my + c];
        const float2* col = src + ((int64_t)b0 * terms + s) * plane + at;
#pragma unroll
        for (int j = 0; j < MIX_BB; ++j) {
            if (j < nb) {
                float2 v = col[(int64_t)j * terms * plane];
                v.x *= k;
                v.y *= k;
                const float2 p = DX ? cmul_conj_b(v, wv) : cmul(v, wv);
                acc[j].x += p.x;
                acc[j].y += p.y;
            }
        }
    }
}

// Every mode of the forward's Y (DX false) or of dX (DX true), and with `ready` the same made
// ready for the C2R after it. Tiled by mode: the first blocks give one thread to each (sample
// group of MIX_BB, output channel, kept mode), kept mode fastest (consecutive columns: coalesced
// reads of the weight and the spectrum), each weight read once per sample group instead of once
// per sample; on the DC and Nyquist columns that thread also sums the partner row (H - row) % H
// for the Hermitian part, and writes the partner's ready element when that row is not kept. The
// remaining blocks write the zeros of every other mode (grid-stride). Each output element has one
// writer; every sum runs in order of the reduced channel, so the result does not depend on the
// launch.
template <bool DX>
__device__ __forceinline__ void mix_all(const float2* __restrict__ src, const float2* __restrict__ w, float2* __restrict__ out, float2* __restrict__ ready, const SpectralGeom& g, const SpectrumGeom& sg, int dy_w) {
    const int channels = DX ? g.ci : g.co;
    const int64_t kept = (int64_t)g.r * g.my, groups = (g.b + MIX_BB - 1) / MIX_BB;
    const int64_t tile_threads = groups * channels * kept, tile_blocks = (tile_threads + blockDim.x - 1) / blockDim.x;
    const int64_t plane = (int64_t)g.h * g.wh;
    if ((int64_t)blockIdx.x < tile_blocks) {
        const int64_t t = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
        if (t >= tile_threads) return;
        const int mode = t % kept, ch = (t / kept) % channels, b0 = (int)(t / (kept * channels)) * MIX_BB;
        const int nb = g.b - b0 < MIX_BB ? g.b - b0 : MIX_BB;
        const int r = mode / g.my, c = mode % g.my, row = r < g.pos ? r : g.h - g.r + r;
        float2 acc[MIX_BB];
        mix_sums<DX>(src, w, g, b0, nb, ch, r, row, c, dy_scale(c, g.h, dy_w), acc);
        float2* o = out + ((int64_t)b0 * channels + ch) * plane;
        for (int j = 0; j < nb; ++j) o[(int64_t)j * channels * plane + (int64_t)row * g.wh + c] = acc[j];
        if (!ready) return;
        float2* rd = ready + ((int64_t)b0 * channels + ch) * plane;
        if (hermitian_weight(c, sg.w) != 1.f) {
            for (int j = 0; j < nb; ++j) rd[(int64_t)j * channels * plane + (int64_t)row * g.wh + c] = irfft_ready(acc[j], acc[j], c, sg);
            return;
        }
        const int prow = (g.h - row) % g.h, pr = kept_row(prow, c, g);
        float2 part[MIX_BB];
        if (prow == row) {
            for (int j = 0; j < MIX_BB; ++j) part[j] = acc[j];
        } else if (pr >= 0) {
            mix_sums<DX>(src, w, g, b0, nb, ch, pr, prow, c, dy_scale(c, g.h, dy_w), part);
        } else {
            for (int j = 0; j < MIX_BB; ++j) part[j] = make_float2(0.f, 0.f);
        }
        for (int j = 0; j < nb; ++j) {
            float2* e = rd + (int64_t)j * channels * plane;
            e[(int64_t)row * g.wh + c] = irfft_ready(acc[j], part[j], c, sg);
            // The partner row is not kept: its element is 0, its partner this one.
            if (pr < 0) e[(int64_t)prow * g.wh + c] = irfft_ready(make_float2(0.f, 0.f), acc[j], c, sg);
        }
        return;
    }
    const int64_t n = (int64_t)g.b * channels * plane, zb = blockIdx.x - tile_blocks, zblocks = gridDim.x - tile_blocks;
    for (int64_t t = zb * blockDim.x + threadIdx.x; t < n; t += zblocks * blockDim.x) {
        const Elem e = elem_of(t, channels, g);
        if (e.r >= 0) continue;  // a kept mode: its tile thread writes it
        out[t] = make_float2(0.f, 0.f);
        if (!ready) continue;
        // On the DC and Nyquist columns, a row whose partner is kept is written by the partner's
        // tile thread.
        const int row = (int)(e.at / g.wh);
        if (hermitian_weight(e.c, sg.w) == 1.f && kept_row((g.h - row) % g.h, e.c, g) >= 0) continue;
        ready[t] = irfft_ready(make_float2(0.f, 0.f), make_float2(0.f, 0.f), e.c, sg);
    }
}

extern "C" __global__ void spectral_mix_fwd_f32(const float2* __restrict__ x, const float2* __restrict__ w, float2* __restrict__ y, float2* __restrict__ ready, SpectralGeom g, SpectrumGeom sg) {
    mix_all<false>(x, w, y, ready, g, sg, 0);
}

extern "C" __global__ void spectral_mix_bwd_input_f32(const float2* __restrict__ dy, const float2* __restrict__ w, float2* __restrict__ dx, float2* __restrict__ ready, SpectralGeom g, SpectrumGeom sg, int dy_w) {
    mix_all<true>(dy, w, dx, ready, g, sg, dy_w);
}

extern "C" __global__ void spectral_mix_bwd_weight_f32(const float2* __restrict__ x, const float2* __restrict__ dy, float2* __restrict__ dw, SpectralGeom g, int dy_w) {
    const int64_t n = (int64_t)g.ci * g.co * g.r * g.my;
    FNO_FOR(t, n) {
        const Mode m = mode_of(t, g.co, g);
        const int o = m.mid, i = m.outer;
        const int64_t plane = (int64_t)g.h * g.wh, at = m.at;
        const float k = dy_scale(m.c, g.h, dy_w);
        float2 acc = make_float2(0.f, 0.f);
        for (int b = 0; b < g.b; ++b) {
            float2 d = dy[((int64_t)b * g.co + o) * plane + at];
            d.x *= k;
            d.y *= k;
            // conj(X) dY = conj(X conj(dY)) -> (re, -im) of cmul_conj_b(X, dY)
            const float2 p = cmul_conj_b(x[((int64_t)b * g.ci + i) * plane + at], d);
            acc.x += p.x;
            acc.y -= p.y;
        }
        dw[t] = acc;
    }
}

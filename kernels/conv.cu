// conv.cu: the layout halves of a 2-D convolution as im2col + GEMM (the GEMMs are cuBLAS's).
//
//   im2col_f32: cols[n, (c kh + i) kw + j, oh Wo + ow] = x[n, c, oh s + i - pad, ow s + j - pad]
//               (0 outside the map), for a chunk of N samples; with k_major = 1 the same columns
//               as cols[(c kh + i) kw + j, n, oh Wo + ow]: one [K, N Ho Wo] matrix, so that the
//               weight gradient of the whole chunk is one GEMM
//   col2im_f32: dx[n, c, ih, iw] = sum over taps (i, j), in order, of
//               dcols[n, (c kh + i) kw + j, oh Wo + ow] where oh s + i - pad = ih and
//               ow s + j - pad = iw (a gather, so no atomics and a fixed order of additions)
//   channels_outer_f32: y[c, n, s] = x[n, c, s], an activation [N, C, S] as the matrix
//               [C, N S] (the output gradient's side of that GEMM); when `sums` is not null
//               also sums[c] = the sum of row c (the bias gradient, from the same read), added
//               to what sums[c] holds when `accumulate` is 1 (the chunks after the first)
// Shapes: x, dx [N, C, H, W]; cols, dcols [N, C kh kw, Ho Wo] (or [C kh kw, N, Ho Wo]).
// Geometry: one thread per output element (grid-stride); channels_outer_f32: one block per
//   channel c, its threads stepping along the row (reads and writes coalesced), the row's sum
//   with block_sum (a fixed order of additions).
// CPU reference: im2col / col2im in src/backend/conv/cpu.rs. ConvGeom is in params.cuh.
#include "common.cuh"

extern "C" __global__ void im2col_f32(const float* __restrict__ x, float* __restrict__ cols, int nb, ConvGeom g, int k_major) {
    const int64_t hw = (int64_t)g.ho * g.wo;
    const int64_t k = (int64_t)g.c * g.kh * g.kw;
    const int64_t n = nb * k * hw;
    FNO_FOR(e, n) {
        int64_t o, s;
        int r;
        if (k_major) {
            const int64_t q = e % (nb * hw);
            r = e / (nb * hw);
            s = q / hw;
            o = q % hw;
        } else {
            o = e % hw;
            const int64_t t = e / hw;
            r = t % k;
            s = t / k;
        }
        const int c = r / (g.kh * g.kw), tap = r % (g.kh * g.kw);
        const int i = tap / g.kw, j = tap % g.kw;
        const int oh = o / g.wo, ow = o % g.wo;
        const int ih = oh * g.stride + i - g.pad, iw = ow * g.stride + j - g.pad;
        cols[e] = (ih >= 0 && ih < g.h && iw >= 0 && iw < g.w) ? x[((s * g.c + c) * g.h + ih) * g.w + iw] : 0.f;
    }
}

extern "C" __global__ void channels_outer_f32(const float* __restrict__ x, float* __restrict__ y, float* __restrict__ sums, PlaneGeom g, int accumulate) {
    const int64_t c = blockIdx.x, ns = (int64_t)g.b * g.s;
    if (c >= g.c) return;
    float acc = 0.f;
    for (int64_t q = threadIdx.x; q < ns; q += blockDim.x) {
        const int64_t b = q / g.s, p = q % g.s;
        const float v = x[(b * g.c + c) * g.s + p];
        y[c * ns + q] = v;
        acc += v;
    }
    if (sums) {
        acc = block_sum(acc);
        if (threadIdx.x == 0) sums[c] = accumulate ? sums[c] + acc : acc;
    }
}

extern "C" __global__ void col2im_f32(const float* __restrict__ dcols, float* __restrict__ dx, int nb, ConvGeom g) {
    const int64_t hw = (int64_t)g.ho * g.wo;
    const int64_t k = (int64_t)g.c * g.kh * g.kw;
    const int64_t n = (int64_t)nb * g.c * g.h * g.w;
    FNO_FOR(e, n) {
        const int iw = e % g.w;
        const int64_t t = e / g.w;
        const int ih = t % g.h;
        const int64_t t2 = t / g.h;
        const int c = t2 % g.c;
        const int64_t s = t2 / g.c;
        float acc = 0.f;
        for (int i = 0; i < g.kh; ++i) {
            const int ohs = ih + g.pad - i;
            if (ohs < 0 || ohs % g.stride != 0) continue;
            const int oh = ohs / g.stride;
            if (oh >= g.ho) continue;
            for (int j = 0; j < g.kw; ++j) {
                const int ows = iw + g.pad - j;
                if (ows < 0 || ows % g.stride != 0) continue;
                const int ow = ows / g.stride;
                if (ow >= g.wo) continue;
                acc += dcols[(s * k + (c * g.kh + i) * g.kw + j) * hw + (int64_t)oh * g.wo + ow];
            }
        }
        dx[e] = acc;
    }
}

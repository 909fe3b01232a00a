// conv.cu: the layout halves of a 2-D convolution as im2col + GEMM (the GEMMs are cuBLAS's).
//
//   im2col_f32: cols[n, (c kh + i) kw + j, oh Wo + ow] = x[n, c, oh s + i - pad, ow s + j - pad]
//               (0 outside the map), for a chunk of N samples: the forward's columns. When
//               `bias` is not null, the same launch also sets the chunk's output
//               y[n, o, p] = bias[o] (o < c_out), which the forward GEMM then adds onto
//               (beta = 1): no separate pass over y for the bias
//   conv_dw_operands_f32: both operands of the weight gradient's one GEMM over a chunk, in one
//               launch: the same columns k-major, cols[(c kh + i) kw + j, n, oh Wo + ow] (one
//               [K, N Ho Wo] matrix), and the output gradient as the matrix [C_out, N Ho Wo],
//               dy_rows[o, n, p] = dy[n, o, p]; when `db` is not null also db[o] = the sum of
//               row o (the bias gradient, from the same read), added to what db[o] holds when
//               `accumulate` is 1 (the chunks after the first)
//   col2im_f32: dx[n, c, ih, iw] = sum over taps (i, j), in order, of
//               dcols[n, (c kh + i) kw + j, oh Wo + ow] where oh s + i - pad = ih and
//               ow s + j - pad = iw (a gather, so no atomics and a fixed order of additions),
//               plus bias[c] after the sum when `bias` is not null (the transposed convolution's
//               bias, which runs on this kernel)
// Shapes: x, dx [N, C, H, W]; dy [N, C_out, Ho, Wo]; cols, dcols [N, C kh kw, Ho Wo] (or
//   [C kh kw, N, Ho Wo]).
// Geometry: one thread per output element (grid-stride); conv_dw_operands_f32: blocks 0 .. C_out
//   one row of dy_rows each, their threads stepping along the row (reads and writes coalesced),
//   the row's sum with block_sum (a fixed order of additions); the blocks after them the columns,
//   grid-stride over those blocks.
// CPU reference: im2col / col2im in src/backend/conv/cpu.rs. ConvGeom is in params.cuh.
#include "common.cuh"

// Column element r = (c kh + i) kw + j, sample s, output position o of x (0 on the padding).
__device__ __forceinline__ float im2col_at(const float* __restrict__ x, const ConvGeom& g, int64_t s, int r, int64_t o) {
    const int c = r / (g.kh * g.kw), tap = r % (g.kh * g.kw);
    const int i = tap / g.kw, j = tap % g.kw;
    const int oh = o / g.wo, ow = o % g.wo;
    const int ih = oh * g.stride + i - g.pad, iw = ow * g.stride + j - g.pad;
    return (ih >= 0 && ih < g.h && iw >= 0 && iw < g.w) ? x[((s * g.c + c) * g.h + ih) * g.w + iw] : 0.f;
}

extern "C" __global__ void im2col_f32(const float* __restrict__ x, const float* __restrict__ bias, float* __restrict__ cols, float* __restrict__ y, int nb, int c_out, ConvGeom g) {
    const int64_t hw = (int64_t)g.ho * g.wo;
    const int64_t k = (int64_t)g.c * g.kh * g.kw;
    if (bias) {
        FNO_FOR(e, (int64_t)nb * c_out * hw) y[e] = bias[(e / hw) % c_out];
    }
    FNO_FOR(e, nb * k * hw) {
        const int64_t t = e / hw;
        cols[e] = im2col_at(x, g, t / k, t % k, e % hw);
    }
}

extern "C" __global__ void conv_dw_operands_f32(const float* __restrict__ x, const float* __restrict__ dy, float* __restrict__ cols, float* __restrict__ dy_rows, float* __restrict__ db, int nb, int c_out, ConvGeom g, int accumulate) {
    const int64_t hw = (int64_t)g.ho * g.wo, ns = nb * hw;
    if (blockIdx.x < c_out) {
        const int64_t o = blockIdx.x;
        float acc = 0.f;
        for (int64_t q = threadIdx.x; q < ns; q += blockDim.x) {
            const float v = dy[((q / hw) * c_out + o) * hw + q % hw];
            dy_rows[o * ns + q] = v;
            acc += v;
        }
        if (db) {
            acc = block_sum(acc);
            if (threadIdx.x == 0) db[o] = accumulate ? db[o] + acc : acc;
        }
        return;
    }
    const int64_t k = (int64_t)g.c * g.kh * g.kw;
    const int64_t step = (int64_t)(gridDim.x - c_out) * blockDim.x;
    for (int64_t e = (int64_t)(blockIdx.x - c_out) * blockDim.x + threadIdx.x; e < k * ns; e += step) {
        const int64_t q = e % ns;
        cols[e] = im2col_at(x, g, q / hw, e / ns, q % hw);
    }
}

extern "C" __global__ void col2im_f32(const float* __restrict__ dcols, const float* __restrict__ bias, float* __restrict__ dx, int nb, ConvGeom g) {
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
        dx[e] = bias ? acc + bias[c] : acc;
    }
}

// conv.cu: 2-D convolutions. First the layout halves of im2col + GEMM (the GEMMs are cuBLAS's;
// `train.gpu_conv = "columns"` and TF32), then the implicit GEMMs (the default), further down.
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

// ---------------------------------------------------------------------------------------------
// Implicit GEMMs: the same three products without columns in memory. Each block computes one
// IG_BM x IG_BN tile of C [m, n] = sum over k of A(i, k) B(k, j), staging IG_BK-deep slices of A
// and B in shared memory; the operands are read from the tensors through the convolution's index
// map as the slices are loaded (the padding's taps read as 0), so no im2col buffer is written or
// read, and each product is one launch (the weight gradient's deep reductions two, below).
// Every thread sums its 4 x 4 outputs over k in ascending order: the same bits on every run.
//
//   conv2d_fwd_f32:        y[n, o, p] = bias[o] + sum_r w[o, r] cols(x)[n, r, p]
//                          (m = C_out, n = N Ho Wo, k = C kh kw); when `act` is not null also
//                          act = GELU(y) (a convolution and the activation after it in one pass)
//   conv2d_bwd_input_f32:  dx[n, c, q] = bias[c] + sum_(o, i, j) w[o, c, i, j] dy[n, o, oh, ow]
//                          over the taps with oh s + i - pad = ih, ow s + j - pad = iw
//                          (m = C, n = N H W, k = C_out kh kw; the transposed convolution's
//                          bias, when not null), and acc[n, c, q] + that when `acc` is not
//                          null (the gradient of x gathered so far from its other consumers:
//                          the sum of the two without a launch of its own)
//   conv2d_bwd_weight_f32: dw[o, r] = sum_(n, p) dy[n, o, p] cols(x)[n, r, p] and, when
//                          `with_bias`, db[o] = sum_(n, p) dy[n, o, p] as the extra column
//                          r = C kh kw of a column of ones (m = C_out, n = C kh kw + with_bias,
//                          k = N Ho Wo). With splits > 1 the k range is cut into `splits`
//                          consecutive parts, whose sums go to part[s, o, r], and
//                          conv2d_bwd_weight_sum_f32 adds them in order of s into dw and db:
//                          enough blocks for the shallow levels' few outputs and long sums,
//                          still without atomics.
// Geometry: IG_THREADS threads per block, one-dimensional grids: block b is tile (b / tiles_n) %
//   tiles_m, b % tiles_n of split b / (tiles_m tiles_n). Shared memory: two IG_BK x 64 slices.

#define IG_BM 64
#define IG_BN 64
#define IG_BK 16
#define IG_THREADS 256

// An operand loader L of igemm_tile reads element (idx, kk) of its operand, where idx is the row
// of A or the column of B and kk the index summed over, in three steps, so that the integer
// divisions that map an index onto a tensor are done once per tile or once per slice, not once
// per element:
//   L::Fixed L::fixed(idx)          what depends on idx only: decoded once per tile (each thread
//                                   loads its operands at the same few idx for the whole sum);
//   L::Step  L::step(kk)            what depends on kk only: decoded once per slice of IG_BK;
//   float    L::at(Fixed, Step)     the element, 0 on the padding.
// The callers guarantee idx < m (or n) and kk < k1.
//
// One tile (tm, tn) of C over k in [k0, k1): out(i, j, sum) for each i < m, j < n of the tile.
// A's slice is loaded with consecutive threads along k (its sources are contiguous along k), so
// each thread keeps one k of A's slice and four rows; B's along j when B_J_FAST (one column, four
// k, whose steps the slice's first IG_BK threads decode into shared memory), else along k (one k,
// four columns).
template <bool B_J_FAST, class A, class B, class Out>
__device__ __forceinline__ void igemm_tile(const A& a, const B& b, const Out& out, int64_t m, int64_t n, int64_t k0, int64_t k1, int64_t tm, int64_t tn) {
    __shared__ float as[IG_BK][IG_BM];
    __shared__ float bs[IG_BK][IG_BN];
    __shared__ typename B::Step b_steps[IG_BK];
    const int t = threadIdx.x, tx = t % 16, ty = t / 16;
    const int64_t m0 = tm * IG_BM, n0 = tn * IG_BN;
    // A: k = t % IG_BK, rows t / IG_BK + 16 l. B: column t % IG_BN and k = t / IG_BN + 4 l, or
    // k = t % IG_BK and columns t / IG_BK + 16 l.
    const int a_k = t % IG_BK, b_k = B_J_FAST ? t / IG_BN : t % IG_BK;
    typename A::Fixed a_fix[4];
    typename B::Fixed b_fix[4];
    bool a_in[4], b_in[4];
    for (int l = 0; l < 4; ++l) {
        const int64_t i = m0 + t / IG_BK + 16 * l;
        a_in[l] = i < m;
        if (a_in[l]) a_fix[l] = a.fixed(i);
        const int64_t j = n0 + (B_J_FAST ? t % IG_BN : t / IG_BK + 16 * l);
        b_in[l] = j < n;
        if (b_in[l]) b_fix[l] = b.fixed(j);
    }
    float acc[4][4];
    for (int i = 0; i < 4; ++i)
        for (int j = 0; j < 4; ++j) acc[i][j] = 0.f;
    for (int64_t kb = k0; kb < k1; kb += IG_BK) {
        if (B_J_FAST && t < IG_BK && kb + t < k1) b_steps[t] = b.step(kb + t);
        const bool ak = kb + a_k < k1;
        typename A::Step a_step;
        if (ak) a_step = a.step(kb + a_k);
        typename B::Step b_step;
        if (!B_J_FAST && kb + b_k < k1) b_step = b.step(kb + b_k);
        if (B_J_FAST) __syncthreads();  // b_steps written
        for (int l = 0; l < 4; ++l) as[a_k][t / IG_BK + 16 * l] = (a_in[l] && ak) ? a.at(a_fix[l], a_step) : 0.f;
        for (int l = 0; l < 4; ++l) {
            if (B_J_FAST) {
                const int kk = b_k + 4 * l;
                bs[kk][t % IG_BN] = (b_in[0] && kb + kk < k1) ? b.at(b_fix[0], b_steps[kk]) : 0.f;
            } else {
                bs[b_k][t / IG_BK + 16 * l] = (b_in[l] && kb + b_k < k1) ? b.at(b_fix[l], b_step) : 0.f;
            }
        }
        __syncthreads();
        for (int kk = 0; kk < IG_BK; ++kk) {
            float av[4], bv[4];
            for (int i = 0; i < 4; ++i) av[i] = as[kk][ty + 16 * i];
            for (int j = 0; j < 4; ++j) bv[j] = bs[kk][tx + 16 * j];
            for (int i = 0; i < 4; ++i)
                for (int j = 0; j < 4; ++j) acc[i][j] += av[i] * bv[j];
        }
        __syncthreads();  // the slices (and b_steps) are overwritten by the next step
    }
    for (int i = 0; i < 4; ++i)
        for (int j = 0; j < 4; ++j) {
            const int64_t gi = m0 + ty + 16 * i, gj = n0 + tx + 16 * j;
            if (gi < m && gj < n) out(gi, gj, acc[i][j]);
        }
}

__device__ __forceinline__ int64_t ig_tiles(int64_t v, int64_t tile) { return (v + tile - 1) / tile; }

// A tap r = (c kh + i) kw + j of a column of x: its channel's plane offset and the tap's (i, j).
struct Tap {
    int64_t plane;
    int i, j;
};
__device__ __forceinline__ Tap tap_of(const ConvGeom& g, int r) {
    const int taps = g.kh * g.kw, c = r / taps, tap = r % taps;
    return Tap{(int64_t)c * g.h * g.w, tap / g.kw, tap % g.kw};
}
// An output position q = (n, oh, ow) of the columns: its sample's offset in x and the top-left
// input pixel of its window.
struct Window {
    int64_t sample;
    int ih0, iw0;
};
__device__ __forceinline__ Window window_of(const ConvGeom& g, int64_t q, int64_t hw) {
    const int64_t n = q / hw;
    const int p = (int)(q % hw), oh = p / g.wo, ow = p % g.wo;
    return Window{n * g.c * g.h * g.w, oh * g.stride - g.pad, ow * g.stride - g.pad};
}
__device__ __forceinline__ float x_at(const float* __restrict__ x, const ConvGeom& g, const Window& q, const Tap& r) {
    const int ih = q.ih0 + r.i, iw = q.iw0 + r.j;
    return (ih >= 0 && ih < g.h && iw >= 0 && iw < g.w) ? x[q.sample + r.plane + (int64_t)ih * g.w + iw] : 0.f;
}

// The forward's operands: the weight as rows [C_out, K], the columns of x gathered.
struct FwdWeight {
    const float* w;
    int64_t k;
    typedef int64_t Fixed;
    typedef int64_t Step;
    __device__ Fixed fixed(int64_t o) const { return o * k; }
    __device__ Step step(int64_t r) const { return r; }
    __device__ float at(Fixed row, Step r) const { return w[row + r]; }
};
struct FwdCols {
    const float* x;
    ConvGeom g;
    int64_t hw;
    typedef Window Fixed;
    typedef Tap Step;
    __device__ Fixed fixed(int64_t q) const { return window_of(g, q, hw); }
    __device__ Step step(int64_t r) const { return tap_of(g, (int)r); }
    __device__ float at(const Fixed& q, const Step& r) const { return x_at(x, g, q, r); }
};
struct FwdOut {
    float* y;
    float* act;
    const float* bias;
    int64_t c_out, hw;
    __device__ void operator()(int64_t o, int64_t q, float v) const {
        const int64_t at = ((q / hw) * c_out + o) * hw + q % hw;
        const float z = bias ? v + bias[o] : v;
        y[at] = z;
        if (act) act[at] = gelu(z);
    }
};

extern "C" __global__ void conv2d_fwd_f32(const float* __restrict__ x, const float* __restrict__ w, const float* __restrict__ bias, float* __restrict__ y, float* __restrict__ act, int nb, int c_out, ConvGeom g) {
    const int64_t hw = (int64_t)g.ho * g.wo, k = (int64_t)g.c * g.kh * g.kw, n = (int64_t)nb * hw;
    const int64_t tiles_n = ig_tiles(n, IG_BN);
    igemm_tile<true>(FwdWeight{w, k}, FwdCols{x, g, hw}, FwdOut{y, act, bias, c_out, hw}, c_out, n, 0, k, blockIdx.x / tiles_n, blockIdx.x % tiles_n);
}

// The input gradient's operands: w [C_out, C, kh, kw] read as [C, (o, i, j)], and dy gathered at
// the output position each tap of an input position came from (0 where none did).
struct BwdInWeight {
    const float* w;
    int64_t c, taps;
    typedef int64_t Fixed;
    typedef int64_t Step;
    __device__ Fixed fixed(int64_t ci) const { return ci * taps; }
    __device__ Step step(int64_t r) const { return (r / taps) * c * taps + r % taps; }
    __device__ float at(Fixed ci, Step r) const { return w[ci + r]; }
};
// An input pixel (n, ih, iw): dy's offset of its sample and the pixel shifted by the padding.
struct Pixel {
    int64_t sample;
    int ihp, iwp;
};
// A tap (o, i, j) of dy: its channel's plane offset and (i, j).
struct OutTap {
    int64_t plane;
    int i, j;
};
struct BwdInRows {
    const float* dy;
    ConvGeom g;
    int64_t c_out, plane;
    typedef Pixel Fixed;
    typedef OutTap Step;
    __device__ Fixed fixed(int64_t q) const {
        const int pos = (int)(q % plane);
        return Pixel{(q / plane) * c_out * g.ho * g.wo, pos / g.w + g.pad, pos % g.w + g.pad};
    }
    __device__ Step step(int64_t r) const {
        const int taps = g.kh * g.kw, tap = (int)(r % taps);
        return OutTap{(r / taps) * g.ho * g.wo, tap / g.kw, tap % g.kw};
    }
    __device__ float at(const Fixed& q, const Step& r) const {
        const int ohs = q.ihp - r.i, ows = q.iwp - r.j;
        if (ohs < 0 || ows < 0 || ohs % g.stride != 0 || ows % g.stride != 0) return 0.f;
        const int oh = ohs / g.stride, ow = ows / g.stride;
        if (oh >= g.ho || ow >= g.wo) return 0.f;
        return dy[q.sample + r.plane + (int64_t)oh * g.wo + ow];
    }
};
struct BwdInOut {
    float* dx;
    const float* bias;
    const float* acc;
    int64_t c, plane;
    __device__ void operator()(int64_t ci, int64_t q, float v) const {
        const int64_t e = ((q / plane) * c + ci) * plane + q % plane;
        const float r = bias ? v + bias[ci] : v;
        dx[e] = acc ? acc[e] + r : r;
    }
};

extern "C" __global__ void conv2d_bwd_input_f32(const float* __restrict__ dy, const float* __restrict__ w, const float* __restrict__ bias, const float* __restrict__ acc, float* __restrict__ dx, int nb, int c_out, ConvGeom g) {
    const int64_t plane = (int64_t)g.h * g.w, taps = (int64_t)g.kh * g.kw, n = (int64_t)nb * plane;
    const int64_t tiles_n = ig_tiles(n, IG_BN);
    igemm_tile<true>(BwdInWeight{w, g.c, taps}, BwdInRows{dy, g, c_out, plane}, BwdInOut{dx, bias, acc, g.c, plane}, g.c, n, 0, c_out * taps,
                     blockIdx.x / tiles_n, blockIdx.x % tiles_n);
}

// The weight gradient's operands: dy as [C_out, (n, p)], the columns of x as [(n, p), r] with a
// column of ones after the last (r = K) for the bias.
struct BwdWRows {
    const float* dy;
    int64_t c_out, hw;
    typedef int64_t Fixed;
    typedef int64_t Step;
    __device__ Fixed fixed(int64_t o) const { return o * hw; }
    __device__ Step step(int64_t q) const { return (q / hw) * c_out * hw + q % hw; }
    __device__ float at(Fixed o, Step q) const { return dy[o + q]; }
};
// A column r of the weight gradient: a tap of x, or (bias) the column of ones.
struct WeightCol {
    Tap tap;
    bool ones;
};
struct BwdWCols {
    const float* x;
    ConvGeom g;
    int64_t hw, k;
    typedef WeightCol Fixed;
    typedef Window Step;
    __device__ Fixed fixed(int64_t r) const { return r < k ? WeightCol{tap_of(g, (int)r), false} : WeightCol{Tap{0, 0, 0}, true}; }
    __device__ Step step(int64_t q) const { return window_of(g, q, hw); }
    __device__ float at(const Fixed& r, const Step& q) const { return r.ones ? 1.f : x_at(x, g, q, r.tap); }
};
struct BwdWOut {
    float* dw;
    float* db;
    int64_t k;
    __device__ void operator()(int64_t o, int64_t r, float v) const {
        if (r < k) dw[o * k + r] = v;
        else db[o] = v;
    }
};
struct BwdWPart {
    float* part;
    int64_t cols;
    __device__ void operator()(int64_t o, int64_t r, float v) const { part[o * cols + r] = v; }
};

extern "C" __global__ void conv2d_bwd_weight_f32(const float* __restrict__ x, const float* __restrict__ dy, float* __restrict__ dw, float* __restrict__ db, float* __restrict__ part, int nb, int c_out, ConvGeom g, int with_bias, int splits) {
    const int64_t hw = (int64_t)g.ho * g.wo, k = (int64_t)g.c * g.kh * g.kw, cols = k + with_bias, q = (int64_t)nb * hw;
    const int64_t tiles_n = ig_tiles(cols, IG_BN), tiles_m = ig_tiles(c_out, IG_BM);
    const int64_t tn = blockIdx.x % tiles_n, tm = (blockIdx.x / tiles_n) % tiles_m, s = blockIdx.x / (tiles_n * tiles_m);
    // Each split's part of the reduction starts at a multiple of IG_BK.
    const int64_t per = ig_tiles(ig_tiles(q, splits), IG_BK) * IG_BK;
    const int64_t k0 = s * per, k1 = k0 + per < q ? k0 + per : q;
    const BwdWRows a{dy, c_out, hw};
    const BwdWCols b{x, g, hw, k};
    if (splits == 1) igemm_tile<false>(a, b, BwdWOut{dw, db, k}, c_out, cols, k0, k1, tm, tn);
    else igemm_tile<false>(a, b, BwdWPart{part + s * c_out * cols, cols}, c_out, cols, k0, k1, tm, tn);
}

// dw[o, r] (and db[o] = the column r = K, when `with_bias`) = the sum over s, in order, of
// part[s, o, r]. One thread per output element (grid-stride).
extern "C" __global__ void conv2d_bwd_weight_sum_f32(const float* __restrict__ part, float* __restrict__ dw, float* __restrict__ db, int c_out, int64_t k, int with_bias, int splits) {
    const int64_t cols = k + with_bias;
    FNO_FOR(e, (int64_t)c_out * cols) {
        float acc = 0.f;
        for (int s = 0; s < splits; ++s) acc += part[s * c_out * cols + e];
        const int64_t o = e / cols, r = e % cols;
        if (r < k) dw[o * k + r] = acc;
        else db[o] = acc;
    }
}

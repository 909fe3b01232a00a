// layout.cu: per-channel and layout glue on [B, C, S] activations (S = H W, or H W 2).
//
//   channel_bias_f32:   y[b, c, s] += bias[c]                     (in place)
//   channel_scale_f32:  y[b, c, s] = x[b, c, s] * l[c]
//   channel_dot_partials_f32: partial[b, c] = sum_s a[b, c, s] * b[b, c, s] (or of a alone when
//                       b is null); channel_sum_partials_f32 then sums over b in order, so
//                       channel_dot is deterministic
//   copy_channels_f32:  concat: dst[b, off + c, s] = src[b, c, s]   (src [B, Cs, S], dst [B, Cd, S])
//                       slice (slice = 1): dst[b, c, s] = src[b, off + c, s] (src [B, Cs, S], dst [B, Cd, S])
//   concat2_f32:        y[b, c, s] = a[b, c, s] for c < ca, else bb[b, c - ca, s] (two parts in
//                       one launch, the U-Net's skip joins); split2_f32 the reverse (their gradient)
//   pack_complex_f32:   [B, 2C, S] (real channels, then imaginary) -> [B, C, S, 2], or back (unpack)
//   roll2d_f32:         y[p, (i + sh) % H, (j + sw) % W, k] = x[p, i, j, k] over P planes, k < inner
// Geometry: one thread per element (grid-stride), except channel_dot_partials_f32: one block per
//   (b, c) plane reducing with block_sum.
// Shapes: PlaneGeom, CopyGeom, RollGeom of params.cuh. CPU reference: src/backend/layout/cpu.rs.
#include "common.cuh"

extern "C" __global__ void channel_bias_f32(float* __restrict__ y, const float* __restrict__ bias, PlaneGeom g) {
    const int64_t n = (int64_t)g.b * g.c * g.s;
    FNO_FOR(i, n) y[i] += bias[(i / g.s) % g.c];
}

extern "C" __global__ void channel_scale_f32(const float* __restrict__ x, const float* __restrict__ l, float* __restrict__ y, PlaneGeom g) {
    const int64_t n = (int64_t)g.b * g.c * g.s;
    FNO_FOR(i, n) y[i] = x[i] * l[(i / g.s) % g.c];
}

extern "C" __global__ void channel_dot_partials_f32(const float* __restrict__ a, const float* __restrict__ b, float* __restrict__ partial, PlaneGeom g) {
    const int64_t plane = blockIdx.x;
    if (plane >= (int64_t)g.b * g.c) return;
    const float* ap = a + plane * g.s;
    const float* bp = b ? b + plane * g.s : nullptr;
    float acc = 0.f;
    for (int64_t s = threadIdx.x; s < g.s; s += blockDim.x) acc += bp ? ap[s] * bp[s] : ap[s];
    acc = block_sum(acc);
    if (threadIdx.x == 0) partial[plane] = acc;
}

// out[c] = sum_b partial[b, c], b in order.
extern "C" __global__ void channel_sum_partials_f32(const float* __restrict__ partial, float* __restrict__ out, PlaneGeom g) {
    FNO_FOR(c, g.c) {
        float acc = 0.f;
        for (int b = 0; b < g.b; ++b) acc += partial[(int64_t)b * g.c + c];
        out[c] = acc;
    }
}

extern "C" __global__ void copy_channels_f32(const float* __restrict__ src, float* __restrict__ dst, CopyGeom g) {
    // One thread per element of the smaller tensor (src for a concat, dst for a slice).
    const int Cn = g.slice ? g.cd : g.cs;
    const int64_t n = (int64_t)g.b * Cn * g.s;
    FNO_FOR(i, n) {
        const int64_t s = i % g.s;
        const int64_t bc = i / g.s;
        const int c = bc % Cn, b = bc / Cn;
        if (g.slice) dst[i] = src[((int64_t)b * g.cs + g.off + c) * g.s + s];
        else dst[((int64_t)b * g.cd + g.off + c) * g.s + s] = src[i];
    }
}

extern "C" __global__ void concat2_f32(const float* __restrict__ a, const float* __restrict__ bb, float* __restrict__ y, Concat2Geom g) {
    const int C = g.ca + g.cb;
    const int64_t n = (int64_t)g.b * C * g.s;
    FNO_FOR(i, n) {
        const int64_t s = i % g.s, bc = i / g.s;
        const int c = bc % C, b = bc / C;
        y[i] = c < g.ca ? a[((int64_t)b * g.ca + c) * g.s + s] : bb[((int64_t)b * g.cb + c - g.ca) * g.s + s];
    }
}

extern "C" __global__ void split2_f32(const float* __restrict__ y, float* __restrict__ a, float* __restrict__ bb, Concat2Geom g) {
    const int C = g.ca + g.cb;
    const int64_t n = (int64_t)g.b * C * g.s;
    FNO_FOR(i, n) {
        const int64_t s = i % g.s, bc = i / g.s;
        const int c = bc % C, b = bc / C;
        if (c < g.ca) a[((int64_t)b * g.ca + c) * g.s + s] = y[i];
        else bb[((int64_t)b * g.cb + c - g.ca) * g.s + s] = y[i];
    }
}

extern "C" __global__ void pack_complex_f32(const float* __restrict__ x, float* __restrict__ y, PlaneGeom g, int unpack) {
    // Indexed by the complex tensor's (b, c, s) element; g is that complex tensor's [b, c, s].
    const int C = g.c;
    const int64_t S = g.s, n = (int64_t)g.b * C * S;
    FNO_FOR(i, n) {
        const int64_t s = i % S, bc = i / S;
        const int c = bc % C, b = bc / C;
        const int64_t re = ((int64_t)b * 2 * C + c) * S + s;
        const int64_t im = ((int64_t)b * 2 * C + C + c) * S + s;
        if (unpack) {
            y[re] = x[2 * i];
            y[im] = x[2 * i + 1];
        } else {
            y[2 * i] = x[re];
            y[2 * i + 1] = x[im];
        }
    }
}

extern "C" __global__ void roll2d_f32(const float* __restrict__ x, float* __restrict__ y, RollGeom g) {
    const int64_t n = g.planes * g.h * g.w * g.inner;
    FNO_FOR(i, n) {
        const int k = i % g.inner;
        const int64_t t = i / g.inner;
        const int j = t % g.w;
        const int64_t t2 = t / g.w;
        const int r = t2 % g.h;
        const int64_t p = t2 / g.h;
        const int oi = (r + g.sh) % g.h, oj = (j + g.sw) % g.w;
        y[((p * g.h + oi) * g.w + oj) * g.inner + k] = x[i];
    }
}

// layout.cu: per-channel and layout glue on [B, C, S] activations (S = H W, or H W 2).
//
//   channel_bias_f32:   y[b, c, s] += bias[c]                     (in place)
//   channel_scale_f32:  y[b, c, s] = x[b, c, s] * l[c]
//   channel_dot_partials_f32: partial[b, c] = sum_s a[b, c, s] * b[b, c, s] (or of a alone when
//                       b is null); channel_sum_partials_f32 (layerscale.cu) then sums over b in
//                       order, so channel_dot is deterministic
//   copy_channels_f32:  concat: dst[b, off + c, s] = src[b, c, s]   (src [B, Cs, S], dst [B, Cd, S])
//                       slice (slice = 1): dst[b, c, s] = src[b, off + c, s] (src [B, Cs, S], dst [B, Cd, S])
//   pack_complex_f32:   [B, 2C, S] (real channels, then imaginary) -> [B, C, S, 2], or back (unpack)
//   roll2d_f32:         y[p, (i + sh) % H, (j + sw) % W, k] = x[p, i, j, k] over P planes, k < inner
// Geometry: one thread per element (grid-stride), except channel_dot_partials_f32: one block per
//   (b, c) plane reducing with block_sum.
// CPU reference: add_channel_bias, channel_scale, channel_dot, copy_channels, slice_channels in
//   src/backend/cpu/mod.rs; pack and roll2d in src/backend/cpu/complex.rs.
#include "common.cuh"

extern "C" __global__ void channel_bias_f32(float* __restrict__ y, const float* __restrict__ bias, int64_t n, int C, int64_t S) {
    FNO_FOR(i, n) y[i] += bias[(i / S) % C];
}

extern "C" __global__ void channel_scale_f32(const float* __restrict__ x, const float* __restrict__ l, float* __restrict__ y, int64_t n, int C, int64_t S) {
    FNO_FOR(i, n) y[i] = x[i] * l[(i / S) % C];
}

extern "C" __global__ void channel_dot_partials_f32(const float* __restrict__ a, const float* __restrict__ b, float* __restrict__ partial, int planes, int64_t S) {
    const int64_t plane = blockIdx.x;
    if (plane >= planes) return;
    const float* ap = a + plane * S;
    const float* bp = b ? b + plane * S : nullptr;
    float acc = 0.f;
    for (int64_t s = threadIdx.x; s < S; s += blockDim.x) acc += bp ? ap[s] * bp[s] : ap[s];
    acc = block_sum(acc);
    if (threadIdx.x == 0) partial[plane] = acc;
}

extern "C" __global__ void copy_channels_f32(const float* __restrict__ src, float* __restrict__ dst, int B, int Cs, int Cd, int64_t S, int off, int slice) {
    // One thread per element of the smaller tensor (src for a concat, dst for a slice).
    const int Cn = slice ? Cd : Cs;
    const int64_t n = (int64_t)B * Cn * S;
    FNO_FOR(i, n) {
        const int64_t s = i % S;
        const int64_t bc = i / S;
        const int c = bc % Cn, b = bc / Cn;
        if (slice) dst[i] = src[((int64_t)b * Cs + off + c) * S + s];
        else dst[((int64_t)b * Cd + off + c) * S + s] = src[i];
    }
}

extern "C" __global__ void pack_complex_f32(const float* __restrict__ x, float* __restrict__ y, int B, int C, int64_t S, int unpack) {
    // Indexed by the complex tensor's (b, c, s) element.
    const int64_t n = (int64_t)B * C * S;
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

extern "C" __global__ void roll2d_f32(const float* __restrict__ x, float* __restrict__ y, int64_t planes, int H, int W, int inner, int sh, int sw) {
    const int64_t n = planes * H * W * inner;
    FNO_FOR(i, n) {
        const int k = i % inner;
        const int64_t t = i / inner;
        const int j = t % W;
        const int64_t t2 = t / W;
        const int r = t2 % H;
        const int64_t p = t2 / H;
        const int oi = (r + sh) % H, oj = (j + sw) % W;
        y[((p * H + oi) * W + oj) * inner + k] = x[i];
    }
}

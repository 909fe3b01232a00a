// layerscale.cu: the fused LayerScale residual, forward and backward.
//
//   forward:   y[b, c, s] = x[b, c, s] + l[c] * br[b, c, s]
//   backward:  dx = dy (the launcher passes dy on; no kernel), dbr[b, c, s] = l[c] * dy[b, c, s],
//              dl[c] = sum_{b, s} dy[b, c, s] * br[b, c, s]
// Shapes: x, br, y, dy, dbr [B, C, S] (S = H W), l, dl [C], partial [B, C] (scratch).
// Geometry: forward, one thread per element (grid-stride). Backward in two launches, both
//   deterministic: layerscale_bwd_f32 has one block per (b, c) plane (grid B * C) that writes dbr
//   for the plane and reduces the plane's dy * br with block_sum into partial[b, c]; then
//   channel_sum_partials_f32 sums partial over b in order, one thread per channel.
// CPU reference: layerscale_fwd, channel_scale and channel_dot in src/backend/cpu/mod.rs.
#include "common.cuh"

extern "C" __global__ void layerscale_fwd_f32(const float* __restrict__ x, const float* __restrict__ br, const float* __restrict__ l,
                                              float* __restrict__ y, int B, int C, int S) {
    const int64_t n = (int64_t)B * C * S;
    FNO_FOR(i, n) {
        const int c = (i / S) % C;
        y[i] = x[i] + l[c] * br[i];
    }
}

extern "C" __global__ void layerscale_bwd_f32(const float* __restrict__ dy, const float* __restrict__ br, const float* __restrict__ l,
                                              float* __restrict__ dbr, float* __restrict__ partial, int B, int C, int S) {
    const int64_t plane = blockIdx.x;  // b * C + c
    if (plane >= (int64_t)B * C) return;
    const int c = plane % C;
    const float g = l[c];
    const float* dyp = dy + plane * S;
    const float* brp = br + plane * S;
    float* dbrp = dbr + plane * S;
    float acc = 0.f;
    for (int s = threadIdx.x; s < S; s += blockDim.x) {
        const float d = dyp[s];
        dbrp[s] = g * d;
        acc += d * brp[s];
    }
    acc = block_sum(acc);
    if (threadIdx.x == 0) partial[plane] = acc;
}

// out[c] = sum_b partial[b, c], b in order.
extern "C" __global__ void channel_sum_partials_f32(const float* __restrict__ partial, float* __restrict__ out, int B, int C) {
    FNO_FOR(c, C) {
        float acc = 0.f;
        for (int b = 0; b < B; ++b) acc += partial[(int64_t)b * C + c];
        out[c] = acc;
    }
}

// layerscale.cu: the fused LayerScale residual, forward and backward.
//
//   forward:   y[b, c, s] = x[b, c, s] + l[c] * br[b, c, s]
//   backward:  dx = dy (the launcher passes dy on; no kernel), dbr[b, c, s] = l[c] * dy[b, c, s],
//              dl[c] = sum_{b, s} dy[b, c, s] * br[b, c, s]
// Shapes: x, br, y, dy, dbr [B, C, S] (S = H W), l, dl [C], partial [B, C] (scratch).
// Geometry: forward, one thread per element (grid-stride). Backward in two launches, both
//   deterministic: layerscale_bwd_f32 has one block per (b, c) plane (grid B * C) that writes dbr
//   for the plane and reduces the plane's dy * br with block_sum into partial[b, c]; then
//   channel_sum_partials_f32 (layout.cu) sums partial over b in order, one thread per channel.
// Shapes: PlaneGeom g of params.cuh. CPU reference: src/backend/layerscale/cpu.rs.
#include "common.cuh"

extern "C" __global__ void layerscale_fwd_f32(const float* __restrict__ x, const float* __restrict__ br, const float* __restrict__ l,
                                              float* __restrict__ y, PlaneGeom g) {
    const int64_t n = (int64_t)g.b * g.c * g.s;
    FNO_FOR(i, n) {
        const int c = (i / g.s) % g.c;
        y[i] = x[i] + l[c] * br[i];
    }
}

extern "C" __global__ void layerscale_bwd_f32(const float* __restrict__ dy, const float* __restrict__ br, const float* __restrict__ l,
                                              float* __restrict__ dbr, float* __restrict__ partial, PlaneGeom g) {
    const int64_t plane = blockIdx.x;  // b * C + c
    if (plane >= (int64_t)g.b * g.c) return;
    const float gain = l[plane % g.c];
    const float* dyp = dy + plane * g.s;
    const float* brp = br + plane * g.s;
    float* dbrp = dbr + plane * g.s;
    float acc = 0.f;
    for (int64_t s = threadIdx.x; s < g.s; s += blockDim.x) {
        const float d = dyp[s];
        dbrp[s] = gain * d;
        acc += d * brp[s];
    }
    acc = block_sum(acc);
    if (threadIdx.x == 0) partial[plane] = acc;
}

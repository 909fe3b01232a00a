// agc.cu: adaptive gradient clipping (Brock et al. 2021), norms and scaling in one launch.
//
// A weight is viewed as [pre, units, post] with its output units along the middle axis (axis 0:
// pre = 1; axis 1 of conv-transpose and spectral weights: pre = C_in). Per unit u:
//   |W_u| = sqrt(sum W_u^2),  |G_u| = sqrt(sum G_u^2)   (a complex weight is its (re, im) pairs)
//   G_u  *= min(1, lambda max(|W_u|, eps) / |G_u|)       (unchanged when |G_u| = 0)
// Per-tensor AGC is units = 1 (pre = 1, post = the tensor's size). The trainer's clipping
// (src/optim/mod.rs) runs this one launch per clipped weight: no norm leaves the GPU.
// Shapes: w, g [pre * units * post]; factor_out [units] (optional: null skips it).
// Geometry: one block per unit, threads stride over the unit's pre * post elements, one block_sum
//   for |W_u|^2 and one for |G_u|^2 (deterministic); the same block then rescales the unit's
//   gradient in place.
// Shapes: AgcParams a of params.cuh. CPU reference: src/backend/agc/cpu.rs.
#include "common.cuh"

__device__ __forceinline__ int64_t unit_at(int64_t k, int u, int units, int post) {
    const int64_t a = k / post, j = k % post;
    return (a * units + u) * post + j;
}

extern "C" __global__ void agc_unit_f32(const float* __restrict__ w, float* __restrict__ g, float* __restrict__ factor_out, AgcParams a) {
    const int pre = a.pre, units = a.units, post = a.post;
    const float lambda = a.lambda, eps = a.eps;
    const int u = blockIdx.x;
    if (u >= units) return;
    const int64_t n = (int64_t)pre * post;
    float sw = 0.f, sg = 0.f;
    for (int64_t k = threadIdx.x; k < n; k += blockDim.x) {
        const int64_t at = unit_at(k, u, units, post);
        sw += w[at] * w[at];
        sg += g[at] * g[at];
    }
    const float wn = sqrtf(block_sum(sw)), gn = sqrtf(block_sum(sg));
    const float limit = lambda * fmaxf(wn, eps);
    const float f = (gn > limit && gn > 0.f) ? limit / gn : 1.f;
    if (f != 1.f) {
        for (int64_t k = threadIdx.x; k < n; k += blockDim.x) g[unit_at(k, u, units, post)] *= f;
    }
    if (threadIdx.x == 0 && factor_out) factor_out[u] = f;
}


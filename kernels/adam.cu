// adam.cu: the fused Adam / AdamW update, in place, fp32 (master weights and moments).
//
//   g' = s g (+ wd p unless decoupled)
//   m  = b1 m + (1 - b1) g';   v = b2 v + (1 - b2) g'^2
//   p  = p (1 - lr wd if decoupled) - lr (m / bc1) / (sqrt(v / bc2) + eps),   bc_k = 1 - b_k^t
// Shapes: p, g, m, v [n]. Geometry: one thread per element, grid-stride; reads p, g, m, v and
//   writes p, m, v once (28 bytes per element).
// CPU reference: adam in src/backend/cpu/optim.rs (f64 arithmetic there).
#include "common.cuh"

extern "C" __global__ void adam_step_f32(float* __restrict__ p, const float* __restrict__ g, float* __restrict__ m, float* __restrict__ v, int64_t n,
                                         float lr, float b1, float b2, float eps, float wd, float bc1, float bc2, float s, int decoupled) {
    FNO_FOR(i, n) {
        float gi = s * g[i];
        float pi = p[i];
        if (!decoupled) gi += wd * pi;
        const float mi = b1 * m[i] + (1.f - b1) * gi;
        const float vi = b2 * v[i] + (1.f - b2) * gi * gi;
        m[i] = mi;
        v[i] = vi;
        if (decoupled) pi *= 1.f - lr * wd;
        p[i] = pi - lr * (mi / bc1) / (sqrtf(vi / bc2) + eps);
    }
}

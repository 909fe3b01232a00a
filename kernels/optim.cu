// optim.cu: the fused optimiser updates, in place, fp32 (master weights and moments).
//
// adam_step_f32, Adam / AdamW, every tensor of an update in one launch:
//
//   g' = s g (+ wd p unless decoupled)
//   m  = b1 m + (1 - b1) g';   v = b2 v + (1 - b2) g'^2
//   p  = p (1 - lr wd if decoupled) - lr (m / bc1) / (sqrt(v / bc2) + eps),   bc_k = 1 - b_k^t
// Shapes: `count` AdamSlots (params.cuh), each a tensor's p, g, m, v [n]; h.n is the total of
//   their n. Geometry: one thread per element of the concatenation, grid-stride; an element
//   finds its tensor by binary search over the slots' starts. Reads p, g, m, v and writes p, m,
//   v once (28 bytes per element).
// sgd_step_f32, SGD with optional momentum (PyTorch's, dampening 0):
//   d = s g + wd p;   buf = d on the first step, else mu buf + d;
//   p -= lr (d + mu buf if nesterov, else buf); without a buffer (buf null) p -= lr d
// Shapes: p, g, buf [n]; one thread per element, grid-stride.
// Shapes: AdamParams, SgdParams h of params.cuh. CPU reference: src/backend/optim/cpu.rs (f64
// arithmetic there).
#include "common.cuh"

// The slot of element i: the last whose start is at most i.
__device__ __forceinline__ int adam_slot_of(const AdamSlot* slots, int count, int64_t i) {
    int lo = 0, hi = count - 1;
    while (lo < hi) {
        const int mid = (lo + hi + 1) / 2;
        if (slots[mid].start <= i) lo = mid;
        else hi = mid - 1;
    }
    return lo;
}

extern "C" __global__ void adam_step_f32(const AdamSlot* __restrict__ slots, int count, AdamParams h) {
    const float lr = h.lr, b1 = h.b1, b2 = h.b2, eps = h.eps, wd = h.wd, bc1 = h.bc1, bc2 = h.bc2, s = h.s;
    const int decoupled = h.decoupled;
    FNO_FOR(e, h.n) {
        const AdamSlot t = slots[adam_slot_of(slots, count, e)];
        const int64_t i = e - t.start;
        float* p = (float*)t.p;
        const float* g = (const float*)t.g;
        float* m = (float*)t.m;
        float* v = (float*)t.v;
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

extern "C" __global__ void sgd_step_f32(float* __restrict__ p, const float* __restrict__ g, float* __restrict__ buf, SgdParams h) {
    const float lr = h.lr, mu = h.mu, wd = h.wd, s = h.s;
    const int nesterov = h.nesterov, first = h.first;
    FNO_FOR(i, h.n) {
        const float x = p[i];
        const float d = s * g[i] + wd * x;
        float step = d;
        if (buf) {
            const float nb = first ? d : mu * buf[i] + d;
            buf[i] = nb;
            step = nesterov ? d + mu * nb : nb;
        }
        p[i] = x - lr * step;
    }
}

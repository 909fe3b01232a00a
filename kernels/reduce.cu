// reduce.cu: deterministic full reductions in two launches.
//
//   op 0: sum x;  op 1: sum x^2 (the squared norm behind global-norm clipping and the guards);
//   op 2: sum x y (the dot product; y is read only by this op)
// reduce_partial_f32: grid of P blocks (P fixed by the launcher, e.g. 256), block k reduces the
//   elements i = k * blockDim + t, stepping by P * blockDim, into partial[k] with block_sum.
// reduce_partial_each_f32: the first passes of several tensors in one launch (the gradient norms
//   of every parameter): `count` ReduceSlots (params.cuh); block b belongs to the slot whose
//   blocks include it and does exactly what block b - first_block of that tensor's own
//   reduce_partial_f32 would, writing segment t's slot of a partial [count, P]; a tensor's first
//   block also writes 0 into the slots of its segment beyond its blocks.
// reduce_final_f32: block k sums segment k of the partials, partial[k p .. (k + 1) p], the same
//   way into out[k]. One segment for one reduction; for several tensors at once, one segment of
//   p = P slots each, and one launch of that many blocks finishes them all, so the trainer reads
//   every norm back in one copy. Zeros in a segment change no sum, and each thread adds exactly
//   what it would over the used slots alone, so the result is the same either way.
// The order of additions depends only on P and blockDim, so the result is bitwise repeatable.
// Shapes: x, y [n], partial [segments * p], out [segments]. CPU reference: reduce in
//   src/backend/cpu/mod.rs (f64 there).
#include "common.cuh"

extern "C" __global__ void reduce_partial_f32(const float* __restrict__ x, const float* __restrict__ y, float* __restrict__ partial, int64_t n, int op) {
    float s = 0.f;
    FNO_FOR(i, n) {
        const float v = x[i];
        s += op == 0 ? v : (op == 1 ? v * v : v * y[i]);
    }
    s = block_sum(s);
    if (threadIdx.x == 0) partial[blockIdx.x] = s;
}

extern "C" __global__ void reduce_partial_each_f32(const ReduceSlot* __restrict__ slots, int count, float* __restrict__ partial, int p, int op) {
    int lo = 0, hi = count - 1;
    while (lo < hi) {
        const int mid = (lo + hi + 1) / 2;
        if (slots[mid].first_block <= (int64_t)blockIdx.x) lo = mid;
        else hi = mid - 1;
    }
    const ReduceSlot t = slots[lo];
    const float* x = (const float*)t.x;
    const int64_t k = blockIdx.x - t.first_block, stride = (int64_t)t.blocks * blockDim.x;
    float s = 0.f;
    for (int64_t i = k * blockDim.x + threadIdx.x; i < t.n; i += stride) {
        const float v = x[i];
        s += op == 0 ? v : v * v;
    }
    s = block_sum(s);
    float* seg = partial + (int64_t)lo * p;
    if (threadIdx.x == 0) seg[k] = s;
    if (k == 0) {
        for (int j = t.blocks + threadIdx.x; j < p; j += blockDim.x) seg[j] = 0.f;
    }
}

extern "C" __global__ void reduce_final_f32(const float* __restrict__ partial, float* __restrict__ out, int p) {
    const float* seg = partial + (int64_t)blockIdx.x * p;
    float s = 0.f;
    for (int i = threadIdx.x; i < p; i += blockDim.x) s += seg[i];
    s = block_sum(s);
    if (threadIdx.x == 0) out[blockIdx.x] = s;
}

// reduce.cu: deterministic full reductions in two launches.
//
//   op 0: sum x;  op 1: sum x^2 (the squared norm behind global-norm clipping and the guards);
//   op 2: sum x y (the dot product; y is read only by this op)
// reduce_partial_f32: grid of P blocks (P fixed by the launcher, e.g. 256), block k reduces the
//   elements i = k * blockDim + t, stepping by P * blockDim, into partial[k] with block_sum.
// reduce_final_f32: block k sums segment k of the partials, partial[k p .. (k + 1) p], the same
//   way into out[k]. One segment for one reduction; for several tensors at once (the gradient
//   norms of every parameter) each tensor's first pass writes its own segment of p = 256 slots,
//   the unused slots left at 0, and one launch of that many blocks finishes them all, so the
//   trainer reads every norm back in one copy. Zeros in a segment change no sum, and each thread
//   adds exactly what it would over the used slots alone, so the result is the same either way.
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

extern "C" __global__ void reduce_final_f32(const float* __restrict__ partial, float* __restrict__ out, int p) {
    const float* seg = partial + (int64_t)blockIdx.x * p;
    float s = 0.f;
    for (int i = threadIdx.x; i < p; i += blockDim.x) s += seg[i];
    s = block_sum(s);
    if (threadIdx.x == 0) out[blockIdx.x] = s;
}

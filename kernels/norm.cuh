// norm.cuh: FP32-promoted LayerNorm, RMSNorm and InstanceNorm, forward and backward, for f32, f16
// and bf16 inputs, as templates: norm.cu instantiates f32, dev/norm_lowp.cu f16 and bf16.
// Statistics, the affine parameters and all arithmetic are fp32; y and dx are written in the
// input's type.
//
// x is viewed as [B, C, S]. kind 0 LayerNorm and 1 RMSNorm normalise each (b, s) over its C
// channels (stride S); kind 2 InstanceNorm normalises each (b, c) over its S positions.
//   xhat = (x - mean) * rstd   (mean = 0 for RMSNorm),  rstd = 1 / sqrt(var + eps)   (var = mean x^2 for RMS)
//   y    = xhat * gamma[c] + beta[c]   (gamma, beta optional: null means 1 and 0)
// backward, per group of N elements, g = dy * gamma:
//   centred: dx = rstd (g - mean(g) - xhat mean(g xhat));   RMS: dx = rstd (g - xhat mean(g xhat))
//   dgamma[c] = sum dy xhat,  dbeta[c] = sum dy   (norm_affine_bwd: one block per channel)
// Shapes: x, y, dy, dx [B, C, S]; mean, rstd [groups] fp32 (groups = B S or B C); gamma, beta,
//   dgamma, dbeta [C] fp32.
// Geometry: one block per group (grid = groups), threads stride over the group's N elements;
//   the variance is a second pass over the centred values (no E[x^2] - E[x]^2 cancellation).
//   norm_affine_bwd has one block per channel, reducing over B and S in a fixed order.
// CPU reference: src/backend/norm/cpu.rs (statistics in f64 there).
#pragma once
#include "common.cuh"

struct Group {
    int64_t base, stride;
    int n;
};

__device__ __forceinline__ Group group_of(int64_t g, int kind, int C, int S) {
    if (kind == 2) return Group{g * S, 1, S};                    // (b, c): contiguous S
    const int64_t b = g / S, s = g % S;                          // (b, s): C values, stride S
    return Group{b * C * S + s, S, C};
}

__device__ __forceinline__ int channel_of(const Group& gr, int k, int kind, int64_t g, int C) {
    return kind == 2 ? (int)(g % C) : k;
}

template <typename T>
__device__ void norm_fwd(const T* __restrict__ x, const float* __restrict__ gamma, const float* __restrict__ beta, T* __restrict__ y,
                         float* __restrict__ mean_out, float* __restrict__ rstd_out, int kind, int B, int C, int S, float eps) {
    const int64_t groups = kind == 2 ? (int64_t)B * C : (int64_t)B * S;
    const int64_t g = blockIdx.x;
    if (g >= groups) return;
    const Group gr = group_of(g, kind, C, S);
    float mean = 0.f;
    if (kind != 1) {
        float s = 0.f;
        for (int k = threadIdx.x; k < gr.n; k += blockDim.x) s += to_f32(x[gr.base + k * gr.stride]);
        mean = block_sum(s) / gr.n;
    }
    float q = 0.f;
    for (int k = threadIdx.x; k < gr.n; k += blockDim.x) {
        const float d = to_f32(x[gr.base + k * gr.stride]) - mean;
        q += d * d;
    }
    const float rstd = rsqrtf(block_sum(q) / gr.n + eps);
    for (int k = threadIdx.x; k < gr.n; k += blockDim.x) {
        const int64_t at = gr.base + k * gr.stride;
        const int c = channel_of(gr, k, kind, g, C);
        const float xh = (to_f32(x[at]) - mean) * rstd;
        y[at] = from_f32<T>(xh * (gamma ? gamma[c] : 1.f) + (beta ? beta[c] : 0.f));
    }
    if (threadIdx.x == 0) {
        mean_out[g] = mean;
        rstd_out[g] = rstd;
    }
}

template <typename T>
__device__ void norm_bwd(const T* __restrict__ x, const T* __restrict__ dy, const float* __restrict__ gamma, const float* __restrict__ mean_in,
                         const float* __restrict__ rstd_in, T* __restrict__ dx, int kind, int B, int C, int S) {
    const int64_t groups = kind == 2 ? (int64_t)B * C : (int64_t)B * S;
    const int64_t g = blockIdx.x;
    if (g >= groups) return;
    const Group gr = group_of(g, kind, C, S);
    const float mean = mean_in[g], rstd = rstd_in[g];
    float sg = 0.f, sgx = 0.f;
    for (int k = threadIdx.x; k < gr.n; k += blockDim.x) {
        const int64_t at = gr.base + k * gr.stride;
        const int c = channel_of(gr, k, kind, g, C);
        const float gv = to_f32(dy[at]) * (gamma ? gamma[c] : 1.f);
        sg += gv;
        sgx += gv * (to_f32(x[at]) - mean) * rstd;
    }
    const float mg = kind == 1 ? 0.f : block_sum(sg) / gr.n;
    const float mgx = block_sum(sgx) / gr.n;
    for (int k = threadIdx.x; k < gr.n; k += blockDim.x) {
        const int64_t at = gr.base + k * gr.stride;
        const int c = channel_of(gr, k, kind, g, C);
        const float gv = to_f32(dy[at]) * (gamma ? gamma[c] : 1.f);
        const float xh = (to_f32(x[at]) - mean) * rstd;
        dx[at] = from_f32<T>(rstd * (gv - mg - xh * mgx));
    }
}

// dgamma[c] = sum dy xhat, dbeta[c] = sum dy over every element of channel c (either may be null).
template <typename T>
__device__ void norm_affine_bwd(const T* __restrict__ x, const T* __restrict__ dy, const float* __restrict__ mean_in, const float* __restrict__ rstd_in,
                                float* __restrict__ dgamma, float* __restrict__ dbeta, int kind, int B, int C, int S) {
    const int c = blockIdx.x;
    if (c >= C) return;
    float sgx = 0.f, sg = 0.f;
    const int64_t n = (int64_t)B * S;
    for (int64_t k = threadIdx.x; k < n; k += blockDim.x) {
        const int64_t b = k / S, s = k % S;
        const int64_t at = (b * C + c) * S + s;
        const int64_t g = kind == 2 ? b * C + c : b * S + s;
        const float d = to_f32(dy[at]);
        sg += d;
        sgx += d * (to_f32(x[at]) - mean_in[g]) * rstd_in[g];
    }
    sgx = block_sum(sgx);
    sg = block_sum(sg);
    if (threadIdx.x == 0) {
        if (dgamma) dgamma[c] = sgx;
        if (dbeta) dbeta[c] = sg;
    }
}

// The extern "C" kernels of one element type: norm_fwd_<SUFFIX>, norm_bwd_<SUFFIX>,
// norm_affine_bwd_<SUFFIX>, each taking its NormGeom (params.cuh) by value.
#define FNO_NORM_KERNELS(SUFFIX, T)                                                                                                  \
    extern "C" __global__ void norm_fwd_##SUFFIX(const T* x, const float* gamma, const float* beta, T* y, float* mean, float* rstd,   \
                                                 NormGeom g) {                                                                       \
        norm_fwd<T>(x, gamma, beta, y, mean, rstd, g.kind, g.b, g.c, g.s, g.eps);                                                  \
    }                                                                                                                                \
    extern "C" __global__ void norm_bwd_##SUFFIX(const T* x, const T* dy, const float* gamma, const float* mean, const float* rstd,   \
                                                 T* dx, NormGeom g) {                                                                \
        norm_bwd<T>(x, dy, gamma, mean, rstd, dx, g.kind, g.b, g.c, g.s);                                                          \
    }                                                                                                                                \
    extern "C" __global__ void norm_affine_bwd_##SUFFIX(const T* x, const T* dy, const float* mean, const float* rstd, float* dgamma,  \
                                                        float* dbeta, NormGeom g) {                                                  \
        norm_affine_bwd<T>(x, dy, mean, rstd, dgamma, dbeta, g.kind, g.b, g.c, g.s);                                               \
    }

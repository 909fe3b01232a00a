// params.cuh: every struct a kernel takes by value, in one place. build.rs generates the Rust
// mirror of each (#[repr(C)], the same fields in the same order: src/backend/kernels.rs) and
// checks that the static_assert below states the size the C layout rules give; the Rust side
// asserts the same size. A kernel's launch geometry lives in the struct of its op family
// (src/backend/<family>/mod.rs), whose constructor is the op's only shape check.
#pragma once
#include <stdint.h>

// conv.cu: a 2-D convolution of x [N, c, h, w] with kernels kh x kw into [N, *, ho, wo].
struct ConvGeom {
    int c, h, w, kh, kw, ho, wo, stride, pad;
};
static_assert(sizeof(ConvGeom) == 36, "ConvGeom");

// spectral.cu: b samples, ci -> co channels, an h x wh half spectrum, r kept rows (rows 0..pos,
// then h - (r - pos)..h) and my kept columns.
struct SpectralGeom {
    int b, ci, co, h, wh, r, pos, my;
};
static_assert(sizeof(SpectralGeom) == 32, "SpectralGeom");

// norm.cu: kind 0 LayerNorm, 1 RMSNorm, 2 InstanceNorm of x [b, c, s].
struct NormGeom {
    int kind, b, c, s;
    float eps;
};
static_assert(sizeof(NormGeom) == 20, "NormGeom");

// layout.cu, layerscale.cu: an activation [b, c, s] (s the product of the trailing dimensions).
struct PlaneGeom {
    int64_t s;
    int b, c;
};
static_assert(sizeof(PlaneGeom) == 16, "PlaneGeom");

// layout.cu: concat (slice 0) writes src [b, cs, s] into channels off.. of dst [b, cd, s]; slice
// (slice 1) reads channels off.. of src [b, cs, s] into dst [b, cd, s].
struct CopyGeom {
    int64_t s;
    int b, cs, cd, off, slice;
};
static_assert(sizeof(CopyGeom) == 32, "CopyGeom");

// layout.cu: two activations [b, ca, s] and [b, cb, s] side by side along channels in one
// [b, ca + cb, s] (concat2_f32 joins them, split2_f32 takes them apart).
struct Concat2Geom {
    int64_t s;
    int b, ca, cb;
};
static_assert(sizeof(Concat2Geom) == 24, "Concat2Geom");

// layout.cu: a circular shift by (sh, sw) of planes of [h, w, inner].
struct RollGeom {
    int64_t planes;
    int h, w, inner, sh, sw;
};
static_assert(sizeof(RollGeom) == 32, "RollGeom");

// fft.cu: planes of an h x wh half spectrum of width-w images; adjoint selects the adjoint glue.
struct SpectrumGeom {
    int64_t planes;
    int h, wh, w, adjoint;
    float norm;
};
static_assert(sizeof(SpectrumGeom) == 32, "SpectrumGeom");

// agc.cu: w, g viewed as [pre, units, post]; lambda and eps of adaptive clipping.
struct AgcParams {
    int pre, units, post;
    float lambda, eps;
};
static_assert(sizeof(AgcParams) == 20, "AgcParams");

// optim.cu: one Adam / AdamW update of n elements (over all the tensors of a launch); bc1, bc2 are
// the bias corrections 1 - b^t, s multiplies the gradient first.
struct AdamParams {
    int64_t n;
    float lr, b1, b2, eps, wd, bc1, bc2, s;
    int decoupled;
};
static_assert(sizeof(AdamParams) == 48, "AdamParams");

// optim.cu: one tensor of a multi-tensor Adam launch: the device addresses of its parameter,
// gradient and moments (n floats each), and `start`, its first element in the launch's numbering
// of all its tensors' elements (the slots in order, starts ascending).
struct AdamSlot {
    uint64_t p, g, m, v;
    int64_t n, start;
};
static_assert(sizeof(AdamSlot) == 48, "AdamSlot");

// reduce.cu: one tensor of a multi-tensor first pass: the device address of its n floats, and
// `first_block`, its first block in the launch (it has `blocks` of them, as a reduction of that
// tensor alone would; the slots in order, first blocks ascending).
struct ReduceSlot {
    uint64_t x;
    int64_t n, first_block;
    int blocks;
};
static_assert(sizeof(ReduceSlot) == 32, "ReduceSlot");

// optim.cu: one SGD update of n elements (momentum mu, dampening 0).
struct SgdParams {
    int64_t n;
    float lr, mu, wd, s;
    int nesterov, first;
};
static_assert(sizeof(SgdParams) == 32, "SgdParams");

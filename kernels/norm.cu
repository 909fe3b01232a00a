// norm.cu: the f32 instantiation of the FP32-promoted norms of norm.cuh (formulas, shapes and launch
// geometry there): norm_fwd_f32, norm_bwd_f32, norm_affine_bwd_f32. GPU activations are f32 (low
// precision is emulated by rounding, as on the CPU), so these are the ones training launches; the
// f16 and bf16 instantiations wait in dev/norm_lowp.cu for 2-byte activation storage.
// CPU reference: src/backend/cpu/norm.rs.
#include "norm.cuh"

FNO_NORM_KERNELS(f32, float)

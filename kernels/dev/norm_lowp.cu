// dev/norm_lowp.cu: the FP32-promoted norms of norm.cuh for f16 and bf16 inputs (norm_fwd_f16,
// norm_bwd_f16, norm_affine_bwd_f16 and the bf16 three): statistics and arithmetic in fp32, y and
// dx written in the input's type. No training path launches them yet (GPU activations are f32);
// tests/cuda.rs checks them against the CPU on rounded inputs and benches/cuda_kernels.rs times
// them beside the f32 ones.
#include "../norm.cuh"

FNO_NORM_KERNELS(f16, __half)
FNO_NORM_KERNELS(bf16, __nv_bfloat16)

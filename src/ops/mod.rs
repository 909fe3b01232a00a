//! Differentiable ops: each computes its forward through `backend`, records a tape node holding
//! only what its backward needs, and registers that backward. These are the only users of the tape.

mod conv;
mod elementwise;
mod loss;
mod norm;
mod physics;
mod spectral_conv;

pub use conv::{conv2d, conv2d_gelu, conv_transpose2d};
pub use elementwise::{
    abs, add, add_gelu, add_scalar, channel_scale, concat_channels, div_scalar, gelu, layerscale, log, mul, mul_scalar, round_to, scale, sqrt, square, sub,
    wrap_angle,
};
pub use loss::{central_differences, global_norm, mae, mae_over_detached_mean, mean, mean_rel_h1, mean_rel_l2, mse, rel_l2, sample_sum_sq, sum, sum_sq};
pub use norm::{instance_norm, layer_norm, norm, rms_norm};
pub use physics::{channels_to_complex, complex_abs, complex_angle, complex_to_channels, fft2, fftshift, ifftshift, mul_probe, roll_flat, FftNorm};
pub use spectral_conv::{irfft2, rfft2, spectral_conv, spectral_mix};

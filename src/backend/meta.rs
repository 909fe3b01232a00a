//! The meta backend: every kernel is a no-op. The dispatch layer has already made the outputs
//! (shapes and byte counts only), so running a graph on the meta device counts exactly the bytes
//! the CPU backend would hold, without touching any data.

use super::{AdamStep, Backend, Binary, Conv2dParams, NormKind, Reduce, SgdStep, Unary, Units};
use crate::error::Result;
use crate::tensor::Tensor;

pub struct MetaBackend;

impl Backend for MetaBackend {
    fn unary(&self, _: Unary, _: &Tensor, _: &mut Tensor) -> Result<()> {
        Ok(())
    }
    fn unary_bwd(&self, _: Unary, _: &Tensor, _: &Tensor, _: &mut Tensor) -> Result<()> {
        Ok(())
    }
    fn binary(&self, _: Binary, _: &Tensor, _: &Tensor, _: &mut Tensor) -> Result<()> {
        Ok(())
    }
    fn add_assign(&self, _: &mut Tensor, _: &Tensor) -> Result<()> {
        Ok(())
    }
    fn add_channel_bias(&self, _: &mut Tensor, _: &Tensor) -> Result<()> {
        Ok(())
    }
    fn affine(&self, _: &Tensor, _: f64, _: f64, _: &mut Tensor) -> Result<()> {
        Ok(())
    }
    fn scale_by(&self, _: &Tensor, _: &Tensor, _: bool, _: &mut Tensor) -> Result<()> {
        Ok(())
    }
    fn reduce(&self, _: Reduce, _: &Tensor, _: &mut Tensor) -> Result<()> {
        Ok(())
    }
    fn reduce_each(&self, _: Reduce, _: &[&Tensor], _: &mut Tensor) -> Result<()> {
        Ok(())
    }
    fn dot(&self, _: &Tensor, _: &Tensor, _: &mut Tensor) -> Result<()> {
        Ok(())
    }
    fn broadcast_scalar(&self, _: &Tensor, _: &Tensor, _: &mut Tensor) -> Result<()> {
        Ok(())
    }
    fn channel_scale(&self, _: &Tensor, _: &Tensor, _: &mut Tensor) -> Result<()> {
        Ok(())
    }
    fn channel_dot(&self, _: &Tensor, _: Option<&Tensor>, _: &mut Tensor) -> Result<()> {
        Ok(())
    }
    fn layerscale_fwd(&self, _: &Tensor, _: &Tensor, _: &Tensor, _: &mut Tensor) -> Result<()> {
        Ok(())
    }
    fn layerscale_bwd(&self, _: &Tensor, _: &Tensor, _: &Tensor, _: &mut Tensor, _: &mut Tensor) -> Result<()> {
        Ok(())
    }
    fn copy_channels(&self, _: &Tensor, _: &mut Tensor, _: usize) -> Result<()> {
        Ok(())
    }
    fn slice_channels(&self, _: &Tensor, _: usize, _: &mut Tensor) -> Result<()> {
        Ok(())
    }
    fn conv2d_fwd(&self, _: &Tensor, _: &Tensor, _: Option<&Tensor>, _: Conv2dParams, _: &mut Tensor) -> Result<()> {
        Ok(())
    }
    fn conv2d_bwd_input(&self, _: &Tensor, _: &Tensor, _: Conv2dParams, _: &mut Tensor) -> Result<()> {
        Ok(())
    }
    fn conv2d_bwd_weight(&self, _: &Tensor, _: &Tensor, _: Conv2dParams, _: &mut Tensor) -> Result<()> {
        Ok(())
    }
    fn rfft2(&self, _: &Tensor, _: &mut Tensor) -> Result<()> {
        Ok(())
    }
    fn rfft2_bwd(&self, _: &Tensor, _: &mut Tensor) -> Result<()> {
        Ok(())
    }
    fn irfft2(&self, _: &Tensor, _: &mut Tensor) -> Result<()> {
        Ok(())
    }
    fn irfft2_bwd(&self, _: &Tensor, _: &mut Tensor) -> Result<()> {
        Ok(())
    }
    fn spectral_mix_fwd(&self, _: &Tensor, _: &Tensor, _: &[usize], _: &mut Tensor) -> Result<()> {
        Ok(())
    }
    fn spectral_mix_bwd_input(&self, _: &Tensor, _: &Tensor, _: &[usize], _: &mut Tensor) -> Result<()> {
        Ok(())
    }
    fn spectral_mix_bwd_weight(&self, _: &Tensor, _: &Tensor, _: &[usize], _: &mut Tensor) -> Result<()> {
        Ok(())
    }
    fn norm_fwd(&self, _: NormKind, _: &Tensor, _: Option<&Tensor>, _: Option<&Tensor>, _: f64, _: &mut Tensor, _: &mut Tensor, _: &mut Tensor) -> Result<()> {
        Ok(())
    }
    fn norm_bwd(
        &self,
        _: NormKind,
        _: &Tensor,
        _: &Tensor,
        _: Option<&Tensor>,
        _: &Tensor,
        _: &Tensor,
        _: &mut Tensor,
        _: Option<&mut Tensor>,
        _: Option<&mut Tensor>,
    ) -> Result<()> {
        Ok(())
    }
    fn complex_mul(&self, _: &Tensor, _: &Tensor, _: bool, _: &mut Tensor) -> Result<()> {
        Ok(())
    }
    fn fft2(&self, _: &Tensor, _: bool, _: f64, _: &mut Tensor) -> Result<()> {
        Ok(())
    }
    fn roll2d(&self, _: &Tensor, _: usize, _: usize, _: bool, _: &mut Tensor) -> Result<()> {
        Ok(())
    }
    fn complex_abs(&self, _: &Tensor, _: &mut Tensor) -> Result<()> {
        Ok(())
    }
    fn complex_abs_bwd(&self, _: &Tensor, _: &Tensor, _: &mut Tensor) -> Result<()> {
        Ok(())
    }
    fn complex_angle(&self, _: &Tensor, _: &mut Tensor) -> Result<()> {
        Ok(())
    }
    fn complex_angle_bwd(&self, _: &Tensor, _: &Tensor, _: &mut Tensor) -> Result<()> {
        Ok(())
    }
    fn pack_complex(&self, _: &Tensor, _: bool, _: &mut Tensor) -> Result<()> {
        Ok(())
    }
    fn adam_step(&self, _: &mut Tensor, _: &Tensor, _: &mut Tensor, _: &mut Tensor, _: &AdamStep) -> Result<()> {
        Ok(())
    }
    fn sgd_step(&self, _: &mut Tensor, _: &Tensor, _: Option<&mut Tensor>, _: &SgdStep) -> Result<()> {
        Ok(())
    }
    fn agc(&self, _: &Tensor, _: &mut Tensor, _: Units, _: f64, _: f64) -> Result<()> {
        Ok(())
    }
    fn clamp(&self, _: &mut Tensor, _: f64) -> Result<()> {
        Ok(())
    }
}

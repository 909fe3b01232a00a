//! Finite-difference gradient checks.
//!
//! [`check`] builds a graph from f64 inputs, reduces its output to L = sum(out * R) with a fixed
//! random R, back-propagates, and compares every entry of every checked input's gradient with the
//! central difference (L(x + h) - L(x - h)) / 2h. An entry passes when
//! |analytic - numeric| <= atol + rtol |numeric|. [`all_cases`] lists a check for every
//! differentiable op, on small odd sizes with fixed seeds; `fnokern gradcheck` runs them and so
//! does the test suite.

use crate::autograd::{ParamStore, Tape, Var};
use crate::backend::{self, Conv2dParams, ModeConvention, NormKind, SpectralModes};
use crate::device::Device;
use crate::error::Result;
use crate::ops;
use crate::tensor::{DType, Shape, Tensor};

/// Step and tolerances of a check.
#[derive(Clone, Copy, Debug)]
pub struct Tolerance {
    pub step: f64,
    pub atol: f64,
    pub rtol: f64,
}

impl Default for Tolerance {
    /// h = 1e-6 leaves a truncation error near h^2 = 1e-12 and a rounding error near
    /// 1e-16 / h = 1e-10 relative to L; the tolerances sit well above both.
    fn default() -> Self {
        Tolerance { step: 1e-6, atol: 1e-7, rtol: 1e-5 }
    }
}

/// The outcome of one check.
#[derive(Debug, Default)]
pub struct Report {
    pub checked: usize,
    pub max_abs_err: f64,
    pub max_rel_err: f64,
    /// The failing entries, first ones first.
    pub mismatches: Vec<String>,
}

impl Report {
    pub fn passed(&self) -> bool {
        self.mismatches.is_empty() && self.checked > 0
    }
}

/// One input of a check: its value and whether its gradient is checked (false: a constant).
pub struct Input {
    pub value: Tensor,
    pub checked: bool,
}

impl Input {
    pub fn var(value: Tensor) -> Input {
        Input { value, checked: true }
    }
    pub fn constant(value: Tensor) -> Input {
        Input { value, checked: false }
    }
}

type Graph<'a> = dyn Fn(&mut Tape, &[Var]) -> Result<Var> + 'a;

fn eval(params: &ParamStore, inputs: &[Tensor], f: &Graph, r: &Tensor) -> Result<f64> {
    let mut tape = Tape::with_params(params);
    let vars: Vec<Var> = inputs.iter().map(|t| tape.leaf(t.clone(), false)).collect();
    let out = f(&mut tape, &vars)?;
    backend::dot(out.value(), r)?.scalar_value()
}

/// Checks the gradient of `f` with respect to every checked input.
pub fn check(inputs: Vec<Input>, f: &Graph, tol: Tolerance, seed: u64) -> Result<Report> {
    check_with_params(&ParamStore::new(), inputs, f, tol, seed, usize::MAX)
}

/// Which entries of an `n`-element tensor to check: all of them, or `limit` spread evenly.
fn entries(n: usize, limit: usize) -> Vec<usize> {
    if n <= limit {
        (0..n).collect()
    } else {
        (0..limit).map(|i| i * n / limit + (i * 7919) % (n / limit).max(1)).collect()
    }
}

/// Checks the gradients of `f` with respect to its checked inputs and every parameter of `params`
/// (which `f` reads with `tape.param`), at most `limit` entries per tensor (spread over it).
pub fn check_with_params(params: &ParamStore, inputs: Vec<Input>, f: &Graph, tol: Tolerance, seed: u64, limit: usize) -> Result<Report> {
    // All values of one check live on one device (one ledger).
    let dev = match params.values().first() {
        Some(t) => t.device().clone(),
        None => Device::cpu(),
    };
    let inputs = inputs
        .into_iter()
        .map(|i| {
            let value = Tensor::from_vec(i.value.to_f64_vec()?, i.value.shape().clone(), &dev)?;
            Ok(Input { value, checked: i.checked })
        })
        .collect::<Result<Vec<_>>>()?;
    let mut tape = Tape::with_params(params);
    let vars: Vec<Var> = inputs.iter().map(|i| tape.leaf(i.value.clone(), i.checked)).collect();
    let out = f(&mut tape, &vars)?;
    let r = Tensor::randn(out.shape().clone(), 1.0, seed ^ 0x5eed, DType::F64, &dev)?;
    let grads = tape.backward_with(vec![(out, r.clone())])?;

    let values: Vec<Tensor> = inputs.iter().map(|i| i.value.clone()).collect();
    let mut report = Report::default();
    let mut compare = |what: String, analytic: f64, numeric: f64| {
        let err = (analytic - numeric).abs();
        report.checked += 1;
        report.max_abs_err = report.max_abs_err.max(err);
        report.max_rel_err = report.max_rel_err.max(err / numeric.abs().max(1e-12));
        // Negated so that a NaN error counts as a failure.
        #[allow(clippy::neg_cmp_op_on_partial_ord)]
        if !(err <= tol.atol + tol.rtol * numeric.abs()) {
            report.mismatches.push(format!("{what}: analytic {analytic:.9e} numeric {numeric:.9e}"));
        }
    };
    let central = |at: &dyn Fn(f64) -> Result<f64>| -> Result<f64> { Ok((at(tol.step)? - at(-tol.step)?) / (2.0 * tol.step)) };
    for (k, input) in inputs.iter().enumerate().filter(|(_, i)| i.checked) {
        let analytic = match grads.wrt(&vars[k]) {
            Some(g) => g.to_f64_vec()?,
            None => vec![0.0; input.value.numel()],
        };
        let base = input.value.to_f64_vec()?;
        for j in entries(base.len(), limit) {
            let numeric = central(&|delta| {
                let mut v = base.clone();
                v[j] += delta;
                let mut probe = values.clone();
                probe[k] = Tensor::from_vec(v, input.value.shape().clone(), &dev)?;
                eval(params, &probe, f, &r)
            })?;
            compare(format!("input {k} {} entry {j}", input.value.shape()), analytic[j], numeric);
        }
    }
    for (id, name, value) in params.iter() {
        let analytic = match grads.param(id) {
            Some(g) => g.to_f64_vec()?,
            None => vec![0.0; value.numel()],
        };
        let base = value.to_f64_vec()?;
        for j in entries(base.len(), limit) {
            let numeric = central(&|delta| {
                let mut v = base.clone();
                v[j] += delta;
                let mut moved = params.clone();
                moved.set(id, Tensor::from_vec(v, value.shape().clone(), &dev)?)?;
                eval(&moved, &values, f, &r)
            })?;
            compare(format!("parameter `{name}` entry {j}"), analytic[j], numeric);
        }
    }
    Ok(report)
}

/// A named check.
pub struct Case {
    pub name: &'static str,
    pub run: fn() -> Result<Report>,
}

fn randn(shape: impl Into<Shape>, seed: u64) -> Result<Tensor> {
    Tensor::randn(shape, 1.0, seed, DType::F64, &Device::cpu())
}

fn positive(shape: impl Into<Shape>, seed: u64) -> Result<Tensor> {
    Tensor::rand_uniform(shape, 0.5, 2.0, seed, DType::F64, &Device::cpu())
}

fn vars(ts: Vec<Tensor>) -> Vec<Input> {
    ts.into_iter().map(Input::var).collect()
}

fn go(inputs: Vec<Input>, f: &Graph) -> Result<Report> {
    check(inputs, f, Tolerance::default(), 17)
}

fn conv_case(x: [usize; 4], w: [usize; 4], bias: bool, p: Conv2dParams) -> Result<Report> {
    let mut ins = vec![randn(x, 1)?, randn(w, 2)?];
    if bias {
        ins.push(randn([w[0]], 3)?);
    }
    go(vars(ins), &move |t, v| ops::conv2d(t, &v[0], &v[1], v.get(2), p))
}

/// A convolution the CPU runs as Winograd (128 channels each way on 2 samples of 3 x 3 maps),
/// with the weights at PyTorch's initial scale so that the loss stays O(1) (at N(0, 1) weights
/// its 1152-term sums make finite differences too noisy for the tolerance); 40 entries per tensor.
fn winograd_case() -> Result<Report> {
    let w = backend::affine(&randn([128, 128, 3, 3], 2)?, (1.0f64 / 1152.0).sqrt(), 0.0)?;
    let ins = vars(vec![randn([2, 128, 3, 3], 1)?, w, randn([128], 3)?]);
    let p = Conv2dParams::new(1, 1);
    check_with_params(&ParamStore::new(), ins, &move |t, v| ops::conv2d(t, &v[0], &v[1], v.get(2), p), Tolerance::default(), 17, 40)
}

fn convt_case(x: [usize; 4], w: [usize; 4], bias: bool, p: Conv2dParams) -> Result<Report> {
    let mut ins = vec![randn(x, 1)?, randn(w, 2)?];
    if bias {
        ins.push(randn([w[1]], 3)?);
    }
    go(vars(ins), &move |t, v| ops::conv_transpose2d(t, &v[0], &v[1], v.get(2), p))
}

fn spectral_case(x: [usize; 4], c_out: usize, modes: SpectralModes) -> Result<Report> {
    let ws = modes.weight_shape(x[1], c_out, x[2], x[3]);
    go(vars(vec![randn(x, 1)?, randn(ws, 2)?]), &move |t, v| ops::spectral_conv(t, &v[0], &v[1], modes))
}

fn mix_case(xh: [usize; 5], c_out: usize, modes: SpectralModes) -> Result<Report> {
    // The weight shape for a map whose half spectrum has xh[3] columns (W = 2 (Wh - 1)).
    let ws = modes.weight_shape(xh[1], c_out, xh[2], 2 * (xh[3] - 1));
    go(vars(vec![randn(xh, 1)?, randn(ws, 2)?]), &move |t, v| ops::spectral_mix(t, &v[0], &v[1], modes))
}

fn norm_case(kind: NormKind, affine: bool) -> Result<Report> {
    let x = [2, 3, 5, 3];
    let mut ins = vec![randn(x, 1)?];
    if affine {
        ins.push(randn([3], 2)?);
        if kind != NormKind::RmsNorm {
            ins.push(randn([3], 3)?);
        }
    }
    go(vars(ins), &move |t, v| ops::norm(t, kind, &v[0], v.get(1), v.get(2), 1e-5))
}

fn unary_case(f: fn(&mut Tape, &Var) -> Result<Var>, positive_only: bool) -> Result<Report> {
    let x = if positive_only { positive([3, 5, 7], 1)? } else { randn([3, 5, 7], 1)? };
    go(vars(vec![x]), &move |t, v| f(t, &v[0]))
}

fn binary_case(f: fn(&mut Tape, &Var, &Var) -> Result<Var>) -> Result<Report> {
    go(vars(vec![randn([3, 5, 7], 1)?, randn([3, 5, 7], 2)?]), &move |t, v| f(t, &v[0], &v[1]))
}

fn scalar_case(f: fn(&mut Tape, &Var, &Var) -> Result<Var>) -> Result<Report> {
    go(vars(vec![randn([3, 5], 1)?, positive([1], 2)?]), &move |t, v| f(t, &v[0], &v[1]))
}

fn fft_case(norm: ops::FftNorm) -> Result<Report> {
    go(vars(vec![randn([2, 5, 3, 2], 1)?]), &move |t, v| ops::fft2(t, &v[0], norm))
}

fn loss_case(f: fn(&mut Tape, &Var, &Var) -> Result<Var>) -> Result<Report> {
    go(vars(vec![randn([2, 3, 5], 1)?, randn([2, 3, 5], 2)?]), &move |t, v| f(t, &v[0], &v[1]))
}

/// Every op's check.
pub fn all_cases() -> Vec<Case> {
    use ModeConvention::{Corners, Positive};
    macro_rules! case {
        ($name:literal, $body:expr) => {
            Case { name: $name, run: || $body }
        };
    }
    vec![
        case!("conv2d_3x3_pad1_bias", conv_case([2, 3, 5, 7], [4, 3, 3, 3], true, Conv2dParams::new(1, 1))),
        case!("conv2d_2x2_stride2_bias", conv_case([2, 3, 6, 5], [5, 3, 2, 2], true, Conv2dParams::new(2, 0))),
        case!("conv2d_1x1_bias", conv_case([2, 3, 5, 3], [4, 3, 1, 1], true, Conv2dParams::new(1, 0))),
        case!("conv2d_3x3_stride2_pad1", conv_case([1, 2, 7, 5], [3, 2, 3, 3], false, Conv2dParams::new(2, 1))),
        // Many channels on a small map (C_in, C_out >= 128, C_out >= H W, batch > 1): the CPU runs
        // Winograd F(2x2, 3x3) there (odd sides: partial tiles).
        case!("conv2d_3x3_pad1_winograd", winograd_case()),
        case!("conv_transpose2d_2x2_stride2_bias", convt_case([2, 3, 3, 5], [3, 4, 2, 2], true, Conv2dParams::new(2, 0))),
        case!("conv_transpose2d_3x3_stride2_pad1", convt_case([1, 2, 3, 4], [2, 3, 3, 3], false, Conv2dParams::new(2, 1))),
        case!("rfft2_odd_width", go(vars(vec![randn([2, 5, 7], 1)?]), &|t, v| ops::rfft2(t, &v[0]))),
        case!("rfft2_even_width", go(vars(vec![randn([2, 5, 6], 1)?]), &|t, v| ops::rfft2(t, &v[0]))),
        // Random half spectra: the DC and Nyquist columns are not Hermitian.
        case!("irfft2_even_width", go(vars(vec![randn([2, 5, 4, 2], 1)?]), &|t, v| ops::irfft2(t, &v[0], 6))),
        case!("irfft2_odd_width", go(vars(vec![randn([2, 5, 4, 2], 1)?]), &|t, v| ops::irfft2(t, &v[0], 7))),
        case!("spectral_mix_corners", mix_case([2, 3, 7, 4, 2], 2, SpectralModes::new(3, Corners))),
        case!("spectral_mix_positive", mix_case([2, 3, 7, 4, 2], 2, SpectralModes::new(3, Positive))),
        case!("spectral_conv_corners", spectral_case([2, 3, 7, 6], 2, SpectralModes::new(3, Corners))),
        case!("spectral_conv_positive_clamped", spectral_case([2, 2, 5, 5], 3, SpectralModes::new(4, Positive))),
        case!("spectral_conv_corners_clamped", spectral_case([1, 2, 3, 5], 2, SpectralModes::new(12, Corners))),
        case!("gelu", unary_case(ops::gelu, false)),
        case!("abs", unary_case(ops::abs, false)),
        case!("sqrt", unary_case(ops::sqrt, true)),
        case!("square", unary_case(ops::square, false)),
        case!("log", unary_case(ops::log, true)),
        // randn inputs stay clear of the wrap points (odd multiples of pi) by far more than h.
        case!("wrap_angle", unary_case(ops::wrap_angle, false)),
        case!("add", binary_case(ops::add)),
        case!("sub", binary_case(ops::sub)),
        case!("mul", binary_case(ops::mul)),
        case!("scale", go(vars(vec![randn([3, 5], 1)?]), &|t, v| ops::scale(t, &v[0], -1.7))),
        case!("add_scalar", go(vars(vec![randn([3, 5], 1)?]), &|t, v| ops::add_scalar(t, &v[0], 0.3))),
        case!("mul_scalar", scalar_case(ops::mul_scalar)),
        case!("div_scalar", scalar_case(ops::div_scalar)),
        case!("channel_scale", go(vars(vec![randn([2, 3, 5, 3], 1)?, randn([3], 2)?]), &|t, v| ops::channel_scale(t, &v[0], &v[1]))),
        case!(
            "layerscale_residual",
            go(vars(vec![randn([2, 3, 5, 3], 1)?, randn([2, 3, 5, 3], 2)?, randn([3], 3)?]), &|t, v| ops::layerscale(t, &v[0], &v[1], &v[2]))
        ),
        case!(
            "concat_channels",
            go(vars(vec![randn([2, 3, 3, 5], 1)?, randn([2, 1, 3, 5], 2)?, randn([2, 2, 3, 5], 3)?]), &|t, v| {
                ops::concat_channels(t, &[&v[0], &v[1], &v[2]])
            })
        ),
        case!("layer_norm_affine", norm_case(NormKind::LayerNorm, true)),
        case!("layer_norm_plain", norm_case(NormKind::LayerNorm, false)),
        case!("rms_norm_affine", norm_case(NormKind::RmsNorm, true)),
        case!("rms_norm_plain", norm_case(NormKind::RmsNorm, false)),
        case!("instance_norm_affine", norm_case(NormKind::InstanceNorm, true)),
        case!("instance_norm_plain", norm_case(NormKind::InstanceNorm, false)),
        case!(
            "mul_probe",
            go(vars(vec![randn([2, 3, 5, 2], 1)?]), &|t, v| {
                let probe = Tensor::randn([3, 5, 2], 1.0, 9, DType::F64, v[0].value().device())?;
                ops::mul_probe(t, &v[0], &probe)
            })
        ),
        case!("fft2_unnormalised", fft_case(ops::FftNorm::Backward)),
        case!("fft2_ortho", fft_case(ops::FftNorm::Ortho)),
        case!("fft2_forward_norm", fft_case(ops::FftNorm::Forward)),
        case!("fftshift_complex_odd", go(vars(vec![randn([2, 5, 3, 2], 1)?]), &|t, v| ops::fftshift(t, &v[0], true))),
        case!("ifftshift_real_odd", go(vars(vec![randn([2, 5, 7], 1)?]), &|t, v| ops::ifftshift(t, &v[0], false))),
        // Across samples (9 rows of the [24, 5] view: one and a half samples) and columns.
        case!("roll_flat", go(vars(vec![randn([3, 2, 4, 5], 1)?]), &|t, v| ops::roll_flat(t, &v[0], 9, 2))),
        case!("complex_angle", go(vars(vec![randn([2, 5, 3, 2], 1)?]), &|t, v| ops::complex_angle(t, &v[0]))),
        case!("complex_abs", go(vars(vec![randn([2, 5, 3, 2], 1)?]), &|t, v| ops::complex_abs(t, &v[0]))),
        case!("channels_to_complex", go(vars(vec![randn([2, 4, 3, 5], 1)?]), &|t, v| ops::channels_to_complex(t, &v[0]))),
        case!("complex_to_channels", go(vars(vec![randn([2, 3, 3, 5, 2], 1)?]), &|t, v| ops::complex_to_channels(t, &v[0]))),
        case!("sum", go(vars(vec![randn([3, 5], 1)?]), &|t, v| ops::sum(t, &v[0]))),
        case!("sum_sq", go(vars(vec![randn([3, 5], 1)?]), &|t, v| ops::sum_sq(t, &v[0]))),
        case!("mean", go(vars(vec![randn([3, 5], 1)?]), &|t, v| ops::mean(t, &v[0]))),
        case!("global_norm", go(vars(vec![randn([3, 5], 1)?, randn([7], 2)?]), &|t, v| ops::global_norm(t, &[&v[0], &v[1]]))),
        case!("mae", loss_case(ops::mae)),
        case!("mse", loss_case(ops::mse)),
        case!("rel_l2", loss_case(ops::rel_l2)),
        case!("sample_sum_sq", go(vars(vec![randn([3, 2, 4, 5], 1)?]), &|t, v| ops::sample_sum_sq(t, &v[0]))),
        case!(
            "mean_rel_l2",
            go(vec![Input::var(randn([3, 1, 5, 5], 1)?), Input::constant(randn([3, 1, 5, 5], 2)?)], &|t, v| ops::mean_rel_l2(t, &v[0], &v[1]))
        ),
        case!("central_differences", go(vars(vec![randn([2, 1, 5, 6], 1)?]), &|t, v| ops::central_differences(t, &v[0], 0.25))),
        case!(
            "mean_rel_h1",
            go(vec![Input::var(randn([3, 1, 5, 5], 1)?), Input::constant(randn([3, 1, 5, 5], 2)?)], &|t, v| ops::mean_rel_h1(t, &v[0], &v[1], 0.25))
        ),
        // The denominator is detached, so only the prediction's gradient is the true derivative.
        case!(
            "mae_over_detached_mean",
            go(vec![Input::var(randn([2, 3, 5], 1)?), Input::constant(positive([2, 3, 5], 2)?)], &|t, v| {
                ops::mae_over_detached_mean(t, &v[0], &v[1], 1e-8)
            })
        ),
    ]
}

//! The physics forward model and the training losses: between the differentiable ops (below) and
//! the model and trainer (above).
//!
//! The generator's output [B, 2C, N, N] holds the object O (real channels, then imaginary). The
//! forward model illuminates it with the probe times `probe_scale` and propagates to the detector:
//!   amp_pred = |fftshift(FFT2(O * probe_scale * P))| / N        (an orthonormal FFT)
//! Losses (all one-element values):
//!   normalized_amplitude_mae: mean |amp_pred - amp_obs| / (mean(amp_obs) + eps), denominator detached
//!   poisson_nll:              mean(I_pred - I_obs ln(I_pred + eps)), I = amp^2 (PyTorch's
//!                             PoissonNLLLoss with log_input = False)
//!   supervised_l1:            mean | |O * probe_scale * P| - Y_I | + mean |wrap(arg O - Y_phi)|
//! and the Darcy workload's losses of predicted solution fields ([`field_objective`]):
//!   rel_l2:                   mean over samples of ||u_pred - u|| / ||u||
//!   h1:                       the same in the H1 norm (values and central differences)

use crate::autograd::{Tape, Var};
use crate::backend;
use crate::config::{LossConfig, LossKind};
use crate::error::{Error, Result};
use crate::ops;
use crate::tensor::Tensor;

/// Along which axis the second half of a paired batch lies from the first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PairAxis {
    /// B_k is A_k's neighbour `shift` rows down.
    Rows,
    /// B_k is A_k's neighbour `shift` columns right.
    Cols,
}

/// A paired batch [A; B]: sample k + B/2 is the neighbour of sample k, `shift` pixels along `axis`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pairs {
    pub axis: PairAxis,
    pub shift: usize,
}

/// The overlap term of a paired batch ([`Pairs`]): where two neighbouring patches see the same
/// part of the object, their predictions must agree. With the generator output O [B, 2, N, N]
/// (re, im) and A_k, B_k its two halves,
///   sum_k sum_x m(x) |O_{A_k}(x) - O_{B_k}(x - d)|^2 / sum_k sum_x m(x) (|O_{A_k}(x)|^2 + |O_{B_k}(x - d)|^2),
/// x over A's pixels whose partner x - d lies in B's patch, m(x) = |P(x)|^2 |P(x - d)|^2 (the
/// probe's intensity in both: where both patterns measured the object), the denominator detached.
/// A constant phase e^{ic} per patch leaves the physics loss unchanged; this term is 0 only when
/// neighbouring patches agree on it.
pub fn overlap_disagreement(t: &mut Tape, out: &Var, pairs: Pairs, probe: &Tensor) -> Result<Var> {
    let d = out.dims().to_vec();
    let bad = |why: &str| Err(Error::bad_shape("overlap term", out.shape(), why));
    if d.len() != 4 || d[1] != 2 || d[2] != d[3] {
        return bad("needs a complex object [B, 2, N, N]");
    }
    let (b, c, n, s) = (d[0], d[1], d[2], pairs.shift);
    if b < 2 || b % 2 != 0 || s == 0 || s >= n {
        return bad(&format!("needs an even batch of pairs shifted by 0 < {s} < N"));
    }
    if probe.dims() != [n, n, 2] {
        return Err(Error::bad_shape("overlap term", probe.shape(), "the probe must be [N, N, 2]"));
    }
    let half = b / 2;
    let p = probe.to_f64_vec()?;
    let intensity = |r: usize, a: usize| p[2 * (r * n + a)].powi(2) + p[2 * (r * n + a) + 1].powi(2);
    // sqrt(m): the output's difference is squared.
    let mut mask = vec![0.0; b * c * n * n];
    for r in 0..n {
        for a in 0..n {
            let partner = match pairs.axis {
                PairAxis::Rows => r.checked_sub(s).map(|rb| (rb, a)),
                PairAxis::Cols => a.checked_sub(s).map(|ab| (r, ab)),
            };
            if let Some((rb, ab)) = partner {
                let m = (intensity(r, a) * intensity(rb, ab)).sqrt();
                for k in 0..half * c {
                    mask[(k * n + r) * n + a] = m;
                }
            }
        }
    }
    // B's patch moved onto A's slot (half a batch along the rows of the [B C N, N] view) and by d.
    let (rows, cols) = match pairs.axis {
        PairAxis::Rows => (half * c * n + s, 0),
        PairAxis::Cols => (half * c * n, s),
    };
    let partner = ops::roll_flat(t, out, rows, cols)?;
    let (o, q) = (out.value().to_f64_vec()?, partner.value().to_f64_vec()?);
    let den: f64 = mask.iter().zip(o.iter().zip(&q)).map(|(m, (x, y))| m * m * (x * x + y * y)).sum();
    let mask = t.constant(Tensor::from_f64_vec(mask, d, out.value().dtype(), out.value().device())?);
    let diff = ops::sub(t, out, &partner)?;
    let weighted = ops::mul(t, &diff, &mask)?;
    let num = ops::sum_sq(t, &weighted)?;
    ops::scale(t, &num, 1.0 / den.max(f64::MIN_POSITIVE))
}

/// The probe the forward model uses: P * probe_scale, [N, N, 2].
pub fn scaled_probe(probe: &Tensor, cfg: &LossConfig) -> Result<Tensor> {
    backend::affine(probe, cfg.probe_scale, 0.0)
}

/// O * probe_scale * P as a complex [B, C, N, N, 2] value.
pub fn illuminate(t: &mut Tape, out: &Var, scaled_probe: &Tensor) -> Result<Var> {
    let o = ops::channels_to_complex(t, out)?;
    ops::mul_probe(t, &o, scaled_probe)
}

/// The predicted diffraction amplitude [B, C, N, N] of the generator output [B, 2C, N, N].
pub fn predicted_amplitude(t: &mut Tape, out: &Var, scaled_probe: &Tensor) -> Result<Var> {
    let lit = illuminate(t, out, scaled_probe)?;
    let far = ops::fft2(t, &lit, ops::FftNorm::Ortho)?;
    drop(lit);
    let far = ops::fftshift(t, &far, true)?;
    ops::complex_abs(t, &far)
}

/// What a loss compares the output with: observed amplitudes, and for the supervised loss the
/// illuminated amplitude and the phase, each [B, C, N, N].
pub struct Targets<'a> {
    pub diffraction: &'a Var,
    pub y_i: &'a Var,
    pub y_phi: &'a Var,
}

/// A Darcy loss (`rel_l2` or `h1`) of predicted fields against the solutions u, both
/// [B, 1, s, s] on the unit square's s x s grid (spacing 1 / (s - 1)): the mean over samples.
pub fn field_objective(t: &mut Tape, kind: LossKind, pred: &Var, u: &Var) -> Result<Var> {
    let s = u.dims().last().copied().unwrap_or(0);
    match kind {
        LossKind::RelL2 => ops::mean_rel_l2(t, pred, u),
        LossKind::H1 if s >= 3 => ops::mean_rel_h1(t, pred, u, 1.0 / (s - 1) as f64),
        LossKind::H1 => Err(Error::bad_shape("h1 loss", u.shape(), "fields need at least 3 points per side")),
        other => Err(Error::invalid("loss", format!("{other:?} is not a loss of solution fields (use rel_l2 or h1)"))),
    }
}

/// The configured loss of a generator output.
pub fn objective(t: &mut Tape, cfg: &LossConfig, out: &Var, targets: &Targets, scaled_probe: &Tensor) -> Result<Var> {
    match cfg.kind {
        LossKind::NormalizedAmplitudeMae => {
            let amp = predicted_amplitude(t, out, scaled_probe)?;
            ops::mae_over_detached_mean(t, &amp, targets.diffraction, cfg.eps)
        }
        LossKind::PoissonNll => {
            let amp = predicted_amplitude(t, out, scaled_probe)?;
            let i_pred = ops::square(t, &amp)?;
            drop(amp);
            let i_obs = ops::square(t, targets.diffraction)?;
            let shifted = ops::add_scalar(t, &i_pred, cfg.eps)?;
            let log = ops::log(t, &shifted)?;
            let weighted = ops::mul(t, &i_obs, &log)?;
            let nll = ops::sub(t, &i_pred, &weighted)?;
            ops::mean(t, &nll)
        }
        LossKind::SupervisedL1 => {
            let lit = illuminate(t, out, scaled_probe)?;
            let amp = ops::complex_abs(t, &lit)?;
            drop(lit);
            let amp_term = ops::mae(t, &amp, targets.y_i)?;
            let o = ops::channels_to_complex(t, out)?;
            let phase = ops::complex_angle(t, &o)?;
            let d = ops::sub(t, &phase, targets.y_phi)?;
            let d = ops::wrap_angle(t, &d)?;
            let d = ops::abs(t, &d)?;
            let phase_term = ops::mean(t, &d)?;
            ops::add(t, &amp_term, &phase_term)
        }
        LossKind::RelL2 | LossKind::H1 => Err(Error::invalid("loss", "rel_l2 and h1 compare solution fields: they are the Darcy workload's losses")),
    }
}

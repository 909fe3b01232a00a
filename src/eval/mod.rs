//! Evaluation: stitch test patches into the object canvas, align, and score.
//!
//! Stitching ([`Stitch`]): the reference study's `center` places the central s x s region of
//! each test patch (s the test stride) at its centre in the canvas of the split's first object;
//! `blend` averages every patch that covers a pixel, weighted by the probe's intensity there
//! (the part of a patch the physics loss constrains), which removes the seams between patches.
//! `aligned` is `blend` after each patch's constant phase offset has been aligned with its
//! neighbours' from their overlaps ([`phase_offsets`]). All three give the same canvas. Amplitude is
//! rescaled by mean(GT) / mean(pred); from each phase its circular mean (a constant offset, which
//! no diffraction measurement determines) and then a least-squares plane a + b r + c c are removed
//! and the result wrapped to [-pi, pi).
//! Metrics: MAE; SSIM with skimage's defaults (7 x 7 uniform window, reflect mode, sample
//! covariance, K1 0.01, K2 0.03, a 3-px border cropped before the mean; data range = the GT's
//! range for amplitude, and 1 for phase mapped to [0, 1] by (phi + pi) / 2 pi); PSNR; FRC
//! (Fourier ring correlation on integer rings) with its 0.5 and 1/7 crossings.

use serde::Serialize;

pub use crate::config::Stitch;
use crate::data::npz::NpzSplit;
use crate::error::{Error, Result};

/// A real image, row-major.
#[derive(Clone, Debug, PartialEq)]
pub struct Canvas {
    pub rows: usize,
    pub cols: usize,
    pub data: Vec<f64>,
}

impl Canvas {
    pub fn new(rows: usize, cols: usize, data: Vec<f64>) -> Result<Canvas> {
        if data.len() != rows * cols {
            return Err(Error::invalid("canvas", format!("{} values for {rows} x {cols}", data.len())));
        }
        Ok(Canvas { rows, cols, data })
    }
    fn at(&self, r: usize, c: usize) -> f64 {
        self.data[r * self.cols + c]
    }
    pub fn mean(&self) -> f64 {
        self.data.iter().sum::<f64>() / self.data.len().max(1) as f64
    }
    /// The population standard deviation of the pixels.
    pub fn sd(&self) -> f64 {
        let m = self.mean();
        (self.data.iter().map(|v| (v - m).powi(2)).sum::<f64>() / self.data.len().max(1) as f64).sqrt()
    }
}

pub fn mae(a: &Canvas, b: &Canvas) -> f64 {
    a.data.iter().zip(&b.data).map(|(x, y)| (x - y).abs()).sum::<f64>() / a.data.len().max(1) as f64
}

/// 10 log10(range^2 / MSE).
pub fn psnr(truth: &Canvas, test: &Canvas, data_range: f64) -> f64 {
    let mse = truth.data.iter().zip(&test.data).map(|(x, y)| (x - y).powi(2)).sum::<f64>() / truth.data.len().max(1) as f64;
    10.0 * (data_range * data_range / mse).log10()
}

/// scipy.ndimage.uniform_filter(size=7, mode='reflect'), separable.
fn uniform7(img: &Canvas) -> Canvas {
    let refl = |i: isize, n: usize| -> usize {
        let n = n as isize;
        let m = i.rem_euclid(2 * n);
        (if m < n { m } else { 2 * n - m - 1 }) as usize
    };
    let (h, w) = (img.rows, img.cols);
    let mut tmp = vec![0.0; h * w];
    for r in 0..h {
        for c in 0..w {
            tmp[r * w + c] = (-3..=3).map(|d| img.at(r, refl(c as isize + d, w))).sum::<f64>() / 7.0;
        }
    }
    let mut out = vec![0.0; h * w];
    for r in 0..h {
        for c in 0..w {
            out[r * w + c] = (-3..=3).map(|d| tmp[refl(r as isize + d, h) * w + c]).sum::<f64>() / 7.0;
        }
    }
    Canvas { rows: h, cols: w, data: out }
}

/// skimage.metrics.structural_similarity with its defaults and the given data range.
pub fn ssim(a: &Canvas, b: &Canvas, data_range: f64) -> Result<f64> {
    if a.rows != b.rows || a.cols != b.cols {
        return Err(Error::invalid("ssim", "images differ in size"));
    }
    if a.rows < 7 || a.cols < 7 {
        return Err(Error::invalid("ssim", "images must be at least 7 x 7"));
    }
    let prod = |x: &Canvas, y: &Canvas| Canvas { rows: x.rows, cols: x.cols, data: x.data.iter().zip(&y.data).map(|(p, q)| p * q).collect() };
    let (ux, uy) = (uniform7(a), uniform7(b));
    let (uxx, uyy, uxy) = (uniform7(&prod(a, a)), uniform7(&prod(b, b)), uniform7(&prod(a, b)));
    let cov_norm = 49.0 / 48.0;
    let (c1, c2) = ((0.01 * data_range).powi(2), (0.03 * data_range).powi(2));
    let mut total = 0.0;
    let mut count = 0usize;
    for r in 3..a.rows - 3 {
        for c in 3..a.cols - 3 {
            let k = r * a.cols + c;
            let (mx, my) = (ux.data[k], uy.data[k]);
            let vx = cov_norm * (uxx.data[k] - mx * mx);
            let vy = cov_norm * (uyy.data[k] - my * my);
            let vxy = cov_norm * (uxy.data[k] - mx * my);
            total += (2.0 * mx * my + c1) * (2.0 * vxy + c2) / ((mx * mx + my * my + c1) * (vx + vy + c2));
            count += 1;
        }
    }
    Ok(total / count as f64)
}

/// FRC per integer ring radius 0..=n/2 of two images (cropped to their common centred square).
pub fn frc(a: &Canvas, b: &Canvas) -> Vec<f64> {
    use rustfft::{num_complex::Complex, FftPlanner};
    let n = a.rows.min(a.cols).min(b.rows).min(b.cols);
    let spectrum = |img: &Canvas| -> Vec<Complex<f64>> {
        let (r0, c0) = ((img.rows - n) / 2, (img.cols - n) / 2);
        let mut f: Vec<Complex<f64>> = (0..n * n).map(|k| Complex::new(img.at(r0 + k / n, c0 + k % n), 0.0)).collect();
        let fft = FftPlanner::<f64>::new().plan_fft_forward(n);
        for row in f.chunks_mut(n) {
            fft.process(row);
        }
        let mut col = vec![Complex::default(); n];
        for c in 0..n {
            for r in 0..n {
                col[r] = f[r * n + c];
            }
            fft.process(&mut col);
            for r in 0..n {
                f[r * n + c] = col[r];
            }
        }
        f
    };
    let (fa, fb) = (spectrum(a), spectrum(b));
    let rings = n / 2 + 1;
    let (mut num, mut da, mut db) = (vec![0.0; rings], vec![0.0; rings], vec![0.0; rings]);
    for k in 0..n * n {
        // Signed frequencies, so the ring is the distance from the zero frequency.
        let f = |i: usize| if i <= n / 2 { i as f64 } else { i as f64 - n as f64 };
        let radius = (f(k / n).powi(2) + f(k % n).powi(2)).sqrt().round() as usize;
        if radius < rings {
            num[radius] += (fa[k] * fb[k].conj()).re;
            da[radius] += fa[k].norm_sqr();
            db[radius] += fb[k].norm_sqr();
        }
    }
    (0..rings)
        .map(|r| {
            let d = (da[r] * db[r]).sqrt();
            if d > 0.0 {
                num[r] / d
            } else {
                0.0
            }
        })
        .collect()
}

/// The first ring (> 0) where the FRC falls below `threshold`, in cycles per pixel (0.5 if never).
pub fn frc_resolution(curve: &[f64], threshold: f64) -> f64 {
    let n = 2 * (curve.len() - 1).max(1);
    match curve.iter().enumerate().skip(1).find(|(_, &v)| v < threshold) {
        Some((r, _)) => r as f64 / n as f64,
        None => 0.5,
    }
}

/// Subtracts the least-squares plane a + b r + c c.
pub fn remove_plane(img: &Canvas) -> Canvas {
    // Normal equations for the three coefficients, solved by Cramer's rule.
    let mut m = [[0.0f64; 3]; 3];
    let mut v = [0.0f64; 3];
    for r in 0..img.rows {
        for c in 0..img.cols {
            let basis = [1.0, r as f64, c as f64];
            for i in 0..3 {
                for j in 0..3 {
                    m[i][j] += basis[i] * basis[j];
                }
                v[i] += basis[i] * img.at(r, c);
            }
        }
    }
    let det3 = |a: [[f64; 3]; 3]| {
        a[0][0] * (a[1][1] * a[2][2] - a[1][2] * a[2][1]) - a[0][1] * (a[1][0] * a[2][2] - a[1][2] * a[2][0])
            + a[0][2] * (a[1][0] * a[2][1] - a[1][1] * a[2][0])
    };
    let d = det3(m);
    let coef: Vec<f64> = (0..3)
        .map(|i| {
            if d.abs() < 1e-300 {
                return if i == 0 { img.mean() } else { 0.0 };
            }
            let mut mi = m;
            for (row, vr) in mi.iter_mut().zip(v) {
                row[i] = vr;
            }
            det3(mi) / d
        })
        .collect();
    let data = (0..img.rows * img.cols).map(|k| img.data[k] - (coef[0] + coef[1] * (k / img.cols) as f64 + coef[2] * (k % img.cols) as f64)).collect();
    Canvas { rows: img.rows, cols: img.cols, data }
}

/// The phase less its circular mean arg(mean e^{i phi}): a constant offset removed before the
/// plane, so that a reconstruction whose (arbitrary) offset lies near pi does not wrap across the
/// canvas, where a least-squares plane cannot follow it.
pub fn circular_centred(phase: &Canvas) -> Canvas {
    let (s, c) = phase.data.iter().fold((0.0, 0.0), |(s, c), p| (s + p.sin(), c + p.cos()));
    let mean = if s == 0.0 && c == 0.0 { 0.0 } else { s.atan2(c) };
    Canvas { data: phase.data.iter().map(|p| p - mean).collect(), ..phase.clone() }
}

fn wrap(x: f64) -> f64 {
    x - std::f64::consts::TAU * (x / std::f64::consts::TAU).round()
}

/// Stitched prediction and ground truth of a split's first object.
pub struct Stitched {
    pub pred_amp: Canvas,
    pub pred_phase: Canvas,
    pub gt_amp: Canvas,
    pub gt_phase: Canvas,
}

/// Where the first object's patches go on the canvas.
struct Layout {
    /// (pattern, centre) of every patch of object 0.
    mine: Vec<(usize, (f64, f64))>,
    stride: usize,
    half: usize,
    top: i64,
    left: i64,
    h: usize,
    w: usize,
}

fn layout(split: &NpzSplit) -> Result<Layout> {
    let n = split.n;
    let Some(centres) = &split.centres else {
        return Err(Error::invalid("stitch", "the split has no patch coordinates (xcoords, ycoords)"));
    };
    let index = split.object_index.clone().unwrap_or_else(|| vec![0; split.len()]);
    if index.len() != centres.len() {
        return Err(Error::invalid("stitch", format!("{} object indices for {} patch centres", index.len(), centres.len())));
    }
    let mine: Vec<(usize, (f64, f64))> = centres.iter().copied().enumerate().filter(|(i, _)| index[*i] == 0).collect();
    if mine.is_empty() {
        return Err(Error::invalid("stitch", "the split has no patch of object 0"));
    }
    // The stride: the smallest non-zero gap between patch centres.
    let mut rows: Vec<i64> = mine.iter().map(|(_, c)| c.0.round() as i64).collect();
    rows.sort_unstable();
    rows.dedup();
    let stride = rows.windows(2).map(|w| (w[1] - w[0]) as usize).min().unwrap_or(n).clamp(1, n);
    let half = stride / 2;
    let (r_min, c_min) = mine.iter().fold((i64::MAX, i64::MAX), |(a, b), (_, c)| (a.min(c.0.round() as i64), b.min(c.1.round() as i64)));
    let (r_max, c_max) = mine.iter().fold((i64::MIN, i64::MIN), |(a, b), (_, c)| (a.max(c.0.round() as i64), b.max(c.1.round() as i64)));
    let (top, left) = (r_min - half as i64, c_min - half as i64);
    let (h, w) = ((r_max - r_min) as usize + stride, (c_max - c_min) as usize + stride);
    let outside = |side: usize| top < 0 || left < 0 || (top as usize + h) > side || (left as usize + w) > side;
    if top < 0 || left < 0 || split.ground_truth.as_ref().is_some_and(|(side, _)| outside(*side)) {
        return Err(Error::invalid("stitch", "patch centres fall outside the object"));
    }
    Ok(Layout { mine, stride, half, top, left, h, w })
}

/// Whether [`stitch`] can place the split's first object (checked before training, so that a
/// run does not fail at its final evaluation).
pub fn check_stitchable(split: &NpzSplit) -> Result<()> {
    if split.ground_truth.is_none() {
        return Err(Error::invalid("stitch", "the split has no ground-truth object (YY_ground_truth)"));
    }
    layout(split).map(drop)
}

/// The canvas of a split's first object (object_index 0) stitched from predicted patches: the
/// central stride x stride of each patch, as the reference stitches.
#[derive(Clone, Debug)]
pub struct Placed {
    pub amp: Canvas,
    pub phase: Canvas,
    /// Where the canvas's top-left pixel lies in the object (row, column).
    pub top_left: (usize, usize),
}

/// Stitches predicted object patches (amplitude and phase, each [count * N * N], in the split's
/// order) into the canvas of the split's first object; needs the patch centres, not the truth.
pub fn place(split: &NpzSplit, pred_amp: &[f64], pred_phase: &[f64]) -> Result<Placed> {
    let n = split.n;
    let Layout { mine, stride, half, top, left, h, w } = layout(split)?;
    if pred_amp.len() != split.len() * n * n || pred_phase.len() != pred_amp.len() {
        return Err(Error::invalid("stitch", "predictions do not match the split"));
    }
    let mut pa = vec![0.0; h * w];
    let mut pp = vec![0.0; h * w];
    let n2 = n * n;
    for (i, (cr, cc)) in &mine {
        let (r0, c0) = ((cr.round() as i64 - top) as usize - half, (cc.round() as i64 - left) as usize - half);
        for dr in 0..stride {
            for dc in 0..stride {
                let src = i * n2 + (n / 2 - half + dr) * n + (n / 2 - half + dc);
                pa[(r0 + dr) * w + c0 + dc] = pred_amp[src];
                pp[(r0 + dr) * w + c0 + dc] = pred_phase[src];
            }
        }
    }
    Ok(Placed { amp: Canvas::new(h, w, pa)?, phase: Canvas::new(h, w, pp)?, top_left: (top as usize, left as usize) })
}

/// Stitches predicted complex object patches ([count * N * N] (re, im), in the split's order)
/// into the canvas of [`place`] by a probe-weighted average: pixel x of the canvas is
/// sum_i |P(x - c_i)|^2 O_i(x - c_i) / sum_i |P(x - c_i)|^2 over the patches i of object 0 that
/// hold x. Needs the split's probe.
pub fn place_blended(split: &NpzSplit, object: &[[f32; 2]]) -> Result<Placed> {
    let n = split.n;
    let Layout { mine, top, left, h, w, .. } = layout(split)?;
    if object.len() != split.len() * n * n {
        return Err(Error::invalid("stitch", "predictions do not match the split"));
    }
    if split.probe.len() != n * n {
        return Err(Error::invalid("stitch", "blend stitching needs the probe (probeGuess), and the split has none"));
    }
    let weight: Vec<f64> = split.probe.iter().map(|z| (z[0] as f64).powi(2) + (z[1] as f64).powi(2)).collect();
    // A floor that keeps a pixel no probe reaches defined (it takes the plain mean there).
    let floor = 1e-12 * weight.iter().cloned().fold(0.0, f64::max).max(f64::MIN_POSITIVE);
    let (mut re, mut im, mut den) = (vec![0.0; h * w], vec![0.0; h * w], vec![0.0; h * w]);
    let n2 = n * n;
    for (i, (cr, cc)) in &mine {
        // Patch pixel (a, b) lies at object (cr - n/2 + a, cc - n/2 + b).
        let (r0, c0) = (cr.round() as i64 - (n / 2) as i64 - top, cc.round() as i64 - (n / 2) as i64 - left);
        for a in 0..n {
            let r = r0 + a as i64;
            if r < 0 || r >= h as i64 {
                continue;
            }
            for b in 0..n {
                let c = c0 + b as i64;
                if c < 0 || c >= w as i64 {
                    continue;
                }
                let (k, q) = (r as usize * w + c as usize, a * n + b);
                let wt = weight[q] + floor;
                let z = object[i * n2 + q];
                re[k] += wt * z[0] as f64;
                im[k] += wt * z[1] as f64;
                den[k] += wt;
            }
        }
    }
    let amp = (0..h * w).map(|k| (re[k] / den[k]).hypot(im[k] / den[k])).collect();
    let phase = (0..h * w).map(|k| im[k].atan2(re[k])).collect();
    Ok(Placed { amp: Canvas::new(h, w, amp)?, phase: Canvas::new(h, w, phase)?, top_left: (top as usize, left as usize) })
}

/// Each of object 0's patches' phase offset c_i (radians, in the split's order of object 0's
/// patches), chosen so that neighbouring patches agree where both are lit: with
/// M_ij = sum_x w_i(x) w_j(x) O_i(x) conj(O_j(x)) over the pixels both cover (w the probe's
/// intensity), c minimises sum_ij |M_ij| (c_i - c_j - arg M_ij)^2, a graph-Laplacian system
/// solved by Cholesky with a tiny ridge (which holds an unconnected patch at 0).
pub fn phase_offsets(split: &NpzSplit, object: &[[f32; 2]]) -> Result<Vec<f64>> {
    let n = split.n;
    let Layout { mine, .. } = layout(split)?;
    if object.len() != split.len() * n * n || split.probe.len() != n * n {
        return Err(Error::invalid("stitch", "aligned stitching needs the predictions of every pattern and the probe"));
    }
    let w: Vec<f64> = split.probe.iter().map(|z| (z[0] as f64).powi(2) + (z[1] as f64).powi(2)).collect();
    let k = mine.len();
    let pos: Vec<(i64, i64)> = mine.iter().map(|(_, c)| (c.0.round() as i64, c.1.round() as i64)).collect();
    // |M_ij| and arg M_ij of every overlapping pair.
    let mut pairs = Vec::new();
    for a in 0..k {
        for b in a + 1..k {
            let (dr, dc) = (pos[b].0 - pos[a].0, pos[b].1 - pos[a].1);
            if dr.unsigned_abs() as usize >= n || dc.unsigned_abs() as usize >= n {
                continue;
            }
            let (oa, ob) = (&object[mine[a].0 * n * n..][..n * n], &object[mine[b].0 * n * n..][..n * n]);
            let (mut re, mut im) = (0.0, 0.0);
            // Pixel (r, c) of patch a is pixel (r - dr, c - dc) of patch b.
            for r in (dr.max(0) as usize)..((n as i64 + dr.min(0)) as usize) {
                for c in (dc.max(0) as usize)..((n as i64 + dc.min(0)) as usize) {
                    let (qa, qb) = (r * n + c, (r as i64 - dr) as usize * n + (c as i64 - dc) as usize);
                    let wt = w[qa] * w[qb];
                    let (x, y) = (oa[qa], ob[qb]);
                    // x conj(y)
                    re += wt * (x[0] as f64 * y[0] as f64 + x[1] as f64 * y[1] as f64);
                    im += wt * (x[1] as f64 * y[0] as f64 - x[0] as f64 * y[1] as f64);
                }
            }
            pairs.push((a, b, re.hypot(im), im.atan2(re)));
        }
    }
    let top = pairs.iter().map(|p| p.2).fold(0.0, f64::max);
    // The Laplacian of the pairs that overlap noticeably, and its right-hand side.
    let mut l = vec![0.0; k * k];
    let mut rhs = vec![0.0; k];
    for &(a, b, m, phi) in pairs.iter().filter(|p| p.2 > 1e-3 * top) {
        l[a * k + a] += m;
        l[b * k + b] += m;
        l[a * k + b] -= m;
        l[b * k + a] -= m;
        rhs[a] += m * phi;
        rhs[b] -= m * phi;
    }
    let ridge = 1e-9 * top.max(f64::MIN_POSITIVE);
    for i in 0..k {
        l[i * k + i] += ridge;
    }
    // Cholesky: L = G G^T, then two triangular solves.
    for j in 0..k {
        let mut d = l[j * k + j];
        for p in 0..j {
            d -= l[j * k + p] * l[j * k + p];
        }
        let d = d.max(ridge).sqrt();
        l[j * k + j] = d;
        for i in j + 1..k {
            let mut v = l[i * k + j];
            for p in 0..j {
                v -= l[i * k + p] * l[j * k + p];
            }
            l[i * k + j] = v / d;
        }
    }
    let mut y = rhs;
    for i in 0..k {
        for p in 0..i {
            y[i] -= l[i * k + p] * y[p];
        }
        y[i] /= l[i * k + i];
    }
    for i in (0..k).rev() {
        for p in i + 1..k {
            y[i] -= l[p * k + i] * y[p];
        }
        y[i] /= l[i * k + i];
    }
    Ok(y)
}

/// [`place_blended`] after turning each of object 0's patches by e^{-i c} with its
/// [`phase_offsets`] c.
pub fn place_aligned(split: &NpzSplit, object: &[[f32; 2]]) -> Result<Placed> {
    let c = phase_offsets(split, object)?;
    let n2 = split.n * split.n;
    let Layout { mine, .. } = layout(split)?;
    let mut turned = object.to_vec();
    for ((i, _), c) in mine.iter().zip(&c) {
        let (s, co) = (-c).sin_cos();
        for z in &mut turned[i * n2..(i + 1) * n2] {
            let (re, im) = (z[0] as f64, z[1] as f64);
            *z = [(re * co - im * s) as f32, (re * s + im * co) as f32];
        }
    }
    place_blended(split, &turned)
}

/// The canvas of object 0 stitched as `how` says, from the predicted amplitude and phase (for
/// `center`) or complex patches (for `blend`).
pub fn place_as(how: Stitch, split: &NpzSplit, pred_amp: &[f64], pred_phase: &[f64], object: &[[f32; 2]]) -> Result<Placed> {
    match how {
        Stitch::Center => place(split, pred_amp, pred_phase),
        Stitch::Blend => place_blended(split, object),
        Stitch::Aligned => place_aligned(split, object),
    }
}

/// [`place`], beside the ground truth's same window.
pub fn stitch(split: &NpzSplit, pred_amp: &[f64], pred_phase: &[f64]) -> Result<Stitched> {
    beside_truth(split, place(split, pred_amp, pred_phase)?)
}

/// A placed canvas of `split`, beside the ground truth's same window.
pub fn beside_truth(split: &NpzSplit, p: Placed) -> Result<Stitched> {
    let (side, gt) = split.ground_truth.as_ref().map(|(s, g)| (*s, g)).ok_or_else(|| Error::invalid("stitch", "the split has no ground-truth object"))?;
    let (h, w, (top, left)) = (p.amp.rows, p.amp.cols, p.top_left);
    let (mut ga, mut gp) = (Vec::with_capacity(h * w), Vec::with_capacity(h * w));
    for r in 0..h {
        for c in 0..w {
            let z = gt[(top + r) * side + left + c];
            ga.push((z[0] as f64).hypot(z[1] as f64));
            gp.push((z[1] as f64).atan2(z[0] as f64));
        }
    }
    Ok(Stitched { pred_amp: p.amp, pred_phase: p.phase, gt_amp: Canvas::new(h, w, ga)?, gt_phase: Canvas::new(h, w, gp)? })
}

/// The scores of one reconstruction.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Metrics {
    pub amp_mae: f64,
    pub amp_ssim: f64,
    pub amp_psnr: f64,
    pub phase_mae: f64,
    pub phase_ssim: f64,
    pub phase_psnr: f64,
    /// FRC crossings of the amplitude, in cycles per pixel.
    pub amp_frc50: f64,
    pub amp_frc17: f64,
    /// The amplitude's contrast against the truth's: sd(prediction) / sd(truth), after the
    /// prediction is scaled to the truth's mean. A flat (collapsed) output scores near 0.
    pub amp_contrast: f64,
}

/// Aligns (amplitude scale, phase planes) and scores a stitched reconstruction. Returns the
/// aligned images too, for plots.
pub fn score(s: &Stitched) -> Result<(Metrics, Stitched)> {
    let pm = s.pred_amp.mean();
    let k = if pm.abs() > 0.0 { s.gt_amp.mean() / pm } else { 1.0 };
    let amp = Canvas { data: s.pred_amp.data.iter().map(|v| v * k).collect(), ..s.pred_amp.clone() };
    let wrap_all = |c: Canvas| Canvas { data: c.data.iter().map(|&v| wrap(v)).collect(), ..c };
    let phase = wrap_all(remove_plane(&wrap_all(circular_centred(&s.pred_phase))));
    let gt_phase = wrap_all(remove_plane(&wrap_all(circular_centred(&s.gt_phase))));
    let unit = |c: &Canvas| Canvas { data: c.data.iter().map(|v| (v + std::f64::consts::PI) / std::f64::consts::TAU).collect(), ..c.clone() };
    let range = s.gt_amp.data.iter().cloned().fold(f64::MIN, f64::max) - s.gt_amp.data.iter().cloned().fold(f64::MAX, f64::min);
    let curve = frc(&s.gt_amp, &amp);
    let m = Metrics {
        amp_mae: mae(&amp, &s.gt_amp),
        amp_ssim: ssim(&s.gt_amp, &amp, range)?,
        amp_psnr: psnr(&s.gt_amp, &amp, range),
        phase_mae: mae(&phase, &gt_phase),
        phase_ssim: ssim(&unit(&gt_phase), &unit(&phase), 1.0)?,
        phase_psnr: psnr(&unit(&gt_phase), &unit(&phase), 1.0),
        amp_frc50: frc_resolution(&curve, 0.5),
        amp_frc17: frc_resolution(&curve, 1.0 / 7.0),
        amp_contrast: amp.sd() / s.gt_amp.sd().max(f64::MIN_POSITIVE),
    };
    Ok((m, Stitched { pred_amp: amp, pred_phase: phase, gt_amp: s.gt_amp.clone(), gt_phase }))
}

//! The synthetic "grid-lines" ptychography data (shared/REFERENCE.md section 2).
//!
//! Object: `lines` random 1-px lines (Bresenham, endpoints uniform on the grid) in a
//! 2S x 2S image, blurred g(1) + 2 g(5) + 5 g(10) (Gaussian sigmas; scipy's gaussian_filter with
//! mode `reflect` and truncate 4), centre crop S x S. Phase phi = pi tanh((A - max A / 2) / (3 mean A)).
//! Probe: a soft disk, amplitude 0.5 erfc((r - R) / (sqrt(2) edge)), R = probe_radius N, with a
//! defocus phase defocus (r / R)^2, centred at (N/2, N/2).
//! Patches: N x N windows at a regular stride. Diffraction: with s = sqrt(nphotons / mean_i sum |Y P|^2)
//! (training split), amplitude = sqrt(Poisson(|fftshift(FFT2_ortho(s Y e^{i phi} P))|^2)) / s.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Poisson};
use rayon::prelude::*;
use rustfft::{num_complex::Complex, FftPlanner};

use crate::config::DataConfig;

/// A square real image, row-major.
#[derive(Clone, Debug, PartialEq)]
pub struct Image {
    pub size: usize,
    pub data: Vec<f64>,
}

/// One object: amplitude and phase, S x S.
#[derive(Clone, Debug, PartialEq)]
pub struct Object {
    pub amplitude: Image,
    pub phase: Image,
}

/// Draws a 1-px line from (r0, c0) to (r1, c1) (Bresenham), setting pixels to 1.
fn draw_line(img: &mut [f64], size: usize, (r0, c0): (i64, i64), (r1, c1): (i64, i64)) {
    let (dr, dc) = ((r1 - r0).abs(), (c1 - c0).abs());
    let (sr, sc) = ((r1 - r0).signum(), (c1 - c0).signum());
    let (mut r, mut c) = (r0, c0);
    let mut err = dc - dr;
    loop {
        img[r as usize * size + c as usize] = 1.0;
        if r == r1 && c == c1 {
            break;
        }
        let e2 = 2 * err;
        if e2 > -dr {
            err -= dr;
            c += sc;
        }
        if e2 < dc {
            err += dc;
            r += sr;
        }
    }
}

/// scipy.ndimage.gaussian_filter(mode='reflect', truncate=4.0), separable.
pub fn gaussian_filter(img: &Image, sigma: f64) -> Image {
    let n = img.size;
    let radius = (4.0 * sigma + 0.5) as i64;
    let mut k: Vec<f64> = (-radius..=radius).map(|x| (-0.5 * (x * x) as f64 / (sigma * sigma)).exp()).collect();
    let total: f64 = k.iter().sum();
    k.iter_mut().for_each(|v| *v /= total);
    // 'reflect': d c b a | a b c d | d c b a
    let reflect = |i: i64| -> usize {
        let n = n as i64;
        let period = 2 * n;
        let m = i.rem_euclid(period);
        (if m < n { m } else { period - m - 1 }) as usize
    };
    let pass = |src: &[f64], horizontal: bool| -> Vec<f64> {
        let mut out = vec![0.0; n * n];
        out.par_chunks_mut(n).enumerate().for_each(|(a, row)| {
            for (b, o) in row.iter_mut().enumerate() {
                let mut acc = 0.0;
                for (t, w) in k.iter().enumerate() {
                    let off = reflect(b as i64 + t as i64 - radius);
                    // horizontal: along the row; vertical: along the column (a is the column then).
                    acc += w * if horizontal { src[a * n + off] } else { src[off * n + a] };
                }
                *o = acc;
            }
        });
        out
    };
    let h = pass(&img.data, true);
    // The vertical pass writes its output transposed; transpose back.
    let vt = pass(&h, false);
    let mut data = vec![0.0; n * n];
    for a in 0..n {
        for b in 0..n {
            data[b * n + a] = vt[a * n + b];
        }
    }
    Image { size: n, data }
}

/// One grid-lines object of side `size`, seeded.
pub fn lines_object(size: usize, lines: usize, with_phase: bool, seed: u64) -> Object {
    let big = 2 * size;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut raw = vec![0.0; big * big];
    let coord = |rng: &mut ChaCha8Rng| (big as f64 * rng.random::<f64>()) as i64;
    for _ in 0..lines {
        let p0 = (coord(&mut rng), coord(&mut rng));
        let p1 = (coord(&mut rng), coord(&mut rng));
        draw_line(&mut raw, big, p0, p1);
    }
    let raw = Image { size: big, data: raw };
    let (g1, g5, g10) = (gaussian_filter(&raw, 1.0), gaussian_filter(&raw, 5.0), gaussian_filter(&raw, 10.0));
    let start = size / 2;
    let mut amp = vec![0.0; size * size];
    for r in 0..size {
        for c in 0..size {
            let k = (start + r) * big + start + c;
            amp[r * size + c] = g1.data[k] + 2.0 * g5.data[k] + 5.0 * g10.data[k];
        }
    }
    let phase = if with_phase {
        let max = amp.iter().cloned().fold(f64::MIN, f64::max);
        let mean = amp.iter().sum::<f64>() / amp.len() as f64;
        amp.iter().map(|&a| std::f64::consts::PI * ((a - max / 2.0) / (3.0 * mean)).tanh()).collect()
    } else {
        vec![0.0; size * size]
    };
    Object { amplitude: Image { size, data: amp }, phase: Image { size, data: phase } }
}

/// The synthetic probe [N, N] as (re, im) pairs.
pub fn probe(n: usize, radius_frac: f64, edge: f64, defocus: f64) -> Vec<[f64; 2]> {
    let radius = radius_frac * n as f64;
    let c = n as f64 / 2.0;
    (0..n * n)
        .map(|k| {
            let (i, j) = ((k / n) as f64 - c, (k % n) as f64 - c);
            let r = (i * i + j * j).sqrt();
            let amp = if edge > 0.0 {
                0.5 * libm::erfc((r - radius) / (std::f64::consts::SQRT_2 * edge))
            } else if r <= radius {
                1.0
            } else {
                0.0
            };
            let ph = defocus * (r / radius).powi(2);
            [amp * ph.cos(), amp * ph.sin()]
        })
        .collect()
}

/// Top-left corners of the N x N patches of an S x S object at a stride, row-major.
pub fn patch_corners(size: usize, n: usize, stride: usize) -> Vec<(usize, usize)> {
    let per_axis = (size - n) / stride + 1;
    (0..per_axis * per_axis).map(|k| ((k / per_axis) * stride, (k % per_axis) * stride)).collect()
}

/// Patches of one object: (amplitude, phase) each [N * N].
pub fn cut(obj: &Object, corners: &[(usize, usize)], n: usize) -> (Vec<f64>, Vec<f64>) {
    let s = obj.amplitude.size;
    let mut amp = Vec::with_capacity(corners.len() * n * n);
    let mut ph = Vec::with_capacity(corners.len() * n * n);
    for &(r0, c0) in corners {
        for r in 0..n {
            let row = (r0 + r) * s + c0;
            amp.extend_from_slice(&obj.amplitude.data[row..row + n]);
            ph.extend_from_slice(&obj.phase.data[row..row + n]);
        }
    }
    (amp, ph)
}

/// s = sqrt(nphotons / mean_i sum_px |Y_i P|^2).
pub fn intensity_scale(amp: &[f64], probe: &[[f64; 2]], nphotons: f64) -> f64 {
    let n2 = probe.len();
    let count = amp.len() / n2;
    let total: f64 = amp.chunks(n2).map(|y| y.iter().zip(probe).map(|(a, p)| a * a * (p[0] * p[0] + p[1] * p[1])).sum::<f64>()).sum();
    let photons = if nphotons > 0.0 { nphotons } else { 1.0 };
    (photons / (total / count as f64)).sqrt()
}

/// Diffraction amplitudes of every patch, divided by s; Poisson noise when nphotons > 0. Patch k
/// draws its noise from its own seeded stream, so the result does not depend on threads.
pub fn diffract(amp: &[f64], phase: &[f64], probe: &[[f64; 2]], n: usize, s: f64, noisy: bool, seed: u64) -> Vec<f64> {
    let n2 = n * n;
    let fft = FftPlanner::<f64>::new().plan_fft_forward(n);
    let mut out = vec![0.0; amp.len()];
    out.par_chunks_mut(n2).enumerate().for_each(|(k, o)| {
        let mut field: Vec<Complex<f64>> = (0..n2)
            .map(|px| {
                let a = s * amp[k * n2 + px];
                let e = Complex::from_polar(a, phase[k * n2 + px]);
                e * Complex::new(probe[px][0], probe[px][1])
            })
            .collect();
        fft2_in_place(&mut field, n, fft.as_ref());
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ (k as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
        let half = n / 2;
        for r in 0..n {
            for c in 0..n {
                // fftshift: the zero frequency lands at (N/2, N/2).
                let z = field[r * n + c] / n as f64;
                let intensity = z.norm_sqr();
                let counted = if noisy && intensity > 0.0 { Poisson::new(intensity).map(|p| p.sample(&mut rng)).unwrap_or(intensity) } else { intensity };
                o[((r + half) % n) * n + (c + half) % n] = counted.sqrt() / s;
            }
        }
    });
    out
}

fn fft2_in_place(f: &mut [Complex<f64>], n: usize, fft: &dyn rustfft::Fft<f64>) {
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
}

/// Everything the simulation makes for one split.
pub struct SimSplit {
    pub diffraction: Vec<f64>,
    pub y_i: Vec<f64>,
    pub y_phi: Vec<f64>,
    /// (object index, top-left row, top-left column) of each patch.
    pub origin: Vec<(usize, usize, usize)>,
    pub objects: Vec<Object>,
}

/// Simulates both splits; returns (train, test, probe, s).
pub fn simulate(cfg: &DataConfig) -> (SimSplit, SimSplit, Vec<[f64; 2]>, f64) {
    let n = cfg.n;
    let p = probe(n, cfg.probe_radius, cfg.probe_edge, cfg.probe_defocus);
    let make = |count: usize, stride: usize, tag: u64| {
        let objects: Vec<Object> = (0..count).map(|i| lines_object(cfg.object_size, cfg.lines, cfg.phase, cfg.seed ^ (tag << 32) ^ i as u64)).collect();
        let corners = patch_corners(cfg.object_size, n, stride);
        let mut amp = Vec::new();
        let mut ph = Vec::new();
        let mut origin = Vec::new();
        for (i, o) in objects.iter().enumerate() {
            let (a, f) = cut(o, &corners, n);
            amp.extend(a);
            ph.extend(f);
            origin.extend(corners.iter().map(|&(r, c)| (i, r, c)));
        }
        (objects, amp, ph, origin)
    };
    let (tr_obj, tr_amp, tr_ph, tr_org) = make(cfg.train_objects, cfg.train_stride, 1);
    let (te_obj, te_amp, te_ph, te_org) = make(cfg.test_objects, cfg.test_stride, 2);
    let s = intensity_scale(&tr_amp, &p, cfg.nphotons);
    let noisy = cfg.nphotons > 0.0;
    let split = |amp: Vec<f64>, ph: Vec<f64>, origin, objects, tag: u64| {
        let diffraction = diffract(&amp, &ph, &p, n, s, noisy, cfg.seed ^ (tag << 40));
        let n2 = n * n;
        let y_i = amp.iter().enumerate().map(|(k, a)| a * (p[k % n2][0].powi(2) + p[k % n2][1].powi(2)).sqrt()).collect();
        SimSplit { diffraction, y_i, y_phi: ph, origin, objects }
    };
    let train = split(tr_amp, tr_ph, tr_org, tr_obj, 3);
    let test = split(te_amp, te_ph, te_org, te_obj, 4);
    (train, test, p, s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gaussian_filter_keeps_mass_and_matches_a_hand_value() {
        // A unit impulse in the middle of a 21 x 21 image: the filtered centre is k(0)^2 with
        // k(0) = 1 / sum_{x=-4..4} exp(-x^2 / 2) for sigma 1 (truncate 4 gives radius 4).
        let mut data = vec![0.0; 21 * 21];
        data[10 * 21 + 10] = 1.0;
        let out = gaussian_filter(&Image { size: 21, data }, 1.0);
        let k0 = 1.0 / (-4i32..=4).map(|x| (-(x * x) as f64 / 2.0).exp()).sum::<f64>();
        assert!((out.data[10 * 21 + 10] - k0 * k0).abs() < 1e-15);
        assert!((out.data.iter().sum::<f64>() - 1.0).abs() < 1e-12);
    }

    #[test]
    fn reflect_mode_repeats_the_edge_pixel() {
        // An image that is 1 in its first column: with 'reflect' the column beyond the edge is also
        // 1, so after a horizontal blur of any width the edge column stays above 1/2.
        let n = 9;
        let data: Vec<f64> = (0..n * n).map(|k| if k % n == 0 { 1.0 } else { 0.0 }).collect();
        let out = gaussian_filter(&Image { size: n, data }, 1.0);
        assert!(out.data[4 * n] > 0.5, "{}", out.data[4 * n]);
    }

    #[test]
    fn patch_grid_counts_match_the_reference() {
        // 392-px objects at N = 64: 83^2 = 6889 patches at stride 4, 33^2 = 1089 at stride 10.
        assert_eq!(patch_corners(392, 64, 4).len(), 6889);
        assert_eq!(patch_corners(392, 64, 10).len(), 1089);
    }

    #[test]
    fn noiseless_diffraction_conserves_energy() {
        // Parseval with the orthonormal FFT: sum |F|^2 = sum |field|^2, so after dividing by s the
        // diffraction energy equals sum |Y P|^2.
        let n = 16;
        let p = probe(n, 1.0 / 4.0, 1.0, 1.0);
        let obj = lines_object(32, 20, true, 3);
        let corners = patch_corners(32, n, 8);
        let (amp, ph) = cut(&obj, &corners, n);
        let s = intensity_scale(&amp, &p, 1e6);
        let d = diffract(&amp, &ph, &p, n, s, false, 0);
        for k in 0..corners.len() {
            let e_d: f64 = d[k * n * n..(k + 1) * n * n].iter().map(|v| v * v).sum();
            let e_o: f64 = (0..n * n).map(|px| amp[k * n * n + px].powi(2) * (p[px][0].powi(2) + p[px][1].powi(2))).sum();
            assert!((e_d - e_o).abs() < 1e-9 * e_o.max(1.0), "{e_d} vs {e_o}");
        }
    }
}

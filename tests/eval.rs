//! Metrics on small fixed arrays whose values come from the maths or from an independent tool
//! (each test says which), plane removal, and stitching.

use fnokern::data::npz::NpzSplit;
use fnokern::eval::{beside_truth, frc, frc_resolution, mae, place, place_as, place_blended, psnr, remove_plane, score, ssim, stitch, Canvas, Stitch};

fn canvas(rows: usize, cols: usize, f: impl Fn(f64, f64) -> f64) -> Canvas {
    let data = (0..rows * cols).map(|k| f((k / cols) as f64, (k % cols) as f64)).collect();
    Canvas::new(rows, cols, data).unwrap()
}

/// The 12 x 10 pair below, scored by scikit-image 0.25 (structural_similarity and
/// peak_signal_noise_ratio with data_range = max(a) - min(a)):
///   a = sin(0.7 r) + cos(0.4 c) + 0.05 r c;  b = a + 0.3 sin(1.3 r c + 0.5)
///   ssim = 0.9407937882133854, psnr = 29.284366548854006, range = 6.039704593337607
#[test]
fn ssim_and_psnr_match_scikit_image() {
    let a = canvas(12, 10, |r, c| (0.7 * r).sin() + (0.4 * c).cos() + 0.05 * r * c);
    let b = canvas(12, 10, |r, c| (0.7 * r).sin() + (0.4 * c).cos() + 0.05 * r * c + 0.3 * (1.3 * r * c + 0.5).sin());
    let range = a.data.iter().cloned().fold(f64::MIN, f64::max) - a.data.iter().cloned().fold(f64::MAX, f64::min);
    assert!((range - 6.039704593337607).abs() < 1e-12);
    assert!((ssim(&a, &b, range).unwrap() - 0.9407937882133854).abs() < 1e-12);
    assert!((psnr(&a, &b, range) - 29.284366548854006).abs() < 1e-9);
}

/// On a 7 x 7 image only the centre survives skimage's 3-px crop, and its window is the whole
/// image, so SSIM is the closed form on whole-image statistics. With x = 0..48 (row-major) and
/// y = 2x + 1, range 48: means 24 and 49, sample variances v and 4v with v = 200 * 49/48,
/// covariance 2v, C1 = 0.48^2, C2 = 1.44^2:
///   (2*24*49 + C1)(4v + C2) / ((24^2 + 49^2 + C1)(5v + C2)) = 0.6323790027491488
#[test]
fn ssim_closed_form_on_a_7x7_image() {
    let x = canvas(7, 7, |r, c| r * 7.0 + c);
    let y = canvas(7, 7, |r, c| 2.0 * (r * 7.0 + c) + 1.0);
    assert!((ssim(&x, &y, 48.0).unwrap() - 0.6323790027491488).abs() < 1e-12);
    assert!((ssim(&x, &x, 48.0).unwrap() - 1.0).abs() < 1e-15);
    assert!(ssim(&x, &canvas(6, 7, |_, _| 0.0), 1.0).is_err());
}

#[test]
fn mae_and_psnr_by_hand() {
    let a = canvas(4, 4, |_, _| 0.0);
    let b = canvas(4, 4, |r, _| if r < 2.0 { 0.1 } else { -0.1 });
    assert!((mae(&a, &b) - 0.1).abs() < 1e-15);
    // MSE 0.01 with range 1: 10 log10(1 / 0.01) = 20 dB.
    assert!((psnr(&a, &b, 1.0) - 20.0).abs() < 1e-12);
}

/// FRC is 1 on every ring for identical images and -1 against the negated image; an image
/// against an unrelated one crosses 0.5 early.
#[test]
fn frc_of_identical_and_negated_images() {
    let a = canvas(16, 16, |r, c| (0.9 * r).sin() * (1.7 * c).cos() + 0.1 * r);
    let neg = Canvas::new(16, 16, a.data.iter().map(|v| -v).collect()).unwrap();
    for v in frc(&a, &a) {
        assert!((v - 1.0).abs() < 1e-12, "{v}");
    }
    for v in frc(&a, &neg) {
        assert!((v + 1.0).abs() < 1e-12, "{v}");
    }
    assert_eq!(frc_resolution(&frc(&a, &a), 0.5), 0.5, "never crosses: Nyquist");
    assert_eq!(frc_resolution(&frc(&a, &neg), 0.5), 1.0 / 16.0, "crosses at the first ring");
}

#[test]
fn plane_removal_removes_planes_only() {
    let plane = canvas(9, 11, |r, c| 0.3 - 0.2 * r + 0.05 * c);
    assert!(remove_plane(&plane).data.iter().all(|v| v.abs() < 1e-12));
    // Removal is linear: a plane added to any image comes off again.
    let bumps = canvas(9, 11, |r, c| r * r - 2.0 * c * c);
    let both = Canvas::new(9, 11, plane.data.iter().zip(&bumps.data).map(|(p, q)| p + q).collect()).unwrap();
    let a = remove_plane(&both);
    let b = remove_plane(&bumps);
    for (x, y) in a.data.iter().zip(&b.data) {
        assert!((x - y).abs() < 1e-9);
    }
}

/// Patches cut from an object and stitched back give the object's central region; perfect
/// predictions score SSIM 1 and MAE 0 after alignment, even with a scaled amplitude and a phase plane.
#[test]
fn stitching_perfect_patches_scores_perfectly() {
    // Patches of the object times a global scale and phase plane, which scoring must remove.
    let (split, object) = blend_case();
    let pa: Vec<f64> = object.iter().map(|z| (z[0] as f64).hypot(z[1] as f64)).collect();
    let pp: Vec<f64> = object.iter().map(|z| (z[1] as f64).atan2(z[0] as f64)).collect();
    let (n, stride, per) = (split.n, 4, 7);
    let s = stitch(&split, &pa, &pp).unwrap();
    assert_eq!((s.gt_amp.rows, s.gt_amp.cols), ((per - 1) * stride + stride, (per - 1) * stride + stride));
    assert_eq!(split.len(), per * per);
    assert_eq!(n, 16);
    let (m, _) = score(&s).unwrap();
    assert!(m.amp_mae < 1e-5 && (m.amp_ssim - 1.0).abs() < 1e-9, "{m:?}");
    assert!(m.phase_mae < 1e-5 && (m.phase_ssim - 1.0).abs() < 1e-9, "{m:?}");
    assert_eq!(m.amp_frc50, 0.5);
}

/// A 40 x 40 object cut into 16 x 16 patches at stride 4 under a Gaussian probe: the split, and
/// each patch's complex values times 3 e^{i (0.4 + a phase plane in object coordinates)} (a global
/// scale and plane, consistent between patches, which scoring removes).
fn blend_case() -> (NpzSplit, Vec<[f32; 2]>) {
    let (side, n, stride) = (40usize, 16usize, 4usize);
    let value = |r: usize, c: usize| {
        let (a, p) = (1.0 + 0.5 * ((r as f64) * 0.3).sin() * ((c as f64) * 0.2).cos(), 0.8 * ((r as f64) * 0.15).cos() + 0.3 * ((c as f64) * 0.25).sin());
        (a, p)
    };
    let gt: Vec<[f32; 2]> = (0..side * side).map(|k| value(k / side, k % side)).map(|(a, p)| [(a * p.cos()) as f32, (a * p.sin()) as f32]).collect();
    let per = (side - n) / stride + 1;
    let (mut centres, mut object) = (Vec::new(), Vec::new());
    for i in 0..per {
        for j in 0..per {
            let (r0, c0) = (i * stride, j * stride);
            centres.push(((r0 + n / 2) as f64, (c0 + n / 2) as f64));
            for r in 0..n {
                for c in 0..n {
                    let (a, p) = value(r0 + r, c0 + c);
                    let p = p + 0.01 * (r0 + r) as f64 - 0.02 * (c0 + c) as f64 + 0.4;
                    object.push([(3.0 * a * p.cos()) as f32, (3.0 * a * p.sin()) as f32]);
                }
            }
        }
    }
    let probe = (0..n * n)
        .map(|k| {
            let (dr, dc) = ((k / n) as f64 - n as f64 / 2.0, (k % n) as f64 - n as f64 / 2.0);
            [(-(dr * dr + dc * dc) / 18.0).exp() as f32, 0.0]
        })
        .collect();
    let count = per * per;
    let split = NpzSplit {
        n,
        diffraction: vec![0.0; count * n * n],
        y_i: vec![0.0; count * n * n],
        y_phi: vec![0.0; count * n * n],
        probe,
        ground_truth: Some((side, gt)),
        centres: Some(centres),
        object_index: None,
    };
    (split, object)
}

#[test]
fn blend_stitching_of_consistent_patches_scores_perfectly_on_the_center_canvas() {
    let (split, object) = blend_case();
    let blended = place_blended(&split, &object).unwrap();
    let amp: Vec<f64> = object.iter().map(|z| (z[0] as f64).hypot(z[1] as f64)).collect();
    let phase: Vec<f64> = object.iter().map(|z| (z[1] as f64).atan2(z[0] as f64)).collect();
    let center = place(&split, &amp, &phase).unwrap();
    // The same canvas as the reference stitching, so the two score the same pixels.
    assert_eq!((blended.amp.rows, blended.amp.cols, blended.top_left), (center.amp.rows, center.amp.cols, center.top_left));
    let (m, _) = score(&beside_truth(&split, blended).unwrap()).unwrap();
    assert!(m.amp_mae < 1e-5 && (m.amp_ssim - 1.0).abs() < 1e-9, "{m:?}");
    assert!(m.phase_mae < 1e-5 && (m.phase_ssim - 1.0).abs() < 1e-9, "{m:?}");
    // place_as picks the stitching; blend needs a probe.
    let via = place_as(Stitch::Center, &split, &amp, &phase, &object).unwrap();
    assert_eq!(via.amp, center.amp);
    let mut no_probe = split.clone();
    no_probe.probe.clear();
    let err = place_blended(&no_probe, &object).unwrap_err().to_string();
    assert!(err.contains("probe"), "{err}");
}

#[test]
fn blend_stitching_is_the_probe_weighted_mean_of_the_patches_covering_a_pixel() {
    let (split, mut object) = blend_case();
    let n = split.n;
    let centres = split.centres.clone().unwrap();
    // Patch i holds the constant (i + 1) + i i: a pixel's blend is then easy to write down.
    for (i, patch) in object.chunks_mut(n * n).enumerate() {
        patch.fill([(i + 1) as f32, i as f32]);
    }
    let placed = place_blended(&split, &object).unwrap();
    let (top, left) = placed.top_left;
    let w = |q: usize| (split.probe[q][0] as f64).powi(2);
    for &(r, c) in &[(top, left), (top + 5, left + 9), (top + 13, left + 2)] {
        let (mut re, mut im, mut den) = (0.0, 0.0, 0.0);
        for (i, &(cr, cc)) in centres.iter().enumerate() {
            let (a, b) = (r as i64 - (cr as i64 - n as i64 / 2), c as i64 - (cc as i64 - n as i64 / 2));
            if (0..n as i64).contains(&a) && (0..n as i64).contains(&b) {
                let wt = w(a as usize * n + b as usize);
                re += wt * (i + 1) as f64;
                im += wt * i as f64;
                den += wt;
            }
        }
        let k = (r - top) * placed.amp.cols + (c - left);
        assert!((placed.amp.data[k] - (re / den).hypot(im / den)).abs() < 1e-9, "({r}, {c}): {} vs {}", placed.amp.data[k], (re / den).hypot(im / den));
        assert!((placed.phase.data[k] - im.atan2(re)).abs() < 1e-9, "({r}, {c})");
    }
}

/// A reconstruction whose constant phase offset lies near pi wraps across the canvas; scoring
/// removes the offset circularly before the plane, so it still scores as perfect.
#[test]
fn a_phase_offset_near_pi_scores_as_perfect() {
    let (split, object) = blend_case();
    let rot = 3.0f64; // with the case's own 0.4: 3.4 rad, past pi
    let turned: Vec<[f32; 2]> = object
        .iter()
        .map(|z| {
            let (re, im) = (z[0] as f64, z[1] as f64);
            [(re * rot.cos() - im * rot.sin()) as f32, (re * rot.sin() + im * rot.cos()) as f32]
        })
        .collect();
    let amp: Vec<f64> = turned.iter().map(|z| (z[0] as f64).hypot(z[1] as f64)).collect();
    let phase: Vec<f64> = turned.iter().map(|z| (z[1] as f64).atan2(z[0] as f64)).collect();
    let placed = place(&split, &amp, &phase).unwrap();
    assert!(placed.phase.data.iter().any(|&p| p > 3.0) && placed.phase.data.iter().any(|&p| p < -3.0), "the case must wrap");
    let (m, _) = score(&beside_truth(&split, placed).unwrap()).unwrap();
    assert!(m.phase_mae < 1e-5 && (m.phase_ssim - 1.0).abs() < 1e-9, "{m:?}");
}

/// Patches each turned by its own constant phase (which no diffraction pattern determines):
/// blend stitching mixes the offsets, aligned stitching finds them from the overlaps alone (up to
/// one common offset) and scores as perfect.
#[test]
fn aligned_stitching_recovers_per_patch_phase_offsets_from_the_overlaps() {
    let (split, object) = blend_case();
    let n2 = split.n * split.n;
    let offsets: Vec<f64> = (0..split.len()).map(|i| 0.9 * ((i as f64) * 1.7).sin()).collect();
    let mut turned = object.clone();
    for (i, c) in offsets.iter().enumerate() {
        let (s, co) = c.sin_cos();
        for z in &mut turned[i * n2..(i + 1) * n2] {
            let (re, im) = (z[0] as f64, z[1] as f64);
            *z = [(re * co - im * s) as f32, (re * s + im * co) as f32];
        }
    }
    let found = fnokern::eval::phase_offsets(&split, &turned).unwrap();
    // The same offsets up to one constant.
    let shift = found[0] - offsets[0];
    for (f, o) in found.iter().zip(&offsets) {
        assert!((f - o - shift).abs() < 1e-4, "found {f}, put {o} (+{shift})");
    }
    let blended = score(&beside_truth(&split, place_blended(&split, &turned).unwrap()).unwrap()).unwrap().0;
    assert!(blended.phase_ssim < 0.99, "{blended:?}");
    let aligned = score(&beside_truth(&split, place_as(Stitch::Aligned, &split, &[], &[], &turned).unwrap()).unwrap()).unwrap().0;
    assert!(aligned.phase_mae < 1e-4 && (aligned.phase_ssim - 1.0).abs() < 1e-7, "{aligned:?}");
    assert!(aligned.amp_mae < 1e-4, "{aligned:?}");
}

//! Finite-difference gradient checks (f64, central differences, small odd sizes, fixed seeds) of
//! every differentiable op, for every input and parameter. One test per case; the last test makes
//! sure no case of `all_cases` is left without one.

use fnokern::autograd::Tape;
use fnokern::gradcheck::{all_cases, check, Input, Tolerance};
use fnokern::{backend, DType, Device, Tensor};

fn run(name: &str) {
    let cases = all_cases();
    let case = cases.iter().find(|c| c.name == name).unwrap_or_else(|| panic!("no gradient check named {name}"));
    let report = (case.run)().unwrap_or_else(|e| panic!("{name}: {e}"));
    assert!(
        report.passed(),
        "{name}: {} of {} entries wrong (max abs err {:.3e}):\n{}",
        report.mismatches.len(),
        report.checked,
        report.max_abs_err,
        report.mismatches.iter().take(8).cloned().collect::<Vec<_>>().join("\n")
    );
}

macro_rules! gradcheck_tests {
    ($($name:ident),* $(,)?) => {
        $( #[test] fn $name() { run(stringify!($name)); } )*
        const NAMES: &[&str] = &[$(stringify!($name)),*];
    };
}

gradcheck_tests!(
    conv2d_3x3_pad1_bias,
    conv2d_2x2_stride2_bias,
    conv2d_1x1_bias,
    conv2d_3x3_stride2_pad1,
    conv2d_3x3_pad1_winograd,
    conv_transpose2d_2x2_stride2_bias,
    conv_transpose2d_3x3_stride2_pad1,
    rfft2_odd_width,
    rfft2_even_width,
    irfft2_even_width,
    irfft2_odd_width,
    spectral_mix_corners,
    spectral_mix_positive,
    spectral_conv_corners,
    spectral_conv_positive_clamped,
    spectral_conv_corners_clamped,
    gelu,
    abs,
    sqrt,
    square,
    log,
    wrap_angle,
    add,
    sub,
    mul,
    scale,
    add_scalar,
    mul_scalar,
    div_scalar,
    channel_scale,
    layerscale_residual,
    concat_channels,
    layer_norm_affine,
    layer_norm_plain,
    rms_norm_affine,
    rms_norm_plain,
    instance_norm_affine,
    instance_norm_plain,
    mul_probe,
    fft2_unnormalised,
    fft2_ortho,
    fft2_forward_norm,
    fftshift_complex_odd,
    ifftshift_real_odd,
    roll_flat,
    complex_abs,
    complex_angle,
    channels_to_complex,
    complex_to_channels,
    sum,
    sum_sq,
    mean,
    global_norm,
    mae,
    mse,
    rel_l2,
    sample_sum_sq,
    mean_rel_l2,
    central_differences,
    mean_rel_h1,
    mae_over_detached_mean,
);

#[test]
fn every_case_has_a_test() {
    let mut missing: Vec<&str> = all_cases().iter().map(|c| c.name).filter(|n| !NAMES.contains(n)).collect();
    missing.sort();
    assert!(missing.is_empty(), "gradient checks without a test: {missing:?}");
}

/// The checker itself must catch a wrong backward: here an op whose recorded gradient is off by 1%.
#[test]
fn checker_catches_a_wrong_gradient() {
    let x = Tensor::randn([3, 5], 1.0, 1, DType::F64, &Device::cpu()).unwrap();
    let wrong = |t: &mut Tape, v: &[fnokern::Var]| {
        let y = backend::affine(v[0].value(), 2.0, 0.0)?;
        t.record1(&[&v[0]], y, |ctx| {
            let dx = backend::affine(ctx.grad(0), 2.02, 0.0)?;
            ctx.add(0, dx)
        })
    };
    let report = check(vec![Input::var(x)], &wrong, Tolerance::default(), 3).unwrap();
    assert_eq!(report.checked, 15);
    assert_eq!(report.mismatches.len(), 15, "every entry is 1% off and must be flagged");
}

/// The detached denominator: the gradient with respect to the observation flows through the
/// numerator only, so it equals the gradient of mae(pred, obs) / c with c = mean(obs) + eps fixed.
#[test]
fn detached_mean_stops_the_denominator_gradient() {
    let dev = Device::cpu();
    let pred = Tensor::randn([2, 3, 5], 1.0, 1, DType::F64, &dev).unwrap();
    let obs = Tensor::rand_uniform([2, 3, 5], 0.5, 2.0, 2, DType::F64, &dev).unwrap();
    let c = obs.to_f64_vec().unwrap().iter().sum::<f64>() / 30.0 + 1e-8;

    let mut t = Tape::new();
    let p = t.leaf(pred.clone(), false);
    let o = t.leaf(obs.clone(), true);
    let loss = fnokern::ops::mae_over_detached_mean(&mut t, &p, &o, 1e-8).unwrap();
    let got = t.backward(&loss).unwrap().wrt(&o).unwrap().to_f64_vec().unwrap();

    let (pv, ov) = (pred.to_f64_vec().unwrap(), obs.to_f64_vec().unwrap());
    for j in 0..30 {
        // d/d obs_j of mean|p - o| / c = -sign(p_j - o_j) / (30 c)
        let want = -(pv[j] - ov[j]).signum() / (30.0 * c);
        assert!((got[j] - want).abs() < 1e-12, "entry {j}: {} vs {want}", got[j]);
    }
}

//! Optimisers, clipping and schedules against values worked out by hand from PyTorch's formulas.

use fnokern::autograd::{ParamRole, ParamStore};
use fnokern::config::{ClipKind, OptimizerKind, ScheduleKind, TrainConfig};
use fnokern::optim::{AuxSchedule, Clipper, Optimizer, Schedule};
use fnokern::{Device, Tensor};

/// A store of parameters with the roles given (biases when none are).
fn store_with(vals: &[(&str, Vec<f64>, Vec<usize>)], roles: &[ParamRole], dev: &Device) -> ParamStore {
    let mut s = ParamStore::new();
    for (i, (n, v, shape)) in vals.iter().enumerate() {
        s.add(*n, Tensor::from_vec(v.clone(), shape.clone(), dev).unwrap(), roles.get(i).copied().unwrap_or(ParamRole::Bias)).unwrap();
    }
    s
}

fn store(vals: &[(&str, Vec<f64>, Vec<usize>)], dev: &Device) -> ParamStore {
    store_with(vals, &[], dev)
}

fn vals(s: &ParamStore, i: usize) -> Vec<f64> {
    s.values()[i].to_f64_vec().unwrap()
}

/// Adam's first update moves each entry by lr * sign(g) (m_hat / sqrt(v_hat) = g / |g|, up to
/// eps); the second, with g2, by lr * m_hat / (sqrt(v_hat) + eps) computed here in full.
#[test]
fn adam_matches_the_formula() {
    let dev = Device::cpu();
    let mut p = store(&[("w", vec![1.0, -2.0], vec![2])], &dev);
    let cfg = TrainConfig { optimizer: OptimizerKind::Adam, ..TrainConfig::default() };
    let mut opt = Optimizer::new(&cfg, &p);
    let g1 = vec![Some(Tensor::from_vec(vec![0.5, -4.0], [2], &dev).unwrap())];
    opt.step(&mut p, &g1, 0.1).unwrap();
    let w = vals(&p, 0);
    assert!((w[0] - (1.0 - 0.1 * 0.5 / (0.5 + 1e-8))).abs() < 1e-12);
    assert!((w[1] - (-2.0 + 0.1 * 4.0 / (4.0 + 1e-8))).abs() < 1e-12);
    let g2 = vec![Some(Tensor::from_vec(vec![1.0, 0.0], [2], &dev).unwrap())];
    opt.step(&mut p, &g2, 0.1).unwrap();
    let (b1, b2) = (0.9f64, 0.999f64);
    let m = (1.0 - b1) * 0.5 * b1 + (1.0 - b1) * 1.0;
    let v = b2 * (1.0 - b2) * 0.25 + (1.0 - b2) * 1.0;
    let step = 0.1 * (m / (1.0 - b1 * b1)) / ((v / (1.0 - b2 * b2)).sqrt() + 1e-8);
    assert!((vals(&p, 0)[0] - (w[0] - step)).abs() < 1e-12);
}

/// AdamW decays the weight by lr * wd before the Adam step; Adam adds wd * p to the gradient.
#[test]
fn adamw_decouples_weight_decay() {
    let dev = Device::cpu();
    let cfg = TrainConfig { optimizer: OptimizerKind::Adamw, weight_decay: 0.5, ..TrainConfig::default() };
    let mut p = store(&[("w", vec![2.0], vec![1])], &dev);
    let mut opt = Optimizer::new(&cfg, &p);
    opt.step(&mut p, &[Some(Tensor::from_vec(vec![3.0], [1], &dev).unwrap())], 0.1).unwrap();
    // 2 (1 - 0.1 * 0.5) - 0.1 * sign(3)
    assert!((vals(&p, 0)[0] - (2.0 * 0.95 - 0.1 * 3.0 / (3.0 + 1e-8))).abs() < 1e-12);
}

/// SGD with Nesterov momentum 0.9: buf1 = g1, p -= lr (g1 + 0.9 g1); buf2 = 0.9 g1 + g2,
/// p -= lr (g2 + 0.9 buf2).
#[test]
fn sgd_nesterov_matches_the_formula() {
    let dev = Device::cpu();
    let cfg = TrainConfig { optimizer: OptimizerKind::Sgd, momentum: 0.9, nesterov: true, ..TrainConfig::default() };
    let mut p = store(&[("w", vec![1.0], vec![1])], &dev);
    let mut opt = Optimizer::new(&cfg, &p);
    let g = |v: f64| vec![Some(Tensor::from_vec(vec![v], [1], &dev).unwrap())];
    opt.step(&mut p, &g(2.0), 0.1).unwrap();
    assert!((vals(&p, 0)[0] - (1.0 - 0.1 * (2.0 + 0.9 * 2.0))).abs() < 1e-12);
    opt.step(&mut p, &g(-1.0), 0.1).unwrap();
    let buf2 = 0.9 * 2.0 - 1.0;
    assert!((vals(&p, 0)[0] - (1.0 - 0.38 - 0.1 * (-1.0 + 0.9 * buf2))).abs() < 1e-12);
}

#[test]
fn global_norm_value_and_per_param_clipping() {
    let dev = Device::cpu();
    let p = store(&[("a", vec![0.0, 0.0], vec![2]), ("b", vec![0.0], vec![1])], &dev);
    let grads = || vec![Some(Tensor::from_vec(vec![3.0, 0.0], [2], &dev).unwrap()), Some(Tensor::from_vec(vec![4.0], [1], &dev).unwrap())];
    // Global norm 5 clipped to 1: coefficient 1 / (5 + 1e-6).
    let mut g = grads();
    let cfg = TrainConfig::default();
    let r = Clipper::new(&cfg).clip(&mut g, &p).unwrap();
    assert!((r.norm_before - 5.0).abs() < 1e-12 && (r.norm_after - 5.0 / (5.0 + 1e-6)).abs() < 1e-12);
    let mut g = grads();
    let r = Clipper::new(&TrainConfig { clip: ClipKind::Value, clip_value: 2.0, ..cfg.clone() }).clip(&mut g, &p).unwrap();
    assert_eq!(g[0].as_ref().unwrap().to_f64_vec().unwrap(), [2.0, 0.0]);
    assert!((r.norm_after - 8f64.sqrt()).abs() < 1e-12);
    let mut g = grads();
    Clipper::new(&TrainConfig { clip: ClipKind::PerParam, clip_max_norm: 3.5, ..cfg }).clip(&mut g, &p).unwrap();
    assert_eq!(g[0].as_ref().unwrap().to_f64_vec().unwrap(), [3.0, 0.0], "norm 3 is under 3.5");
    assert!((g[1].as_ref().unwrap().to_f64_vec().unwrap()[0] - 4.0 * 3.5 / (4.0 + 1e-6)).abs() < 1e-12);
}

/// Unit-wise AGC on a conv weight [2 units, 2]: unit 0 has |W| = 5, |G| = 1 -> limit 0.1 * 5 = 0.5,
/// scaled by 0.5; unit 1 has |W| = 0 -> limit 0.1 * eps = 1e-4, |G| = 2 -> scaled by 5e-5. The
/// bias and the head are left alone; per-tensor AGC scales the whole weight by 0.1 * 5 / sqrt(5).
#[test]
fn agc_clips_per_unit_and_per_tensor() {
    let dev = Device::cpu();
    let roles = [ParamRole::Weight { unit_axis: 0 }, ParamRole::Bias, ParamRole::Head];
    let p = store_with(&[("w", vec![3.0, 4.0, 0.0, 0.0], vec![2, 2]), ("b", vec![0.0, 0.0], vec![2]), ("head.weight", vec![1.0], vec![1])], &roles, &dev);
    let grads = || {
        vec![
            Some(Tensor::from_vec(vec![0.6, 0.8, 2.0, 0.0], [2, 2], &dev).unwrap()),
            Some(Tensor::from_vec(vec![100.0, 0.0], [2], &dev).unwrap()),
            Some(Tensor::from_vec(vec![100.0], [1], &dev).unwrap()),
        ]
    };
    let cfg = TrainConfig { clip: ClipKind::AgcUnit, ..TrainConfig::default() };
    let mut g = grads();
    Clipper::new(&cfg).clip(&mut g, &p).unwrap();
    let w = g[0].as_ref().unwrap().to_f64_vec().unwrap();
    for (got, want) in w.iter().zip([0.3, 0.4, 2.0 * 5e-5, 0.0]) {
        assert!((got - want).abs() < 1e-12, "{w:?}");
    }
    assert_eq!(g[1].as_ref().unwrap().to_f64_vec().unwrap(), [100.0, 0.0]);
    assert_eq!(g[2].as_ref().unwrap().to_f64_vec().unwrap(), [100.0]);
    let mut g = grads();
    Clipper::new(&TrainConfig { clip: ClipKind::AgcTensor, ..cfg }).clip(&mut g, &p).unwrap();
    let k = 0.5 / 5f64.sqrt();
    let w = g[0].as_ref().unwrap().to_f64_vec().unwrap();
    assert!((w[2] - 2.0 * k).abs() < 1e-12, "{w:?}");
    // The bias has |W| = 0: limit 0.1 * 1e-3.
    assert!((g[1].as_ref().unwrap().to_f64_vec().unwrap()[0] - 1e-4).abs() < 1e-12);
}

#[test]
fn schedules_by_hand() {
    let mut cfg = TrainConfig { schedule: ScheduleKind::WarmupCosine, lr: 1.0, warmup_frac: 0.1, min_lr_frac: 0.1, ..TrainConfig::default() };
    let s = Schedule::new(&cfg, 100);
    // 10 warmup updates: (u + 1) / 10; then cosine from 1 to 0.1 over 90 updates.
    assert!((s.lr(0) - 0.1).abs() < 1e-12);
    assert!((s.lr(9) - 1.0).abs() < 1e-12);
    assert!((s.lr(10) - 1.0).abs() < 1e-12);
    assert!((s.lr(55) - 0.55).abs() < 1e-12, "half way: 0.1 + 0.45 (1 + cos(pi/2))");
    assert!((s.lr(100) - 0.1).abs() < 1e-12);
    cfg.schedule = ScheduleKind::Step;
    cfg.step_size = 10;
    assert!((Schedule::new(&cfg, 100).lr(25) - 0.25).abs() < 1e-12);
    cfg.schedule = ScheduleKind::Exponential;
    cfg.exp_gamma = 0.5;
    assert!((Schedule::new(&cfg, 100).lr(3) - 0.125).abs() < 1e-12);
    // Plateau, patience 2: the third epoch without improvement halves the rate.
    cfg.schedule = ScheduleKind::Plateau;
    cfg.min_lr = 0.3;
    let mut s = Schedule::new(&cfg, 100);
    for v in [1.0, 0.9, 0.95, 0.92, 0.91] {
        s.on_epoch(v);
    }
    assert_eq!(s.lr(0), 0.5);
    for v in [0.99, 0.99, 0.99] {
        s.on_epoch(v);
    }
    assert_eq!(s.lr(0), 0.3, "never below min_lr");
    // Its state is what a checkpoint keeps: restored into a fresh schedule, the rate is the same.
    let mut fresh = Schedule::new(&cfg, 100);
    fresh.restore(s.state().clone());
    assert_eq!(fresh.lr(7), s.lr(7));
}

#[test]
fn curriculum_weight_ramps_then_caps() {
    let cfg = TrainConfig { aux_weight: 0.2, aux_warmup_steps: 10, aux_ramp_steps: 20, ..TrainConfig::default() };
    let aux = AuxSchedule::new(&cfg);
    assert_eq!(aux.at(5), 0.0);
    assert!((aux.at(20) - 0.1).abs() < 1e-12);
    assert_eq!(aux.at(30), 0.2);
    assert_eq!(aux.at(1000), 0.2);
}

//! The tape on a multi-op graph shaped like two generator blocks with a skip connection:
//! checkpointed and plain backward agree bit for bit, checkpointing lowers the measured peak, the
//! meta device predicts the device's peak to the byte, and memory comes back after the step.
//! Every test body runs on each device (`test_device!`: the CPU, and a GPU or the driver stand-in;
//! a GPU computes in f32 only).

use fnokern::autograd::{ParamId, ParamRole, ParamStore, Tape, Var};
use fnokern::backend::Conv2dParams;
use fnokern::{ops, DType, Device, ModeConvention, NormKind, Result, SpectralModes, Tensor};

mod common;
use common::dtype_and_tol;

const B: usize = 2;
const C: usize = 4;
const H: usize = 9;
const W: usize = 7;
const MODES: SpectralModes = SpectralModes { modes: 3, convention: ModeConvention::Corners };

struct Net {
    store: ParamStore,
    lift_w: ParamId,
    lift_b: ParamId,
    spec1: ParamId,
    conv1_w: ParamId,
    conv1_b: ParamId,
    spec2: ParamId,
    conv2_w: ParamId,
    conv2_b: ParamId,
    gamma2: ParamId,
    lambda2: ParamId,
    head_w: ParamId,
    head_b: ParamId,
}

impl Net {
    fn new(dev: &Device, dtype: DType) -> Result<Net> {
        let mut s = ParamStore::new();
        let mut seed = 100;
        let mut p = |s: &mut ParamStore, name: &str, shape: fnokern::Shape, std: f64| {
            seed += 1;
            s.add(name, Tensor::randn(shape, std, seed, dtype, dev)?, ParamRole::Weight { unit_axis: 0 })
        };
        let sw = MODES.weight_shape(C, C, H, W);
        Ok(Net {
            lift_w: p(&mut s, "lift.w", [C, 1, 3, 3].into(), 0.3)?,
            lift_b: p(&mut s, "lift.b", [C].into(), 0.1)?,
            spec1: p(&mut s, "b1.spectral", sw.clone(), 0.5)?,
            conv1_w: p(&mut s, "b1.conv.w", [C, C, 3, 3].into(), 0.2)?,
            conv1_b: p(&mut s, "b1.conv.b", [C].into(), 0.1)?,
            spec2: p(&mut s, "b2.spectral", sw, 0.5)?,
            conv2_w: p(&mut s, "b2.conv.w", [C, C, 3, 3].into(), 0.2)?,
            conv2_b: p(&mut s, "b2.conv.b", [C].into(), 0.1)?,
            gamma2: p(&mut s, "b2.norm.gamma", [C].into(), 1.0)?,
            lambda2: p(&mut s, "b2.lambda", [C].into(), 0.1)?,
            head_w: p(&mut s, "head.w", [2, 2 * C, 1, 1].into(), 0.3)?,
            head_b: p(&mut s, "head.b", [2].into(), 0.1)?,
            store: s,
        })
    }
}

/// y = x + GELU(Spectral(x) + Conv3x3(x))
fn block1(t: &mut Tape, x: &Var, spec: ParamId, cw: ParamId, cb: ParamId) -> Result<Var> {
    let (s, w, b) = (t.param(spec)?, t.param(cw)?, t.param(cb)?);
    let a = ops::spectral_conv(t, x, &s, MODES)?;
    let c = ops::conv2d(t, x, &w, Some(&b), Conv2dParams::new(1, 1))?;
    let sum = ops::add(t, &a, &c)?;
    let g = ops::gelu(t, &sum)?;
    ops::add(t, x, &g)
}

/// y = x + lambda * GELU(Spectral(n) + Conv3x3(n)), n = RMSNorm(x) (pre-norm LayerScale)
fn block2(t: &mut Tape, x: &Var, ids: [ParamId; 5]) -> Result<Var> {
    let [spec, cw, cb, gamma, lambda] = ids;
    let gm = t.param(gamma)?;
    let n = ops::norm(t, NormKind::RmsNorm, x, Some(&gm), None, 1e-5)?;
    let (s, w, b, l) = (t.param(spec)?, t.param(cw)?, t.param(cb)?, t.param(lambda)?);
    let a = ops::spectral_conv(t, &n, &s, MODES)?;
    let c = ops::conv2d(t, &n, &w, Some(&b), Conv2dParams::new(1, 1))?;
    let sum = ops::add(t, &a, &c)?;
    let g = ops::gelu(t, &sum)?;
    ops::layerscale(t, x, &g, &l)
}

/// One training step's forward and backward; returns the loss value (None on meta) and gradients.
fn step(net: &Net, x: &Tensor, target: &Tensor, checkpoint: bool) -> Result<(Option<f64>, Vec<Option<Tensor>>)> {
    let mut t = Tape::with_params(&net.store);
    let xv = t.constant(x.clone());
    let (lw, lb) = (t.param(net.lift_w)?, t.param(net.lift_b)?);
    let h0 = ops::conv2d(&mut t, &xv, &lw, Some(&lb), Conv2dParams::new(1, 1))?;
    let ids1 = (net.spec1, net.conv1_w, net.conv1_b);
    let ids2 = [net.spec2, net.conv2_w, net.conv2_b, net.gamma2, net.lambda2];
    let h2 = if checkpoint {
        let h1 = t.checkpoint(&[&h0], move |t, v| Ok(vec![block1(t, &v[0], ids1.0, ids1.1, ids1.2)?]))?;
        let h2 = t.checkpoint(&[&h1[0]], move |t, v| Ok(vec![block2(t, &v[0], ids2)?]))?;
        h2.into_iter().next().unwrap()
    } else {
        let h1 = block1(&mut t, &h0, ids1.0, ids1.1, ids1.2)?;
        block2(&mut t, &h1, ids2)?
    };
    // The skip: h0 feeds both the first block and the head.
    let cat = ops::concat_channels(&mut t, &[&h2, &h0])?;
    drop((h0, h2));
    let (hw, hb) = (t.param(net.head_w)?, t.param(net.head_b)?);
    let y = ops::conv2d(&mut t, &cat, &hw, Some(&hb), Conv2dParams::new(1, 0))?;
    drop(cat);
    let tv = t.constant(target.clone());
    let loss = ops::mae(&mut t, &y, &tv)?;
    drop((y, tv, xv, lw, lb, hw, hb));
    let value = if loss.value().device().is_meta() { None } else { Some(loss.value().scalar_value()?) };
    let grads = t.backward(&loss)?;
    Ok((value, grads.into_params()))
}

fn inputs(dev: &Device, dtype: DType) -> (Tensor, Tensor) {
    (Tensor::randn([B, 1, H, W], 1.0, 1, dtype, dev).unwrap(), Tensor::randn([B, 2, H, W], 1.0, 2, dtype, dev).unwrap())
}

/// Peak bytes of one step, measured from the state after parameters and data exist.
fn peak_of_step(dev: &Device, checkpoint: bool) -> (u64, u64, u64) {
    let net = Net::new(dev, DType::F32).unwrap();
    let (x, target) = inputs(dev, DType::F32);
    dev.reset_peak();
    let before = dev.memory().current;
    let (_, grads) = step(&net, &x, &target, checkpoint).unwrap();
    let grad_bytes: u64 = grads.iter().flatten().map(|g| g.size_in_bytes() as u64).sum();
    let peak = dev.memory().peak;
    drop(grads);
    let after = dev.memory().current;
    assert_eq!(after, before, "a step must give back every byte but the gradients");
    (before, peak, grad_bytes)
}

test_device!(
    fn checkpointed_gradients_are_bitwise_identical(dev) {
        let dtypes: &[DType] = if dev.kind().is_gpu() { &[DType::F32] } else { &[DType::F64, DType::F32] };
        for &dtype in dtypes {
            let net = Net::new(dev, dtype).unwrap();
            let (x, target) = inputs(dev, dtype);
            let (l0, plain) = step(&net, &x, &target, false).unwrap();
            let (l1, ckpt) = step(&net, &x, &target, true).unwrap();
            assert_eq!(l0.unwrap().to_bits(), l1.unwrap().to_bits(), "{dtype:?}: loss");
            assert_eq!(plain.len(), net.store.len());
            for (id, name, _) in net.store.iter() {
                let a = plain[id.0].as_ref().unwrap_or_else(|| panic!("no gradient for {name}")).to_f64_vec().unwrap();
                let b = ckpt[id.0].as_ref().unwrap().to_f64_vec().unwrap();
                assert!(a.iter().any(|v| *v != 0.0), "{name}: gradient is all zero");
                let same = a.iter().zip(&b).all(|(p, q)| p.to_bits() == q.to_bits());
                assert!(same, "{dtype:?} {name}: checkpointed gradient differs");
            }
        }
    }
);

test_device!(
    fn checkpointing_lowers_the_peak(dev) {
        let fresh = || Device::of_kind(dev.kind()).unwrap();
        let (_, plain, _) = peak_of_step(&fresh(), false);
        let (_, ckpt, _) = peak_of_step(&fresh(), true);
        eprintln!("peak bytes of one step on {dev}: plain {plain}, checkpointed {ckpt}");
        assert!(ckpt < plain, "checkpointed peak {ckpt} is not below plain peak {plain}");
    }
);

test_device!(
    fn meta_predicts_the_peak_to_the_byte(dev) {
        for checkpoint in [false, true] {
            let real = Device::of_kind(dev.kind()).unwrap();
            let meta = Device::meta();
            let (real_base, real_peak, real_grads) = peak_of_step(&real, checkpoint);
            let (meta_base, meta_peak, meta_grads) = peak_of_step(&meta, checkpoint);
            assert_eq!(meta_base, real_base, "checkpoint={checkpoint}: resident bytes");
            assert_eq!(meta_peak, real_peak, "checkpoint={checkpoint}: peak bytes");
            assert_eq!(meta_grads, real_grads, "checkpoint={checkpoint}: gradient bytes");
            assert_eq!(real.memory().allocations, meta.memory().allocations, "checkpoint={checkpoint}: allocation count");
        }
    }
);

test_device!(
    /// The f32 graph on the device against the f64 graph on the CPU.
    fn f32_matches_f64_on_the_whole_graph(dev) {
        let d64 = Device::cpu();
        let n64 = Net::new(&d64, DType::F64).unwrap();
        let n32 = Net::new(dev, DType::F32).unwrap();
        let (x64, t64) = inputs(&d64, DType::F64);
        let (x32, t32) = inputs(dev, DType::F32);
        let (l64, g64) = step(&n64, &x64, &t64, false).unwrap();
        let (l32, g32) = step(&n32, &x32, &t32, false).unwrap();
        // f32 inputs are the f64 inputs rounded, so agreement is limited by f32 rounding (~1e-7
        // relative per op, a few dozen ops deep).
        assert!((l64.unwrap() - l32.unwrap()).abs() < 1e-5 * l64.unwrap().abs());
        for (a, b) in g64.iter().zip(&g32) {
            let (a, b) = (a.as_ref().unwrap().to_f64_vec().unwrap(), b.as_ref().unwrap().to_f64_vec().unwrap());
            let scale = a.iter().fold(0.0f64, |m, v| m.max(v.abs()));
            for (p, q) in a.iter().zip(&b) {
                assert!((p - q).abs() <= 1e-4 * scale + 1e-6, "{p} vs {q} (scale {scale})");
            }
        }
    }
);

test_device!(
    fn memory_limit_fails_cleanly_and_names_the_request(dev) {
        let dev = &Device::of_kind(dev.kind()).unwrap();
        let net = Net::new(dev, DType::F32).unwrap();
        let (x, target) = inputs(dev, DType::F32);
        let resident = dev.memory().current;
        dev.set_memory_limit(Some(resident + 4096));
        let err = step(&net, &x, &target, false).unwrap_err().to_string();
        assert!(err.starts_with(&format!("out of memory on {dev}: requested ")), "{err}");
        assert!(err.contains(&format!("limit {} bytes", resident + 4096)), "{err}");
        assert!(err.contains("tensor of shape ["), "{err}");
        // Everything the failed step held is given back.
        assert_eq!(dev.memory().current, resident);
        dev.set_memory_limit(None);
        step(&net, &x, &target, false).unwrap();
    }
);

test_device!(
    fn a_value_from_another_tape_is_an_error(dev) {
        let mut t1 = Tape::new();
        let mut t2 = Tape::new();
        let a = t1.leaf(Tensor::zeros([2, 2], DType::F32, dev).unwrap(), true);
        let err = ops::gelu(&mut t2, &a).unwrap_err().to_string();
        assert!(err.contains("another tape"), "{err}");
    }
);

test_device!(
    fn backward_needs_a_one_element_loss(dev) {
        let mut t = Tape::new();
        let a = t.leaf(Tensor::zeros([2, 2], DType::F32, dev).unwrap(), true);
        let y = ops::gelu(&mut t, &a).unwrap();
        let err = t.backward(&y).err().unwrap().to_string();
        assert!(err.contains("one-element loss") && err.contains("[2, 2]"), "{err}");
    }
);

test_device!(
    fn a_checkpoint_body_cannot_capture_outer_values(dev) {
        let mut t = Tape::new();
        let a = t.leaf(Tensor::zeros([1, 2, 3, 3], DType::F32, dev).unwrap(), true);
        let outer = a.clone();
        let err = t.checkpoint(&[&a], move |t, v| Ok(vec![ops::add(t, &v[0], &outer)?])).unwrap_err().to_string();
        assert!(err.contains("another tape"), "{err}");
    }
);

test_device!(
    /// A checkpointed segment whose only input is data (no gradient) still gives its parameters
    /// their gradients: the body's parameter reads make its outputs differentiable.
    fn a_checkpoint_on_data_alone_still_trains_its_parameters(dev) {
        let dtype = dtype_and_tol(dev).0;
        let net = Net::new(dev, dtype).unwrap();
        let x = Tensor::randn([B, 1, H, W], 1.0, 5, dtype, dev).unwrap();
        let (lw, lb) = (net.lift_w, net.lift_b);
        let grads = |checkpoint: bool| {
            let mut t = Tape::with_params(&net.store);
            let xv = t.constant(x.clone());
            let body = move |t: &mut Tape, v: &[Var]| -> Result<Vec<Var>> {
                let (w, b) = (t.param(lw)?, t.param(lb)?);
                let y = ops::conv2d(t, &v[0], &w, Some(&b), Conv2dParams::new(1, 1))?;
                Ok(vec![ops::gelu(t, &y)?])
            };
            let y = if checkpoint { t.checkpoint(&[&xv], body).unwrap().remove(0) } else { body(&mut t, &[xv]).unwrap().remove(0) };
            let loss = ops::sum_sq(&mut t, &y).unwrap();
            let g = t.backward(&loss).unwrap();
            [lw, lb].map(|id| g.param(id).map(|g| g.to_f64_vec().unwrap()))
        };
        let plain = grads(false);
        assert!(plain.iter().all(Option::is_some));
        assert_eq!(grads(true), plain, "the checkpointed segment lost or changed its parameter gradients");
    }
);

test_device!(
    /// A value read by a convolution and by other ops: its gradient is the sum of their parts,
    /// bit for bit, whether the convolution's backward runs first (nothing gathered yet) or after
    /// the others (it adds into what they gathered, on a GPU in its own launch).
    fn a_gradient_gathered_by_a_convolution_is_the_sum_of_the_parts(dev) {
        let dtype = dtype_and_tol(dev).0;
        let p = Conv2dParams::new(1, 1);
        let xv = Tensor::randn([2, 3, 6, 5], 1.0, 1, dtype, dev).unwrap();
        let wv = Tensor::randn([3, 3, 3, 3], 0.5, 2, dtype, dev).unwrap();
        let seed = Tensor::randn([2, 3, 6, 5], 1.0, 3, dtype, dev).unwrap();
        for conv_first in [true, false] {
            let mut t = Tape::new();
            let x = t.leaf(xv.clone(), true);
            let w = t.leaf(wv.clone(), false);
            // y = conv(x) + gelu(x), recorded in either order.
            let (c, g) = if conv_first {
                let c = ops::conv2d(&mut t, &x, &w, None, p).unwrap();
                (c, ops::gelu(&mut t, &x).unwrap())
            } else {
                let g = ops::gelu(&mut t, &x).unwrap();
                (ops::conv2d(&mut t, &x, &w, None, p).unwrap(), g)
            };
            let y = ops::add(&mut t, &c, &g).unwrap();
            let grads = t.backward_with(vec![(y, seed.clone())]).unwrap();
            let got = grads.wrt(&x).unwrap().to_f64_vec().unwrap();
            // The parts, each on its own, then one sum.
            let conv_part = fnokern::backend::conv2d_bwd_input(&seed, &wv, xv.shape(), p).unwrap();
            let mut t = Tape::new();
            let x1 = t.leaf(xv.clone(), true);
            let g1 = ops::gelu(&mut t, &x1).unwrap();
            let gelu_part = t.backward_with(vec![(g1, seed.clone())]).unwrap().wrt(&x1).unwrap().clone();
            let want = fnokern::backend::binary(fnokern::backend::Binary::Add, &conv_part, &gelu_part).unwrap().to_f64_vec().unwrap();
            assert!(got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()), "conv first: {conv_first}: the gathered gradient differs from the sum of the parts");
        }
    }
);

//! Selective recomputation: a checkpointed segment's backward re-runs its body but takes the
//! segment's last output as the forward made it, so the op that made it (here a convolution)
//! runs once, not twice; on small maps (here at most 128 values per channel,
//! `Tape::checkpoint_keeping`) it takes every convolution's output so, and the gradients stay bit for bit those of the plain tape. The
//! backend's op profile counts the calls; it is global, so this binary holds this one test.

use fnokern::autograd::{ParamRole, ParamStore, Tape, Var};
use fnokern::backend::{profile, Conv2dParams};
use fnokern::{ops, DType, Device, Result, Tensor};

fn calls(rows: &[profile::OpTime], op: &str) -> u64 {
    rows.iter().find(|r| r.op == op).map_or(0, |r| r.calls)
}

#[test]
fn a_checkpointed_segment_does_not_recompute_its_last_op_nor_small_maps_convolutions() {
    // 12 x 12 (144 values a channel): only the last op is kept. 6 x 5: every convolution is.
    segment_on((12, 12), 3);
    segment_on((6, 5), 2);
}

/// Runs the segment on maps of `hw` with and without checkpointing; `convs` is how many
/// convolution forwards the checkpointed step runs.
fn segment_on((h, w): (usize, usize), convs: u64) {
    let dev = Device::cpu();
    let mut store = ParamStore::new();
    let mut p =
        |name: &str, shape: [usize; 4], seed| store.add(name, Tensor::randn(shape, 0.3, seed, DType::F64, &dev).unwrap(), ParamRole::Weight { unit_axis: 0 });
    let (w1, w2) = (p("c1.w", [3, 3, 3, 3], 1).unwrap(), p("c2.w", [3, 3, 3, 3], 2).unwrap());
    let x = Tensor::randn([2, 3, h, w], 1.0, 3, DType::F64, &dev).unwrap();
    // Two convolutions with a GELU between: the body's last op is the second convolution.
    let body = move |t: &mut Tape, v: &[Var]| -> Result<Vec<Var>> {
        let c = Conv2dParams::new(1, 1);
        let (a, b) = (t.param(w1)?, t.param(w2)?);
        let h = ops::conv2d(t, &v[0], &a, None, c)?;
        let h = ops::gelu(t, &h)?;
        Ok(vec![ops::conv2d(t, &h, &b, None, c)?])
    };
    let run = |checkpoint: bool| {
        let mut t = Tape::with_params(&store);
        let xv = t.leaf(x.clone(), true);
        let y =
            if checkpoint { t.checkpoint_keeping(&[&xv], 128, body).unwrap().remove(0) } else { body(&mut t, std::slice::from_ref(&xv)).unwrap().remove(0) };
        // A consumer that keeps the segment's output, as the next segment or the head does.
        let loss = ops::sum_sq(&mut t, &y).unwrap();
        let g = t.backward(&loss).unwrap();
        let grads: Vec<Vec<f64>> =
            [w1, w2].iter().map(|&id| g.param(id).unwrap().to_f64_vec().unwrap()).chain([g.wrt(&xv).unwrap().to_f64_vec().unwrap()]).collect();
        grads
    };
    profile::set_enabled(true);
    profile::take();
    let plain = run(false);
    let plain_calls = profile::take();
    let checkpointed = run(true);
    let ckpt_calls = profile::take();
    profile::set_enabled(false);
    assert_eq!(checkpointed, plain, "checkpointing changed the gradients");
    assert_eq!(calls(&plain_calls, "conv2d"), 2);
    // The forward's two, and on the larger map the first one again in backward: the second
    // convolution's output is the segment's, kept from the forward (its backward needs only its
    // input and weight); on the small map the first's output was kept too.
    assert_eq!(calls(&ckpt_calls, "conv2d"), convs, "{h} x {w}: the recomputation ran {} convolutions", calls(&ckpt_calls, "conv2d") - 2);
    assert_eq!(calls(&ckpt_calls, "gelu"), 2, "the GELU's output is the second convolution's input: it is recomputed");
    assert_eq!(calls(&ckpt_calls, "conv2d_bwd_weight"), 2);
}

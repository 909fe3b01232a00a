//! The kernels the mission names are what the training step runs on a GPU, and the step reads
//! little back: counted on the driver stand-in (tests/common/standin.rs), which counts every
//! kernel launch and every copy. One test in its own binary, so nothing else moves the counters.
//! On a real GPU there are no counters and the test says so.

use fnokern::autograd::ParamRole;
use fnokern::backend;
use fnokern::config::{BlockKind, ClipKind};
use fnokern::model::Generator;
use fnokern::optim;
use fnokern::train::{self, RunOptions};
use fnokern::{DType, Tensor};

mod common;
use common::{tempdir, tiny};

#[test]
#[cfg_attr(not(fnokern_kernels), ignore = "skipped: no kernels (built without nvcc; scripts/install-nvcc.sh installs it)")]
fn the_step_clips_in_one_reduction_and_launches_the_fused_kernels() {
    let Some(dev) = common::standin::cuda_device("training-step kernels") else { return };
    let Some(standin) = common::standin::standin() else {
        eprintln!("training-step kernels: skipped: launch counts need the stand-in (this machine has a GPU)");
        return;
    };
    let root = tempdir("cuda-step");
    let mut cfg = tiny(&root.join("cache"));
    cfg.model.block = BlockKind::Layerscale;
    let g = Generator::new(&cfg.model, cfg.data.n, 1, &dev, DType::F32).unwrap();
    let fake_grads = || -> Vec<Option<Tensor>> {
        g.params
            .iter()
            .enumerate()
            .map(|(i, (_, _, p))| Some(backend::affine(&Tensor::randn(p.shape().clone(), 1.0, i as u64, DType::F32, &dev).unwrap(), 10.0, 0.0).unwrap()))
            .collect()
    };
    let weights = g.params.roles().iter().filter(|r| matches!(r, ParamRole::Weight { .. })).count();
    assert!(weights > 0 && weights < g.params.len());

    // Global-norm clipping: one reduction over every gradient (two launches) and one copy back,
    // whatever the number of parameters (it was two copies per parameter, then one first pass per
    // parameter).
    cfg.train.clip = ClipKind::GlobalNorm;
    let mut grads = fake_grads();
    standin.reset_calls();
    let r = optim::Clipper::new(&cfg.train).clip(&mut grads, &g.params).unwrap();
    assert!(r.norm_before > cfg.train.clip_max_norm && (r.norm_after - cfg.train.clip_max_norm).abs() < 1e-5, "{r:?}");
    assert_eq!(standin.calls("cuMemcpyDtoHAsync_v2"), 1, "copies back for global-norm clipping");
    assert_eq!(standin.calls("reduce_final_f32"), 1);
    assert_eq!(standin.calls("reduce_partial_each_f32"), 1, "one first pass over every gradient");
    assert_eq!(standin.calls("reduce_partial_f32"), 0);

    // Unit-wise AGC: one agc_unit_f32 launch per weight (biases, gains and the head excluded), no
    // norm copied back; per-tensor AGC: one per parameter. Each reads back only the norms before
    // and after.
    for (clip, launches) in [(ClipKind::AgcUnit, weights), (ClipKind::AgcTensor, g.params.len())] {
        cfg.train.clip = clip;
        let mut grads = fake_grads();
        standin.reset_calls();
        optim::Clipper::new(&cfg.train).clip(&mut grads, &g.params).unwrap();
        assert_eq!(standin.calls("agc_unit_f32"), launches as u64, "{clip:?}");
        assert_eq!(standin.calls("cuMemcpyDtoHAsync_v2"), 2, "{clip:?}: copies back");
    }

    // A real run: LayerScale blocks back-propagate through the fused kernel, and unit-wise AGC
    // clips in the trainer's own step.
    cfg.train.clip = ClipKind::AgcUnit;
    cfg.train.device = "cuda".into();
    cfg.train.epochs = 1;
    standin.reset_calls();
    let opts = RunOptions::new(root.join("run"));
    let s = train::train(&cfg, &opts, &mut |_| {}).unwrap();
    assert!(s.finished && !s.crashed, "{s:?}");
    let steps = s.steps;
    let layerscale_blocks = (cfg.model.depth + 1) as u64;
    assert!(standin.calls("layerscale_bwd_f32") >= steps * layerscale_blocks, "layerscale_bwd_f32: {}", standin.calls("layerscale_bwd_f32"));
    assert_eq!(standin.calls("agc_unit_f32"), s.updates * weights as u64);
}

//! What one steady-state training step asks of a GPU, counted on the driver stand-in
//! (tests/common/standin.rs): kernel launches, cuBLAS and cuFFT calls, memsets, pool allocations
//! and frees, copies and host synchronisations. The model is the study preset's structure (depth
//! 8, N 64, batch 16, modes 12, fp32) with its widths shrunk: the counts depend only on the
//! structure, and the stand-in runs kernels on the host. One test in its own binary, so nothing
//! else moves the counters. Rerun it to see the table:
//!
//! ```sh
//! cargo test --release --test step_counts -- --nocapture
//! ```
//!
//! On a real GPU there are no counters and the test says so.

use std::collections::BTreeMap;

use fnokern::backend::kernels::SIGNATURES;
use fnokern::plan::SteadyState;

mod common;

/// One step's counts by kind.
#[derive(Debug, Default, PartialEq, Eq, Clone, Copy)]
struct Counts {
    kernels: u64,
    library: u64,
    memsets: u64,
    allocs: u64,
    frees: u64,
    copies: u64,
    syncs: u64,
}

impl Counts {
    fn of(c: &BTreeMap<String, u64>) -> Counts {
        let sum = |f: &dyn Fn(&str) -> bool| c.iter().filter(|(k, _)| f(k)).map(|(_, v)| v).sum::<u64>();
        Counts {
            kernels: sum(&|k| SIGNATURES.iter().any(|(s, _)| *s == k)),
            library: sum(&|k| k.starts_with("cublas") || k.starts_with("cufft")),
            memsets: sum(&|k| k.starts_with("cuMemset")),
            allocs: sum(&|k| k.starts_with("cuMemAlloc")),
            frees: sum(&|k| k.starts_with("cuMemFree")),
            copies: sum(&|k| k.starts_with("cuMemcpy")),
            syncs: sum(&|k| k.ends_with("Synchronize")),
        }
    }
}

fn table(c: &BTreeMap<String, u64>) -> String {
    let mut rows: Vec<(&String, &u64)> = c.iter().collect();
    rows.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
    rows.iter().map(|(k, v)| format!("  {v:>6}  {k}\n")).collect()
}

#[test]
#[cfg_attr(not(fnokern_kernels), ignore = "skipped: no kernels (built without nvcc; scripts/install-nvcc.sh installs it)")]
fn a_study_step_counted_on_the_stand_in() {
    let Some(dev) = common::standin::cuda_device("step counts") else { return };
    let Some(standin) = common::standin::standin() else {
        eprintln!("step counts: skipped: the counters are the stand-in's (this machine has a GPU)");
        return;
    };
    let mut cfg = fnokern::config::presets::get("study").unwrap();
    for s in ["model.depth=8", "model.width=2", "model.max_channels=8", "train.device=\"cuda\""] {
        cfg.set(s).unwrap();
    }
    let mut s = SteadyState::new(&cfg, &dev).unwrap();
    let mut steps = Vec::new();
    fnokern::backend::profile::take();
    for _ in 0..2 {
        dev.synchronize().unwrap();
        standin.reset_calls();
        fnokern::backend::profile::set_enabled(true);
        s.trainer.step(s.batch.clone(), true).unwrap();
        fnokern::backend::profile::set_enabled(false);
        dev.synchronize().unwrap();
        let mut c = standin.counters();
        // The test's own synchronisation, after the step.
        *c.get_mut("cuStreamSynchronize").unwrap() -= 1;
        c.retain(|_, v| *v > 0);
        steps.push(c);
    }
    let (first, second) = (Counts::of(&steps[0]), Counts::of(&steps[1]));
    eprintln!("one steady-state step of the study structure (depth 8, N 64, batch 16, modes 12, fp32):\n{}", table(&steps[1]));
    eprintln!("{second:#?}");
    assert_eq!(first, second, "two steady-state steps ask the same of the GPU");

    // The issue's bars (issue 32): at most one host synchronisation (the step's loss, input check
    // and gradient norms come back in one copy), at most 60 memsets, at most one weight-gradient
    // GEMM per convolution. Launches plus library calls: 1,357 at the start, 457 with im2col +
    // cuBLAS, 350 with the implicit-GEMM convolutions, 333 with GELU written by the launches that
    // compute its inputs, 315 with the spectral mix making its results ready for the inverse
    // FFTs, 299 with the convolutions' dX added into the gradient gathered so far, 290 with the
    // column scale of irfft2's adjoint applied by the mix's backward as it reads (the bar: 300).
    let convs = fnokern::backend::profile::take().iter().find(|r| r.op == "conv2d_bwd_weight").map_or(0, |r| r.calls) / 2;
    assert!(convs >= 36, "the study structure has 40 convolutions, {convs} weight gradients counted");
    assert!(second.syncs <= 1, "{} host synchronisations a step", second.syncs);
    assert!(second.memsets <= 60, "{} memsets a step", second.memsets);
    let dw_gemms = ["cublasSgemm_v2", "conv2d_bwd_weight_f32"].iter().map(|k| steps[1].get(*k).copied().unwrap_or(0)).sum::<u64>();
    assert!(dw_gemms <= convs, "{dw_gemms} weight-gradient GEMMs for {convs} weight gradients");
    assert!(second.kernels + second.library <= 300, "{} launches and library calls a step", second.kernels + second.library);
}

//! The CPU backend's results do not depend on the number of threads: the same training steps in
//! pools of 1, 2 and 3 threads give the same weights to the bit (the batch-parallel convolution
//! sums its weight gradient in fixed groups, the batched one splits its GEMMs in fixed blocks;
//! the spectral mix splits work by mode).

use fnokern::config::presets;
use fnokern::plan::SteadyState;
use fnokern::Device;

/// Every parameter after three steps of the `cpu` preset's generator (at depth 5, batch 9: the
/// per-sample convolutions' weight gradient has groups of 4, 4 and 1 samples, and the 4 x 4
/// levels take the batched GEMMs), on `threads` threads.
fn weights_after_steps(threads: usize) -> Vec<Vec<u64>> {
    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
    pool.install(|| {
        let mut cfg = presets::get("cpu").unwrap();
        cfg.model.depth = 5;
        cfg.train.batch_size = 9;
        let mut s = SteadyState::new(&cfg, &Device::cpu()).unwrap();
        for _ in 0..3 {
            s.trainer.step(s.batch.clone(), true).unwrap();
        }
        s.trainer.model().params.values().iter().map(|t| t.to_f64_vec().unwrap().iter().map(|v| v.to_bits()).collect()).collect()
    })
}

#[test]
fn training_steps_are_bitwise_the_same_on_any_number_of_threads() {
    let one = weights_after_steps(1);
    assert!(one.iter().flatten().any(|&b| b != 0));
    for threads in [2, 3] {
        assert!(weights_after_steps(threads) == one, "{threads} threads differ from 1");
    }
}

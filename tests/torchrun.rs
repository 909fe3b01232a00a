//! Ranks without MPI, as torchrun starts them (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`, and
//! `NCCL_COMM_ID` or `MASTER_ADDR`/`MASTER_PORT`): NCCL carries everything. On the driver
//! stand-in with its fake NCCL, two such GPU ranks train as one GPU process with accumulate 2.

mod common;

use std::process::{Command, Stdio};

use common::bin;
use common::parallel::{assert_same_run, single_gpu_run, GpuRuns};

#[test]
fn torchrun_style_gpu_ranks_train_as_one_process_through_nccl_alone() {
    let Some(standin) = common::standin::built("torchrun_style_gpu_ranks_train_as_one_process_through_nccl_alone") else { return };
    let GpuRuns { single, multi, multi_cfg, lib_path } = single_gpu_run("torchrun", &standin);
    // What torchrun sets for each worker; the rendezvous of the fake NCCL is named by the port.
    let port = 20000 + std::process::id() % 20000;
    let ranks: Vec<_> = (0..2)
        .map(|r| {
            let mut c = Command::new(bin().get_program());
            c.args(["train", "--config", multi_cfg.to_str().unwrap(), "--out", multi.to_str().unwrap()])
                .env("LD_LIBRARY_PATH", &lib_path)
                .env("RANK", r.to_string())
                .env("LOCAL_RANK", r.to_string())
                .env("WORLD_SIZE", "2")
                .env("MASTER_ADDR", "127.0.0.1")
                .env("MASTER_PORT", port.to_string())
                .env("RAYON_NUM_THREADS", "1")
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            c.spawn().unwrap()
        })
        .collect();
    let outs: Vec<_> = ranks.into_iter().map(|c| c.wait_with_output().unwrap()).collect();
    for (r, o) in outs.iter().enumerate() {
        assert!(o.status.success(), "rank {r}: {}\n{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    }
    let said = String::from_utf8_lossy(&outs[0].stdout);
    assert!(said.contains("2 ranks over NCCL") && said.contains("gradients through NCCL, this rank on cuda:0"), "rank 0 says how its ranks meet:\n{said}");
    assert!(!String::from_utf8_lossy(&outs[1].stdout).contains("run directory"), "rank 1 is silent");
    assert_same_run(&single, &multi);
}

/// torchrun's variables without a way for NCCL to bootstrap are refused, saying what to set.
#[test]
fn torchrun_style_ranks_without_a_rendezvous_are_refused() {
    let out =
        bin().args(["train", "--preset", "cpu"]).env("RANK", "0").env("WORLD_SIZE", "2").env_remove("NCCL_COMM_ID").env_remove("MASTER_ADDR").output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("NCCL_COMM_ID") && err.contains("MASTER_ADDR"), "{err}");
}

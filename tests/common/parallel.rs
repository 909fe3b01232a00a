//! What the multi-process tests share: running a command that must succeed, a tiny run's config
//! in a file, and the comparison of two runs bit for bit.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use super::{bin, tempdir, tiny};

pub fn run(mut c: Command) -> Output {
    let out = c.output().expect("the command starts");
    if !out.status.success() {
        panic!("{c:?} failed ({}):\n{}\n{}", out.status, String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    }
    out
}

/// A tiny run's config, written to `dir/c.toml`, with `edit` applied (the data cache beside
/// `dir`, shared by the runs compared).
pub fn config(dir: &Path, edit: impl FnOnce(&mut fnokern::config::Config)) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let mut c = tiny(&dir.parent().unwrap().join("cache"));
    edit(&mut c);
    let p = dir.join("c.toml");
    std::fs::write(&p, toml::to_string(&c).unwrap()).unwrap();
    p
}

/// Two finished runs are the same: every line of metrics.jsonl and every weight, bit for bit.
pub fn assert_same_run(a: &Path, b: &Path) {
    let ma = std::fs::read_to_string(a.join("metrics.jsonl")).unwrap();
    let mb = std::fs::read_to_string(b.join("metrics.jsonl")).unwrap();
    assert!(!ma.is_empty());
    for (i, (la, lb)) in ma.lines().zip(mb.lines()).enumerate() {
        assert_eq!(la, lb, "metrics.jsonl line {i} of {} and {}", a.display(), b.display());
    }
    assert_eq!(ma.lines().count(), mb.lines().count(), "metrics.jsonl lengths");
    let wa = fnokern::train::load_final_weights(a).unwrap();
    let wb = fnokern::train::load_final_weights(b).unwrap();
    assert_eq!(wa.keys().collect::<Vec<_>>(), wb.keys().collect::<Vec<_>>());
    for (k, ta) in &wa {
        let (va, vb) = (&ta.values, &wb[k].values);
        assert_eq!(va.len(), vb.len(), "weight {k}'s size");
        assert!(va.iter().zip(vb).all(|(x, y)| x.to_bits() == y.to_bits()), "weight {k} differs between {} and {}", a.display(), b.display());
    }
}

/// The GPU comparisons on the driver stand-in (`standin`: its directory): one GPU process with
/// accumulate 2 trained into `single`, and the config of the two ranks to compare with it
/// (`multi_cfg`, into `multi`), with the library path that gives them the stand-in.
pub struct GpuRuns {
    pub single: PathBuf,
    pub multi: PathBuf,
    pub multi_cfg: PathBuf,
    pub lib_path: String,
}

pub fn single_gpu_run(tag: &str, standin: &Path) -> GpuRuns {
    let d = tempdir(tag);
    let edit = |c: &mut fnokern::config::Config| c.train.device = "cuda".into();
    let single_cfg = config(&d.join("single"), |c| {
        edit(c);
        c.train.accumulate = 2;
    });
    let multi_cfg = config(&d.join("multi"), edit);
    let (single, multi) = (d.join("single/run"), d.join("multi/run"));
    let lib_path = format!("{}:{}", standin.display(), std::env::var("LD_LIBRARY_PATH").unwrap_or_default());
    let mut one = bin();
    one.args(["train", "--config", single_cfg.to_str().unwrap(), "--out", single.to_str().unwrap()])
        .env("LD_LIBRARY_PATH", &lib_path)
        .env("RAYON_NUM_THREADS", "1");
    run(one);
    GpuRuns { single, multi, multi_cfg, lib_path }
}

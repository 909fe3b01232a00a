//! What the multi-process tests share: running a command that must succeed, a tiny run's config
//! in a file, and the comparison of two runs bit for bit.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use super::tiny;

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

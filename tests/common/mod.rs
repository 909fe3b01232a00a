//! Helpers shared by the integration tests that train: a fresh temporary directory and the tiny
//! configuration every trainer test uses.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use fnokern::config::Config;

/// A fresh directory under the system's temp dir, unique to this process and moment.
pub fn tempdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!(
        "fnokern-{tag}-{}-{}",
        std::process::id(),
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0)
    ));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A generator and data small enough for a test: N 16, depth 2, width 4, 24 training and 8
/// validation patterns, batch 4, 4 epochs, no final evaluation; the data cache in `cache`.
pub fn tiny(cache: &Path) -> Config {
    let mut c = Config::default();
    c.model.depth = 2;
    c.model.width = 4;
    c.model.modes = 3;
    c.model.max_channels = 8;
    c.data.n = 16;
    c.data.object_size = 48;
    c.data.lines = 30;
    c.data.train_stride = 4;
    c.data.test_stride = 8;
    c.data.nphotons = 1e6;
    c.data.cache_dir = cache.to_path_buf();
    c.train.epochs = 4;
    c.train.batch_size = 4;
    c.train.train_patterns = 24;
    c.train.test_patterns = 8;
    c.train.evaluate = false;
    c
}

/// Every element-wise op of the backend, in the kernels' code order.
pub const UNARY: [fnokern::backend::Unary; 8] = {
    use fnokern::backend::Unary::*;
    [Gelu, Abs, Sqrt, Square, Log, WrapAngle, RoundF16, RoundBf16]
};

pub mod standin;

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

/// The `fnokern` binary (FNOKERN_BIN: the binary when the tests run from a bundle copied to
/// another host).
pub fn bin() -> std::process::Command {
    std::process::Command::new(std::env::var("FNOKERN_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_fnokern").to_string()))
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

pub mod parallel;
pub mod standin;

/// A seeded N(0, 1) f32 tensor on `dev` (the same values on every device for the same seed).
pub fn randn(dev: &fnokern::Device, shape: &[usize], seed: u64) -> fnokern::Tensor {
    fnokern::Tensor::randn(shape.to_vec(), 1.0, seed, fnokern::DType::F32, dev).unwrap()
}

/// |got - want| <= atol + rtol |want| everywhere (a NaN on either side is a mismatch), with the
/// first mismatches in the message. The tensors may live on different devices.
#[track_caller]
pub fn assert_close(what: &str, got: &fnokern::Tensor, want: &fnokern::Tensor, atol: f64, rtol: f64) {
    assert_eq!(got.dims(), want.dims(), "{what}: shape");
    let (got, want) = (got.to_f64_vec().unwrap(), want.to_f64_vec().unwrap());
    let bad: Vec<String> = got
        .iter()
        .zip(&want)
        .enumerate()
        .filter(|(_, (&g, &w))| {
            let err = (g - w).abs();
            err.is_nan() || err > atol + rtol * w.abs()
        })
        .map(|(i, (g, w))| format!("[{i}] got {g} want {w}"))
        .collect();
    assert!(bad.is_empty(), "{what}: {} of {} mismatch, first: {}", bad.len(), got.len(), bad[..bad.len().min(5)].join(", "));
}

/// The dtype the definition tests compute in on `dev`, and their tolerance against the f64
/// definitions: the CPU computes in f64 (to 1e-12), a GPU only in f32 (to 2e-5).
pub fn dtype_and_tol(dev: &fnokern::Device) -> (fnokern::DType, f64) {
    if dev.kind().is_gpu() {
        (fnokern::DType::F32, 2e-5)
    } else {
        (fnokern::DType::F64, 1e-12)
    }
}

/// One test body for every device: `test_device!(fn name(dev) { ... })` makes the module `name`
/// with the tests `name::cpu` and `name::cuda`, each calling the body with its `&Device`. The
/// CUDA one runs on a GPU where there is one, else on the driver stand-in
/// (`standin::cuda_device`); only a build without kernels skips it.
#[macro_export]
macro_rules! test_device {
    ($(#[$meta:meta])* fn $name:ident($dev:ident) $body:block) => {
        $(#[$meta])*
        mod $name {
            #[allow(unused_imports)]
            use super::*;

            fn body($dev: &fnokern::Device) $body

            #[test]
            fn cpu() {
                body(&fnokern::Device::cpu())
            }

            #[test]
            fn cuda() {
                if let Some(d) = $crate::common::standin::cuda_device(stringify!($name)) {
                    body(&d)
                }
            }
        }
    };
}

//! The crate's one error type. Library code returns `Result<T>`; it never panics on bad input.

use crate::tensor::{DType, Shape};

/// Everything that can go wrong in fnokern.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Two operands (or an operand and what the op needs) do not fit together.
    #[error("{op}: shape mismatch: {lhs} vs {rhs}{}", detail.as_deref().map(|d| format!(" ({d})")).unwrap_or_default())]
    ShapeMismatch { op: &'static str, lhs: Shape, rhs: Shape, detail: Option<String> },

    /// An operand has the wrong number of dimensions or an impossible shape.
    #[error("{op}: bad shape {shape}: {why}")]
    BadShape { op: &'static str, shape: Shape, why: String },

    #[error("{op}: dtype mismatch: {lhs:?} vs {rhs:?}")]
    DTypeMismatch { op: &'static str, lhs: DType, rhs: DType },

    #[error("{op}: dtype {dtype:?} is not supported here ({why})")]
    UnsupportedDType { op: &'static str, dtype: DType, why: &'static str },

    #[error("{op}: operands live on different devices ({lhs} vs {rhs})")]
    DeviceMismatch { op: &'static str, lhs: String, rhs: String },

    /// An allocation would take the device over its memory limit, as a real card would refuse it.
    #[error("out of memory on {device}: requested {requested} bytes for {what} with {in_use} bytes in use, limit {limit} bytes")]
    OutOfMemory { device: String, what: String, requested: u64, in_use: u64, limit: u64 },

    /// Another rank of a data-parallel run failed; its own message says why (and its failure
    /// ends the job).
    #[error("rank {rank} failed (its message says why)")]
    RankFailed { rank: usize },

    /// A value given by the caller (a hyper-parameter, a stride, a mode count) cannot work.
    #[error("{op}: invalid argument: {why}")]
    InvalidArgument { op: &'static str, why: String },

    /// The tape was used in a way that cannot produce gradients.
    #[error("autograd: {0}")]
    Autograd(String),

    /// The data of a meta tensor was asked for: meta tensors carry shapes only.
    #[error("{op}: tensor on the meta device has no data")]
    NoData { op: &'static str },

    /// The CUDA driver, the GPU or the embedded kernels: no GPU, no driver, a failed launch. A
    /// failed driver, cuBLAS or cuFFT call keeps that library's error as the source.
    #[error("cuda: {op}: {why}")]
    Cuda {
        op: String,
        why: String,
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },

    #[error("FFT failed in {op}: {why}")]
    Fft { op: &'static str, why: String },

    /// A config file or override that cannot be read as a config.
    #[error("{origin}: {why}")]
    Config { origin: String, why: String },

    /// A data file that is missing a field or holds the wrong thing.
    #[error("{path}: {why}")]
    BadFile { path: String, why: String },

    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// A CUDA error without a library error behind it (no GPU, no kernels, a refused shape).
    pub fn cuda(op: impl Into<String>, why: impl Into<String>) -> Error {
        Error::Cuda { op: op.into(), why: why.into(), source: None }
    }

    /// A failed call into the driver, cuBLAS or cuFFT, kept as the source.
    pub fn cuda_call<E: std::error::Error + Send + Sync + 'static>(op: impl Into<String>, e: E) -> Error {
        Error::Cuda { op: op.into(), why: e.to_string(), source: Some(Box::new(e)) }
    }

    pub(crate) fn invalid(op: &'static str, why: impl Into<String>) -> Self {
        Error::InvalidArgument { op, why: why.into() }
    }

    pub(crate) fn bad_shape(op: &'static str, shape: &Shape, why: impl Into<String>) -> Self {
        Error::BadShape { op, shape: shape.clone(), why: why.into() }
    }

    pub(crate) fn mismatch(op: &'static str, lhs: &Shape, rhs: &Shape) -> Self {
        Error::ShapeMismatch { op, lhs: lhs.clone(), rhs: rhs.clone(), detail: None }
    }

    pub(crate) fn mismatch_because(op: &'static str, lhs: &Shape, rhs: &Shape, detail: impl Into<String>) -> Self {
        Error::ShapeMismatch { op, lhs: lhs.clone(), rhs: rhs.clone(), detail: Some(detail.into()) }
    }
}

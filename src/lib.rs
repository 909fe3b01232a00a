//! fnokern: a training engine for deep Fourier Neural Operators.
//!
//! Layers, bottom up: [`tensor`] and [`device`] (storage and the memory ledger), [`backend`] (the
//! kernels of each device behind one small surface), [`autograd`] (the tape, parameters,
//! checkpointed segments), [`ops`] (differentiable ops, the only users of the tape), and
//! [`gradcheck`] (finite-difference checks of the ops).

pub mod autograd;
pub mod autopsy;
pub mod backend;
pub mod build_info;
pub mod config;
pub mod data;
pub mod device;
pub mod error;
pub mod eval;
pub mod experiments;
pub mod gradcheck;
pub mod io;
pub mod loss;
pub mod model;
pub mod ops;
pub mod optim;
pub mod parallel;
pub mod plan;
pub mod predict;
pub mod tensor;
pub mod train;

pub use autograd::{ActivationProbe, ActivationStat, Gradients, ParamId, ParamStore, Tape, Var};
pub use backend::{Conv2dParams, ModeConvention, NormKind, SpectralModes};
pub use device::{Device, DeviceKind, MemoryStats};
pub use error::{Error, Result};
pub use tensor::{DType, Precision, Shape, Tensor};

//! The typed launcher of every kernel and the parameter structs of kernels/params.cuh, generated
//! by build.rs (build/kernel_api.rs) from the kernels' own C source. A launcher takes the kernel's
//! parameters by name, in its order, with Rust types for its C types, so an argument of another
//! type, a missing one or an extra one does not compile; tests/launches.rs checks that every call
//! passes its arguments by the kernel's parameter names, in order. Each family's geometry struct
//! (`ConvGeom`, `SpectralGeom`, ...) gets its constructor and methods in the family's mod.rs.
//!
//! Launchers are `pub(crate)`: a kernel that nothing launches is a compiler warning (and an error
//! in CI).

use cudarc::driver::{LaunchConfig, PushKernelArg};

use super::gpu::{launched, Gpu, In, Out};
use crate::error::Result;

include!(concat!(env!("OUT_DIR"), "/kernels.rs"));

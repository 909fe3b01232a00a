//! The CUDA side: the embedded fatbin's hand-written kernels, driven through cudarc.
//!
//! cudarc loads libcuda at run time, so this compiles and links on machines without CUDA;
//! [`probe`] and [`Gpu::open`] check for the driver library, a device and the embedded kernels
//! first and return [`Error::Cuda`] saying which is missing, never a panic.
//!
//! Launchers (one per kernel family: [`spectral`], [`layerscale`], [`norm`], [`agc`], [`adam`],
//! [`elementwise`], [`reduce`]) validate every length against the shape they are given, then
//! launch on the context's stream; a driver error carries the kernel's name. Kernels and their
//! formulas, shapes and launch geometry are described at the top of each `kernels/*.cu`.
//!
//! Not here yet: GPU tensor storage behind [`crate::device::Device`] and the rest of the
//! [`crate::backend::Backend`] surface on CUDA (convolutions through cuBLAS GEMMs, FFTs through
//! cuFFT), so the trainer and `--device cuda` do not run on the GPU yet.

pub mod adam;
pub mod agc;
pub mod elementwise;
pub mod layerscale;
pub mod norm;
pub mod reduce;
pub mod spectral;

use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DeviceRepr, LaunchConfig, ValidAsZeroBits};

use crate::build_info;
use crate::error::{Error, Result};

/// Threads per block of every launch (a multiple of 32, as `block_sum` needs).
pub const BLOCK: u32 = 256;

fn cuda_err(op: &str) -> impl Fn(cudarc::driver::DriverError) -> Error + '_ {
    move |e| Error::Cuda { op: op.to_string(), why: e.to_string() }
}

/// What `fnokern info` prints about a GPU.
#[derive(Clone, Debug)]
pub struct GpuInfo {
    pub ordinal: usize,
    pub name: String,
    pub compute_capability: (i32, i32),
    /// The driver's CUDA version, e.g. 13000 for 13.0.
    pub driver_version: i32,
    pub total_bytes: usize,
    pub free_bytes: usize,
}

fn driver_present() -> Result<()> {
    // SAFETY: only tries to dlopen the driver library; no CUDA call is made.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err(Error::Cuda { op: "driver".into(), why: "libcuda is not installed on this machine (no NVIDIA driver)".into() });
    }
    Ok(())
}

fn context(ordinal: usize) -> Result<Arc<CudaContext>> {
    driver_present()?;
    let count = CudaContext::device_count().map_err(cuda_err("device count"))?;
    if ordinal >= count.max(0) as usize {
        return Err(Error::Cuda { op: "device".into(), why: format!("GPU {ordinal} requested but the driver sees {count}") });
    }
    CudaContext::new(ordinal).map_err(cuda_err("context"))
}

/// The GPU `ordinal`, its driver and its memory, or why there is none.
pub fn probe(ordinal: usize) -> Result<GpuInfo> {
    let ctx = context(ordinal)?;
    let mut driver_version = 0;
    // SAFETY: the driver is loaded (context() succeeded); the pointer is to a live i32.
    unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut driver_version) }
        .result()
        .map_err(cuda_err("driver version"))?;
    let (free_bytes, total_bytes) = ctx.mem_get_info().map_err(cuda_err("memory info"))?;
    Ok(GpuInfo {
        ordinal,
        name: ctx.name().map_err(cuda_err("device name"))?,
        compute_capability: ctx.compute_capability().map_err(cuda_err("compute capability"))?,
        driver_version,
        total_bytes,
        free_bytes,
    })
}

/// A GPU with the embedded kernels loaded, and its stream.
pub struct Gpu {
    pub ctx: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
    module: Arc<CudaModule>,
}

impl Gpu {
    /// Opens GPU `ordinal` and loads the embedded fatbin.
    pub fn open(ordinal: usize) -> Result<Gpu> {
        if !build_info::KERNELS_EMBEDDED {
            return Err(Error::Cuda {
                op: "kernels".into(),
                why: "this binary was built without nvcc, so no CUDA kernels are embedded (run scripts/install-nvcc.sh and rebuild)".into(),
            });
        }
        let ctx = context(ordinal)?;
        let module = ctx
            .load_module(cudarc::nvrtc::Ptx::from_binary(build_info::FATBIN.to_vec()))
            .map_err(cuda_err("loading the embedded fatbin (is the driver older than CUDA 13.0?)"))?;
        let stream = ctx.default_stream();
        Ok(Gpu { ctx, stream, module })
    }

    /// A kernel of the embedded fatbin by name.
    pub fn function(&self, name: &str) -> Result<CudaFunction> {
        self.module.load_function(name).map_err(cuda_err(name))
    }

    pub fn upload<T: DeviceRepr>(&self, host: &[T]) -> Result<CudaSlice<T>> {
        self.stream.clone_htod(host).map_err(cuda_err("copy to the GPU"))
    }

    pub fn download<T: DeviceRepr + Default + Clone>(&self, dev: &CudaSlice<T>) -> Result<Vec<T>> {
        self.stream.clone_dtoh(dev).map_err(cuda_err("copy from the GPU"))
    }

    pub fn zeros<T: DeviceRepr + ValidAsZeroBits>(&self, len: usize) -> Result<CudaSlice<T>> {
        self.stream.alloc_zeros(len).map_err(cuda_err("allocation"))
    }

    pub fn clear<T: DeviceRepr + ValidAsZeroBits>(&self, dev: &mut CudaSlice<T>) -> Result<()> {
        self.stream.memset_zeros(dev).map_err(cuda_err("memset"))
    }

    /// Waits for every launch so far.
    pub fn sync(&self) -> Result<()> {
        self.stream.synchronize().map_err(cuda_err("synchronize"))
    }
}

/// Grid-stride launch over `n` elements (at most 65535 * 8 blocks; the kernels loop).
pub(crate) fn elementwise_config(n: usize) -> LaunchConfig {
    let blocks = n.div_ceil(BLOCK as usize).clamp(1, 65_535 * 8) as u32;
    LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 }
}

/// One block per item (a group, a plane, a unit).
pub(crate) fn per_block_config(blocks: usize) -> Result<LaunchConfig> {
    if blocks > i32::MAX as usize {
        return Err(Error::invalid("cuda launch", format!("{blocks} blocks exceed the grid limit")));
    }
    Ok(LaunchConfig { grid_dim: (blocks.max(1) as u32, 1, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 })
}

/// A dimension as the kernels' `int`.
pub(crate) fn int(op: &'static str, v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| Error::invalid(op, format!("size {v} does not fit a 32-bit kernel index")))
}

/// Checks that a buffer holds exactly `want` elements.
pub(crate) fn check_len<T>(op: &'static str, what: &str, buf: &CudaSlice<T>, want: usize) -> Result<()> {
    if buf.len() != want {
        return Err(Error::invalid(op, format!("{what} holds {} elements, the shape needs {want}", buf.len())));
    }
    Ok(())
}

/// Maps a launch's driver error to one that names the kernel.
pub(crate) fn launched(name: &'static str, r: std::result::Result<Option<(cudarc::driver::CudaEvent, cudarc::driver::CudaEvent)>, cudarc::driver::DriverError>) -> Result<()> {
    r.map(drop).map_err(cuda_err(name))
}

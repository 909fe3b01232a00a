//! The GPU: the embedded fatbin's kernels, driven through cudarc on one stream.
//!
//! cudarc loads libcuda at run time, so this compiles and links on machines without CUDA;
//! [`probe`] and [`Gpu::open`] check for the driver library, a device and the embedded kernels
//! first and return [`Error::Cuda`] saying which is missing, never a panic. A
//! [`crate::device::Device::cuda`] tensor holds an f32 buffer from the driver's stream-ordered
//! memory pool (kept as a cache; see [`Gpu::shared`]).
//!
//! The launchers of each op family (`src/backend/<family>/cuda.rs`) check every length against
//! the op's geometry, then call the typed launcher of `super::kernels`, generated from the
//! kernel's signature; a driver error names the kernel and keeps the driver's error as its source.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::cublas::CudaBlas;
use cudarc::driver::{
    sys, CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, CudaView, CudaViewMut, DeviceRepr, LaunchArgs, LaunchConfig, PushKernelArg,
    ValidAsZeroBits,
};

use crate::build_info;
use crate::error::{Error, Result};

/// Threads per block of every launch (a multiple of 32, as `block_sum` needs).
pub const BLOCK: u32 = 256;

pub(crate) fn cuda_err(op: &str) -> impl Fn(cudarc::driver::DriverError) -> Error + '_ {
    move |e| Error::cuda_call(op, e)
}

/// Whether a CUDA library can be loaded; `present` is its cudarc `is_culib_present`.
fn library_present(name: &str, present: unsafe fn() -> bool) -> Result<()> {
    // SAFETY: only tries to dlopen the library; nothing in it is called.
    if unsafe { present() } {
        Ok(())
    } else {
        Err(Error::cuda(
            name,
            format!("the {name} library cannot be loaded (add CUDA's lib64, or the nvidia/*/lib folders of a PyTorch install, to LD_LIBRARY_PATH)"),
        ))
    }
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
        return Err(Error::cuda("driver", "libcuda is not installed on this machine (no NVIDIA driver)"));
    }
    Ok(())
}

/// How many GPUs the driver sees.
pub fn device_count() -> Result<usize> {
    driver_present()?;
    Ok(CudaContext::device_count().map_err(cuda_err("device count"))?.max(0) as usize)
}

fn context(ordinal: usize) -> Result<Arc<CudaContext>> {
    driver_present()?;
    let count = CudaContext::device_count().map_err(cuda_err("device count"))?;
    if ordinal >= count.max(0) as usize {
        return Err(Error::cuda("device", format!("GPU {ordinal} requested but the driver sees {count}")));
    }
    CudaContext::new(ordinal).map_err(cuda_err("context"))
}

/// The GPU `ordinal`, its driver and its memory, or why there is none.
pub fn probe(ordinal: usize) -> Result<GpuInfo> {
    let ctx = context(ordinal)?;
    let mut driver_version = 0;
    // SAFETY: the driver is loaded (context() succeeded); the pointer is to a live i32.
    unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut driver_version) }.result().map_err(cuda_err("driver version"))?;
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

/// The driver's memory pool of a device (a driver handle, valid for the process).
struct Pool(sys::CUmemoryPool);
// SAFETY: a CUmemoryPool handle may be used from any thread; the driver synchronises it.
unsafe impl Send for Pool {}
unsafe impl Sync for Pool {}

/// A GPU with the embedded kernels loaded, and its stream. Everything runs on that one stream, in
/// order, so buffers need no cross-stream events.
pub struct Gpu {
    pub ctx: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
    module: Arc<CudaModule>,
    functions: Mutex<HashMap<String, CudaFunction>>,
    /// cuBLAS on the stream; one call at a time (a handle is not to be shared between threads
    /// that call concurrently, and tests and sweeps drive one GPU from several threads).
    blas: OnceLock<Mutex<CudaBlas>>,
    pub(crate) ffts: Mutex<HashMap<crate::backend::fft::cuda::PlanKey, crate::backend::fft::cuda::FftPlan>>,
    pool: Option<Pool>,
    /// cuBLAS GEMMs in TF32 tensor-op math (`train.tf32`), for every later GEMM on this GPU.
    tf32: std::sync::atomic::AtomicBool,
    /// Convolutions as im2col + cuBLAS instead of the implicit-GEMM kernels (`train.gpu_conv`).
    conv_columns: std::sync::atomic::AtomicBool,
}

impl Gpu {
    /// The process's one opened GPU `ordinal` (opened on first use): kernels loaded, cuBLAS and
    /// cuFFT found, event tracking off (one stream), and the memory pool kept as a cache (its
    /// release threshold raised to the maximum, so freed blocks serve the next allocations
    /// instead of returning to the driver at each synchronisation).
    pub fn shared(ordinal: usize) -> Result<Arc<Gpu>> {
        static OPENED: OnceLock<Mutex<HashMap<usize, Arc<Gpu>>>> = OnceLock::new();
        let mut opened = OPENED.get_or_init(Mutex::default).lock().map_err(|_| Error::invalid("cuda", "a thread panicked while opening a GPU"))?;
        if let Some(g) = opened.get(&ordinal) {
            return Ok(g.clone());
        }
        let mut gpu = Gpu::open(ordinal)?;
        library_present("cuBLAS", cudarc::cublas::sys::is_culib_present)?;
        library_present("cuFFT", cudarc::cufft::sys::is_culib_present)?;
        // SAFETY: every buffer of this GPU lives on its one stream, so no cross-stream event is
        // ever needed.
        unsafe { gpu.ctx.disable_event_tracking() };
        gpu.pool = gpu.caching_pool()?;
        let gpu = Arc::new(gpu);
        opened.insert(ordinal, gpu.clone());
        Ok(gpu)
    }

    /// The device's default memory pool with its release threshold at the maximum, or `None` when
    /// the device has no stream-ordered allocator (cudarc then allocates synchronously).
    fn caching_pool(&self) -> Result<Option<Pool>> {
        if !self.ctx.has_async_alloc() {
            return Ok(None);
        }
        let mut pool = std::ptr::null_mut();
        // SAFETY: the context is bound; the out-pointers point at live locals.
        unsafe {
            sys::cuDeviceGetDefaultMemPool(&mut pool, self.ctx.cu_device()).result().map_err(cuda_err("memory pool"))?;
            let mut threshold = u64::MAX;
            sys::cuMemPoolSetAttribute(pool, sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD, &mut threshold as *mut u64 as *mut _)
                .result()
                .map_err(cuda_err("memory pool release threshold"))?;
        }
        Ok(Some(Pool(pool)))
    }

    /// Bytes the memory pool has had in use at most since the last reset (0 without a pool).
    pub fn pool_peak(&self) -> Result<u64> {
        let Some(pool) = &self.pool else { return Ok(0) };
        let mut v = 0u64;
        // SAFETY: a live pool handle and a live u64.
        unsafe {
            sys::cuMemPoolGetAttribute(pool.0, sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH, &mut v as *mut u64 as *mut _)
                .result()
                .map_err(cuda_err("memory pool peak"))?;
        }
        Ok(v)
    }

    /// Starts the pool's high-water mark again from what is in use now.
    pub fn reset_pool_peak(&self) -> Result<()> {
        let Some(pool) = &self.pool else { return Ok(()) };
        let mut zero = 0u64;
        // SAFETY: a live pool handle; USED_MEM_HIGH may only be set to 0, which resets it.
        unsafe {
            sys::cuMemPoolSetAttribute(pool.0, sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH, &mut zero as *mut u64 as *mut _)
                .result()
                .map_err(cuda_err("memory pool peak reset"))
        }
    }

    /// Whether cuBLAS GEMMs on this GPU may round their operands to TF32 and use tensor cores
    /// (`train.tf32`): about 8x the FP32 rate on an H100, operands with 10 mantissa bits instead
    /// of 23. The setting is the process's for this GPU (every run in it that uses the GPU).
    pub fn set_tf32(&self, on: bool) {
        self.tf32.store(on, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn tf32(&self) -> bool {
        self.tf32.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Whether FP32 convolutions on this GPU run as im2col + cuBLAS (`train.gpu_conv =
    /// "columns"`) instead of the implicit-GEMM kernels. The process's setting for this GPU.
    pub fn set_conv_columns(&self, on: bool) {
        self.conv_columns.store(on, std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether convolutions run as im2col + cuBLAS: when asked for, and always in TF32 (cuBLAS's
    /// tensor-op GEMMs are the TF32 path; the implicit-GEMM kernels compute in FP32).
    pub fn conv_columns(&self) -> bool {
        self.tf32() || self.conv_columns.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// cuBLAS on this GPU's stream (created on first use), locked for the caller's calls, in
    /// the math mode [`Gpu::set_tf32`] chose.
    pub(crate) fn blas(&self) -> Result<std::sync::MutexGuard<'_, CudaBlas>> {
        let blas = self.blas_handle()?;
        use cudarc::cublas::sys::cublasMath_t as M;
        let mode = if self.tf32() { M::CUBLAS_TF32_TENSOR_OP_MATH } else { M::CUBLAS_DEFAULT_MATH };
        // SAFETY: a live handle, held locked by this thread.
        unsafe { cudarc::cublas::sys::cublasSetMathMode(*blas.handle(), mode) }.result().map_err(|e| Error::cuda_call("cuBLAS math mode", e))?;
        Ok(blas)
    }

    fn blas_handle(&self) -> Result<std::sync::MutexGuard<'_, CudaBlas>> {
        fn lock(m: &Mutex<CudaBlas>) -> Result<std::sync::MutexGuard<'_, CudaBlas>> {
            m.lock().map_err(|_| Error::invalid("cuBLAS", "a thread panicked during a GEMM"))
        }
        if let Some(b) = self.blas.get() {
            return lock(b);
        }
        library_present("cuBLAS", cudarc::cublas::sys::is_culib_present)?;
        self.ctx.bind_to_thread().map_err(cuda_err("cuBLAS handle"))?;
        let b = CudaBlas::new(self.stream.clone()).map_err(|e| Error::cuda_call("cuBLAS handle", e))?;
        lock(self.blas.get_or_init(|| Mutex::new(b)))
    }

    /// Opens GPU `ordinal` and loads the embedded fatbin (a handle of its own; the trainer's
    /// devices share [`Gpu::shared`]).
    pub fn open(ordinal: usize) -> Result<Gpu> {
        if !build_info::KERNELS_EMBEDDED {
            return Err(Error::cuda(
                "kernels",
                "this binary was built without nvcc, so no CUDA kernels are embedded (run scripts/install-nvcc.sh and rebuild)",
            ));
        }
        let ctx = context(ordinal)?;
        let module = ctx
            .load_module(cudarc::nvrtc::Ptx::from_binary(build_info::FATBIN.to_vec()))
            .map_err(cuda_err("loading the embedded fatbin (is the driver older than CUDA 13.0?)"))?;
        let stream = ctx.default_stream();
        Ok(Gpu {
            ctx,
            stream,
            module,
            functions: Mutex::default(),
            blas: OnceLock::new(),
            ffts: Mutex::default(),
            pool: None,
            tf32: std::sync::atomic::AtomicBool::new(false),
            conv_columns: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// A kernel of the embedded fatbin by name (looked up once, then cached).
    pub fn function(&self, name: &str) -> Result<CudaFunction> {
        let mut cache = self.functions.lock().map_err(|_| Error::invalid("cuda", "a thread panicked while loading a kernel"))?;
        if let Some(f) = cache.get(name) {
            return Ok(f.clone());
        }
        let f = self.module.load_function(name).map_err(cuda_err(name))?;
        cache.insert(name.to_string(), f.clone());
        Ok(f)
    }

    /// An allocation failure as the trainer's out-of-memory error (so a run ends as an `oom`
    /// crash), any other driver error as itself.
    pub(crate) fn alloc_err(&self, bytes: usize) -> impl Fn(cudarc::driver::DriverError) -> Error + '_ {
        move |e| {
            if e.0 == sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY {
                let (free, total) = self.ctx.mem_get_info().unwrap_or((0, 0));
                Error::OutOfMemory {
                    device: format!("cuda:{}", self.ctx.ordinal()),
                    what: "a GPU buffer".into(),
                    requested: bytes as u64,
                    in_use: total.saturating_sub(free) as u64,
                    limit: total as u64,
                }
            } else {
                cuda_err("allocation")(e)
            }
        }
    }

    pub fn upload<T: DeviceRepr>(&self, host: &[T]) -> Result<CudaSlice<T>> {
        self.stream.clone_htod(host).map_err(self.alloc_err(std::mem::size_of_val(host)))
    }

    /// dst = src (same lengths).
    pub fn copy_into(&self, src: &CudaSlice<f32>, dst: &mut CudaSlice<f32>) -> Result<()> {
        check_len("copy", "dst", dst, src.len())?;
        self.stream.memcpy_dtod(src, dst).map_err(cuda_err("copy on the GPU"))
    }

    /// The buffer's elements on the host. The stream is synchronised after the copy: a copy to
    /// pageable memory is not guaranteed to have finished when the call returns.
    pub fn download<T: DeviceRepr + Default + Clone>(&self, dev: &CudaSlice<T>) -> Result<Vec<T>> {
        let v = self.stream.clone_dtoh(dev).map_err(cuda_err("copy from the GPU"))?;
        self.sync()?;
        Ok(v)
    }

    /// A zero-filled buffer of `len` elements; running out of GPU memory is `Error::OutOfMemory`.
    pub fn zeros<T: DeviceRepr + ValidAsZeroBits>(&self, len: usize) -> Result<CudaSlice<T>> {
        self.stream.alloc_zeros(len).map_err(self.alloc_err(len * std::mem::size_of::<T>()))
    }

    /// A buffer of `len` elements whose contents are undefined until written (no memset).
    pub fn uninit<T: DeviceRepr + ValidAsZeroBits>(&self, len: usize) -> Result<CudaSlice<T>> {
        // SAFETY: the element types here are plain numbers (every bit pattern valid, as
        // ValidAsZeroBits says of zero); callers write every element before reading it.
        unsafe { self.stream.alloc::<T>(len) }.map_err(self.alloc_err(len * std::mem::size_of::<T>()))
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

pub(crate) use super::int;

/// Checks that a buffer holds exactly `want` elements.
pub(crate) fn check_len<T>(op: &'static str, what: &str, buf: &CudaSlice<T>, want: usize) -> Result<()> {
    if buf.len() != want {
        return Err(Error::invalid(op, format!("{what} holds {} elements, the shape needs {want}", buf.len())));
    }
    Ok(())
}

/// A device buffer a kernel reads (`const T*`): a buffer, a view of one, or `None` (a null
/// pointer, for the kernels' optional inputs).
pub(crate) trait In<T> {
    fn push_in<'b>(&'b self, l: &mut LaunchArgs<'b>);
}

/// A device buffer a kernel writes (`T*`), or `None` (null).
pub(crate) trait Out<T> {
    fn push_out<'b>(&'b mut self, l: &mut LaunchArgs<'b>);
}

static NULL: u64 = 0;

impl<T: DeviceRepr> In<T> for CudaSlice<T> {
    fn push_in<'b>(&'b self, l: &mut LaunchArgs<'b>) {
        l.arg(self);
    }
}
impl<T: DeviceRepr> In<T> for CudaView<'_, T> {
    fn push_in<'b>(&'b self, l: &mut LaunchArgs<'b>) {
        l.arg(self);
    }
}
impl<T: DeviceRepr, S: In<T>> In<T> for Option<&S> {
    fn push_in<'b>(&'b self, l: &mut LaunchArgs<'b>) {
        match self {
            Some(s) => s.push_in(l),
            None => {
                l.arg(&NULL);
            }
        }
    }
}
impl<T: DeviceRepr> Out<T> for CudaSlice<T> {
    fn push_out<'b>(&'b mut self, l: &mut LaunchArgs<'b>) {
        l.arg(self);
    }
}
impl<T: DeviceRepr> Out<T> for CudaViewMut<'_, T> {
    fn push_out<'b>(&'b mut self, l: &mut LaunchArgs<'b>) {
        l.arg(self);
    }
}
impl<T: DeviceRepr, S: Out<T>> Out<T> for Option<&mut S> {
    fn push_out<'b>(&'b mut self, l: &mut LaunchArgs<'b>) {
        match self {
            Some(s) => s.push_out(l),
            None => {
                l.arg(&NULL);
            }
        }
    }
}

/// Maps a launch's driver error to one that names the kernel.
pub(crate) fn launched(
    name: &'static str,
    r: std::result::Result<Option<(cudarc::driver::CudaEvent, cudarc::driver::CudaEvent)>, cudarc::driver::DriverError>,
) -> Result<()> {
    r.map(drop).map_err(cuda_err(name))
}

/// The first check of a GPU (`fnokern info`): an allocation, a copy each way, one kernel, one
/// cuBLAS GEMM (a convolution) and one cuFFT transform, each compared with the CPU's result.
pub fn self_test(gpu: &crate::device::Device) -> Result<()> {
    use crate::backend::{self as b, Conv2dParams};
    use crate::tensor::{DType, Tensor};
    let cpu = crate::device::Device::cpu();
    let x = Tensor::randn([2, 3, 9, 6], 1.0, 1, DType::F32, &cpu)?;
    let w = Tensor::randn([4, 3, 3, 3], 1.0, 2, DType::F32, &cpu)?;
    let (xg, wg) = (x.to_device(gpu)?, w.to_device(gpu)?);
    let p = Conv2dParams::new(1, 1);
    let checks = [
        ("a copy there and back", xg.clone(), x.clone()),
        ("a kernel (affine_f32)", b::affine(&xg, 2.0, 1.0)?, b::affine(&x, 2.0, 1.0)?),
        ("cuBLAS (a 3x3 convolution)", b::conv2d(&xg, &wg, None, p)?, b::conv2d(&x, &w, None, p)?),
        ("cuFFT (rfft2)", b::rfft2(&xg)?, b::rfft2(&x)?),
    ];
    for (what, got, want) in checks {
        let (got, want) = (got.to_f64_vec()?, want.to_f64_vec()?);
        let worst = got.iter().zip(&want).map(|(g, w)| (g - w).abs() / (1.0 + w.abs())).fold(0.0, f64::max);
        if worst.is_nan() || worst > 1e-4 {
            return Err(Error::cuda(what, format!("differs from the CPU by {worst:.2e} (relative)")));
        }
    }
    Ok(())
}

//! NCCL on the GPUs of a data-parallel run (cudarc's `nccl` module, loaded at run time): one
//! communicator per rank, on its GPU's stream, for the gradients. The ranks' small exchanges
//! (losses, stop requests, statuses) and the communicator's id go through the host world (MPI).

use std::path::{Path, PathBuf};

use cudarc::nccl::{Comm, Id};

use crate::device::Device;
use crate::error::{Error, Result};
use crate::tensor::{DType, Shape, Tensor};

/// This rank's NCCL communicator.
pub(crate) struct DeviceComm {
    comm: Comm,
    device: Device,
}

// SAFETY: the communicator is made, used and dropped by the thread that trains (the run's world
// is handed to the run, whose thread alone makes its collective calls); NCCL allows a
// communicator to be used from another thread than the one that made it, one call at a time.
unsafe impl Send for DeviceComm {}
unsafe impl Sync for DeviceComm {}

/// How to make NCCL loadable, for the errors that need it.
const INSTALL: &str = "install it (`pip install nvidia-nccl-cu13`) and put its lib/ directory on LD_LIBRARY_PATH \
     (python3 -c 'import nvidia.nccl, os; print(os.path.dirname(nvidia.nccl.__file__) + \"/lib\")')";

/// The environment variable that says fnokern already made NCCL findable for this process.
const REEXEC_MARK: &str = "FNOKERN_NCCL_LINKED";

/// NCCL installs itself as `libnccl.so.2`; cudarc 0.19.10 asks the loader for `libnccl.so` (and
/// `.so.13`, `.so.12`, ..., not `.so.2`). When only `libnccl.so.2` loads, this makes a directory
/// holding `libnccl.so` -> that file and runs this same program again with the directory first on
/// LD_LIBRARY_PATH (the loader reads the variable once, at start). Call at the start of `main`,
/// before any thread or MPI starts, when several ranks may need NCCL; does nothing otherwise.
pub fn make_findable() -> Result<()> {
    if std::env::var_os(REEXEC_MARK).is_some() || loads("libnccl.so") {
        return Ok(());
    }
    let Some(real) = path_of_nccl_2() else { return Ok(()) };
    // One directory per user and NCCL file, so that jobs using different NCCLs do not meet.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in real.as_os_str().as_encoded_bytes() {
        h = (h ^ *b as u64).wrapping_mul(0x0100_0000_01b3);
    }
    // SAFETY: getuid has no preconditions.
    let dir = std::env::temp_dir().join(format!("fnokern-nccl-{}-{h:016x}", unsafe { libc::getuid() }));
    std::fs::create_dir_all(&dir).map_err(|source| Error::Io { path: dir.display().to_string(), source })?;
    let link = dir.join("libnccl.so");
    let tmp = dir.join(format!(".libnccl.so.{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(&real, &tmp).map_err(|source| Error::Io { path: tmp.display().to_string(), source })?;
    std::fs::rename(&tmp, &link).map_err(|source| Error::Io { path: link.display().to_string(), source })?;
    let old = std::env::var("LD_LIBRARY_PATH").unwrap_or_default();
    let path = if old.is_empty() { dir.display().to_string() } else { format!("{}:{old}", dir.display()) };
    let exe = std::env::current_exe().map_err(|source| Error::Io { path: "the running fnokern binary".into(), source })?;
    use std::os::unix::process::CommandExt;
    let err = std::process::Command::new(exe).args(std::env::args_os().skip(1)).env("LD_LIBRARY_PATH", path).env(REEXEC_MARK, &real).exec();
    Err(Error::Io { path: "re-running fnokern with NCCL on LD_LIBRARY_PATH".into(), source: err })
}

fn loads(name: &str) -> bool {
    // SAFETY: loading NCCL runs its initialisers only, which have no preconditions.
    unsafe { libloading::Library::new(name) }.is_ok()
}

/// Where the loader finds `libnccl.so.2`, if it does.
fn path_of_nccl_2() -> Option<PathBuf> {
    // SAFETY: as in `loads`; the symbol is only looked up, to ask the loader which file holds it.
    unsafe {
        let lib = libloading::os::unix::Library::new("libnccl.so.2").ok()?;
        let sym: libloading::os::unix::Symbol<*const libc::c_void> = lib.get(b"ncclGetVersion\0").ok()?;
        let mut info: libc::Dl_info = std::mem::zeroed();
        if libc::dladdr(*sym, &mut info) == 0 || info.dli_fname.is_null() {
            return None;
        }
        let p = Path::new(std::ffi::CStr::from_ptr(info.dli_fname).to_str().ok()?);
        std::fs::canonicalize(p).ok()
    }
}

impl DeviceComm {
    /// The GPU the communicator is on.
    pub(crate) fn device(&self) -> &Device {
        &self.device
    }

    /// Every rank's bytes, through the GPU: the lengths first, then the bytes padded to the
    /// longest.
    fn all_gather_bytes(&self, mine: &[u8], size: usize) -> Result<Vec<Vec<u8>>> {
        let lens = self.gather_u8(&(mine.len() as u64).to_le_bytes(), size)?;
        let lens: Vec<usize> = lens.chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")) as usize).collect();
        let longest = lens.iter().copied().max().unwrap_or(0).max(1);
        let mut padded = mine.to_vec();
        padded.resize(longest, 0);
        let all = self.gather_u8(&padded, size)?;
        Ok(lens.iter().enumerate().map(|(r, &n)| all[r * longest..r * longest + n].to_vec()).collect())
    }

    /// NCCL's all-gather of `mine` (the same length on every rank) through device buffers.
    fn gather_u8(&self, mine: &[u8], size: usize) -> Result<Vec<u8>> {
        let gpu = self.device.gpu()?;
        let send = gpu.upload(mine)?;
        let mut recv = gpu.zeros::<u8>(mine.len() * size)?;
        self.comm.all_gather(&send, &mut recv).map_err(|e| nccl_err("ncclAllGather", e))?;
        gpu.download(&recv)
    }

    /// The communicator of rank `rank` of `size` on `device`'s GPU, `id` from rank 0
    /// ([`new_id`]).
    pub(crate) fn join(device: &Device, rank: usize, size: usize, id: &[u8]) -> Result<DeviceComm> {
        let gpu = device.gpu()?;
        let id: [std::ffi::c_char; 128] = id
            .iter()
            .map(|&b| b as std::ffi::c_char)
            .collect::<Vec<_>>()
            .try_into()
            .map_err(|_| Error::invalid("nccl", format!("an NCCL id is 128 bytes, not {}", id.len())))?;
        let comm = Comm::from_rank(gpu.stream.clone(), rank, size, Id::uninit(id)).map_err(|e| nccl_err("ncclCommInitRank", e))?;
        Ok(DeviceComm { comm, device: device.clone() })
    }

    /// Every rank's gradients (`mine`: this rank's, or None for zeros), shaped as `shapes`, in
    /// rank order, made on `device` (the run's: its ledger counts them); `present[r][i]` says
    /// whether rank r's slot i holds a gradient.
    pub(crate) fn all_gather_grads(
        &self,
        mine: Option<&[Option<Tensor>]>,
        shapes: &[Shape],
        present: &[Vec<bool>],
        device: &Device,
    ) -> Result<Vec<Vec<Option<Tensor>>>> {
        let gpu = device.gpu()?;
        let total: usize = shapes.iter().map(Shape::numel).sum();
        let size = present.len();
        // One flat buffer per rank (the ledger counts it, and the budget applies).
        let mut flat = Tensor::zeros([total.max(1)], DType::F32, device)?;
        if let Some(grads) = mine {
            let dst = flat.cuda_mut()?;
            let mut off = 0;
            for (g, shape) in grads.iter().zip(shapes) {
                let n = shape.numel();
                if let Some(g) = g {
                    gpu.stream.memcpy_dtod(g.cuda()?, &mut dst.slice_mut(off..off + n)).map_err(crate::backend::gpu::cuda_err("packing the gradients"))?;
                }
                off += n;
            }
        }
        let mut all = Tensor::zeros([total.max(1) * size], DType::F32, device)?;
        self.comm.all_gather(flat.cuda()?, all.cuda_mut()?).map_err(|e| nccl_err("ncclAllGather", e))?;
        let src = all.cuda()?;
        let mut out = Vec::with_capacity(size);
        for (r, present) in present.iter().enumerate() {
            let mut off = r * total.max(1);
            let mut grads = Vec::with_capacity(shapes.len());
            for (shape, &here) in shapes.iter().zip(present) {
                let n = shape.numel();
                grads.push(if here {
                    let mut t = Tensor::zeros(shape.clone(), DType::F32, device)?;
                    gpu.stream.memcpy_dtod(&src.slice(off..off + n), t.cuda_mut()?).map_err(crate::backend::gpu::cuda_err("unpacking the gradients"))?;
                    Some(t)
                } else {
                    None
                });
                off += n;
            }
            out.push(grads);
        }
        Ok(out)
    }
}

/// The host collectives of ranks that have no MPI (torchrun): NCCL's all-gather through staging
/// buffers on the GPU.
pub(crate) struct NcclHost {
    comm: std::sync::Arc<DeviceComm>,
    rank: usize,
    size: usize,
}

impl NcclHost {
    pub(crate) fn new(comm: std::sync::Arc<DeviceComm>, rank: usize, size: usize) -> NcclHost {
        NcclHost { comm, rank, size }
    }
}

impl super::Collective for NcclHost {
    fn rank(&self) -> usize {
        self.rank
    }
    fn size(&self) -> usize {
        self.size
    }
    fn all_gather(&self, mine: &[u8]) -> Result<Vec<Vec<u8>>> {
        self.comm.all_gather_bytes(mine, self.size)
    }
    fn barrier(&self) -> Result<()> {
        self.comm.all_gather_bytes(&[1], self.size).map(|_| ())
    }
    fn abort(&self, code: i32) -> ! {
        // The launcher (torchrun's agent) ends the other ranks when one fails.
        std::process::exit(code)
    }
    fn describe(&self) -> String {
        let mut v = 0;
        // SAFETY: ncclGetVersion writes one int.
        let version = if unsafe { cudarc::nccl::sys::ncclGetVersion(&mut v) } == cudarc::nccl::sys::ncclResult_t::ncclSuccess {
            format!("{}.{}.{}", v / 10000, (v / 100) % 100, v % 100)
        } else {
            "?".into()
        };
        format!("NCCL {version} (torchrun's variables, NCCL_COMM_ID)")
    }
}

/// A fresh NCCL id (rank 0 makes it; the others get it through the host world). A clear error,
/// not cudarc's panic, when NCCL cannot be loaded.
pub(crate) fn new_id() -> Result<Vec<u8>> {
    check_loadable()?;
    let id = Id::new().map_err(|e| nccl_err("ncclGetUniqueId", e))?;
    Ok(id.internal().iter().map(|&c| c as u8).collect())
}

/// Whether NCCL loads here, and as what, for `fnokern info`.
pub fn availability() -> String {
    // SAFETY: tries to load the library by cudarc's names; no call into it.
    if unsafe { cudarc::nccl::sys::is_culib_present() } {
        "loads (GPU ranks exchange gradients through it)".into()
    } else if let Some(p) = path_of_nccl_2() {
        format!("{} (a multi-rank `train` links it as libnccl.so for cudarc)", p.display())
    } else {
        format!("not found: {INSTALL}")
    }
}

/// NCCL loads (cudarc panics on its first call when it does not).
pub(crate) fn check_loadable() -> Result<()> {
    // SAFETY: tries to load the library by cudarc's names; no call into it.
    if unsafe { cudarc::nccl::sys::is_culib_present() } {
        return Ok(());
    }
    Err(Error::invalid("nccl", format!("data parallel on GPUs needs NCCL, which does not load here (no libnccl.so on the loader's path): {INSTALL}")))
}

fn nccl_err(call: &str, e: cudarc::nccl::result::NcclError) -> Error {
    // SAFETY: ncclGetErrorString returns a static string for any result code.
    let text = unsafe {
        let p = cudarc::nccl::sys::ncclGetErrorString(e.0);
        if p.is_null() {
            String::new()
        } else {
            std::ffi::CStr::from_ptr(p).to_string_lossy().into_owned()
        }
    };
    Error::Cuda { op: format!("NCCL {call}"), why: format!("{:?}: {text}", e.0), source: None }
}

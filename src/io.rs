//! Files: atomic writes (a temporary file, fsync, rename, fsync of the directory) and tensors in
//! safetensors files. A GPU tensor is copied to the host to be written. Model-specific names and
//! layouts are in `model::weights`; checkpoints are in `train`.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::Write;
use std::path::Path;

use safetensors::tensor::{Dtype, SafeTensors, TensorView};

use crate::device::Device;
use crate::error::{Error, Result};
use crate::tensor::{DType, Shape, Tensor};

/// An I/O error about `path`.
pub fn io_err(path: &Path) -> impl Fn(std::io::Error) -> Error + '_ {
    move |source| Error::Io { path: path.display().to_string(), source }
}

/// A file that is not what it should be.
pub fn bad(path: &Path, why: impl Into<String>) -> Error {
    Error::BadFile { path: path.display().to_string(), why: why.into() }
}

/// A tensor to write: its values and whether the trailing 2 is a complex pair.
pub struct Named<'a> {
    pub name: String,
    pub tensor: &'a Tensor,
    pub complex: bool,
}

/// The temporary file an atomic write of `path` goes through: `.<name>.tmp<pid>` beside it, with
/// `path`'s extension kept (a PNG encoder picks its format from it).
pub fn temp_path(path: &Path) -> Result<std::path::PathBuf> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path.file_name().ok_or_else(|| bad(path, "not a file path"))?.to_string_lossy();
    let ext = path.extension().map(|e| format!(".{}", e.to_string_lossy())).unwrap_or_default();
    Ok(dir.join(format!(".{name}.tmp{}{ext}", std::process::id())))
}

/// Whether `name` is a temporary file of [`temp_path`] (what a killed process leaves behind).
pub fn is_temp_name(name: &str) -> bool {
    name.starts_with('.')
        && name
            .rsplit_once(".tmp")
            .is_some_and(|(_, rest)| rest.split('.').next().is_some_and(|pid| !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit())))
}

/// Removes what killed writers left in `dir` (call it holding the directory's lock); returns how
/// many files went.
pub fn remove_stale_temps(dir: &Path) -> usize {
    let Ok(entries) = fs::read_dir(dir) else { return 0 };
    entries.flatten().filter(|e| e.file_name().to_str().is_some_and(is_temp_name) && fs::remove_file(e.path()).is_ok()).count()
}

/// Test hook: with `FNOKERN_ABORT_IN_WRITE=K`, the K-th atomic write of this process aborts it
/// (as `kill -9` would) before its temporary file is renamed into place; with
/// `FNOKERN_ABORT_IN_WRITE=NAME` or `NAME#K`, the first (K-th) atomic write of a file named NAME.
/// Every atomic writer (this module's, the plots') asks it once per file.
pub(crate) fn abort_due(path: &Path) -> bool {
    use std::sync::atomic::{AtomicU64, Ordering};
    static WRITES: AtomicU64 = AtomicU64::new(0);
    static NAMED: AtomicU64 = AtomicU64::new(0);
    let Ok(hook) = std::env::var("FNOKERN_ABORT_IN_WRITE") else { return false };
    match hook.parse::<u64>() {
        Ok(k) => WRITES.fetch_add(1, Ordering::SeqCst) + 1 == k,
        Err(_) => {
            let (name, k) = hook.split_once('#').map_or((hook.as_str(), Some(1)), |(n, k)| (n, k.parse::<u64>().ok()));
            path.file_name().is_some_and(|f| f == name) && Some(NAMED.fetch_add(1, Ordering::SeqCst) + 1) == k
        }
    }
}

/// Puts a file at `path` atomically: `fill` writes it whole to a temporary file beside it, which
/// is synced, renamed into place, and the rename made durable (the directory synced). Nothing
/// is left behind when `fill` fails.
fn commit_atomic(path: &Path, fill: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let tmp = temp_path(path)?;
    let result = (|| {
        fill(&tmp)?;
        File::open(&tmp).and_then(|f| f.sync_all()).map_err(io_err(&tmp))?;
        fs::rename(&tmp, path).map_err(io_err(path))?;
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Writes `bytes` to `path` atomically (temp file, fsync, rename, fsync the directory).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    commit_atomic(path, |tmp| {
        let mut f = File::create(tmp).map_err(io_err(tmp))?;
        if abort_due(path) {
            // Half of the bytes reach the temporary file, then the process dies.
            let _ = f.write_all(&bytes[..bytes.len() / 2]);
            let _ = f.sync_all();
            std::process::abort();
        }
        f.write_all(bytes).map_err(io_err(tmp))
    })
}

/// Copies `from` to `to` atomically (a temporary copy, fsync, rename, fsync the directory).
pub fn copy_atomic(from: &Path, to: &Path) -> Result<()> {
    commit_atomic(to, |tmp| {
        fs::copy(from, tmp).map_err(io_err(from))?;
        if abort_due(to) {
            std::process::abort();
        }
        Ok(())
    })
}

/// The metadata key of the CRC-32 that every safetensors file fnokern writes carries: over the
/// other metadata entries and every tensor (name, dtype, shape, bytes), in name order. A file
/// with it is verified when read; files from other tools, without it, are read as they are.
pub const CHECKSUM_KEY: &str = "fnokern_crc32";

fn checksum<'a>(metadata: &BTreeMap<String, String>, tensors: impl Iterator<Item = (&'a str, Dtype, &'a [usize], &'a [u8])>) -> String {
    let mut h = crc32fast::Hasher::new();
    for (k, v) in metadata.iter().filter(|(k, _)| *k != CHECKSUM_KEY) {
        for part in [k.as_bytes(), b"=", v.as_bytes(), b"\n"] {
            h.update(part);
        }
    }
    let mut ts: Vec<_> = tensors.collect();
    ts.sort_by(|a, b| a.0.cmp(b.0));
    for (name, dtype, shape, bytes) in ts {
        h.update(format!("{name}:{dtype:?}:{shape:?}\n").as_bytes());
        h.update(bytes);
    }
    format!("{:08x}", h.finalize())
}

/// Serialises named tensors to safetensors bytes, with their checksum ([`CHECKSUM_KEY`]).
pub fn to_bytes(tensors: &[Named], metadata: Option<BTreeMap<String, String>>) -> Result<Vec<u8>> {
    let mut raw: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::with_capacity(tensors.len());
    for n in tensors {
        // A GPU tensor is copied to the host first.
        let host;
        let t = if n.tensor.device().kind() == crate::device::DeviceKind::Cpu {
            n.tensor
        } else {
            host = n.tensor.to_device(&crate::device::Device::cpu())?;
            &host
        };
        let mut shape = t.dims().to_vec();
        let (dtype, bytes): (Dtype, Vec<u8>) = match t.dtype() {
            DType::F32 => (Dtype::F32, bytemuck::cast_slice(t.as_slice::<f32>()?).to_vec()),
            DType::F64 => (Dtype::F64, bytemuck::cast_slice(t.as_slice::<f64>()?).to_vec()),
            DType::F16 => (Dtype::F16, bytemuck::cast_slice(t.as_slice::<half::f16>()?).to_vec()),
            DType::BF16 => (Dtype::BF16, bytemuck::cast_slice(t.as_slice::<half::bf16>()?).to_vec()),
        };
        let dtype = if n.complex {
            if shape.last() != Some(&2) {
                return Err(Error::bad_shape("safetensors", t.shape(), format!("`{}` is not complex", n.name)));
            }
            shape.pop();
            match dtype {
                Dtype::F32 => Dtype::C64,
                other => return Err(Error::invalid("safetensors", format!("complex `{}` must be f32 (complex64), not {other:?}", n.name))),
            }
        } else {
            dtype
        };
        raw.push((n.name.clone(), dtype, shape, bytes));
    }
    let mut metadata = metadata.unwrap_or_default();
    let sum = checksum(&metadata, raw.iter().map(|(n, d, s, b)| (n.as_str(), *d, s.as_slice(), b.as_slice())));
    metadata.insert(CHECKSUM_KEY.to_string(), sum);
    let views = raw
        .iter()
        .map(|(name, dt, shape, bytes)| {
            TensorView::new(*dt, shape.clone(), bytes).map(|v| (name.clone(), v)).map_err(|e| Error::invalid("safetensors", e.to_string()))
        })
        .collect::<Result<Vec<_>>>()?;
    safetensors::serialize(views, Some(metadata.into_iter().collect())).map_err(|e| Error::invalid("safetensors", e.to_string()))
}

/// Writes named tensors to a safetensors file, atomically.
pub fn save_tensors(path: &Path, tensors: &[Named], metadata: Option<BTreeMap<String, String>>) -> Result<()> {
    write_atomic(path, &to_bytes(tensors, metadata)?)
}

/// A tensor read from a file: its values in f64, shape (complex: with the trailing 2) and dtype.
pub struct Loaded {
    pub values: Vec<f64>,
    pub shape: Shape,
    pub complex: bool,
}

impl Loaded {
    pub fn to_tensor(&self, dtype: DType, dev: &Device) -> Result<Tensor> {
        Tensor::from_f64_vec(self.values.clone(), self.shape.clone(), dtype, dev)
    }
}

/// Reads every tensor of a safetensors file.
pub fn load_tensors(path: &Path) -> Result<BTreeMap<String, Loaded>> {
    let bytes = fs::read(path).map_err(io_err(path))?;
    let st = SafeTensors::deserialize(&bytes).map_err(|e| bad(path, format!("not a safetensors file: {e}")))?;
    let (_, header) = SafeTensors::read_metadata(&bytes).map_err(|e| bad(path, format!("not a safetensors file: {e}")))?;
    if let Some(meta) = header.metadata() {
        if let Some(want) = meta.get(CHECKSUM_KEY) {
            let meta: BTreeMap<String, String> = meta.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
            let views = st.tensors();
            let got = checksum(&meta, views.iter().map(|(n, v)| (n.as_str(), v.dtype(), v.shape(), v.data())));
            if &got != want {
                return Err(bad(path, format!("checksum mismatch (stored {want}, computed {got}): the file is damaged")));
            }
        }
    }
    let mut out = BTreeMap::new();
    for (name, view) in st.tensors() {
        let data = view.data();
        let mut shape = view.shape().to_vec();
        let (values, complex): (Vec<f64>, bool) = match view.dtype() {
            Dtype::F32 => (f32s(data).collect(), false),
            Dtype::C64 => {
                shape.push(2);
                (f32s(data).collect(), true)
            }
            Dtype::F64 => (data.chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().unwrap_or([0; 8]))).collect(), false),
            Dtype::F16 => (data.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f64()).collect(), false),
            Dtype::BF16 => (data.chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f64()).collect(), false),
            other => return Err(bad(path, format!("tensor `{name}` has unsupported dtype {other:?}"))),
        };
        out.insert(name, Loaded { values, shape: Shape::new(shape), complex });
    }
    Ok(out)
}

fn f32s(data: &[u8]) -> impl Iterator<Item = f64> + '_ {
    data.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64)
}

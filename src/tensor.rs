//! `Tensor`: a shape, a dtype and contiguous row-major storage on a device.
//!
//! Storage is shared (`Arc`): cloning a tensor is free and never allocates. Every buffer is
//! accounted on its device when it is created and released when its last handle drops, so the
//! device's current and peak byte counts follow the program exactly (see `device.rs`).
//! Complex tensors are real tensors whose last dimension is 2 (re, im), interleaved as cuFFT does.
//!
//! On a GPU a tensor's storage is a device buffer of f32 (low precision is emulated by rounding,
//! as on the CPU); its elements are reached by copying ([`Tensor::to_f64_vec`],
//! [`Tensor::to_device`]), never by a host slice.

use std::fmt;
use std::sync::Arc;

use half::{bf16, f16};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal, Uniform};
use serde::{Deserialize, Serialize};

use cudarc::driver::CudaSlice;

use crate::device::{Allocation, Device};
use crate::error::{Error, Result};

/// Dimensions, outermost first. A scalar has no dimensions and one element.
#[derive(Clone, PartialEq, Eq, Hash, Default)]
pub struct Shape(Vec<usize>);

impl Shape {
    pub fn new(dims: impl Into<Vec<usize>>) -> Self {
        Shape(dims.into())
    }
    pub fn scalar() -> Self {
        Shape(Vec::new())
    }
    pub fn dims(&self) -> &[usize] {
        &self.0
    }
    pub fn rank(&self) -> usize {
        self.0.len()
    }
    pub fn numel(&self) -> usize {
        self.0.iter().product()
    }
    /// Size of dimension `i`, counting from the end when negative-style indexing is wanted:
    /// `dim(0)` is the outermost.
    pub fn dim(&self, i: usize) -> usize {
        self.0[i]
    }
}

impl fmt::Debug for Shape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl fmt::Display for Shape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[")?;
        for (i, d) in self.0.iter().enumerate() {
            if i > 0 {
                write!(f, ", ")?;
            }
            write!(f, "{d}")?;
        }
        write!(f, "]")
    }
}

impl From<&[usize]> for Shape {
    fn from(d: &[usize]) -> Self {
        Shape(d.to_vec())
    }
}
impl<const N: usize> From<[usize; N]> for Shape {
    fn from(d: [usize; N]) -> Self {
        Shape(d.to_vec())
    }
}
impl From<Vec<usize>> for Shape {
    fn from(d: Vec<usize>) -> Self {
        Shape(d)
    }
}
/// The precision of activations and GEMMs. Master weights, optimiser state, FFTs and the spectral
/// multiply, norm statistics and the loss stay in fp32 whatever this says.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Precision {
    #[default]
    Fp32,
    Bf16,
    /// With dynamic loss scaling (the `loss_scale_*` fields).
    Fp16,
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Precision::Fp32 => "fp32",
            Precision::Bf16 => "bf16",
            Precision::Fp16 => "fp16",
        })
    }
}

/// Element types. f32 and f64 are computed on the CPU; f16 and bf16 are storage types for the
/// mixed-precision path (cast to and from, not computed in).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F16,
    BF16,
    F32,
    F64,
}

impl DType {
    pub fn size_in_bytes(self) -> usize {
        match self {
            DType::F16 | DType::BF16 => 2,
            DType::F32 => 4,
            DType::F64 => 8,
        }
    }
    pub fn is_compute(self) -> bool {
        matches!(self, DType::F32 | DType::F64)
    }
}

/// The element buffer behind a tensor. Meta tensors have none.
#[doc(hidden)]
pub enum Data {
    F16(Vec<f16>),
    BF16(Vec<bf16>),
    F32(Vec<f32>),
    F64(Vec<f64>),
    Meta,
    /// f32 elements in GPU memory.
    Cuda(CudaSlice<f32>),
}

/// GPU tensors hold f32 only.
fn check_gpu_dtype(op: &'static str, dtype: DType) -> Result<()> {
    if dtype == DType::F32 {
        Ok(())
    } else {
        Err(Error::UnsupportedDType { op, dtype, why: "GPU tensors are f32 (f16/bf16 activations are emulated by rounding, as on the CPU)" })
    }
}

/// A GPU tensor needs a buffer, and the driver refuses a 0-byte allocation: an empty tensor on
/// a GPU is an error here rather than a driver error later (the CPU and meta devices hold them).
fn check_gpu_len(op: &'static str, shape: &Shape, device: &Device) -> Result<()> {
    if shape.numel() > 0 {
        Ok(())
    } else {
        Err(Error::bad_shape(op, shape, format!("{device} cannot hold an empty tensor (the CUDA driver refuses 0-byte allocations)")))
    }
}

pub(crate) struct Storage {
    data: Data,
    // Dropped with the storage: returns the bytes to the device's accounting.
    _alloc: Allocation,
}

fn on_gpu(op: &'static str, device: &Device) -> Error {
    Error::invalid(op, format!("the tensor is on {device}; copy it to the CPU first (Tensor::to_device)"))
}

/// A Rust element type that a tensor can hold.
pub trait Element: Copy + Send + Sync + bytemuck::Pod + fmt::Debug + 'static {
    const DTYPE: DType;
    fn slice(data: &Data) -> Option<&[Self]>;
    fn slice_mut(data: &mut Data) -> Option<&mut [Self]>;
    fn wrap(v: Vec<Self>) -> Data;
    fn as_f64(self) -> f64;
    fn of_f64(v: f64) -> Self;
}

macro_rules! element {
    ($t:ty, $variant:ident, $to:expr, $from:expr) => {
        impl Element for $t {
            const DTYPE: DType = DType::$variant;
            fn slice(data: &Data) -> Option<&[Self]> {
                match data {
                    Data::$variant(v) => Some(v),
                    _ => None,
                }
            }
            fn slice_mut(data: &mut Data) -> Option<&mut [Self]> {
                match data {
                    Data::$variant(v) => Some(v),
                    _ => None,
                }
            }
            fn wrap(v: Vec<Self>) -> Data {
                Data::$variant(v)
            }
            fn as_f64(self) -> f64 {
                ($to)(self)
            }
            fn of_f64(v: f64) -> Self {
                ($from)(v)
            }
        }
    };
}
element!(f32, F32, |x: f32| x as f64, |v: f64| v as f32);
element!(f64, F64, |x: f64| x, |v: f64| v);
element!(f16, F16, |x: f16| x.to_f64(), f16::from_f64);
element!(bf16, BF16, |x: bf16| x.to_f64(), bf16::from_f64);

/// A shaped, typed buffer on a device. Cheap to clone (shared storage).
#[derive(Clone)]
pub struct Tensor {
    shape: Shape,
    dtype: DType,
    device: Device,
    storage: Arc<Storage>,
}

impl fmt::Debug for Tensor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Tensor({}, {:?}, {})", self.shape, self.dtype, self.device)
    }
}

impl Tensor {
    /// A zero-filled tensor (a data-less one on the meta device), accounted on `device`.
    pub fn zeros(shape: impl Into<Shape>, dtype: DType, device: &Device) -> Result<Tensor> {
        Tensor::alloc(shape.into(), dtype, device, true)
    }

    /// A tensor whose every element the caller writes before anything reads it: on a GPU its
    /// buffer is not cleared (the CUDA stand-in fills it with NaN, so an element left unwritten
    /// shows); on the CPU it is zero-filled like [`Tensor::zeros`].
    pub(crate) fn uninit(shape: impl Into<Shape>, dtype: DType, device: &Device) -> Result<Tensor> {
        Tensor::alloc(shape.into(), dtype, device, false)
    }

    fn alloc(shape: Shape, dtype: DType, device: &Device, clear: bool) -> Result<Tensor> {
        let n = shape.numel();
        let alloc = device.allocate((n * dtype.size_in_bytes()) as u64, || format!("a {dtype:?} tensor of shape {shape}"))?;
        let data = if device.is_meta() {
            Data::Meta
        } else if let Some(gpu) = device.gpu_opt() {
            check_gpu_dtype("Tensor::zeros", dtype)?;
            check_gpu_len("Tensor::zeros", &shape, device)?;
            Data::Cuda(if clear { gpu.zeros::<f32>(n)? } else { gpu.uninit::<f32>(n)? })
        } else {
            match dtype {
                DType::F16 => Data::F16(vec![f16::ZERO; n]),
                DType::BF16 => Data::BF16(vec![bf16::ZERO; n]),
                DType::F32 => Data::F32(vec![0.0; n]),
                DType::F64 => Data::F64(vec![0.0; n]),
            }
        };
        Ok(Tensor { shape, dtype, device: device.clone(), storage: Arc::new(Storage { data, _alloc: alloc }) })
    }

    /// Wraps host data. On the meta device only the shape and byte count are kept.
    pub fn from_vec<T: Element>(data: Vec<T>, shape: impl Into<Shape>, device: &Device) -> Result<Tensor> {
        let shape = shape.into();
        if data.len() != shape.numel() {
            return Err(Error::bad_shape("Tensor::from_vec", &shape, format!("{} elements given for {} places", data.len(), shape.numel())));
        }
        let alloc = device.allocate((data.len() * std::mem::size_of::<T>()) as u64, || format!("a {:?} tensor of shape {shape}", T::DTYPE))?;
        let data = if device.is_meta() {
            Data::Meta
        } else if let Some(gpu) = device.gpu_opt() {
            check_gpu_dtype("Tensor::from_vec", T::DTYPE)?;
            check_gpu_len("Tensor::from_vec", &shape, device)?;
            let host: &[f32] = bytemuck::cast_slice(&data);
            Data::Cuda(gpu.upload(host)?)
        } else {
            T::wrap(data)
        };
        Ok(Tensor { shape, dtype: T::DTYPE, device: device.clone(), storage: Arc::new(Storage { data, _alloc: alloc }) })
    }

    /// A tensor filled with one value.
    pub fn full(value: f64, shape: impl Into<Shape>, dtype: DType, device: &Device) -> Result<Tensor> {
        let shape = shape.into();
        let n = shape.numel();
        if device.is_meta() {
            return Tensor::zeros(shape, dtype, device);
        }
        match dtype {
            DType::F16 => Tensor::from_vec(vec![f16::from_f64(value); n], shape, device),
            DType::BF16 => Tensor::from_vec(vec![bf16::from_f64(value); n], shape, device),
            DType::F32 => Tensor::from_vec(vec![value as f32; n], shape, device),
            DType::F64 => Tensor::from_vec(vec![value; n], shape, device),
        }
    }

    /// Standard-normal samples times `std`, from a seeded ChaCha8 stream: the same seed gives the
    /// same tensor on every machine.
    pub fn randn(shape: impl Into<Shape>, std: f64, seed: u64, dtype: DType, device: &Device) -> Result<Tensor> {
        let shape = shape.into();
        if device.is_meta() {
            // No values to draw: a plan of a model too big for the host must not build it.
            return Tensor::zeros(shape, dtype, device);
        }
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let v: Vec<f64> = (0..shape.numel())
            .map(|_| {
                let z: f64 = StandardNormal.sample(&mut rng);
                z * std
            })
            .collect();
        Tensor::from_f64_vec(v, shape, dtype, device)
    }

    /// Uniform samples in [lo, hi) from a seeded ChaCha8 stream.
    pub fn rand_uniform(shape: impl Into<Shape>, lo: f64, hi: f64, seed: u64, dtype: DType, device: &Device) -> Result<Tensor> {
        let shape = shape.into();
        let dist = Uniform::new(lo, hi).map_err(|e| Error::invalid("Tensor::rand_uniform", format!("bounds [{lo}, {hi}): {e}")))?;
        if device.is_meta() {
            return Tensor::zeros(shape, dtype, device);
        }
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let v: Vec<f64> = (0..shape.numel()).map(|_| dist.sample(&mut rng)).collect();
        Tensor::from_f64_vec(v, shape, dtype, device)
    }

    /// Builds a tensor of any dtype from f64 values (rounded to the dtype).
    pub fn from_f64_vec(v: Vec<f64>, shape: impl Into<Shape>, dtype: DType, device: &Device) -> Result<Tensor> {
        match dtype {
            DType::F64 => Tensor::from_vec(v, shape, device),
            DType::F32 => Tensor::from_vec(v.into_iter().map(|x| x as f32).collect::<Vec<_>>(), shape, device),
            DType::F16 => Tensor::from_vec(v.into_iter().map(f16::from_f64).collect::<Vec<_>>(), shape, device),
            DType::BF16 => Tensor::from_vec(v.into_iter().map(bf16::from_f64).collect::<Vec<_>>(), shape, device),
        }
    }

    pub fn shape(&self) -> &Shape {
        &self.shape
    }
    pub fn dims(&self) -> &[usize] {
        self.shape.dims()
    }
    pub fn rank(&self) -> usize {
        self.shape.rank()
    }
    pub fn numel(&self) -> usize {
        self.shape.numel()
    }
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    pub fn device(&self) -> &Device {
        &self.device
    }
    pub fn size_in_bytes(&self) -> usize {
        self.numel() * self.dtype.size_in_bytes()
    }

    /// The elements, if this tensor holds `T` and has data.
    pub fn as_slice<T: Element>(&self) -> Result<&[T]> {
        match self.storage.data {
            Data::Meta => return Err(Error::NoData { op: "Tensor::as_slice" }),
            Data::Cuda(_) => return Err(on_gpu("Tensor::as_slice", &self.device)),
            _ => {}
        }
        T::slice(&self.storage.data).ok_or(Error::DTypeMismatch { op: "Tensor::as_slice", lhs: self.dtype, rhs: T::DTYPE })
    }

    /// Mutable elements of a tensor whose storage nobody else holds (a freshly made output).
    pub(crate) fn as_mut_slice<T: Element>(&mut self) -> Result<&mut [T]> {
        let dtype = self.dtype;
        let storage = Arc::get_mut(&mut self.storage).ok_or_else(|| Error::invalid("Tensor::as_mut_slice", "storage is shared; write into a fresh tensor"))?;
        match storage.data {
            Data::Meta => return Err(Error::NoData { op: "Tensor::as_mut_slice" }),
            Data::Cuda(_) => return Err(on_gpu("Tensor::as_mut_slice", &self.device)),
            _ => {}
        }
        T::slice_mut(&mut storage.data).ok_or(Error::DTypeMismatch { op: "Tensor::as_mut_slice", lhs: dtype, rhs: T::DTYPE })
    }

    /// The GPU buffer of a tensor on a GPU.
    pub(crate) fn cuda(&self) -> Result<&CudaSlice<f32>> {
        match &self.storage.data {
            Data::Cuda(d) => Ok(d),
            _ => Err(Error::invalid("Tensor::cuda", format!("the tensor is on {}, not a GPU", self.device))),
        }
    }

    /// The GPU buffer of a tensor whose storage nobody else holds (a freshly made output).
    pub(crate) fn cuda_mut(&mut self) -> Result<&mut CudaSlice<f32>> {
        let device = self.device.to_string();
        let storage = Arc::get_mut(&mut self.storage).ok_or_else(|| Error::invalid("Tensor::cuda_mut", "storage is shared; write into a fresh tensor"))?;
        match &mut storage.data {
            Data::Cuda(d) => Ok(d),
            _ => Err(Error::invalid("Tensor::cuda_mut", format!("the tensor is on {device}, not a GPU"))),
        }
    }

    /// Whether this handle is the only one on its storage (so it may be written in place).
    pub(crate) fn is_unique(&mut self) -> bool {
        Arc::get_mut(&mut self.storage).is_some()
    }

    /// Whether the two are views of one buffer (the same storage).
    pub(crate) fn shares_storage(&self, other: &Tensor) -> bool {
        Arc::ptr_eq(&self.storage, &other.storage)
    }

    /// A copy of the elements as f64, whatever the dtype.
    pub fn to_f64_vec(&self) -> Result<Vec<f64>> {
        Ok(match &self.storage.data {
            Data::F16(v) => v.iter().map(|x| x.to_f64()).collect(),
            Data::BF16(v) => v.iter().map(|x| x.to_f64()).collect(),
            Data::F32(v) => v.iter().map(|&x| x as f64).collect(),
            Data::F64(v) => v.clone(),
            // Code that reads values (the trainer's guards, clipping's norms) runs unchanged on
            // the meta device, which plans memory: its tensors read as zeros.
            Data::Meta => vec![0.0; self.numel()],
            Data::Cuda(d) => self.device.gpu()?.download(d)?.into_iter().map(f64::from).collect(),
        })
    }

    /// The elements of several tensors as f64 each, read from a GPU in one copy (and so one
    /// synchronisation): they are gathered into one device buffer first.
    pub fn to_f64_vecs(ts: &[&Tensor]) -> Result<Vec<Vec<f64>>> {
        let on_gpu = ts.first().and_then(|t| t.device.gpu_opt().cloned());
        let Some(gpu) = on_gpu.filter(|_| ts.iter().all(|t| matches!(t.storage.data, Data::Cuda(_)))) else {
            return ts.iter().map(|t| t.to_f64_vec()).collect();
        };
        let total: usize = ts.iter().map(|t| t.numel()).sum();
        let mut all = gpu.uninit::<f32>(total.max(1))?;
        let mut at = 0;
        for t in ts {
            if t.device != ts[0].device {
                return Err(Error::DeviceMismatch { op: "Tensor::to_f64_vecs", lhs: ts[0].device.to_string(), rhs: t.device.to_string() });
            }
            let n = t.numel();
            gpu.stream.memcpy_dtod(t.cuda()?, &mut all.slice_mut(at..at + n)).map_err(crate::backend::gpu::cuda_err("copy on the GPU"))?;
            at += n;
        }
        let host = gpu.download(&all)?;
        let mut at = 0;
        Ok(ts
            .iter()
            .map(|t| {
                let v = host[at..at + t.numel()].iter().map(|&x| f64::from(x)).collect();
                at += t.numel();
                v
            })
            .collect())
    }

    /// The single value of a one-element tensor.
    pub fn scalar_value(&self) -> Result<f64> {
        if self.numel() != 1 {
            return Err(Error::bad_shape("Tensor::scalar_value", &self.shape, "not a one-element tensor"));
        }
        Ok(self.to_f64_vec()?[0])
    }

    /// The same storage seen with another shape of the same element count (no copy).
    pub fn reshape(&self, shape: impl Into<Shape>) -> Result<Tensor> {
        let shape = shape.into();
        if shape.numel() != self.numel() {
            return Err(Error::mismatch_because("reshape", &self.shape, &shape, "element counts differ"));
        }
        Ok(Tensor { shape, dtype: self.dtype, device: self.device.clone(), storage: self.storage.clone() })
    }

    /// A rounded copy in another dtype (f16/bf16 round to nearest even, as `half` does).
    pub fn to_dtype(&self, dtype: DType) -> Result<Tensor> {
        if dtype == self.dtype {
            return Ok(self.clone());
        }
        if self.device.is_meta() {
            return Tensor::zeros(self.shape.clone(), dtype, &self.device);
        }
        Tensor::from_f64_vec(self.to_f64_vec()?, self.shape.clone(), dtype, &self.device)
    }

    /// This tensor on another device (a copy; the same handle when it is already there). A copy to
    /// the meta device keeps the shape only; a copy from it is an error (it has no elements).
    pub fn to_device(&self, device: &Device) -> Result<Tensor> {
        if *device == self.device {
            return Ok(self.clone());
        }
        if device.is_meta() {
            return Tensor::zeros(self.shape.clone(), self.dtype, device);
        }
        match &self.storage.data {
            Data::F16(v) => Tensor::from_vec(v.clone(), self.shape.clone(), device),
            Data::BF16(v) => Tensor::from_vec(v.clone(), self.shape.clone(), device),
            Data::F32(v) => Tensor::from_vec(v.clone(), self.shape.clone(), device),
            Data::F64(v) => Tensor::from_vec(v.clone(), self.shape.clone(), device),
            Data::Meta => Err(Error::NoData { op: "Tensor::to_device" }),
            Data::Cuda(d) => Tensor::from_vec(self.device.gpu()?.download(d)?, self.shape.clone(), device),
        }
    }

    /// Whether every element is finite (an error on the meta device, which has no elements).
    pub fn all_finite(&self) -> Result<bool> {
        Ok(self.to_f64_vec()?.iter().all(|x| x.is_finite()))
    }
}

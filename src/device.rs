//! Devices and the one memory-accounting point.
//!
//! Every tensor buffer is requested through [`Device::allocate`], which checks the optional limit,
//! adds the bytes to the device's current count and raises its peak; dropping the buffer gives the
//! bytes back. A `Device` value is a handle: clones share one ledger, while each call of
//! [`Device::cpu`] or [`Device::meta`] opens a fresh ledger (so that concurrent tests do not see
//! each other's allocations).
//!
//! The meta device runs the same code with shapes only: it allocates nothing but counts exactly the
//! bytes the CPU would, so its peak is a prediction of the CPU's (and, with the same kernels'
//! outputs, a GPU's) to the byte.
//!
//! A CUDA device ([`Device::cuda`]) accounts its tensors in the same ledger. Its buffers come from
//! the driver's stream-ordered memory pool, kept as a caching allocator (freed blocks stay in the
//! pool for the next request instead of going back to the driver); the pool's own high-water mark
//! is [`Device::gpu_pool_peak`]. Scratch that a kernel needs for itself (cuFFT work areas, im2col
//! columns, reduction partials) is not a tensor and is not in the ledger, as on the CPU.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::backend::gpu::Gpu;
use crate::error::{Error, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DeviceKind {
    Cpu,
    Meta,
    /// The GPU of this ordinal.
    Cuda(usize),
}

impl fmt::Display for DeviceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceKind::Cpu => f.write_str("cpu"),
            DeviceKind::Meta => f.write_str("meta"),
            DeviceKind::Cuda(i) => write!(f, "cuda:{i}"),
        }
    }
}

impl DeviceKind {
    pub fn is_gpu(self) -> bool {
        matches!(self, DeviceKind::Cuda(_))
    }

    /// Parses `cpu`, `meta`, `cuda` (GPU 0) or `cuda:N`.
    pub fn parse(s: &str) -> Result<DeviceKind> {
        match s.trim() {
            "cpu" => Ok(DeviceKind::Cpu),
            "meta" => Ok(DeviceKind::Meta),
            "cuda" | "gpu" => Ok(DeviceKind::Cuda(0)),
            other => other
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(DeviceKind::Cuda)
                .ok_or_else(|| Error::invalid("device", format!("unknown device `{s}` (use cpu, cuda or cuda:N)"))),
        }
    }
}

/// Current and peak bytes of one device, and its limit if any.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryStats {
    pub current: u64,
    pub peak: u64,
    pub limit: Option<u64>,
    /// Number of allocations made since the ledger was opened.
    pub allocations: u64,
}

#[derive(Debug, Default)]
struct Ledger {
    current: AtomicU64,
    peak: AtomicU64,
    /// 0 means no limit.
    limit: AtomicU64,
    allocations: AtomicU64,
}

/// A device handle: its kind, its memory ledger and, on a GPU, the opened GPU.
#[derive(Clone)]
pub struct Device {
    kind: DeviceKind,
    ledger: Arc<Ledger>,
    gpu: Option<Arc<Gpu>>,
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.kind, f)
    }
}

impl fmt::Debug for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Device({})", self.kind)
    }
}

impl PartialEq for Device {
    /// Two handles are the same device when they share a ledger.
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.ledger, &other.ledger)
    }
}

impl Device {
    /// A CPU device with a fresh ledger.
    pub fn cpu() -> Device {
        Device { kind: DeviceKind::Cpu, ledger: Arc::default(), gpu: None }
    }

    /// A meta device (shapes and byte counts, no data) with a fresh ledger.
    pub fn meta() -> Device {
        Device { kind: DeviceKind::Meta, ledger: Arc::default(), gpu: None }
    }

    /// GPU `ordinal` with a fresh ledger, or why there is none (no driver, no such GPU, no
    /// embedded kernels, no cuBLAS/cuFFT library). The GPU itself (context, kernels, library
    /// handles, memory pool) is opened once per process and shared by every handle.
    pub fn cuda(ordinal: usize) -> Result<Device> {
        Ok(Device { kind: DeviceKind::Cuda(ordinal), ledger: Arc::default(), gpu: Some(Gpu::shared(ordinal)?) })
    }

    /// The device a kind names (a fresh ledger).
    pub fn of_kind(kind: DeviceKind) -> Result<Device> {
        match kind {
            DeviceKind::Cpu => Ok(Device::cpu()),
            DeviceKind::Meta => Ok(Device::meta()),
            DeviceKind::Cuda(i) => Device::cuda(i),
        }
    }

    pub(crate) fn gpu_opt(&self) -> Option<&Arc<Gpu>> {
        self.gpu.as_ref()
    }

    /// The opened GPU of a CUDA device.
    pub(crate) fn gpu(&self) -> Result<&Arc<Gpu>> {
        self.gpu.as_ref().ok_or_else(|| Error::invalid("device", format!("{} is not a GPU", self.kind)))
    }

    /// Waits until everything queued on the device has run (a no-op off the GPU, where every
    /// kernel has finished when it returns). Timings of GPU work call this.
    pub fn synchronize(&self) -> Result<()> {
        match &self.gpu {
            Some(g) => g.sync(),
            None => Ok(()),
        }
    }

    /// The high-water mark in bytes of the GPU's memory pool since the last
    /// [`Device::reset_peak`] (every live buffer of the process on that GPU, scratch included):
    /// what the GPU really held, beside the ledger's count of tensors. `None` off the GPU.
    pub fn gpu_pool_peak(&self) -> Result<Option<u64>> {
        self.gpu.as_ref().map(|g| g.pool_peak()).transpose()
    }

    pub fn kind(&self) -> DeviceKind {
        self.kind
    }

    pub fn is_meta(&self) -> bool {
        self.kind == DeviceKind::Meta
    }

    /// Sets (or with `None` clears) the memory limit in bytes. Allocations that would take the
    /// current count above it fail with [`Error::OutOfMemory`].
    pub fn set_memory_limit(&self, limit: Option<u64>) {
        self.ledger.limit.store(limit.unwrap_or(0), Ordering::SeqCst);
    }

    pub fn memory(&self) -> MemoryStats {
        let limit = self.ledger.limit.load(Ordering::SeqCst);
        MemoryStats {
            current: self.ledger.current.load(Ordering::SeqCst),
            peak: self.ledger.peak.load(Ordering::SeqCst),
            limit: (limit > 0).then_some(limit),
            allocations: self.ledger.allocations.load(Ordering::SeqCst),
        }
    }

    /// Starts a new peak measurement from the bytes in use now.
    /// On a GPU the memory pool's high-water mark is reset too (best effort: a driver error there
    /// leaves the pool's mark as it was).
    pub fn reset_peak(&self) {
        let cur = self.ledger.current.load(Ordering::SeqCst);
        self.ledger.peak.store(cur, Ordering::SeqCst);
        if let Some(g) = &self.gpu {
            let _ = g.reset_pool_peak();
        }
    }

    /// Accounts `bytes` for a buffer about to be made; `what` describes it for the error message.
    pub(crate) fn allocate(&self, bytes: u64, what: impl FnOnce() -> String) -> Result<Allocation> {
        let l = &self.ledger;
        let limit = l.limit.load(Ordering::SeqCst);
        // Compare-and-swap so that a refused request leaves the ledger untouched.
        let mut cur = l.current.load(Ordering::SeqCst);
        loop {
            let next = cur + bytes;
            if limit > 0 && next > limit {
                return Err(Error::OutOfMemory { device: self.kind.to_string(), what: what(), requested: bytes, in_use: cur, limit });
            }
            match l.current.compare_exchange(cur, next, Ordering::SeqCst, Ordering::SeqCst) {
                Ok(_) => {
                    l.peak.fetch_max(next, Ordering::SeqCst);
                    l.allocations.fetch_add(1, Ordering::SeqCst);
                    return Ok(Allocation { ledger: self.ledger.clone(), bytes });
                }
                Err(actual) => cur = actual,
            }
        }
    }
}

/// Bytes held on a device; returned to its ledger on drop.
pub(crate) struct Allocation {
    ledger: Arc<Ledger>,
    bytes: u64,
}

impl Drop for Allocation {
    fn drop(&mut self) {
        self.ledger.current.fetch_sub(self.bytes, Ordering::SeqCst);
    }
}

/// What `device = "auto"` means here: GPU 0 when this build embeds the kernels and the GPU opens,
/// else the CPU; with the reason, for the line a run prints on start.
pub fn auto_kind() -> (DeviceKind, String) {
    if !crate::build_info::KERNELS_EMBEDDED {
        return (DeviceKind::Cpu, "cpu (this build embeds no CUDA kernels)".into());
    }
    match crate::backend::gpu::probe(0) {
        Ok(g) => (DeviceKind::Cuda(0), format!("cuda:0 ({})", g.name)),
        Err(e) => (DeviceKind::Cpu, format!("cpu (no usable GPU: {e})")),
    }
}

/// The host memory available to a new allocation (Linux's `MemAvailable`), if it can be read.
pub fn host_available_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Refuses, before anything is allocated, work that needs `need` bytes of host memory when the
/// machine has less available: one line naming `what` needs them and `hint` (what to lower).
pub fn ensure_host_fits(need: u64, what: &str, hint: &str) -> Result<()> {
    match host_available_bytes() {
        Some(have) if need > have => Err(Error::invalid(
            "memory",
            format!("{what} needs about {} but the machine has {} available: {hint}", crate::plan::gib(need), crate::plan::gib(have)),
        )),
        _ => Ok(()),
    }
}

/// Parses a byte size such as `24GiB`, `512 MiB`, `1.5GB` or `1000000`.
pub fn parse_bytes(s: &str) -> Result<u64> {
    let t = s.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value: f64 = num.parse().map_err(|_| Error::invalid("parse_bytes", format!("`{s}` does not start with a number")))?;
    let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        "kib" | "k" => 1024.0,
        "mib" | "m" => 1024.0 * 1024.0,
        "gib" | "g" => 1024.0 * 1024.0 * 1024.0,
        other => return Err(Error::invalid("parse_bytes", format!("unknown unit `{other}` in `{s}` (use B, KiB, MiB, GiB, KB, MB or GB)"))),
    };
    if !(value.is_finite() && value >= 0.0) {
        return Err(Error::invalid("parse_bytes", format!("`{s}` is not a size")));
    }
    Ok((value * mult).round() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sizes() {
        assert_eq!(parse_bytes("24GiB").unwrap(), 24 * 1024 * 1024 * 1024);
        assert_eq!(parse_bytes("512 MiB").unwrap(), 512 * 1024 * 1024);
        assert_eq!(parse_bytes("1.5GB").unwrap(), 1_500_000_000);
        assert_eq!(parse_bytes("100").unwrap(), 100);
        assert!(parse_bytes("lots").is_err());
        assert!(parse_bytes("3 parsecs").is_err());
    }
}

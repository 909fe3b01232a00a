//! What this binary was built with: whether CUDA kernels are embedded, and by which nvcc.

/// True when build.rs compiled `kernels/*.cu` into an embedded fatbin.
pub const KERNELS_EMBEDDED: bool = option_env!("FNOKERN_KERNELS").is_some();

/// The nvcc version line used for the kernels, or why none was used.
pub const NVCC: &str = match option_env!("FNOKERN_NVCC_VERSION") {
    Some(v) => v,
    None => "none",
};

/// GPU targets of the embedded fatbin.
pub const CUDA_TARGETS: &str = match option_env!("FNOKERN_CUDA_TARGETS") {
    Some(v) => v,
    None => "none",
};

/// The embedded fatbin (empty when no kernels were built).
#[cfg(fnokern_kernels)]
pub static FATBIN: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/kernels.fatbin"));
#[cfg(not(fnokern_kernels))]
pub static FATBIN: &[u8] = &[];

//! The CUDA device the GPU tests run on: a real GPU where the driver sees one, else the driver
//! stand-in of tests/host/fakecuda/ (libcuda, libcublas and libcufft built with the host C++
//! compiler from the real kernels, and a fake libnccl.so.2; see its README).
//!
//! The stand-in is built once per source tree under the target directory, then loaded by absolute
//! path before cudarc first opens a CUDA library: cudarc asks for `libcuda.so`, `libcublas.so` and
//! `libcufft.so` by name, and the dynamic loader hands back an already loaded library whose
//! SONAME is that name. Child processes (the CLI) get the same libraries through
//! `LD_LIBRARY_PATH` ([`Standin::env`]).
//!
//! `FNOKERN_CUDA_TESTS` chooses: `auto` (default: a real GPU when the driver reports one),
//! `gpu` (the real driver only), `standin` (always the stand-in).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use fnokern::Device;
use libloading::Library;

/// The loaded stand-in.
pub struct Standin {
    /// Holds libcuda.so, libcublas.so and libcufft.so.
    pub dir: PathBuf,
    libs: Vec<Library>,
}

impl Standin {
    /// How many times `name` (a kernel, or a cuBLAS/cuFFT entry point) ran since the last reset.
    pub fn calls(&self, name: &str) -> u64 {
        let name = std::ffi::CString::new(name).unwrap();
        // SAFETY: fakecuda_calls(const char*) -> uint64_t in tests/host/fakecuda/driver.cpp.
        unsafe {
            let f: libloading::Symbol<unsafe extern "C" fn(*const std::ffi::c_char) -> u64> = self.libs[0].get(b"fakecuda_calls\0").unwrap();
            f(name.as_ptr())
        }
    }

    /// Every counter of the stand-in (kernels, cuBLAS/cuFFT executions, copies, memsets,
    /// allocations, frees, synchronisations) since the last reset.
    pub fn counters(&self) -> std::collections::BTreeMap<String, u64> {
        // SAFETY: fakecuda_counters(char*, size_t) -> size_t in tests/host/fakecuda/driver.cpp:
        // it writes at most len bytes and returns the text's whole length.
        let text = unsafe {
            let f: libloading::Symbol<unsafe extern "C" fn(*mut std::ffi::c_char, usize) -> usize> = self.libs[0].get(b"fakecuda_counters\0").unwrap();
            let len = f(std::ptr::null_mut(), 0);
            let mut buf = vec![0u8; len + 1];
            f(buf.as_mut_ptr().cast(), buf.len());
            buf.truncate(len);
            String::from_utf8(buf).unwrap()
        };
        text.lines().filter_map(|l| l.split_once('=')).map(|(k, v)| (k.to_string(), v.parse().unwrap())).collect()
    }

    /// The stand-in's race check for the launches this thread makes, on or off: a byte written
    /// by two blocks of one launch then fails the launch (see its README).
    pub fn racecheck(&self, on: bool) {
        // SAFETY: fakecuda_racecheck(int) in tests/host/fakecuda/driver.cpp.
        unsafe {
            let f: libloading::Symbol<unsafe extern "C" fn(i32)> = self.libs[0].get(b"fakecuda_racecheck\0").unwrap();
            f(on as i32)
        }
    }

    pub fn reset_calls(&self) {
        // SAFETY: fakecuda_reset_calls(void) in tests/host/fakecuda/driver.cpp.
        unsafe {
            let f: libloading::Symbol<unsafe extern "C" fn()> = self.libs[0].get(b"fakecuda_reset_calls\0").unwrap();
            f()
        }
    }

    /// The environment variable that gives a child process the stand-in's libraries.
    pub fn env(&self) -> (&'static str, String) {
        let old = std::env::var("LD_LIBRARY_PATH").unwrap_or_default();
        ("LD_LIBRARY_PATH", if old.is_empty() { self.dir.display().to_string() } else { format!("{}:{old}", self.dir.display()) })
    }
}

/// Which CUDA the tests of this process use.
pub enum Cuda {
    Real,
    Standin(Standin),
    /// No device for the GPU tests, and why (they skip).
    Skip(String),
}

/// Decided (and the stand-in built and loaded) once per process, before any CUDA call.
pub fn cuda() -> &'static Cuda {
    static CUDA: OnceLock<Cuda> = OnceLock::new();
    CUDA.get_or_init(|| {
        if !fnokern::build_info::KERNELS_EMBEDDED {
            assert!(std::env::var("FNOKERN_REQUIRE_KERNELS").as_deref() != Ok("1"), "FNOKERN_REQUIRE_KERNELS=1 but this build embeds no CUDA kernels");
            return Cuda::Skip("this build embeds no CUDA kernels (no nvcc at build time)".into());
        }
        let choice = std::env::var("FNOKERN_CUDA_TESTS").unwrap_or_else(|_| "auto".into());
        match choice.as_str() {
            "gpu" => Cuda::Real,
            "standin" => Cuda::Standin(load().unwrap_or_else(|e| panic!("the CUDA stand-in: {e}"))),
            "auto" if real_gpu_present() => Cuda::Real,
            "auto" => Cuda::Standin(load().unwrap_or_else(|e| panic!("the CUDA stand-in: {e}"))),
            other => panic!("FNOKERN_CUDA_TESTS={other}: expected auto, gpu or standin"),
        }
    })
}

/// The stand-in, when this process runs on it.
pub fn standin() -> Option<&'static Standin> {
    match cuda() {
        Cuda::Standin(s) => Some(s),
        _ => None,
    }
}

/// GPU 0 as a fnokern device, or None (printed) when the tests skip.
pub fn cuda_device(test: &str) -> Option<Device> {
    if let Cuda::Skip(why) = cuda() {
        eprintln!("{test}: skipped: {why}");
        return None;
    }
    Some(Device::cuda(0).unwrap_or_else(|e| panic!("{test}: GPU 0 does not open: {e}")))
}

/// The directory of the built stand-in (built if needed, not loaded into this process), for child
/// processes; None (printed) when this build embeds no kernels.
pub fn built(test: &str) -> Option<PathBuf> {
    if !fnokern::build_info::KERNELS_EMBEDDED {
        eprintln!("{test}: skipped: this build embeds no CUDA kernels");
        return None;
    }
    Some(build().unwrap_or_else(|e| panic!("the CUDA stand-in: {e}")))
}

/// Whether the real driver library loads and reports a device.
pub fn real_gpu_present() -> bool {
    // SAFETY: loads the driver library and calls cuInit and cuDeviceGetCount with their C
    // signatures (CUDA driver API); nothing else.
    unsafe {
        let Ok(lib) = Library::new("libcuda.so.1") else { return false };
        let (Ok(init), Ok(count)) =
            (lib.get::<unsafe extern "C" fn(u32) -> i32>(b"cuInit\0"), lib.get::<unsafe extern "C" fn(*mut i32) -> i32>(b"cuDeviceGetCount\0"))
        else {
            return false;
        };
        let mut n = 0;
        let present = init(0) == 0 && count(&mut n) == 0 && n > 0;
        // Kept loaded: cudarc will open the same library.
        std::mem::forget(lib);
        present
    }
}

/// Every file the stand-in is built from.
fn sources(root: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for (dir, exts) in
        [("tests/host", &["h"][..]), ("tests/host/fakecuda", &["h", "cpp"][..]), ("kernels", &["cu", "cuh"][..]), ("kernels/dev", &["cu", "cuh"][..])]
    {
        if let Ok(rd) = std::fs::read_dir(root.join(dir)) {
            for e in rd.flatten() {
                let p = e.path();
                if p.extension().is_some_and(|x| exts.iter().any(|e| x == *e)) {
                    files.push(p);
                }
            }
        }
    }
    files.sort();
    files
}

/// The kernels of the embedded fatbin: its code sections are named `.text.<kernel>`.
fn fatbin_kernels() -> Vec<String> {
    let bin = fnokern::build_info::FATBIN;
    let pat = b".text.";
    let mut names = std::collections::BTreeSet::new();
    let mut i = 0;
    while i + pat.len() < bin.len() {
        if &bin[i..i + pat.len()] == pat {
            let start = i + pat.len();
            let end = bin[start..].iter().position(|&b| b == 0).map_or(start, |n| start + n);
            let name = &bin[start..end];
            if !name.is_empty() && name.iter().all(|&b| b.is_ascii_alphanumeric() || b == b'_') {
                names.insert(String::from_utf8_lossy(name).into_owned());
            }
            i = end;
        } else {
            i += 1;
        }
    }
    names.into_iter().collect()
}

/// FNV-1a over the sources' paths and contents, the compiler and the kernel list.
fn fingerprint(files: &[PathBuf], cxx: &str, kernels: &[String]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |bytes: &[u8]| {
        for &b in bytes {
            h = (h ^ b as u64).wrapping_mul(0x0100_0000_01b3);
        }
    };
    for f in files {
        eat(f.to_string_lossy().as_bytes());
        eat(&std::fs::read(f).unwrap_or_default());
    }
    eat(cxx.as_bytes());
    eat(kernels.join(",").as_bytes());
    h
}

fn run(cmd: &mut Command) -> Result<(), String> {
    let out = cmd.output().map_err(|e| format!("cannot run {cmd:?}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("{cmd:?} failed:\n{}", String::from_utf8_lossy(&out.stderr)))
    }
}

/// Builds the stand-in (once per source tree), returning its directory. One build at a time in
/// a process: two tests of one binary would otherwise share (and remove) one temporary directory.
fn build() -> Result<PathBuf, String> {
    static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _only = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
    let files = sources(&root);
    let kernels = fatbin_kernels();
    if kernels.is_empty() {
        return Err("the embedded fatbin names no kernel".into());
    }
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("fakecuda-{:016x}", fingerprint(&files, &cxx, &kernels)));
    if dir.join("libnccl.so.2").is_file() {
        return Ok(dir);
    }
    let tmp = dir.with_extension(format!("tmp{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| format!("{}: {e}", tmp.display()))?;
    let mut cus: Vec<&PathBuf> = files.iter().filter(|p| p.extension().is_some_and(|x| x == "cu")).collect();
    cus.sort();
    let all: String = cus.iter().map(|p| format!("#include \"{}\"\n", p.display())).collect();
    let registry: String = kernels.iter().map(|k| format!("FAKECUDA_KERNEL({k})\n")).collect();
    std::fs::write(tmp.join("all_kernels.inc"), all).map_err(|e| e.to_string())?;
    std::fs::write(tmp.join("registry.inc"), registry).map_err(|e| e.to_string())?;
    let src = root.join("tests/host/fakecuda");
    let flags = |c: &mut Command| {
        c.args(["-std=c++17", "-O2", "-fPIC", "-pthread", "-Wall", "-Wno-unused-function"])
            .arg("-I")
            .arg(root.join("tests/host"))
            .arg("-I")
            .arg(&src)
            .arg("-I")
            .arg(root.join("kernels"))
            .arg("-I")
            .arg(&tmp);
    };
    let mut objs = Vec::new();
    for unit in ["driver", "kernels"] {
        let obj = tmp.join(format!("{unit}.o"));
        let mut c = Command::new(&cxx);
        flags(&mut c);
        run(c.arg("-c").arg(src.join(format!("{unit}.cpp"))).arg("-o").arg(&obj))?;
        objs.push(obj);
    }
    run(Command::new(&cxx).args(["-shared", "-pthread", "-Wl,-soname,libcuda.so"]).args(&objs).arg("-o").arg(tmp.join("libcuda.so")))?;
    for lib in ["cublas", "cufft"] {
        let mut c = Command::new(&cxx);
        flags(&mut c);
        run(c
            .arg("-shared")
            .arg(src.join(format!("{lib}.cpp")))
            .arg(format!("-Wl,-soname,lib{lib}.so"))
            .arg("-Wl,-rpath,$ORIGIN")
            .arg("-L")
            .arg(&tmp)
            .arg("-l:libcuda.so")
            .arg("-o")
            .arg(tmp.join(format!("lib{lib}.so"))))?;
    }
    // NCCL installs as libnccl.so.2: the stand-in's has that name too (fnokern makes it findable).
    let mut c = Command::new(&cxx);
    flags(&mut c);
    run(c
        .arg("-shared")
        .arg(src.join("nccl.cpp"))
        .arg("-Wl,-soname,libnccl.so.2")
        .arg("-Wl,-rpath,$ORIGIN")
        .arg("-L")
        .arg(&tmp)
        .arg("-l:libcuda.so")
        .arg("-o")
        .arg(tmp.join("libnccl.so.2")))?;
    // Another test process may have finished the same build meanwhile; either copy will do.
    if std::fs::rename(&tmp, &dir).is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    // Builds of older sources are of no further use.
    if let Ok(rd) = std::fs::read_dir(dir.parent().unwrap_or(&dir)) {
        for e in rd.flatten() {
            let p = e.path();
            let stale = p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("fakecuda-") && !n.contains(".tmp"));
            if stale && p != dir {
                let _ = std::fs::remove_dir_all(&p);
            }
        }
    }
    if dir.join("libnccl.so.2").is_file() {
        Ok(dir)
    } else {
        Err(format!("the build left no {}", dir.join("libnccl.so.2").display()))
    }
}

/// Builds the stand-in and loads its three libraries (libcuda first: the others need it).
fn load() -> Result<Standin, String> {
    let dir = build()?;
    let mut libs = Vec::new();
    for lib in ["libcuda.so", "libcublas.so", "libcufft.so"] {
        // SAFETY: our own test libraries; their only initialiser installs the stand-in's fault
        // handler, which passes faults outside its kernels on to the previous handler.
        libs.push(unsafe { Library::new(dir.join(lib)) }.map_err(|e| format!("loading {lib}: {e}"))?);
    }
    Ok(Standin { dir, libs })
}

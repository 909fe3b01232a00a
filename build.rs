//! Compiles every `kernels/*.cu` and `kernels/dev/*.cu` with nvcc into one fatbin embedded in the
//! binary (SASS for sm_80 and sm_90, PTX for compute_80).
//!
//! nvcc is looked for in `NVCC`, `CUDA_HOME`/`CUDA_PATH`, `PATH`, then the project-local toolchain
//! under `.cuda/` (installed by `scripts/install-nvcc.sh`). Without nvcc the build is CPU-only and
//! says so in one warning; `FNOKERN_REQUIRE_KERNELS=1` turns that into an error.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

#[path = "build/kernel_api.rs"]
mod kernel_api;

const TARGETS: &[&str] = &["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90", "-gencode=arch=compute_80,code=compute_80"];

fn main() {
    mpi_rpath();
    println!("cargo::rustc-check-cfg=cfg(fnokern_kernels)");
    println!("cargo::rerun-if-changed=kernels");
    println!("cargo::rerun-if-changed=build");
    for v in ["NVCC", "CUDA_HOME", "CUDA_PATH", "FNOKERN_REQUIRE_KERNELS", "PATH"] {
        println!("cargo::rerun-if-env-changed={v}");
    }
    let require = env::var("FNOKERN_REQUIRE_KERNELS").is_ok_and(|v| v == "1");
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    // kernels/*.cu are the ones training launches; kernels/dev/*.cu are variants and kernels that
    // wait for their caller (benchmarked and tested beside the others). All go into one fatbin.
    let mut sources: Vec<PathBuf> = ["kernels", "kernels/dev"]
        .iter()
        .flat_map(|dir| std::fs::read_dir(manifest.join(dir)).map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect::<Vec<_>>()).unwrap_or_default())
        .collect();
    sources.retain(|p| p.extension().is_some_and(|e| e == "cu"));
    sources.sort();
    // The typed launchers and parameter structs, from the sources themselves (with or without nvcc).
    let out = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    if let Err(e) = generate_api(&manifest, &sources, &out.join("kernels.rs")) {
        panic!("the kernels' Rust API cannot be generated: {e}");
    }
    if sources.is_empty() {
        if require {
            panic!("FNOKERN_REQUIRE_KERNELS=1 but kernels/ holds no .cu file");
        }
        return;
    }
    let Some(nvcc) = find_nvcc(&manifest) else {
        if require {
            panic!("FNOKERN_REQUIRE_KERNELS=1 but no nvcc was found (NVCC, CUDA_HOME, CUDA_PATH, PATH, .cuda/); run scripts/install-nvcc.sh");
        }
        println!("cargo::warning=nvcc not found: building fnokern CPU-only (set NVCC or run scripts/install-nvcc.sh for the CUDA kernels)");
        return;
    };
    let fatbin = out.join("kernels.fatbin");
    // One translation unit that includes every kernel file: one fatbin, no device linking.
    let unit = out.join("all_kernels.cu");
    let includes: String = sources.iter().map(|s| format!("#include \"{}\"\n", s.display())).collect();
    std::fs::write(&unit, includes).unwrap_or_else(|e| panic!("cannot write {}: {e}", unit.display()));
    let mut cmd = Command::new(&nvcc);
    cmd.arg("--fatbin").arg("-O3").arg("-std=c++17").args(TARGETS);
    if let Some(cccl) = cccl_include(&nvcc) {
        cmd.arg("-I").arg(cccl);
    }
    cmd.arg("-I").arg(manifest.join("kernels")).arg("-o").arg(&fatbin).arg(&unit);
    let status = cmd.status().unwrap_or_else(|e| panic!("cannot run {}: {e}", nvcc.display()));
    if !status.success() {
        panic!("nvcc failed compiling the kernels ({status})");
    }
    let version = Command::new(&nvcc)
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.lines().find(|l| l.contains("release")).map(str::to_owned))
        .unwrap_or_else(|| "unknown".into());
    println!("cargo::rustc-cfg=fnokern_kernels");
    println!("cargo::rustc-env=FNOKERN_KERNELS=1");
    println!("cargo::rustc-env=FNOKERN_NVCC_VERSION={version}");
    println!("cargo::rustc-env=FNOKERN_CUDA_TARGETS=sm_80 sm_90 (SASS), compute_80 (PTX)");
}

/// The text of `file` with its local includes (`#include "..."`, resolved next to it) before it:
/// the macros a kernel file uses may be defined in a header.
fn with_includes(file: &Path, seen: &mut Vec<PathBuf>) -> Result<String, String> {
    let src = std::fs::read_to_string(file).map_err(|e| format!("{}: {e}", file.display()))?;
    let mut text = String::new();
    for line in src.lines() {
        if let Some(rest) = line.trim_start().strip_prefix("#include \"") {
            let name = rest.split('"').next().unwrap_or_default();
            let inc = file.parent().unwrap_or(Path::new(".")).join(name);
            let canon = inc.canonicalize().unwrap_or(inc.clone());
            if !seen.contains(&canon) {
                seen.push(canon);
                text.push_str(&with_includes(&inc, seen)?);
            }
        }
    }
    text.push_str(&src);
    Ok(text)
}

fn generate_api(manifest: &Path, sources: &[PathBuf], out: &Path) -> Result<(), String> {
    let params = manifest.join("kernels/params.cuh");
    let params_src = std::fs::read_to_string(&params).map_err(|e| format!("{}: {e}", params.display()))?;
    let structs = kernel_api::structs_of(&params_src)?;
    kernel_api::check_size_asserts(&params_src, &structs)?;
    let mut kernels = Vec::new();
    for s in sources {
        let rel = s.strip_prefix(manifest).unwrap_or(s).display().to_string();
        kernels.extend(kernel_api::kernels_of(&rel, &with_includes(s, &mut Vec::new())?)?);
    }
    kernels.sort_by(|a, b| a.name.cmp(&b.name));
    if let Some(w) = kernels.windows(2).find(|w| w[0].name == w[1].name) {
        return Err(format!("kernel `{}` is defined twice ({} and {})", w[0].name, w[0].file, w[1].file));
    }
    std::fs::write(out, kernel_api::generate(&structs, &kernels)?).map_err(|e| format!("{}: {e}", out.display()))
}

/// With `--features mpi`: the MPI library's directory (from `mpicc -show`, the compiler wrapper that
/// rsmpi's build also asks) goes into the binaries' run path, so that `mpirun fnokern ...` finds
/// libmpi without LD_LIBRARY_PATH (PyPI's mpich wheel installs it outside the loader's paths).
fn mpi_rpath() {
    if env::var_os("CARGO_FEATURE_MPI").is_none() {
        return;
    }
    println!("cargo::rerun-if-env-changed=MPICC");
    let mpicc = env::var("MPICC").unwrap_or_else(|_| "mpicc".into());
    let Ok(out) = Command::new(&mpicc).arg("-show").output() else {
        println!("cargo::warning=--features mpi: `{mpicc} -show` did not run; libmpi must be on the loader's path (LD_LIBRARY_PATH)");
        return;
    };
    let shown = String::from_utf8_lossy(&out.stdout);
    for dir in shown.split_whitespace().filter_map(|w| w.strip_prefix("-L")) {
        println!("cargo::rustc-link-arg=-Wl,-rpath,{dir}");
    }
}

fn find_nvcc(manifest: &Path) -> Option<PathBuf> {
    let exe = |p: PathBuf| p.is_file().then_some(p);
    if let Some(p) = env::var_os("NVCC").map(PathBuf::from).and_then(exe) {
        return Some(p);
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(p) = env::var_os(var).map(|h| PathBuf::from(h).join("bin/nvcc")).and_then(exe) {
            return Some(p);
        }
    }
    if let Some(path) = env::var_os("PATH") {
        if let Some(p) = env::split_paths(&path).map(|d| d.join("nvcc")).find_map(exe) {
            return Some(p);
        }
    }
    exe(manifest.join(".cuda/nvidia/cu13/bin/nvcc"))
}

/// The PyPI toolchain keeps `<nv/target>` under include/cccl.
fn cccl_include(nvcc: &Path) -> Option<PathBuf> {
    let dir = nvcc.parent()?.parent()?.join("include/cccl");
    dir.is_dir().then_some(dir)
}

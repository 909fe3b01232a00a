//! Every launch matches its kernel. build.rs generates one typed launcher per kernel from its C
//! signature (`backend::kernels`), so a wrong type, a missing or an extra argument does not
//! compile; what types cannot catch is two arguments of one type passed in each other's place.
//! This test reads every call of a generated launcher in src/backend/ and checks that its
//! arguments are the kernel's parameter names, in the kernel's order (after the GPU and the launch
//! configuration), so the launchers name their values as the kernels do and a swap fails here.
//! It also checks that nothing launches a kernel any other way.

use std::path::{Path, PathBuf};

use fnokern::backend::kernels::SIGNATURES;

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The arguments of the call whose opening parenthesis is at `open`, split at top-level commas.
fn call_args(src: &str, open: usize) -> Vec<String> {
    let (mut depth, mut cur, mut args) = (0i32, String::new(), Vec::new());
    for c in src[open..].chars() {
        match c {
            '(' | '[' | '{' => {
                depth += 1;
                if depth == 1 {
                    continue;
                }
            }
            ')' | ']' | '}' => {
                depth -= 1;
                if depth == 0 {
                    args.push(cur.trim().to_string());
                    return args;
                }
            }
            ',' if depth == 1 => {
                args.push(cur.trim().to_string());
                cur.clear();
                continue;
            }
            _ => {}
        }
        cur.push(c);
    }
    args
}

/// An argument as the name it passes: `&mut y`, `&y` and `y` are all `y`.
fn name_of(arg: &str) -> &str {
    arg.trim_start_matches('&').trim_start_matches("mut ").trim()
}

#[test]
fn every_launch_passes_the_kernels_parameters_in_order() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src/backend");
    let mut files = Vec::new();
    rust_files(&root, &mut files);
    let mut calls = 0;
    let mut problems = Vec::new();
    let mut launched = std::collections::BTreeSet::new();
    for f in &files {
        let src = std::fs::read_to_string(f).unwrap();
        let rel = f.strip_prefix(root.parent().unwrap()).unwrap().display().to_string();
        if !rel.ends_with("kernels.rs") && !rel.ends_with("gpu.rs") && src.contains("launch_builder(") {
            problems.push(format!("{rel}: launches a kernel through launch_builder instead of its generated launcher"));
        }
        let mut from = 0;
        while let Some(i) = src[from..].find("kernels::").map(|i| i + from) {
            from = i + "kernels::".len();
            let name_end = src[from..].find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).map_or(src.len(), |e| e + from);
            let name = &src[from..name_end];
            if !src[name_end..].starts_with('(') {
                continue; // a path such as kernels::{self, PlaneGeom}
            }
            let Some((_, params)) = SIGNATURES.iter().find(|(k, _)| *k == name) else {
                problems.push(format!("{rel}: `{name}` is not a kernel"));
                continue;
            };
            calls += 1;
            launched.insert(name.to_string());
            let line = src[..i].lines().count();
            let args = call_args(&src, name_end);
            let names: Vec<&str> = args.iter().skip(2).map(|a| name_of(a)).collect();
            if names != *params {
                problems.push(format!("{rel}:{line}: {name} gets ({}) but its parameters are ({})", names.join(", "), params.join(", ")));
            }
        }
    }
    for (k, _) in SIGNATURES {
        if !launched.contains(*k) {
            problems.push(format!("`{k}` is never launched (delete it, or move it to kernels/dev/ with a caller)"));
        }
    }
    assert!(problems.is_empty(), "{} of {calls} launches do not match their kernels:\n{}", problems.len(), problems.join("\n"));
    assert!(calls >= SIGNATURES.len(), "found only {calls} launches of {} kernels", SIGNATURES.len());
}

/// The `pub(super)` / `pub(crate)` functions a file defines.
fn twins_of(path: &Path) -> std::collections::BTreeSet<String> {
    let src = std::fs::read_to_string(path).unwrap_or_default();
    src.lines()
        .filter_map(|l| l.trim_start().strip_prefix("pub(super) fn ").or_else(|| l.trim_start().strip_prefix("pub(crate) fn ")))
        .map(|rest| rest.split(|c: char| !(c.is_alphanumeric() || c == '_')).next().unwrap_or_default().to_string())
        .collect()
}

/// An op's CPU reference and its GPU launcher keep one name in their family's folder
/// (`<family>/cpu.rs` and `<family>/cuda.rs`), so that the one is found from the other; the GPU
/// side's helpers that other families call (the GEMM, the partial sums) and the steps of GPU-only
/// fusions (the C2R of a spectrum the mode mix made ready, and that glue's geometry) are the only
/// extras.
#[test]
fn cpu_and_cuda_twins_keep_one_name() {
    const GPU_HELPERS: [&str; 4] = ["gemm_rm", "channel_sum_partials", "c2r_ready", "ready_geom"];
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src/backend");
    let mut problems = Vec::new();
    let mut families = 0;
    for e in std::fs::read_dir(&root).unwrap().flatten() {
        let (cpu, cuda) = (e.path().join("cpu.rs"), e.path().join("cuda.rs"));
        if !cpu.is_file() || !cuda.is_file() {
            continue;
        }
        families += 1;
        let (a, b) = (twins_of(&cpu), twins_of(&cuda));
        let family = e.file_name().to_string_lossy().into_owned();
        for f in a.difference(&b) {
            problems.push(format!("{family}: cpu.rs has `{f}`, cuda.rs none of that name"));
        }
        for f in b.difference(&a).filter(|f| !GPU_HELPERS.contains(&f.as_str())) {
            problems.push(format!("{family}: cuda.rs has `{f}`, cpu.rs none of that name"));
        }
    }
    assert!(families >= 11, "found {families} op families");
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

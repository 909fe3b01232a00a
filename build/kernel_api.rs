//! The Rust side of the kernels, generated from their C source by build.rs, so that a launcher
//! cannot push arguments that differ from the kernel's signature:
//!
//! - `kernels/params.cuh`: each `struct` of plain fields becomes a `#[repr(C)]` Rust struct with the
//!   same fields in the same order, and the header's `static_assert(sizeof(S) == N)` must state the
//!   size the C layout rules give (checked here), which the Rust side asserts too.
//! - every `extern "C" __global__ void name(...)` of `kernels/*.cu` and `kernels/dev/*.cu` (after
//!   expanding the function-like macros the file defines) becomes an `unsafe fn name(gpu, cfg,
//!   args...)` with the kernel's parameter names and Rust types for its C types: `const T*` takes
//!   any readable device buffer of T, `T*` a writable one (`float2` buffers are f32 pairs; a buffer
//!   of a params.cuh struct holds that struct), scalars and structs by value. A wrong type or count does not compile; `SIGNATURES` lists the parameter
//!   names, against which tests/launches.rs checks that every call passes its arguments in order.

use std::collections::BTreeMap;
use std::fmt::Write as _;

/// A C parameter or field: its type as written (without `__restrict__`) and its name.
#[derive(Clone, Debug, PartialEq)]
pub struct Param {
    pub ty: String,
    pub name: String,
}

#[derive(Clone, Debug)]
pub struct Kernel {
    pub name: String,
    pub file: String,
    pub params: Vec<Param>,
}

#[derive(Clone, Debug)]
pub struct Struct {
    pub name: String,
    pub fields: Vec<Param>,
}

/// Removes comments and joins continued lines.
fn clean(src: &str) -> String {
    let mut out = String::new();
    let b = src.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'/' && i + 1 < b.len() && b[i + 1] == b'/' {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
        } else if b[i] == b'/' && i + 1 < b.len() && b[i + 1] == b'*' {
            i += 2;
            while i + 1 < b.len() && !(b[i] == b'*' && b[i + 1] == b'/') {
                i += 1;
            }
            i += 2;
        } else if b[i] == b'"' {
            // String literals (only `extern "C"` here) are kept as they are.
            let start = i;
            i += 1;
            while i < b.len() && b[i] != b'"' {
                i += 1;
            }
            i += 1;
            out.push_str(&src[start..i.min(b.len())]);
        } else {
            out.push(b[i] as char);
            i += 1;
        }
    }
    out.replace("\\\n", " ")
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// Splits `s` at the commas outside parentheses, trimmed.
fn split_args(s: &str) -> Vec<String> {
    let mut parts = Vec::new();
    let (mut depth, mut cur) = (0i32, String::new());
    for c in s.chars() {
        match c {
            '(' | '<' | '[' => depth += 1,
            ')' | '>' | ']' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(cur.trim().to_string());
                cur.clear();
                continue;
            }
            _ => {}
        }
        cur.push(c);
    }
    if !cur.trim().is_empty() {
        parts.push(cur.trim().to_string());
    }
    parts
}

/// The text between the parenthesis at `open` and its match, and the index after the match.
fn balanced(s: &str, open: usize) -> Option<(String, usize)> {
    let mut depth = 0;
    for (i, c) in s[open..].char_indices() {
        match c {
            '(' => depth += 1,
            ')' => {
                depth -= 1;
                if depth == 0 {
                    return Some((s[open + 1..open + i].to_string(), open + i + 1));
                }
            }
            _ => {}
        }
    }
    None
}

/// Expands the function-like macros a file defines (the only preprocessing its signatures need):
/// parameters are replaced token by token and `##` pastes.
fn expand_macros(src: &str) -> String {
    let mut macros: BTreeMap<String, (Vec<String>, String)> = BTreeMap::new();
    let mut body = String::new();
    for line in src.lines() {
        let t = line.trim_start();
        if let Some(def) = t.strip_prefix("#define") {
            let def = def.trim_start();
            let name_end = def.find(|c: char| !is_ident(c)).unwrap_or(def.len());
            let name = &def[..name_end];
            if def[name_end..].starts_with('(') {
                if let Some((params, after)) = balanced(def, name_end) {
                    let params = split_args(&params);
                    macros.insert(name.to_string(), (params, def[after..].trim().to_string()));
                }
            }
            continue;
        }
        body.push_str(line);
        body.push('\n');
    }
    let mut out = String::new();
    let mut rest = body.as_str();
    loop {
        // The earliest invocation of any of the macros.
        let next = macros
            .iter()
            .filter_map(|(name, m)| {
                let at = find_ident(rest, name)?;
                let open = rest[at + name.len()..].find('(')? + at + name.len();
                rest[at + name.len()..open].trim().is_empty().then_some((at, open, m))
            })
            .min_by_key(|(at, _, _)| *at);
        let Some((at, open, (params, text))) = next else { break };
        let Some((args, after)) = balanced(rest, open) else { break };
        out.push_str(&rest[..at]);
        out.push_str(&substitute(text, params, &split_args(&args)));
        rest = &rest[after..];
    }
    out.push_str(rest);
    out
}

/// The first place `name` stands as a whole identifier.
fn find_ident(s: &str, name: &str) -> Option<usize> {
    let mut from = 0;
    while let Some(i) = s[from..].find(name).map(|i| i + from) {
        let before = s[..i].chars().next_back().is_none_or(|c| !is_ident(c));
        let after = s[i + name.len()..].chars().next().is_none_or(|c| !is_ident(c));
        if before && after {
            return Some(i);
        }
        from = i + name.len();
    }
    None
}

fn substitute(text: &str, params: &[String], args: &[String]) -> String {
    let mut out = String::new();
    let mut word = String::new();
    let flush = |word: &mut String, out: &mut String| {
        match params.iter().position(|p| p == word) {
            Some(k) => out.push_str(args.get(k).map(String::as_str).unwrap_or("")),
            None => out.push_str(word),
        }
        word.clear();
    };
    for c in text.chars() {
        if is_ident(c) {
            word.push(c);
        } else {
            flush(&mut word, &mut out);
            out.push(c);
        }
    }
    flush(&mut word, &mut out);
    // Token pasting: `a ## b` -> `ab`.
    let mut s = out;
    while let Some(i) = s.find("##") {
        let left = s[..i].trim_end().len();
        let right = i + 2 + (s[i + 2..].len() - s[i + 2..].trim_start().len());
        s = format!("{}{}", &s[..left], &s[right..]);
    }
    s
}

fn param(text: &str) -> Result<Param, String> {
    let t = text.replace("__restrict__", " ").replace('*', " * ");
    let tokens: Vec<&str> = t.split_whitespace().collect();
    let (name, ty) = tokens.split_last().ok_or_else(|| format!("empty parameter in `{text}`"))?;
    if !name.chars().all(is_ident) {
        return Err(format!("cannot read the parameter `{text}`"));
    }
    Ok(Param { ty: ty.join(" ").replace(" *", "*"), name: name.to_string() })
}

/// Every `extern "C" __global__ void` kernel of one file.
pub fn kernels_of(file: &str, src: &str) -> Result<Vec<Kernel>, String> {
    let text = expand_macros(&clean(src));
    let key = "__global__";
    let mut out = Vec::new();
    let mut from = 0;
    while let Some(i) = text[from..].find(key).map(|i| i + from) {
        from = i + key.len();
        let before = text[..i].trim_end();
        if !before.ends_with("extern \"C\"") {
            continue;
        }
        let rest = text[from..].trim_start();
        let Some(rest) = rest.strip_prefix("void") else { return Err(format!("{file}: a kernel must return void")) };
        let rest = rest.trim_start();
        let name_end = rest.find(|c: char| !is_ident(c)).unwrap_or(rest.len());
        let name = rest[..name_end].to_string();
        let open = rest.find('(').ok_or_else(|| format!("{file}: `{name}` has no parameter list"))?;
        let (params, _) = balanced(rest, open).ok_or_else(|| format!("{file}: `{name}`'s parameters do not close"))?;
        let params = split_args(&params).iter().map(|p| param(p)).collect::<Result<Vec<_>, _>>().map_err(|e| format!("{file}: {name}: {e}"))?;
        out.push(Kernel { name, file: file.to_string(), params });
    }
    Ok(out)
}

/// The structs of params.cuh, each with the size its `static_assert` must state.
pub fn structs_of(src: &str) -> Result<Vec<Struct>, String> {
    let text = clean(src);
    let mut out = Vec::new();
    let mut from = 0;
    while let Some(i) = find_ident(&text[from..], "struct").map(|i| i + from) {
        from = i + "struct".len();
        let rest = &text[from..];
        let open = rest.find('{').ok_or("a struct without a body")?;
        let name = rest[..open].trim().to_string();
        let close = rest.find('}').ok_or("a struct body that does not close")?;
        let mut fields = Vec::new();
        for decl in rest[open + 1..close].split(';').map(str::trim).filter(|d| !d.is_empty()) {
            let (ty, names) = decl.split_once(char::is_whitespace).ok_or_else(|| format!("{name}: cannot read `{decl}`"))?;
            for n in names.split(',') {
                fields.push(Param { ty: ty.trim().to_string(), name: n.trim().to_string() });
            }
        }
        out.push(Struct { name, fields });
        from += close;
    }
    Ok(out)
}

/// (size, alignment) of a scalar C type.
fn scalar(ty: &str) -> Option<(usize, usize, &'static str)> {
    Some(match ty {
        "int" => (4, 4, "i32"),
        "unsigned" => (4, 4, "u32"),
        "float" => (4, 4, "f32"),
        "int64_t" => (8, 8, "i64"),
        "uint64_t" => (8, 8, "u64"),
        "double" => (8, 8, "f64"),
        _ => return None,
    })
}

/// The size of a struct of scalar fields under the C layout rules.
pub fn struct_size(s: &Struct) -> Result<usize, String> {
    let (mut at, mut align) = (0usize, 1usize);
    for f in &s.fields {
        let (size, a, _) = scalar(&f.ty).ok_or_else(|| format!("{}: field `{}` has a type the generator does not know: {}", s.name, f.name, f.ty))?;
        at = at.div_ceil(a) * a + size;
        align = align.max(a);
    }
    Ok(at.div_ceil(align) * align)
}

/// The Rust element type of a device buffer of C type `t` (a struct of params.cuh is its own).
fn element(t: &str, structs: &[Struct]) -> Option<String> {
    Some(match t {
        "float" | "float2" => "f32".into(),
        "int" => "i32".into(),
        "__half" => "half::f16".into(),
        "__nv_bfloat16" => "half::bf16".into(),
        s if structs.iter().any(|x| x.name == s) => s.into(),
        _ => return None,
    })
}

/// The Rust type of a kernel parameter, and how it is pushed.
fn rust_param(p: &Param, structs: &[Struct]) -> Result<(String, String), String> {
    if let Some(base) = p.ty.strip_suffix('*') {
        let (constant, base) = match base.trim().strip_prefix("const ") {
            Some(b) => (true, b.trim()),
            None => (false, base.trim()),
        };
        let e = element(base, structs).ok_or_else(|| format!("`{}`: no Rust buffer type for `{}`", p.name, p.ty))?;
        return Ok(if constant {
            (format!("&impl In<{e}>"), format!("{}.push_in(&mut lb_);", p.name))
        } else {
            (format!("&mut impl Out<{e}>"), format!("{}.push_out(&mut lb_);", p.name))
        });
    }
    if let Some((_, _, r)) = scalar(&p.ty) {
        return Ok((r.to_string(), format!("lb_.arg(&{});", p.name)));
    }
    if structs.iter().any(|s| s.name == p.ty) {
        return Ok((p.ty.clone(), format!("lb_.arg(&{});", p.name)));
    }
    Err(format!("`{}`: no Rust type for `{}`", p.name, p.ty))
}

/// The generated Rust: the parameter structs, the launchers and the signature table.
pub fn generate(structs: &[Struct], kernels: &[Kernel]) -> Result<String, String> {
    let mut out = String::from("// Generated by build.rs (build/kernel_api.rs) from kernels/params.cuh and the kernels' signatures.\n\n");
    for s in structs {
        let size = struct_size(s)?;
        writeln!(out, "/// `struct {}` of kernels/params.cuh.", s.name).ok();
        writeln!(out, "#[repr(C)]\n#[derive(Clone, Copy, Debug, PartialEq, Default)]\npub struct {} {{", s.name).ok();
        for f in &s.fields {
            writeln!(out, "    pub {}: {},", f.name, scalar(&f.ty).map(|x| x.2).unwrap_or("?")).ok();
        }
        writeln!(out, "}}\nconst _: () = assert!(std::mem::size_of::<{}>() == {size});", s.name).ok();
        writeln!(out, "// SAFETY: plain old data in C layout, as the kernels read it.\nunsafe impl cudarc::driver::DeviceRepr for {} {{}}\n", s.name).ok();
    }
    for k in kernels {
        let mut args = Vec::new();
        let mut pushes = Vec::new();
        for p in &k.params {
            let (ty, push) = rust_param(p, structs).map_err(|e| format!("{} ({}): {e}", k.name, k.file))?;
            args.push(format!("{}: {ty}", p.name));
            pushes.push(push);
        }
        let c_sig: Vec<String> = k.params.iter().map(|p| format!("{} {}", p.ty, p.name)).collect();
        writeln!(
            out,
            "/// `{}({})` of {}.\n///\n/// # Safety\n/// Every buffer holds what the kernel indexes for this launch.",
            k.name,
            c_sig.join(", "),
            k.file
        )
        .ok();
        writeln!(out, "#[allow(non_snake_case, clippy::too_many_arguments)]").ok();
        writeln!(out, "pub(crate) unsafe fn {}(gpu: &Gpu, cfg: LaunchConfig, {}) -> Result<()> {{", k.name, args.join(", ")).ok();
        writeln!(out, "    let kernel_fn_ = gpu.function(\"{}\")?;\n    let mut lb_ = gpu.stream.launch_builder(&kernel_fn_);", k.name).ok();
        for p in &pushes {
            writeln!(out, "    {p}").ok();
        }
        writeln!(out, "    // SAFETY: the arguments are the kernel's, in its order and of its types (generated from\n    // its signature); the caller's contract covers the buffers.\n    launched(\"{}\", unsafe {{ lb_.launch(cfg) }})\n}}\n", k.name).ok();
    }
    writeln!(out, "/// Every kernel and its parameter names, in order (what tests/launches.rs checks calls against).").ok();
    writeln!(out, "pub const SIGNATURES: &[(&str, &[&str])] = &[").ok();
    for k in kernels {
        let names: Vec<String> = k.params.iter().map(|p| format!("\"{}\"", p.name)).collect();
        writeln!(out, "    (\"{}\", &[{}]),", k.name, names.join(", ")).ok();
    }
    writeln!(out, "];").ok();
    Ok(out)
}

/// Checks that params.cuh asserts the size of each of its structs, with the right number.
pub fn check_size_asserts(src: &str, structs: &[Struct]) -> Result<(), String> {
    let text: String = clean(src).split_whitespace().collect();
    for s in structs {
        let size = struct_size(s)?;
        let want = format!("static_assert(sizeof({})=={size}", s.name);
        if !text.contains(&want) {
            return Err(format!("kernels/params.cuh must state `static_assert(sizeof({}) == {size}, ...)` (the C layout of its fields)", s.name));
        }
    }
    Ok(())
}

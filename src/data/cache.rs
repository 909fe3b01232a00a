//! The on-disk data cache: one directory per data config (its name hashes every field that
//! changes the data), holding the splits (NPZ archives) and `params.json`, written last, with
//! each split's fingerprint: its length and every array's name, size and CRC-32 as the archive's
//! directory records them (read without reading the data). A cache is used only when every split
//! matches its fingerprint and reads whole, each array checked against its CRC-32 as it is read:
//! a damaged, truncated or swapped file (or one copied in from another cache) is said and the
//! data are made again. Writers hold the directory's lock, so two processes that both find no cache
//! make it one after the other (the second reads the first's), and the temporary files of a
//! killed writer are removed by the next one.

use std::fs::File;
use std::path::Path;

use serde_json::{json, Value};

use crate::error::{Error, Result};
use crate::io::io_err;
use crate::train::run_dir::DirLock;

/// A split file's fingerprint: its length, and each array's name, size and CRC-32 from the
/// archive's central directory (the data itself is not read: reading it checks the CRC-32s).
fn fingerprint(path: &Path) -> Result<Value> {
    let file = File::open(path).map_err(io_err(path))?;
    let bytes = file.metadata().map_err(io_err(path))?.len();
    let mut arc = zip::ZipArchive::new(file).map_err(|e| crate::io::bad(path, format!("not an NPZ (zip) file: {e}")))?;
    let mut arrays = Vec::with_capacity(arc.len());
    for i in 0..arc.len() {
        let e = arc.by_index_raw(i).map_err(|e| crate::io::bad(path, format!("entry {i}: {e}")))?;
        arrays.push(json!([e.name(), e.size(), e.crc32()]));
    }
    Ok(json!({ "bytes": bytes, "arrays": arrays }))
}

/// `{"train.npz": <fingerprint>, ...}` for params.json.
fn fingerprints(dir: &Path, files: &[&str]) -> Result<Value> {
    files.iter().map(|name| Ok((name.to_string(), fingerprint(&dir.join(name))?))).collect::<Result<serde_json::Map<_, _>>>().map(Value::Object)
}

/// Why the cache in `dir` cannot be used, or its params.json when it can: every file in `files`
/// has the fingerprint that params.json lists (a cache written before fingerprints were kept
/// lists none; its files are still checked by their own archives' CRC-32 when read).
fn verified(dir: &Path, files: &[&str]) -> std::result::Result<Value, String> {
    let params_path = dir.join("params.json");
    let text = std::fs::read(&params_path).map_err(|e| format!("params.json: {e}"))?;
    let params: Value = serde_json::from_slice(&text).map_err(|e| format!("params.json is not JSON ({e})"))?;
    if let Some(listed) = params.get("fingerprints") {
        for name in files {
            let got = fingerprint(&dir.join(name)).map_err(|e| e.to_string())?;
            if listed.get(name) != Some(&got) {
                return Err(format!("{name} is not the file params.json lists ({} bytes, other arrays or CRC-32s)", got["bytes"]));
            }
        }
    }
    Ok(params)
}

/// The cached data in `dir` (read by `read` from params.json), or None when there is none yet
/// or it is damaged (said, when `tell`).
fn try_read<T>(dir: &Path, files: &[&str], read: &dyn Fn(&Value) -> Result<T>, tell: bool, say: &mut dyn FnMut(&str)) -> Option<T> {
    if !dir.join("params.json").is_file() {
        return None;
    }
    match verified(dir, files).and_then(|p| read(&p).map_err(|e| e.to_string())) {
        Ok(t) => Some(t),
        Err(why) => {
            if tell {
                say(&format!("warning: the data cache {} is damaged ({why}): making it again", dir.display()));
            }
            None
        }
    }
}

/// What makes a cache's data: given where to tell progress, it writes the files into the cache
/// directory and returns the data with the fields params.json keeps besides the sums.
pub(crate) type Make<'a, T> = &'a mut dyn FnMut(&mut dyn FnMut(&str)) -> Result<(T, Value)>;

/// The data of the cache `dir`: read (`read`, after the files are verified) when it is complete
/// and sound, else made by `make`, which writes `files` into `dir` (each atomically) and returns
/// the data with the fields params.json keeps besides the sums. `what` names the data for the
/// progress lines.
pub(crate) fn read_or_make<T>(
    dir: &Path,
    files: &[&str],
    what: &str,
    read: &dyn Fn(&Value) -> Result<T>,
    make: Make<T>,
    say: &mut dyn FnMut(&str),
) -> Result<T> {
    if dir.join("params.json").is_file() {
        say(&format!("reading the cached {what} {}", dir.display()));
    }
    if let Some(t) = try_read(dir, files, read, false, say) {
        return Ok(t);
    }
    // One writer at a time; another process may have made the cache while this one waited.
    let _lock = DirLock::wait(dir, "data cache")?;
    if let Some(t) = try_read(dir, files, read, true, say) {
        return Ok(t);
    }
    let stale = crate::io::remove_stale_temps(dir);
    if stale > 0 {
        say(&format!("removed {stale} temporary file(s) that a killed writer left in {}", dir.display()));
    }
    // A cache without params.json is incomplete: params.json goes first, so that a kill while
    // the splits are rewritten never leaves old sums beside new files.
    match std::fs::remove_file(dir.join("params.json")) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(Error::Io { path: dir.join("params.json").display().to_string(), source: e }),
        _ => {}
    }
    let (t, mut params) = make(say)?;
    params["fingerprints"] = fingerprints(dir, files)?;
    crate::io::write_atomic(&dir.join("params.json"), params.to_string().as_bytes())?;
    Ok(t)
}

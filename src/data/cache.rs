//! The on-disk data cache: one directory per data config (its name hashes every field that
//! changes the data), holding the splits and `params.json`, written last, with the size and
//! CRC-32 of every split file. A cache is used only when every file matches its entry: a
//! damaged, truncated or swapped file (or one copied in from another cache) is said and the data
//! are made again. Writers hold the directory's lock, so two processes that both find no cache
//! make it one after the other (the second reads the first's), and the temporary files of a
//! killed writer are removed by the next one.

use std::fs::File;
use std::io::Read;
use std::path::Path;

use serde_json::{json, Value};

use crate::error::{Error, Result};
use crate::io::io_err;
use crate::train::run_dir::DirLock;

/// The size and CRC-32 of a file, read in 1 MiB pieces.
fn sum_of(path: &Path) -> Result<(u64, u32)> {
    let mut f = File::open(path).map_err(io_err(path))?;
    let (mut h, mut buf, mut len) = (crc32fast::Hasher::new(), vec![0u8; 1 << 20], 0u64);
    loop {
        let k = f.read(&mut buf).map_err(io_err(path))?;
        if k == 0 {
            return Ok((len, h.finalize()));
        }
        h.update(&buf[..k]);
        len += k as u64;
    }
}

/// `{"train.npz": {"bytes": .., "crc32": ..}, ...}` for params.json.
pub(crate) fn sums(dir: &Path, files: &[&str]) -> Result<Value> {
    let mut out = serde_json::Map::new();
    for name in files {
        let (bytes, crc) = sum_of(&dir.join(name))?;
        out.insert(name.to_string(), json!({ "bytes": bytes, "crc32": crc }));
    }
    Ok(Value::Object(out))
}

/// Why the cache in `dir` cannot be used, or its params.json when it can: every file in `files`
/// has the size and CRC-32 that params.json lists (a cache written before the sums were kept
/// lists none; its files are still checked by their own archives' CRC-32 when read).
fn verified(dir: &Path, files: &[&str]) -> std::result::Result<Value, String> {
    let params_path = dir.join("params.json");
    let text = std::fs::read(&params_path).map_err(|e| format!("params.json: {e}"))?;
    let params: Value = serde_json::from_slice(&text).map_err(|e| format!("params.json is not JSON ({e})"))?;
    if let Some(listed) = params.get("files") {
        for name in files {
            let want = (listed[name]["bytes"].as_u64(), listed[name]["crc32"].as_u64());
            let got = sum_of(&dir.join(name)).map_err(|e| e.to_string())?;
            if want != (Some(got.0), Some(got.1 as u64)) {
                return Err(format!("{name} is not the file params.json lists ({} bytes, CRC-32 {:08x})", got.0, got.1));
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
    params["files"] = sums(dir, files)?;
    crate::io::write_atomic(&dir.join("params.json"), params.to_string().as_bytes())?;
    Ok(t)
}

//! The run directory's files besides checkpoints: its lock, what killed writers left behind, and
//! metrics.jsonl.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::config::Config;
use crate::error::{Error, Result};
use crate::io::io_err;

/// A directory held by this process: its `.lock` file is locked (released when this drops or the
/// process dies, however it dies), so two runs never write one directory.
pub struct DirLock {
    _file: File,
}

/// Creates `dir` with its `.lock` file (`what` names the directory's role in the error), and
/// returns that file, opened but not locked, with its path.
fn lock_file(dir: &Path, what: &str) -> Result<(File, PathBuf)> {
    fs::create_dir_all(dir).map_err(|source| Error::Io { path: format!("cannot create the {what} directory {}", dir.display()), source })?;
    let path = dir.join(".lock");
    let file = OpenOptions::new().create(true).truncate(false).write(true).open(&path).map_err(io_err(&path))?;
    Ok((file, path))
}

impl DirLock {
    /// Creates `dir` and takes its lock; `what` names the directory's role in the error.
    pub fn take(dir: &Path, what: &str) -> Result<DirLock> {
        let (file, path) = lock_file(dir, what)?;
        match file.try_lock() {
            Ok(()) => Ok(DirLock { _file: file }),
            Err(std::fs::TryLockError::WouldBlock) => Err(Error::invalid(
                "train",
                format!("{} is in use by another fnokern process (it holds {}): wait for it to end, or stop it", dir.display(), path.display()),
            )),
            Err(std::fs::TryLockError::Error(source)) => Err(Error::Io { path: path.display().to_string(), source }),
        }
    }

    /// Creates `dir` and takes its lock, waiting while another process holds it.
    pub fn wait(dir: &Path, what: &str) -> Result<DirLock> {
        let (file, path) = lock_file(dir, what)?;
        file.lock().map_err(io_err(&path))?;
        Ok(DirLock { _file: file })
    }
}

/// The first line of a run's config.toml when the run started from a preset (or a named config).
const PRESET_LINE: &str = "# fnokern run config; preset: ";

/// The text of a run's config.toml: the resolved config, after a comment naming the preset it
/// started from (which a resume by the directory alone reads back with [`preset_of`]).
pub fn config_file(config_toml: &str, preset: Option<&str>) -> String {
    match preset {
        Some(p) => format!("{PRESET_LINE}{}\n{config_toml}", p.replace('\n', " ")),
        None => config_toml.to_string(),
    }
}

/// The preset the run in `dir` started from, as its config.toml names it.
pub fn preset_of(dir: &Path) -> Option<String> {
    let text = fs::read_to_string(dir.join("config.toml")).ok()?;
    text.lines().next().and_then(|l| l.strip_prefix(PRESET_LINE)).map(str::to_string).or_else(|| {
        // A run written before config.toml named its preset: its summary, if it has one.
        let s: super::Summary = serde_json::from_slice(&fs::read(dir.join("summary.json")).ok()?).ok()?;
        s.preset
    })
}

/// Refuses a directory that exists, holds something, and is not an fnokern run or sweep (every
/// one holds the `.lock` its first writer created before anything else): fnokern writes there
/// only what it will own, and removes temporary files only where it holds the lock.
pub fn refuse_foreign(dir: &Path) -> Result<()> {
    let Ok(mut entries) = fs::read_dir(dir) else { return Ok(()) };
    if entries.next().is_some() && !dir.join(".lock").is_file() {
        return Err(Error::invalid(
            "out",
            format!("{} already holds files that fnokern did not write (it is not a run or sweep directory): choose a new or empty --out", dir.display()),
        ));
    }
    Ok(())
}

/// Creates `dir` as fnokern's (with its `.lock` file, not held) for a caller that writes there
/// before [`crate::train::train`] takes the lock (a sweep's train.log).
pub fn claim(dir: &Path) -> Result<()> {
    lock_file(dir, "run").map(drop)
}

/// metrics.jsonl, appended one whole line per write call; synced to disk at epoch ends.
pub struct MetricsLog {
    file: File,
    path: PathBuf,
}

impl MetricsLog {
    pub fn open(path: &Path) -> Result<MetricsLog> {
        let file = OpenOptions::new().create(true).append(true).open(path).map_err(io_err(path))?;
        Ok(MetricsLog { file, path: path.to_path_buf() })
    }

    pub fn write(&mut self, v: &serde_json::Value) -> Result<()> {
        let mut line = v.to_string();
        line.push('\n');
        self.file.write_all(line.as_bytes()).map_err(io_err(&self.path))
    }

    /// Makes what was written durable (an epoch's end, before its checkpoint).
    pub fn sync(&mut self) -> Result<()> {
        self.file.sync_data().map_err(io_err(&self.path))
    }
}

/// Keeps the records of metrics.jsonl up to `steps` micro-batches and `epochs` epochs (a resumed
/// run drops what the killed one logged after its checkpoint). Lines that are not UTF-8 JSON (a
/// torn last line, a damaged byte) are dropped and counted. Kept lines are written back verbatim:
/// a float re-printed after parsing may differ in its last digit.
pub fn truncate_metrics(path: &Path, steps: u64, epochs: usize) -> Result<(Vec<serde_json::Value>, usize)> {
    let (mut kept, mut dropped, mut text) = (Vec::new(), 0, String::new());
    let bytes = match fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(source) => return Err(Error::Io { path: path.display().to_string(), source }),
    };
    for raw in bytes.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
        let parsed = std::str::from_utf8(raw).ok().and_then(|line| Some((line, serde_json::from_str::<serde_json::Value>(line).ok()?)));
        let Some((line, v)) = parsed else {
            dropped += 1;
            continue;
        };
        let keep = match v["kind"].as_str() {
            Some("step") => v["step"].as_u64().is_some_and(|s| s < steps),
            Some("epoch") => v["epoch"].as_u64().is_some_and(|e| (e as usize) < epochs),
            _ => false,
        };
        if keep {
            text.push_str(line);
            text.push('\n');
            kept.push(v);
        }
    }
    crate::io::write_atomic(path, text.as_bytes())?;
    Ok((kept, dropped))
}

/// The fields in which two configs differ, as `section.field (a vs b)`, for the error that
/// refuses a resume under another config.
pub fn config_diff(run: &Config, now: &Config) -> Vec<String> {
    let table = |c: &Config| toml::Table::try_from(c).unwrap_or_default();
    let (a, b) = (table(run), table(now));
    let mut out = Vec::new();
    for (section, av) in &a {
        let empty = toml::Table::new();
        let (at, bt) = (av.as_table().unwrap_or(&empty), b.get(section).and_then(|v| v.as_table()).unwrap_or(&empty));
        let keys: std::collections::BTreeSet<&String> = at.keys().chain(bt.keys()).collect();
        for k in keys {
            let (x, y) = (at.get(k), bt.get(k));
            if x != y {
                let show = |v: Option<&toml::Value>| v.map_or("unset".to_string(), |v| v.to_string());
                out.push(format!("{section}.{k} ({} in the run, {} now)", show(x), show(y)));
            }
        }
    }
    out
}

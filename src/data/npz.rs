//! The reference NPZ layout: `diffraction` (n, N, N) f32 amplitudes, `Y_I` (n, N, N) illuminated
//! amplitudes, `Y_phi` (n, N, N) phases, `probeGuess` (N, N) complex64, `YY_ground_truth` (S, S)
//! complex64 object. fnokern also writes `xcoords`/`ycoords` (n,) f64 patch centres in the object
//! and `object_index` (n,) i64; files without them load, but cannot be stitched. A trailing
//! channel axis of 1 (n, N, N, 1) is accepted; f64 arrays are accepted and rounded to f32.

use std::fs::File;
use std::io::{BufReader, Read, Seek};
use std::path::Path;

use npyz::npz::{NpzArchive, NpzWriter};
use npyz::WriterBuilder;
use rustfft::num_complex::Complex;

use crate::error::{Error, Result};

/// One split as stored in an NPZ file.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct NpzSplit {
    pub n: usize,
    pub diffraction: Vec<f32>,
    pub y_i: Vec<f32>,
    pub y_phi: Vec<f32>,
    /// [N * N] (re, im).
    pub probe: Vec<[f32; 2]>,
    /// The object (S x S, (re, im)) the patches were cut from, if stored.
    pub ground_truth: Option<(usize, Vec<[f32; 2]>)>,
    /// (row, column) patch centres in the object, if stored.
    pub centres: Option<Vec<(f64, f64)>>,
    pub object_index: Option<Vec<i64>>,
}

impl NpzSplit {
    pub fn len(&self) -> usize {
        if self.n == 0 {
            0
        } else {
            self.diffraction.len() / (self.n * self.n)
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn bad(path: &Path, why: impl Into<String>) -> Error {
    Error::BadFile { path: path.display().to_string(), why: why.into() }
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> Error + '_ {
    move |source| Error::Io { path: path.display().to_string(), source }
}

/// An array's shape and values, if the archive has it.
type Array<T> = Option<(Vec<u64>, Vec<T>)>;

/// Reads a real array as f32 (from f32 or f64), with its shape.
fn read_real<R: Read + Seek>(arc: &mut NpzArchive<R>, path: &Path, key: &str) -> Result<Array<f32>> {
    let Some(npy) = arc.by_name(key).map_err(io(path))? else {
        return Ok(None);
    };
    let shape = npy.shape().to_vec();
    let v = match npy.into_vec::<f32>() {
        Ok(v) => v,
        Err(_) => {
            let npy = arc.by_name(key).map_err(io(path))?.ok_or_else(|| bad(path, format!("`{key}` vanished")))?;
            npy.into_vec::<f64>().map_err(|e| bad(path, format!("`{key}` is not a float32 or float64 array: {e}")))?.into_iter().map(|x| x as f32).collect()
        }
    };
    Ok(Some((shape, v)))
}

fn read_complex<R: Read + Seek>(arc: &mut NpzArchive<R>, path: &Path, key: &str) -> Result<Array<[f32; 2]>> {
    let Some(npy) = arc.by_name(key).map_err(io(path))? else {
        return Ok(None);
    };
    let shape = npy.shape().to_vec();
    let v: Vec<[f32; 2]> = match npy.into_vec::<Complex<f32>>() {
        Ok(v) => v.into_iter().map(|z| [z.re, z.im]).collect(),
        Err(_) => {
            let npy = arc.by_name(key).map_err(io(path))?.ok_or_else(|| bad(path, format!("`{key}` vanished")))?;
            npy.into_vec::<Complex<f64>>()
                .map_err(|e| bad(path, format!("`{key}` is not a complex64 or complex128 array: {e}")))?
                .into_iter()
                .map(|z| [z.re as f32, z.im as f32])
                .collect()
        }
    };
    Ok(Some((shape, v)))
}

/// (n, N) of a patch stack shaped (n, N, N) or (n, N, N, 1).
fn stack_dims(path: &Path, key: &str, shape: &[u64]) -> Result<(usize, usize)> {
    match shape {
        [n, a, b] | [n, a, b, 1] if a == b && *a > 0 => Ok((*n as usize, *a as usize)),
        _ => Err(bad(path, format!("`{key}` has shape {shape:?}; expected (n, N, N) or (n, N, N, 1)"))),
    }
}

/// Loads one split in the reference layout.
pub fn load(path: &Path) -> Result<NpzSplit> {
    let file = File::open(path).map_err(io(path))?;
    let mut arc = NpzArchive::new(BufReader::new(file)).map_err(|e| bad(path, format!("not an NPZ (zip) file: {e}")))?;
    let need = |v: Array<f32>, key: &str| v.ok_or_else(|| bad(path, format!("array `{key}` is missing")));
    let (dshape, diffraction) = need(read_real(&mut arc, path, "diffraction")?, "diffraction")?;
    let (count, n) = stack_dims(path, "diffraction", &dshape)?;
    let (ishape, y_i) = need(read_real(&mut arc, path, "Y_I")?, "Y_I")?;
    let (pshape, y_phi) = need(read_real(&mut arc, path, "Y_phi")?, "Y_phi")?;
    for (key, shape) in [("Y_I", &ishape), ("Y_phi", &pshape)] {
        if stack_dims(path, key, shape)? != (count, n) {
            return Err(bad(path, format!("`{key}` has shape {shape:?} but `diffraction` has {dshape:?}")));
        }
    }
    let (prshape, probe) = read_complex(&mut arc, path, "probeGuess")?.ok_or_else(|| bad(path, "array `probeGuess` is missing"))?;
    if prshape != [n as u64, n as u64] {
        return Err(bad(path, format!("`probeGuess` has shape {prshape:?}; expected ({n}, {n})")));
    }
    let ground_truth = match read_complex(&mut arc, path, "YY_ground_truth")? {
        None => None,
        Some((shape, v)) => match shape.as_slice() {
            [a, b] | [a, b, 1] if a == b => Some((*a as usize, v)),
            _ => return Err(bad(path, format!("`YY_ground_truth` has shape {shape:?}; expected (S, S)"))),
        },
    };
    let xs = read_real(&mut arc, path, "xcoords")?;
    let ys = read_real(&mut arc, path, "ycoords")?;
    let centres = match (xs, ys) {
        (Some((_, x)), Some((_, y))) if x.len() == count && y.len() == count => Some(y.iter().zip(&x).map(|(&r, &c)| (r as f64, c as f64)).collect::<Vec<_>>()),
        (Some(_), Some(_)) => return Err(bad(path, "`xcoords`/`ycoords` do not have one entry per pattern")),
        _ => None,
    };
    let object_index = match arc.by_name("object_index").map_err(io(path))? {
        Some(npy) => Some(npy.into_vec::<i64>().map_err(|e| bad(path, format!("`object_index`: {e}")))?),
        None => None,
    };
    let check = |v: &[f32], key: &str| {
        if v.iter().all(|x| x.is_finite()) {
            Ok(())
        } else {
            Err(bad(path, format!("`{key}` holds NaN or infinite values")))
        }
    };
    check(&diffraction, "diffraction")?;
    check(&y_i, "Y_I")?;
    check(&y_phi, "Y_phi")?;
    if count == 0 {
        return Err(bad(path, "the split holds no pattern"));
    }
    if !probe.iter().all(|z| z[0].is_finite() && z[1].is_finite()) {
        return Err(bad(path, "`probeGuess` holds NaN or infinite values"));
    }
    if let Some((side, gt)) = &ground_truth {
        if gt.len() != side * side {
            return Err(bad(path, format!("`YY_ground_truth` holds {} values, not {side} x {side}", gt.len())));
        }
    }
    if let Some(ix) = &object_index {
        if ix.len() != count {
            return Err(bad(path, format!("`object_index` has {} entries for {count} patterns", ix.len())));
        }
        if let Some(b) = ix.iter().find(|&&i| i < 0) {
            return Err(bad(path, format!("`object_index` holds {b}; object numbers start at 0")));
        }
    }
    if let (Some(c), Some((side, _))) = (&centres, &ground_truth) {
        let side = *side as f64;
        if let Some((i, p)) =
            c.iter().enumerate().find(|(_, p)| !(p.0.is_finite() && p.1.is_finite() && (0.0..side).contains(&p.0) && (0.0..side).contains(&p.1)))
        {
            return Err(bad(path, format!("patch {i}'s centre ({}, {}) is outside the {side} x {side} object", p.0, p.1)));
        }
    }
    Ok(NpzSplit { n, diffraction, y_i, y_phi, probe, ground_truth, centres, object_index })
}

/// np.savez's choice: no compression (deflating 300 MB of noisy floats costs far more than it saves).
fn stored() -> zip::write::FileOptions {
    // A fixed timestamp: the same data gives the same bytes (zip stamps the current time otherwise).
    zip::write::FileOptions::default().compression_method(zip::CompressionMethod::Stored).last_modified_time(zip::DateTime::default())
}

/// Writes one split in the reference layout (plus coordinates) to `path`, and syncs it.
pub fn save(path: &Path, s: &NpzSplit) -> Result<()> {
    let werr = |e: std::io::Error| Error::Io { path: path.display().to_string(), source: e };
    let mut w = NpzWriter::create(path).map_err(werr)?;
    let (count, n) = (s.len() as u64, s.n as u64);
    let real = |w: &mut NpzWriter<_>, key: &str, shape: &[u64], v: &[f32]| -> std::io::Result<()> {
        let mut a = w.array::<f32>(key, stored())?.default_dtype().shape(shape).begin_nd()?;
        a.extend(v.iter().copied())?;
        a.finish()
    };
    real(&mut w, "diffraction", &[count, n, n], &s.diffraction).map_err(werr)?;
    real(&mut w, "Y_I", &[count, n, n], &s.y_i).map_err(werr)?;
    real(&mut w, "Y_phi", &[count, n, n], &s.y_phi).map_err(werr)?;
    let complex = |w: &mut NpzWriter<_>, key: &str, side: u64, v: &[[f32; 2]]| -> std::io::Result<()> {
        let mut a = w.array::<Complex<f32>>(key, stored())?.default_dtype().shape(&[side, side]).begin_nd()?;
        a.extend(v.iter().map(|z| Complex::new(z[0], z[1])))?;
        a.finish()
    };
    complex(&mut w, "probeGuess", n, &s.probe).map_err(werr)?;
    if let Some((side, gt)) = &s.ground_truth {
        complex(&mut w, "YY_ground_truth", *side as u64, gt).map_err(werr)?;
    }
    if let Some(c) = &s.centres {
        let ys: Vec<f64> = c.iter().map(|p| p.0).collect();
        let xs: Vec<f64> = c.iter().map(|p| p.1).collect();
        for (key, v) in [("xcoords", xs), ("ycoords", ys)] {
            let mut a = w.array::<f64>(key, stored()).map_err(werr)?.default_dtype().shape(&[count]).begin_nd().map_err(werr)?;
            a.extend(v).map_err(werr)?;
            a.finish().map_err(werr)?;
        }
    }
    if let Some(idx) = &s.object_index {
        let mut a = w.array::<i64>("object_index", stored()).map_err(werr)?.default_dtype().shape(&[idx.len() as u64]).begin_nd().map_err(werr)?;
        a.extend(idx.iter().copied()).map_err(werr)?;
        a.finish().map_err(werr)?;
    }
    // Finish the archive explicitly (a drop would swallow errors) and make it durable.
    let buffered = w.zip_writer().finish().map_err(|e| werr(std::io::Error::other(e)))?;
    let file = buffered.into_inner().map_err(|e| werr(e.into_error()))?;
    file.sync_all().map_err(werr)?;
    Ok(())
}

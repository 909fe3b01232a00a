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
    /// Whether the split holds the per-pattern targets and the probe (a file loaded by
    /// [`load_inputs`] may hold only the diffraction).
    pub fn has_targets(&self) -> bool {
        !self.y_i.is_empty() && !self.y_phi.is_empty() && !self.probe.is_empty()
    }

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
type Found<T> = Option<(Vec<u64>, Vec<T>)>;

/// The .npy bytes of array `key`, read to their end so that the zip entry's CRC-32 is checked
/// (numpy refuses a file whose check fails, and so does fnokern); None when absent.
fn entry_bytes<R: Read + Seek>(arc: &mut NpzArchive<R>, path: &Path, key: &str) -> Result<Option<Vec<u8>>> {
    let name = npyz::npz::file_name_from_array_name(key);
    let mut entry = match arc.zip_archive().by_name(&name) {
        Ok(e) => e,
        Err(zip::result::ZipError::FileNotFound) => return Ok(None),
        Err(e) => return Err(bad(path, format!("`{key}` cannot be read: {e}"))),
    };
    let mut bytes = Vec::with_capacity(entry.size().min(1 << 32) as usize);
    entry.read_to_end(&mut bytes).map_err(|e| {
        if e.to_string().contains("checksum") {
            bad(path, format!("`{key}` is damaged: its bytes do not match the archive's CRC-32"))
        } else {
            bad(path, format!("`{key}` cannot be read: {e}"))
        }
    })?;
    Ok(Some(bytes))
}

/// `v`, stored in Fortran (column-major) order with `shape`, in C (row-major) order.
fn c_order<T: Copy>(shape: &[u64], v: Vec<T>) -> Vec<T> {
    if shape.len() < 2 || v.is_empty() {
        return v;
    }
    let dims: Vec<usize> = shape.iter().map(|&d| d as usize).collect();
    // Fortran strides: the first axis is contiguous.
    let mut fstride = vec![1usize; dims.len()];
    for j in 1..dims.len() {
        fstride[j] = fstride[j - 1] * dims[j - 1];
    }
    let (last, outer) = (dims.len() - 1, &dims[..dims.len() - 1]);
    let mut out = Vec::with_capacity(v.len());
    let mut index = vec![0usize; outer.len()];
    loop {
        let base: usize = index.iter().zip(&fstride).map(|(i, s)| i * s).sum();
        out.extend((0..dims[last]).map(|k| v[base + k * fstride[last]]));
        // The next C-order prefix (odometer over the outer axes, the last one fastest).
        let mut j = outer.len();
        loop {
            if j == 0 {
                return out;
            }
            j -= 1;
            index[j] += 1;
            if index[j] < outer[j] {
                break;
            }
            index[j] = 0;
        }
    }
}

/// Decodes array `key` from its .npy bytes as `T`, in C order whatever order it was stored in;
/// Err(None) when it does not hold `T`s (the caller tries another type).
fn decode<T: npyz::Deserialize + Copy>(bytes: &[u8], path: &Path, key: &str) -> std::result::Result<(Vec<u64>, Vec<T>), Option<Error>> {
    let npy = npyz::NpyFile::new(bytes).map_err(|e| Some(bad(path, format!("`{key}` is not a .npy array: {e}"))))?;
    let (shape, order) = (npy.shape().to_vec(), npy.order());
    let v = npy.into_vec::<T>().map_err(|_| None)?;
    let v = if order == npyz::Order::Fortran { c_order(&shape, v) } else { v };
    Ok((shape, v))
}

/// Reads array `key` as `A`, or as `B` widened to `A` (`types` names both for the error).
fn read_either<A, B, R>(arc: &mut NpzArchive<R>, path: &Path, key: &str, widen: impl Fn(B) -> A, types: &str) -> Result<Found<A>>
where
    A: npyz::Deserialize + Copy,
    B: npyz::Deserialize + Copy,
    R: Read + Seek,
{
    let Some(bytes) = entry_bytes(arc, path, key)? else {
        return Ok(None);
    };
    match decode::<A>(&bytes, path, key) {
        Ok(found) => Ok(Some(found)),
        Err(Some(e)) => Err(e),
        Err(None) => decode::<B>(&bytes, path, key)
            .map(|(shape, v)| Some((shape, v.into_iter().map(widen).collect())))
            .map_err(|e| e.unwrap_or_else(|| bad(path, format!("`{key}` is not {types} array")))),
    }
}

/// Reads a real array as f32 (from f32 or f64), with its shape.
fn read_real<R: Read + Seek>(arc: &mut NpzArchive<R>, path: &Path, key: &str) -> Result<Found<f32>> {
    read_either::<f32, f64, R>(arc, path, key, |x| x as f32, "a float32 or float64")
}

/// Reads a complex array as (re, im) f32 pairs (from complex64 or complex128), with its shape.
fn read_complex<R: Read + Seek>(arc: &mut NpzArchive<R>, path: &Path, key: &str) -> Result<Found<[f32; 2]>> {
    let found = read_either::<Complex<f32>, Complex<f64>, R>(arc, path, key, |z| Complex::new(z.re as f32, z.im as f32), "a complex64 or complex128")?;
    Ok(found.map(|(shape, v)| (shape, v.into_iter().map(|z| [z.re, z.im]).collect())))
}

/// Reads an integer array as i64 (from int64 or int32).
fn read_int<R: Read + Seek>(arc: &mut NpzArchive<R>, path: &Path, key: &str) -> Result<Option<Vec<i64>>> {
    Ok(read_either::<i64, i32, R>(arc, path, key, i64::from, "an int64 or int32")?.map(|(_, v)| v))
}

/// A real array of an NPZ file as f32 (from f32 or f64) with its shape; an error when absent.
pub(crate) fn read_array(path: &Path, key: &str) -> Result<(Vec<u64>, Vec<f32>)> {
    let file = File::open(path).map_err(io(path))?;
    let mut arc = NpzArchive::new(BufReader::new(file)).map_err(|e| bad(path, format!("not an NPZ (zip) file: {e}")))?;
    read_real(&mut arc, path, key)?.ok_or_else(|| bad(path, format!("array `{key}` is missing")))
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
    load_with(path, true)
}

/// Loads what a prediction needs: `diffraction`, with `Y_I`, `Y_phi` and `probeGuess` when the
/// file has them (empty when not), and the optional arrays as [`load`] does.
pub fn load_inputs(path: &Path) -> Result<NpzSplit> {
    load_with(path, false)
}

fn load_with(path: &Path, targets: bool) -> Result<NpzSplit> {
    let file = File::open(path).map_err(io(path))?;
    let mut arc = NpzArchive::new(BufReader::new(file)).map_err(|e| bad(path, format!("not an NPZ (zip) file: {e}")))?;
    let missing = |key: &str| bad(path, format!("array `{key}` is missing"));
    let (dshape, diffraction) = read_real(&mut arc, path, "diffraction")?.ok_or_else(|| missing("diffraction"))?;
    let (count, n) = stack_dims(path, "diffraction", &dshape)?;
    let target = |arc: &mut NpzArchive<BufReader<File>>, key: &str| -> Result<Vec<f32>> {
        match read_real(arc, path, key)? {
            Some((shape, v)) if stack_dims(path, key, &shape)? == (count, n) => Ok(v),
            Some((shape, _)) => Err(bad(path, format!("`{key}` has shape {shape:?} but `diffraction` has {dshape:?}"))),
            None if targets => Err(missing(key)),
            None => Ok(Vec::new()),
        }
    };
    let y_i = target(&mut arc, "Y_I")?;
    let y_phi = target(&mut arc, "Y_phi")?;
    let probe = match read_complex(&mut arc, path, "probeGuess")? {
        Some((shape, _)) if shape != [n as u64, n as u64] => return Err(bad(path, format!("`probeGuess` has shape {shape:?}; expected ({n}, {n})"))),
        Some((_, v)) => v,
        None if targets => return Err(missing("probeGuess")),
        None => Vec::new(),
    };
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
    let object_index = read_int(&mut arc, path, "object_index")?;
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
    // Amplitudes are magnitudes: a negative one is not a measurement (a file of intensities
    // minus a background, or of something else).
    for (v, key) in [(&diffraction, "diffraction"), (&y_i, "Y_I")] {
        if let Some((i, x)) = v.iter().enumerate().find(|(_, x)| **x < 0.0) {
            return Err(bad(path, format!("`{key}` holds a negative amplitude ({x} at flat index {i}): amplitudes are |.| >= 0")));
        }
    }
    if !probe.is_empty() && probe.iter().all(|z| z[0] == 0.0 && z[1] == 0.0) {
        return Err(bad(path, "`probeGuess` is zero everywhere: nothing is illuminated"));
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

/// One array of an NPZ file to write: its name, shape and values.
pub enum Array<'a> {
    F32(&'a str, Vec<u64>, &'a [f32]),
    F64(&'a str, Vec<u64>, &'a [f64]),
    I64(&'a str, Vec<u64>, &'a [i64]),
    /// (re, im) pairs, stored as complex64.
    C64(&'a str, Vec<u64>, &'a [[f32; 2]]),
}

/// Writes named arrays to an NPZ file (as np.savez does, uncompressed) atomically, and syncs it.
pub fn save_arrays(path: &Path, arrays: &[Array]) -> Result<()> {
    let werr = |e: std::io::Error| Error::Io { path: path.display().to_string(), source: e };
    let tmp = crate::io::temp_path(path)?;
    let write = || -> std::io::Result<()> {
        let mut w = NpzWriter::create(&tmp)?;
        fn put<T: npyz::AutoSerialize + Copy, W: std::io::Write + Seek>(
            w: &mut NpzWriter<W>,
            key: &str,
            shape: &[u64],
            v: impl Iterator<Item = T>,
        ) -> std::io::Result<()> {
            let mut a = w.array::<T>(key, stored())?.default_dtype().shape(shape).begin_nd()?;
            a.extend(v)?;
            a.finish()
        }
        for a in arrays {
            match a {
                Array::F32(key, shape, v) => put(&mut w, key, shape, v.iter().copied())?,
                Array::F64(key, shape, v) => put(&mut w, key, shape, v.iter().copied())?,
                Array::I64(key, shape, v) => put(&mut w, key, shape, v.iter().copied())?,
                Array::C64(key, shape, v) => put(&mut w, key, shape, v.iter().map(|z| Complex::new(z[0], z[1])))?,
            }
        }
        // Finish the archive explicitly (a drop would swallow errors) and make it durable.
        let buffered = w.zip_writer().finish().map_err(std::io::Error::other)?;
        let file = buffered.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()
    };
    let r = write().map_err(werr).and_then(|()| std::fs::rename(&tmp, path).map_err(crate::io::io_err(path)));
    if r.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    r
}

/// Writes one split in the reference layout (plus coordinates) to `path`.
pub fn save(path: &Path, s: &NpzSplit) -> Result<()> {
    let (count, n) = (s.len() as u64, s.n as u64);
    let stack = vec![count, n, n];
    let mut arrays = vec![
        Array::F32("diffraction", stack.clone(), &s.diffraction),
        Array::F32("Y_I", stack.clone(), &s.y_i),
        Array::F32("Y_phi", stack, &s.y_phi),
        Array::C64("probeGuess", vec![n, n], &s.probe),
    ];
    if let Some((side, gt)) = &s.ground_truth {
        arrays.push(Array::C64("YY_ground_truth", vec![*side as u64, *side as u64], gt));
    }
    let (xs, ys): (Vec<f64>, Vec<f64>) = s.centres.iter().flatten().map(|p| (p.1, p.0)).unzip();
    if s.centres.is_some() {
        arrays.push(Array::F64("xcoords", vec![count], &xs));
        arrays.push(Array::F64("ycoords", vec![count], &ys));
    }
    if let Some(idx) = &s.object_index {
        arrays.push(Array::I64("object_index", vec![idx.len() as u64], idx));
    }
    save_arrays(path, &arrays)
}

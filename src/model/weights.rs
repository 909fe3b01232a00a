//! Weights and tensors in safetensors files, with PyTorch's names and layouts:
//! conv `[out, in, kh, kw]`, conv-transpose `[in, out, kh, kw]`, spectral `complex64 [in, out, kx, ky]`
//! (kx the kept rows in order: 0..m then H-m..H for `corners`). Everything else is f32 (or f64 when
//! the store is f64). Files are written atomically (`crate::io`).

use std::collections::BTreeMap;
use std::path::Path;

use crate::autograd::ParamStore;
use crate::error::Result;
use crate::io::{bad, load_tensors, save_tensors, Named};

/// Whether a parameter is a complex spectral weight.
pub fn is_complex_param(name: &str) -> bool {
    name.ends_with("spectral.weight")
}

/// Saves a parameter store under its names (spectral weights as complex64).
pub fn save_params(path: &Path, store: &ParamStore, metadata: Option<BTreeMap<String, String>>) -> Result<()> {
    let named: Vec<Named> = store.iter().map(|(_, name, t)| Named { name: name.to_string(), tensor: t, complex: is_complex_param(name) }).collect();
    save_tensors(path, &named, metadata)
}

/// Prefix of the tensors in a weights file that are not parameters: the FNO-2D's output
/// normaliser (`normalizer.y.mean`, `normalizer.y.scale`, each [s, s]; u = y * scale + mean).
pub const NORMALIZER_PREFIX: &str = "normalizer.";

/// Saves a model's parameters and, for the FNO-2D, its output normaliser.
pub fn save_model(path: &Path, g: &crate::model::Generator) -> Result<()> {
    let store = &g.params;
    let mut named: Vec<Named> = store.iter().map(|(_, name, t)| Named { name: name.to_string(), tensor: t, complex: is_complex_param(name) }).collect();
    let extra: Vec<(String, crate::tensor::Tensor)> = match g.output_normalizer() {
        None => Vec::new(),
        Some(norm) => {
            let crate::model::Grid { rows, cols } = g.grid;
            let cpu = crate::device::Device::cpu();
            vec![
                (format!("{NORMALIZER_PREFIX}y.mean"), crate::tensor::Tensor::from_vec(norm.mean.clone(), [rows, cols], &cpu)?),
                (format!("{NORMALIZER_PREFIX}y.scale"), crate::tensor::Tensor::from_vec(norm.scale(), [rows, cols], &cpu)?),
            ]
        }
    };
    named.extend(extra.iter().map(|(name, t)| Named { name: name.clone(), tensor: t, complex: false }));
    save_tensors(path, &named, None)
}

/// The output normaliser a weights file holds (written by [`save_model`]), for s x s fields.
pub fn load_normalizer(path: &Path, s: usize) -> Result<Option<crate::data::darcy::Normalizer>> {
    let mut file = load_tensors(path)?;
    let (mean, scale) = (file.remove(&format!("{NORMALIZER_PREFIX}y.mean")), file.remove(&format!("{NORMALIZER_PREFIX}y.scale")));
    match (mean, scale) {
        (None, None) => Ok(None),
        (Some(m), Some(sc)) => {
            if m.shape.dims() != [s, s] || sc.shape.dims() != [s, s] {
                return Err(bad(path, format!("the normaliser is {} / {} but the model's fields are [{s}, {s}]", m.shape, sc.shape)));
            }
            let eps = crate::data::darcy::Normalizer::EPS;
            Ok(Some(crate::data::darcy::Normalizer {
                mean: m.values.iter().map(|&v| v as f32).collect(),
                std: sc.values.iter().map(|&v| v as f32 - eps).collect(),
                eps,
            }))
        }
        _ => Err(bad(path, "the output normaliser needs both normalizer.y.mean and normalizer.y.scale")),
    }
}

/// Loads every parameter of `store` from a file written by [`save_params`] (or by PyTorch with the
/// same names and layouts). Every parameter must be present with its shape; a tensor the model
/// does not have is an error too (but for the output normaliser, [`NORMALIZER_PREFIX`]). Nothing is changed unless the whole file fits.
pub fn load_params(path: &Path, store: &mut ParamStore) -> Result<()> {
    let mut file = load_tensors(path)?;
    let mut updates = Vec::with_capacity(store.len());
    for (id, name, t) in store.iter() {
        let l = file.remove(name).ok_or_else(|| bad(path, format!("parameter `{name}` is missing")))?;
        if l.complex != is_complex_param(name) {
            return Err(bad(path, format!("`{name}` must be {}", if is_complex_param(name) { "complex64" } else { "real" })));
        }
        if &l.shape != t.shape() {
            return Err(bad(path, format!("`{name}` has shape {} but the model needs {}", l.shape, t.shape())));
        }
        updates.push((id, l.to_tensor(t.dtype(), t.device())?));
    }
    if let Some(extra) = file.keys().find(|k| !k.starts_with(NORMALIZER_PREFIX)) {
        return Err(bad(path, format!("tensor `{extra}` is not a parameter of this model")));
    }
    for (id, t) in updates {
        store.set(id, t)?;
    }
    Ok(())
}

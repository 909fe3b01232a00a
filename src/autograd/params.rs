//! The parameter store: named tensors with stable ids (the checkpoint and export names), each with
//! its role (what clipping does with it).

use std::collections::HashMap;

use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// Index of a parameter in its store.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ParamId(pub usize);

/// What a parameter is, for clipping rules (unit-wise AGC skips biases, gains and the head).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParamRole {
    /// A weight whose output units lie along `unit_axis` (0 for conv, 1 for conv-transpose and
    /// spectral weights).
    Weight {
        unit_axis: usize,
    },
    Bias,
    /// LayerScale and normalisation gains and shifts.
    Gain,
    /// The 1x1 head's weight and bias.
    Head,
}

#[derive(Default, Clone)]
pub struct ParamStore {
    names: Vec<String>,
    values: Vec<Tensor>,
    roles: Vec<ParamRole>,
    index: HashMap<String, ParamId>,
}

impl ParamStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a parameter under a name not used before.
    pub fn add(&mut self, name: impl Into<String>, value: Tensor, role: ParamRole) -> Result<ParamId> {
        let name = name.into();
        if self.index.contains_key(&name) {
            return Err(Error::invalid("ParamStore::add", format!("parameter `{name}` already exists")));
        }
        let id = ParamId(self.values.len());
        self.index.insert(name.clone(), id);
        self.names.push(name);
        self.values.push(value);
        self.roles.push(role);
        Ok(id)
    }

    pub fn id(&self, name: &str) -> Option<ParamId> {
        self.index.get(name).copied()
    }

    pub fn get(&self, id: ParamId) -> Option<&Tensor> {
        self.values.get(id.0)
    }

    /// Every stored tensor, indexed by id, for in-place updates of all of them at once.
    pub(crate) fn values_mut(&mut self) -> &mut [Tensor] {
        &mut self.values
    }

    pub fn role(&self, id: ParamId) -> Option<ParamRole> {
        self.roles.get(id.0).copied()
    }

    pub fn name(&self, id: ParamId) -> Option<&str> {
        self.names.get(id.0).map(String::as_str)
    }

    /// Replaces a parameter's value with one of the same shape and dtype.
    pub fn set(&mut self, id: ParamId, value: Tensor) -> Result<()> {
        let old = self.values.get(id.0).ok_or_else(|| Error::invalid("ParamStore::set", format!("no parameter #{}", id.0)))?;
        if old.shape() != value.shape() || old.dtype() != value.dtype() {
            return Err(Error::mismatch_because(
                "ParamStore::set",
                old.shape(),
                value.shape(),
                format!("parameter `{}` keeps its shape and dtype", self.names[id.0]),
            ));
        }
        self.values[id.0] = value;
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.values.len()
    }

    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    /// The role of each parameter, indexed by id.
    pub fn roles(&self) -> &[ParamRole] {
        &self.roles
    }

    pub fn values(&self) -> &[Tensor] {
        &self.values
    }

    /// (id, name, value) in insertion order.
    pub fn iter(&self) -> impl Iterator<Item = (ParamId, &str, &Tensor)> {
        self.names.iter().zip(&self.values).enumerate().map(|(i, (n, v))| (ParamId(i), n.as_str(), v))
    }

    /// Total number of scalar elements (a complex weight counts its real and imaginary parts).
    pub fn num_elements(&self) -> usize {
        self.values.iter().map(Tensor::numel).sum()
    }
}

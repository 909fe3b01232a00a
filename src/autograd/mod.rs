//! The autodiff tape, the parameter store and checkpointed segments.
//!
//! A [`Tape`] records one node per differentiable op: the ids of its inputs and outputs and a
//! backward closure holding only the tensors that backward needs. [`Tape::backward`] walks the
//! nodes in reverse; each node takes its outputs' gradients (freeing them), runs, is dropped (freeing
//! what it saved), and adds into its inputs' gradients. Parameter gradients accumulate by parameter,
//! in the order the nodes run. The tape never holds activations itself: what the caller drops and no
//! node saved is freed at once.
//!
//! [`Tape::checkpoint`] runs a body without recording it and records one node that keeps only the
//! body's inputs; its backward re-runs the body on a fresh sub-tape and back-propagates through it.
//! The sub-tape starts from the gradients already accumulated for the inputs and for the parameters,
//! so every addition happens in the same order as without checkpointing: the gradients are bitwise
//! identical.

mod params;

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};

pub use params::{ParamId, ParamRole, ParamStore};

use crate::backend;
use crate::error::{Error, Result};
use crate::tensor::{DType, Shape, Tensor};

/// A value on a tape: its tensor and its place in the graph. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Var {
    id: usize,
    tape: u64,
    value: Tensor,
}

impl Var {
    pub fn value(&self) -> &Tensor {
        &self.value
    }
    pub fn shape(&self) -> &Shape {
        self.value.shape()
    }
    pub fn dims(&self) -> &[usize] {
        self.value.dims()
    }
    pub fn id(&self) -> usize {
        self.id
    }
}

#[derive(Clone, Copy)]
struct VarInfo {
    requires_grad: bool,
    param: Option<ParamId>,
    /// The op that made it, when that op has this one output (see [`OpKey`]).
    made_by: Option<OpKey>,
}

/// An op's place on its tape: its index among the ops recorded there (recording or not) and a
/// fingerprint of its inputs' ids. A checkpoint body re-run on a fresh tape makes the same ops
/// from the same vars in the same order, so the key names the same op in both runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct OpKey {
    index: usize,
    inputs: u64,
}

impl OpKey {
    fn new(index: usize, inputs: &[&Var]) -> OpKey {
        // FNV-1a over the ids: a mismatch between the two runs shows as a different key.
        let inputs = inputs.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, v| (h ^ v.id as u64).wrapping_mul(0x0000_0100_0000_01b3));
        OpKey { index, inputs }
    }
}

type BackwardFn = Box<dyn FnOnce(&mut Ctx) -> Result<()>>;

struct Node {
    inputs: Vec<usize>,
    outputs: Vec<usize>,
    /// Shape and dtype of each output, to make zeros for an output nobody used.
    out_meta: Vec<(Shape, DType)>,
    backward: BackwardFn,
}

/// Gradients being accumulated during one backward walk.
struct GradStore<'p> {
    vars: Vec<Option<Tensor>>,
    params: &'p mut Vec<Option<Tensor>>,
}

impl GradStore<'_> {
    fn slot(&mut self, info: &[VarInfo], var: usize) -> &mut Option<Tensor> {
        match info[var].param {
            Some(p) => &mut self.params[p.0],
            None => &mut self.vars[var],
        }
    }

    fn accumulate(&mut self, info: &[VarInfo], var: usize, g: Tensor) -> Result<()> {
        let slot = self.slot(info, var);
        *slot = Some(match slot.take() {
            None => g,
            Some(prev) => backend::add_into(prev, g)?,
        });
        Ok(())
    }
}

/// What a node's backward closure sees: its outputs' gradients, which inputs need one, and a way
/// to add into the inputs' gradients.
pub struct Ctx<'a, 'p> {
    grads_out: Vec<Tensor>,
    needs: Vec<bool>,
    inputs: &'a [usize],
    info: &'a [VarInfo],
    store: &'a mut GradStore<'p>,
}

impl Ctx<'_, '_> {
    /// The gradient of output `i`.
    pub fn grad(&self, i: usize) -> &Tensor {
        &self.grads_out[i]
    }
    /// Whether input `i` needs a gradient.
    pub fn needs(&self, i: usize) -> bool {
        self.needs[i]
    }
    /// Adds `g` into the gradient of input `i` (ignored when that input needs none).
    pub fn add(&mut self, i: usize, g: Tensor) -> Result<()> {
        if !self.needs[i] {
            return Ok(());
        }
        self.store.accumulate(self.info, self.inputs[i], g)
    }
    /// Sets the gradient of input `i` to what `f` makes of the gradient gathered so far for it
    /// (ignored when that input needs none): `f(None)` is this node's part, `f(Some(acc))` must be
    /// `acc` plus that part. For ops whose kernel adds while it writes its part, which saves
    /// [`Ctx::add`]'s separate sum.
    pub fn add_with(&mut self, i: usize, f: impl FnOnce(Option<Tensor>) -> Result<Tensor>) -> Result<()> {
        if !self.needs[i] {
            return Ok(());
        }
        let slot = self.store.slot(self.info, self.inputs[i]);
        *slot = Some(f(slot.take())?);
        Ok(())
    }
    fn take_input_grad(&mut self, i: usize) -> Option<Tensor> {
        self.store.slot(self.info, self.inputs[i]).take()
    }
    fn put_input_grad(&mut self, i: usize, g: Tensor) {
        *self.store.slot(self.info, self.inputs[i]) = Some(g);
    }
}

static NEXT_TAPE: AtomicU64 = AtomicU64::new(1);

/// The size of one activation a forward pass noted ([`Tape::note`]): the model part it belongs
/// to (an index into the generator's table), what it is there, its RMS and largest magnitude.
#[derive(Clone, Debug, PartialEq)]
pub struct ActivationStat {
    pub part: usize,
    pub what: &'static str,
    pub rms: f64,
    pub max_abs: f64,
}

/// Where a tape's notes go: shared with the caller, who reads them after the forward pass.
pub type ActivationProbe = Rc<RefCell<Vec<ActivationStat>>>;

/// Records differentiable ops for one forward pass.
pub struct Tape {
    id: u64,
    vars: Vec<VarInfo>,
    nodes: Vec<Node>,
    recording: bool,
    params: Rc<Vec<Tensor>>,
    param_vars: HashMap<ParamId, Var>,
    /// Where [`Tape::note`] writes; None (the default) makes a note free.
    probe: Option<ActivationProbe>,
    /// Ops recorded so far, recording or not: the next op's index.
    ops: usize,
    /// In a checkpoint's forward pass: the outputs kept for its recomputation, each with the op
    /// that made it, and the most values per sample and channel an output that an op offers
    /// ([`Tape::reuse_or_keep`]) may have to be kept.
    kept: Option<(Vec<(OpKey, Tensor)>, usize)>,
    /// In a checkpoint's recomputation: outputs as the forward made them (the kept ones and the
    /// segment's last), each with the op that made it, which [`Tape::reuse_or`] then skips.
    reuse: Vec<(OpKey, Tensor)>,
}

impl Default for Tape {
    fn default() -> Self {
        Tape::new()
    }
}

/// The result of a backward walk.
pub struct Gradients {
    params: Vec<Option<Tensor>>,
    leaves: HashMap<usize, Tensor>,
}

impl Gradients {
    /// The gradient of a parameter, if the loss depends on it.
    pub fn param(&self, id: ParamId) -> Option<&Tensor> {
        self.params.get(id.0).and_then(|g| g.as_ref())
    }
    /// All parameter gradients, indexed by parameter id.
    pub fn params(&self) -> &[Option<Tensor>] {
        &self.params
    }
    pub fn into_params(self) -> Vec<Option<Tensor>> {
        self.params
    }
    /// The gradient of a leaf made with [`Tape::leaf`] and `requires_grad`.
    pub fn wrt(&self, v: &Var) -> Option<&Tensor> {
        self.leaves.get(&v.id)
    }
}

impl Tape {
    /// A tape with no parameters.
    pub fn new() -> Tape {
        Tape::with_param_values(Rc::new(Vec::new()))
    }

    /// A tape whose [`Tape::param`] reads the store's current values (shared, not copied).
    pub fn with_params(store: &ParamStore) -> Tape {
        Tape::with_param_values(Rc::new(store.values().to_vec()))
    }

    fn with_param_values(params: Rc<Vec<Tensor>>) -> Tape {
        Tape {
            id: NEXT_TAPE.fetch_add(1, Ordering::Relaxed),
            vars: Vec::new(),
            nodes: Vec::new(),
            recording: true,
            params,
            param_vars: HashMap::new(),
            probe: None,
            ops: 0,
            kept: None,
            reuse: Vec::new(),
        }
    }

    /// Sends this tape's notes (and those of the checkpointed segments it runs forward, but not
    /// their recomputation in backward) to `probe`.
    pub fn set_probe(&mut self, probe: ActivationProbe) {
        self.probe = Some(probe);
    }

    /// Notes the RMS and largest magnitude of `v` as `what` of model part `part`, when the tape
    /// has a probe (the crash autopsy's); otherwise does nothing. Reads the values to the host.
    pub fn note(&self, part: usize, what: &'static str, v: &Var) -> Result<()> {
        let Some(probe) = &self.probe else { return Ok(()) };
        let x = v.value.to_f64_vec()?;
        let sumsq: f64 = x.iter().map(|a| a * a).sum();
        let max_abs = x.iter().fold(0.0f64, |m, a| if a.is_nan() || m.is_nan() { f64::NAN } else { m.max(a.abs()) });
        let rms = (sumsq / x.len().max(1) as f64).sqrt();
        probe.borrow_mut().push(ActivationStat { part, what, rms, max_abs });
        Ok(())
    }

    fn new_var(&mut self, value: Tensor, requires_grad: bool, param: Option<ParamId>) -> Var {
        self.vars.push(VarInfo { requires_grad, param, made_by: None });
        Var { id: self.vars.len() - 1, tape: self.id, value }
    }

    /// A leaf value: an input, or a constant when `requires_grad` is false.
    pub fn leaf(&mut self, value: Tensor, requires_grad: bool) -> Var {
        self.new_var(value, requires_grad, None)
    }

    /// A constant (no gradient).
    pub fn constant(&mut self, value: Tensor) -> Var {
        self.leaf(value, false)
    }

    /// The same value with no gradient flowing back through it.
    pub fn detach(&mut self, v: &Var) -> Var {
        self.leaf(v.value.clone(), false)
    }

    /// The parameter `id` as a leaf whose gradient accumulates into the parameter's.
    pub fn param(&mut self, id: ParamId) -> Result<Var> {
        if let Some(v) = self.param_vars.get(&id) {
            return Ok(v.clone());
        }
        let value = self.params.get(id.0).cloned().ok_or_else(|| Error::Autograd(format!("parameter #{} is not in this tape's store", id.0)))?;
        let v = self.new_var(value, true, Some(id));
        self.param_vars.insert(id, v.clone());
        Ok(v)
    }

    /// Whether gradients flow to `v` from ops recorded now.
    pub fn requires_grad(&self, v: &Var) -> bool {
        self.recording && self.vars.get(v.id).is_some_and(|i| i.requires_grad) && v.tape == self.id
    }

    /// Number of recorded nodes.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    fn check_own(&self, vars: &[&Var]) -> Result<()> {
        match vars.iter().find(|v| v.tape != self.id) {
            Some(v) => Err(Error::Autograd(format!(
                "a value of shape {} belongs to another tape (inside a checkpoint body, use only its inputs and tape.param)",
                v.shape()
            ))),
            None => Ok(()),
        }
    }

    /// Records an op with the given inputs and output values. `backward` runs only if some input
    /// needs a gradient and the tape is recording; otherwise it is dropped at once, with what it saved.
    pub fn record(&mut self, inputs: &[&Var], outputs: Vec<Tensor>, backward: impl FnOnce(&mut Ctx) -> Result<()> + 'static) -> Result<Vec<Var>> {
        self.record_node(inputs, outputs, false, backward)
    }

    /// [`Tape::record`]; with `reads_params` the outputs need gradients even when no input does
    /// (a checkpointed body that reads parameters the tape cannot see as inputs).
    fn record_node(
        &mut self,
        inputs: &[&Var],
        outputs: Vec<Tensor>,
        reads_params: bool,
        backward: impl FnOnce(&mut Ctx) -> Result<()> + 'static,
    ) -> Result<Vec<Var>> {
        self.check_own(inputs)?;
        let key = OpKey::new(self.ops, inputs);
        self.ops += 1;
        let rg = self.recording && (reads_params || inputs.iter().any(|v| self.vars[v.id].requires_grad));
        let out_meta: Vec<(Shape, DType)> = outputs.iter().map(|t| (t.shape().clone(), t.dtype())).collect();
        let single = outputs.len() == 1;
        let outs: Vec<Var> = outputs.into_iter().map(|t| self.new_var(t, rg, None)).collect();
        if single {
            self.vars[outs[0].id].made_by = Some(key);
        }
        if rg {
            self.nodes.push(Node {
                inputs: inputs.iter().map(|v| v.id).collect(),
                outputs: outs.iter().map(|v| v.id).collect(),
                out_meta,
                backward: Box::new(backward),
            });
        }
        Ok(outs)
    }

    /// The output of the one-output op about to be recorded with `inputs`: `compute()`, or, in a
    /// checkpoint's recomputation, the value the forward pass gave it when the forward kept it
    /// (the same bits: the body is deterministic). Ops that can end a segment call this (the
    /// segment's last output is always kept); an op that does not only computes its output again.
    pub fn reuse_or(&mut self, inputs: &[&Var], compute: impl FnOnce() -> Result<Tensor>) -> Result<Tensor> {
        self.reuse_or_compute(inputs, false, compute)
    }

    /// [`Tape::reuse_or`] for an op whose output costs much to compute per value (a convolution):
    /// it offers the output to a checkpoint's forward pass, which keeps it for the recomputation
    /// when its maps are small enough ([`Tape::checkpoint_keeping`]).
    pub fn reuse_or_keep(&mut self, inputs: &[&Var], compute: impl FnOnce() -> Result<Tensor>) -> Result<Tensor> {
        self.reuse_or_compute(inputs, true, compute)
    }

    fn reuse_or_compute(&mut self, inputs: &[&Var], offered: bool, compute: impl FnOnce() -> Result<Tensor>) -> Result<Tensor> {
        let key = OpKey::new(self.ops, inputs);
        if let Some(at) = self.reuse.iter().position(|(k, _)| *k == key) {
            return Ok(self.reuse.swap_remove(at).1);
        }
        let y = compute()?;
        if let Some((kept, max)) = self.kept.as_mut() {
            // Values per sample and channel of an output [B, C, ...].
            let per_channel: usize = y.dims().iter().skip(2).product();
            if offered && y.rank() >= 3 && per_channel <= *max {
                kept.push((key, y.clone()));
            }
        }
        Ok(y)
    }

    /// [`Tape::record`] for an op with one output.
    pub fn record1(&mut self, inputs: &[&Var], output: Tensor, backward: impl FnOnce(&mut Ctx) -> Result<()> + 'static) -> Result<Var> {
        let mut outs = self.record(inputs, vec![output], backward)?;
        outs.pop().ok_or_else(|| Error::Autograd("record1 made no output".into()))
    }

    /// Back-propagates from a one-element `loss` (seed 1).
    pub fn backward(self, loss: &Var) -> Result<Gradients> {
        if loss.value.numel() != 1 {
            return Err(Error::Autograd(format!("backward needs a one-element loss, got shape {} (use backward_with for other seeds)", loss.shape())));
        }
        let seed = Tensor::full(1.0, loss.shape().clone(), loss.value.dtype(), loss.value.device())?;
        self.backward_with(vec![(loss.clone(), seed)])
    }

    /// Back-propagates from the given (value, gradient) pairs.
    pub fn backward_with(self, seeds: Vec<(Var, Tensor)>) -> Result<Gradients> {
        let mut params = vec![None; self.params.len()];
        // Node outputs' gradients are consumed during the walk: what remains belongs to leaves.
        let grads = self.run(seeds, HashMap::new(), &mut params)?;
        let leaves = grads.into_iter().enumerate().filter_map(|(i, g)| g.map(|g| (i, g))).collect();
        Ok(Gradients { params, leaves })
    }

    /// The reverse walk. `initial` pre-loads gradients of some vars (a checkpoint's inputs);
    /// parameter gradients accumulate into `params`. Returns the remaining per-var gradients.
    fn run(mut self, seeds: Vec<(Var, Tensor)>, initial: HashMap<usize, Tensor>, params: &mut Vec<Option<Tensor>>) -> Result<Vec<Option<Tensor>>> {
        let info = std::mem::take(&mut self.vars);
        let mut store = GradStore { vars: vec![None; info.len()], params };
        for (v, g) in initial {
            store.vars[v] = Some(g);
        }
        for (v, g) in seeds {
            self.check_own(&[&v])?;
            if v.shape() != g.shape() {
                return Err(Error::mismatch_because("backward", v.shape(), g.shape(), "seed gradient"));
            }
            drop(v.value);
            store.accumulate(&info, v.id, g)?;
        }
        // Drop the parameter handles so that parameter values are held only by their store.
        self.param_vars.clear();
        while let Some(node) = self.nodes.pop() {
            let mut got: Vec<Option<Tensor>> = node.outputs.iter().map(|&o| store.vars[o].take()).collect();
            let dev = match got.iter().flatten().next() {
                Some(g) => g.device().clone(),
                None => continue,
            };
            let mut grads_out = Vec::with_capacity(got.len());
            for (g, (shape, dtype)) in got.iter_mut().zip(&node.out_meta) {
                grads_out.push(match g.take() {
                    Some(g) => g,
                    None => Tensor::zeros(shape.clone(), *dtype, &dev)?,
                });
            }
            let needs = node.inputs.iter().map(|&i| info[i].requires_grad).collect();
            let mut ctx = Ctx { grads_out, needs, inputs: &node.inputs, info: &info, store: &mut store };
            (node.backward)(&mut ctx)?;
        }
        Ok(store.vars)
    }

    /// Runs `body` on `inputs` as a checkpointed segment: only the inputs (and the last output)
    /// are kept for backward, which re-runs the body. The body must reach other values only
    /// through its inputs and `tape.param`.
    pub fn checkpoint<F>(&mut self, inputs: &[&Var], body: F) -> Result<Vec<Var>>
    where
        F: Fn(&mut Tape, &[Var]) -> Result<Vec<Var>> + 'static,
    {
        self.checkpoint_keeping(inputs, 0, body)
    }

    /// [`Tape::checkpoint`] that also keeps, for the recomputation, the outputs that costly ops
    /// offer ([`Tape::reuse_or_keep`]) when they hold at most `small` values per sample and
    /// channel: the backward then does not compute them again, for the memory they hold until it
    /// runs.
    pub fn checkpoint_keeping<F>(&mut self, inputs: &[&Var], small: usize, body: F) -> Result<Vec<Var>>
    where
        F: Fn(&mut Tape, &[Var]) -> Result<Vec<Var>> + 'static,
    {
        self.check_own(inputs)?;
        let mut seen = HashSet::new();
        for v in inputs {
            if !seen.insert(v.id) {
                return Err(Error::Autograd("a checkpoint input is given twice".into()));
            }
            if self.vars[v.id].param.is_some() {
                return Err(Error::Autograd("a parameter is given as a checkpoint input; read it inside the body with tape.param".into()));
            }
        }
        // Forward on a tape of its own that records nothing, so the body's internals are freed as
        // it goes, and a body that reaches for an outer value fails now rather than in backward.
        let mut fwd = Tape::with_param_values(self.params.clone());
        fwd.recording = false;
        fwd.probe = self.probe.clone();
        fwd.kept = Some((Vec::new(), small));
        let leaves: Vec<Var> = inputs.iter().map(|v| fwd.leaf(v.value.clone(), false)).collect();
        let outs = body(&mut fwd, &leaves)?;
        // Selective recomputation: the recomputation takes these values instead of computing
        // them again. The outputs the ops offered (see `reuse_or_keep`), and the last output: it
        // is what the model consumes next, so the node that consumes it holds it until just
        // before this segment's backward, and keeping it costs no memory there.
        let mut reuse = fwd.kept.take().map(|(kept, _)| kept).unwrap_or_default();
        if let Some((key, value)) = outs.last().and_then(|v| fwd.vars[v.id].made_by.map(|key| (key, v.value.clone()))) {
            if !reuse.iter().any(|(k, _)| *k == key) {
                reuse.push((key, value));
            }
        }
        let out_values: Vec<Tensor> = outs.into_iter().map(|v| v.value).collect();
        // Parameters read inside the body make the outputs depend on them even when no input
        // needs a gradient (e.g. the first segment, whose input is the data).
        let reads_params = !fwd.param_vars.is_empty();
        drop((leaves, fwd));

        let saved: Vec<Tensor> = inputs.iter().map(|v| v.value.clone()).collect();
        let params = self.params.clone();
        let body = Rc::new(body);
        self.record_node(inputs, out_values, reads_params, move |ctx| {
            let mut sub = Tape::with_param_values(params);
            sub.reuse = reuse;
            let leaves: Vec<Var> = saved.into_iter().enumerate().map(|(i, t)| sub.leaf(t, ctx.needs(i))).collect();
            let outs = body(&mut sub, &leaves)?;
            sub.reuse.clear();
            if outs.len() != ctx.grads_out.len() {
                return Err(Error::Autograd(format!("checkpoint body gave {} outputs on recomputation and {} before", outs.len(), ctx.grads_out.len())));
            }
            let seeds: Vec<(Var, Tensor)> = outs.into_iter().zip(std::mem::take(&mut ctx.grads_out)).collect();
            let mut initial = HashMap::new();
            for (i, leaf) in leaves.iter().enumerate() {
                if ctx.needs(i) {
                    if let Some(g) = ctx.take_input_grad(i) {
                        initial.insert(leaf.id, g);
                    }
                }
            }
            let ids: Vec<usize> = leaves.iter().map(|l| l.id).collect();
            drop(leaves);
            let mut sub_grads = sub.run(seeds, initial, &mut *ctx.store.params)?;
            for (i, id) in ids.into_iter().enumerate() {
                if ctx.needs(i) {
                    if let Some(g) = sub_grads[id].take() {
                        ctx.put_input_grad(i, g);
                    }
                }
            }
            Ok(())
        })
    }
}

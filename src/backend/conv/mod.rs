//! 2-D convolutions (kernels/conv.cu holds im2col / col2im; the GEMMs are cuBLAS's on the GPU and
//! the `gemm` crate's on the CPU): conv2d (PyTorch's cross-correlation with zero padding), its two
//! backward products, and the transposed convolution, which is the adjoint of conv2d and runs on
//! its input-gradient kernels. Geometry: `ConvGeom` (kernels/params.cuh).

mod cpu;
mod cuda;
mod winograd;

pub use super::kernels::ConvGeom;
use super::layout::cpu::channel_dot as channel_sum_cpu;
use super::{check_rank, check_same, compute, int, on_device};
use crate::error::{Error, Result};
use crate::tensor::{Shape, Tensor};

/// Stride and zero padding of a 2-D convolution; the kernel size comes from the weight.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Conv2dParams {
    pub stride: usize,
    pub padding: usize,
}

impl Conv2dParams {
    pub const fn new(stride: usize, padding: usize) -> Self {
        Conv2dParams { stride, padding }
    }
}

/// Floats of im2col columns per chunk of samples on the GPU by default (256 MiB).
pub const COLS_BUDGET: usize = 64 << 20;

static COLS_BUDGET_NOW: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(COLS_BUDGET);

/// Sets the floats of im2col columns per chunk of samples on the GPU (at least one sample's per
/// chunk whatever the budget), for every later convolution of the process: a smaller budget
/// trades scratch memory for more GEMMs. Tests lower it to run the chunked path.
pub fn set_cols_budget(floats: usize) {
    COLS_BUDGET_NOW.store(floats, std::sync::atomic::Ordering::Relaxed);
}

impl ConvGeom {
    /// A convolution of an input [B, c, h, w] by kernels kh x kw into maps ho x wo.
    fn new(op: &'static str, x: &[usize], k: (usize, usize), y: (usize, usize), p: Conv2dParams) -> Result<ConvGeom> {
        Ok(ConvGeom {
            c: int(op, x[1])?,
            h: int(op, x[2])?,
            w: int(op, x[3])?,
            kh: int(op, k.0)?,
            kw: int(op, k.1)?,
            ho: int(op, y.0)?,
            wo: int(op, y.1)?,
            stride: int(op, p.stride)?,
            pad: int(op, p.padding)?,
        })
    }
    /// Rows of the columns: c kh kw.
    pub(crate) fn k(&self) -> usize {
        (self.c * self.kh * self.kw) as usize
    }
    pub(crate) fn hw_out(&self) -> usize {
        (self.ho * self.wo) as usize
    }
    pub(crate) fn plane_in(&self) -> usize {
        (self.c * self.h * self.w) as usize
    }
    pub(crate) fn is_pointwise(&self) -> bool {
        self.kh == 1 && self.kw == 1 && self.stride == 1 && self.pad == 0
    }
    /// Samples per chunk so that a chunk's columns stay within the budget.
    pub(crate) fn chunk(&self, batch: usize) -> usize {
        (COLS_BUDGET_NOW.load(std::sync::atomic::Ordering::Relaxed) / (self.k() * self.hw_out()).max(1)).clamp(1, batch.max(1))
    }
}

fn conv_out(op: &'static str, x: &Shape, k: usize, p: Conv2dParams, size: usize) -> Result<usize> {
    if p.stride == 0 {
        return Err(Error::invalid(op, "stride must be at least 1"));
    }
    let padded = size + 2 * p.padding;
    if k == 0 || padded < k {
        return Err(Error::bad_shape(op, x, format!("a {k}-wide kernel does not fit a map of {size} with padding {}", p.padding)));
    }
    Ok((padded - k) / p.stride + 1)
}

/// The geometry and output shape of conv2d, after checking x [B, C_in, H, W], w [C_out, C_in, kh,
/// kw] and b [C_out].
fn forward(op: &'static str, x: &Tensor, w: &Tensor, b: Option<&Tensor>, p: Conv2dParams) -> Result<(ConvGeom, Shape)> {
    let mut ts = vec![x, w];
    ts.extend(b);
    check_same(op, &ts)?;
    check_rank(op, x, 4, "input")?;
    check_rank(op, w, 4, "weight")?;
    let (xd, wd) = (x.dims(), w.dims());
    if xd[1] != wd[1] {
        return Err(Error::mismatch_because(op, x.shape(), w.shape(), "input channels differ from the weight's C_in"));
    }
    if let Some(b) = b {
        if b.dims() != [wd[0]] {
            return Err(Error::mismatch_because(op, w.shape(), b.shape(), "bias must be [C_out]"));
        }
    }
    let ho = conv_out(op, x.shape(), wd[2], p, xd[2])?;
    let wo = conv_out(op, x.shape(), wd[3], p, xd[3])?;
    Ok((ConvGeom::new(op, xd, (wd[2], wd[3]), (ho, wo), p)?, Shape::new([xd[0], wd[0], ho, wo])))
}

/// 2-D cross-correlation (PyTorch's conv2d) with zero padding and an optional bias.
pub fn conv2d(x: &Tensor, w: &Tensor, b: Option<&Tensor>, p: Conv2dParams) -> Result<Tensor> {
    let _p = super::profile::scope("conv2d");
    let (g, shape) = forward("conv2d", x, w, b, p)?;
    compute(shape, x, |y| cpu::conv2d_fwd(&g, x, w, b, y), |gpu, y| cuda::conv2d_fwd(gpu, g, x, w, b, y, None))
}

/// conv2d and the GELU of its output: (z, GELU(z)), the output that GELU's backward keeps and
/// the activation after it. On a GPU with the implicit-GEMM convolutions one launch writes both;
/// elsewhere the two ops run in turn. The values, and the order in which the two outputs are
/// allocated, are those of `conv2d` then `unary(Gelu)`.
pub fn conv2d_gelu(x: &Tensor, w: &Tensor, b: Option<&Tensor>, p: Conv2dParams) -> Result<(Tensor, Tensor)> {
    let gpu = match x.device().kind() {
        crate::device::DeviceKind::Cuda(_) => Some(x.device().gpu()?).filter(|gpu| !gpu.conv_columns()),
        _ => None,
    };
    let Some(gpu) = gpu else {
        let z = conv2d(x, w, b, p)?;
        let y = super::unary(super::Unary::Gelu, &z)?;
        return Ok((z, y));
    };
    let _p = super::profile::scope("conv2d_gelu");
    let (g, shape) = forward("conv2d", x, w, b, p)?;
    let mut z = Tensor::uninit(shape.clone(), x.dtype(), x.device())?;
    let mut y = Tensor::uninit(shape, x.dtype(), x.device())?;
    cuda::conv2d_fwd(gpu, g, x, w, b, &mut z, Some(&mut y))?;
    Ok((z, y))
}

/// The gradient of conv2d with respect to its input of shape `x_shape`.
pub fn conv2d_bwd_input(dy: &Tensor, w: &Tensor, x_shape: &Shape, p: Conv2dParams) -> Result<Tensor> {
    conv2d_bwd_input_added(None, dy, w, x_shape, p)
}

/// `acc` + [`conv2d_bwd_input`]: the gradient of x gathered so far from its other consumers plus
/// this convolution's part, as a new tensor (the same bits as adding the two, in one pass on a
/// GPU's implicit GEMM instead of a launch for the sum; `acc` is dropped).
pub fn conv2d_bwd_input_added(acc: Option<Tensor>, dy: &Tensor, w: &Tensor, x_shape: &Shape, p: Conv2dParams) -> Result<Tensor> {
    let _p = super::profile::scope("conv2d_bwd_input");
    const OP: &str = "conv2d_bwd_input";
    let mut ts = vec![dy, w];
    ts.extend(acc.as_ref());
    check_same(OP, &ts)?;
    if let Some(a) = &acc {
        if a.shape() != x_shape {
            return Err(Error::mismatch_because(OP, a.shape(), x_shape, "the gradient to add into does not have the input's shape"));
        }
    }
    let xd = x_shape.dims();
    if xd.len() != 4 {
        return Err(Error::bad_shape(OP, x_shape, "input must have 4 dimensions"));
    }
    check_rank(OP, w, 4, "weight")?;
    let wd = w.dims();
    let (ho, wo) = (conv_out(OP, x_shape, wd[2], p, xd[2])?, conv_out(OP, x_shape, wd[3], p, xd[3])?);
    let expect = [xd[0], wd[0], ho, wo];
    if dy.dims() != expect || wd[1] != xd[1] {
        return Err(Error::mismatch_because(OP, dy.shape(), &Shape::new(expect), "output gradient does not match the forward's output"));
    }
    let g = ConvGeom::new(OP, xd, (wd[2], wd[3]), (ho, wo), p)?;
    let acc = acc.as_ref();
    compute(
        x_shape.clone(),
        dy,
        |dx| {
            cpu::conv2d_bwd_input(&g, dy, w, None, dx)?;
            acc.map_or(Ok(()), |a| super::elementwise::cpu::add_assign(dx, a))
        },
        |gpu, dx| cuda::conv2d_bwd_input(gpu, g, dy, w, None, acc, dx),
    )
}

/// The gradient of conv2d with respect to its weight of shape `w_shape`.
pub fn conv2d_bwd_weight(x: &Tensor, dy: &Tensor, w_shape: &Shape, p: Conv2dParams) -> Result<Tensor> {
    Ok(conv2d_bwd_params(x, dy, w_shape, p, false)?.0)
}

/// The gradients of conv2d with respect to its weight of shape `w_shape` and, with `bias`, its
/// bias (dy summed over samples and positions). On a GPU the bias gradient comes from the same
/// pass over dy that lays it out for the weight's GEMM.
pub fn conv2d_bwd_params(x: &Tensor, dy: &Tensor, w_shape: &Shape, p: Conv2dParams, bias: bool) -> Result<(Tensor, Option<Tensor>)> {
    let _p = super::profile::scope("conv2d_bwd_weight");
    const OP: &str = "conv2d_bwd_weight";
    check_same(OP, &[x, dy])?;
    let wd = w_shape.dims();
    if wd.len() != 4 || x.rank() != 4 || dy.rank() != 4 || wd[1] != x.dims()[1] || wd[0] != dy.dims()[1] {
        return Err(Error::mismatch_because(OP, x.shape(), dy.shape(), format!("input and output gradient do not fit a weight of shape {w_shape}")));
    }
    let (xd, dyd) = (x.dims(), dy.dims());
    let (ho, wo) = (conv_out(OP, x.shape(), wd[2], p, xd[2])?, conv_out(OP, x.shape(), wd[3], p, xd[3])?);
    let expect = [xd[0], wd[0], ho, wo];
    if dyd != expect {
        return Err(Error::mismatch_because(OP, dy.shape(), &Shape::new(expect), "output gradient does not match the forward's output"));
    }
    let g = ConvGeom::new(OP, xd, (wd[2], wd[3]), (ho, wo), p)?;
    let mut dw = Tensor::uninit(w_shape.clone(), x.dtype(), x.device())?;
    let mut db = bias.then(|| Tensor::uninit([wd[0]], x.dtype(), x.device())).transpose()?;
    on_device(
        x.device(),
        (&mut dw, db.as_mut()),
        |(dw, db)| {
            cpu::conv2d_bwd_weight(&g, x, dy, dw)?;
            db.map_or(Ok(()), |db| channel_sum_cpu(dy, None, db))
        },
        |gpu, (dw, db)| cuda::conv2d_bwd_weight(gpu, g, x, dy, dw, db),
    )?;
    Ok((dw, db))
}

/// Transposed 2-D convolution (PyTorch's conv_transpose2d, output padding 0): x [B, C_in, H, W],
/// w [C_in, C_out, kh, kw], output [B, C_out, (H-1)s - 2p + kh, (W-1)s - 2p + kw]. It is the
/// adjoint of conv2d, so it runs on conv2d's input-gradient kernels: the geometry is that of the
/// conv2d whose input is the output here.
pub fn conv_transpose2d(x: &Tensor, w: &Tensor, b: Option<&Tensor>, p: Conv2dParams) -> Result<Tensor> {
    let _p = super::profile::scope("conv_transpose2d");
    const OP: &str = "conv_transpose2d";
    let mut ts = vec![x, w];
    ts.extend(b);
    check_same(OP, &ts)?;
    check_rank(OP, x, 4, "input")?;
    check_rank(OP, w, 4, "weight")?;
    let (xd, wd) = (x.dims(), w.dims());
    if xd[1] != wd[0] {
        return Err(Error::mismatch_because(OP, x.shape(), w.shape(), "input channels differ from the weight's C_in"));
    }
    if let Some(b) = b {
        if b.dims() != [wd[1]] {
            return Err(Error::mismatch_because(OP, w.shape(), b.shape(), "bias must be [C_out]"));
        }
    }
    if p.stride == 0 {
        return Err(Error::invalid(OP, "stride must be at least 1"));
    }
    let out = |n: usize, k: usize| ((n - 1) * p.stride + k).checked_sub(2 * p.padding).filter(|&v| v > 0);
    let (ho, wo) = match (xd[2], xd[3]) {
        (h, w_) if h > 0 && w_ > 0 => match (out(h, wd[2]), out(w_, wd[3])) {
            (Some(ho), Some(wo)) => (ho, wo),
            _ => return Err(Error::bad_shape(OP, x.shape(), "padding leaves no output")),
        },
        _ => return Err(Error::bad_shape(OP, x.shape(), "empty input map")),
    };
    let y_shape = [xd[0], wd[1], ho, wo];
    let g = ConvGeom::new(OP, &y_shape, (wd[2], wd[3]), (xd[2], xd[3]), p)?;
    compute(y_shape, x, |y| cpu::conv2d_bwd_input(&g, x, w, b, y), |gpu, y| cuda::conv2d_bwd_input(gpu, g, x, w, b, None, y))
}

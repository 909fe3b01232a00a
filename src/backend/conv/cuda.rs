//! 2-D convolutions on the GPU, by one of two algorithms (`train.gpu_conv`, [`Gpu::conv_columns`]):
//!
//! **Implicit GEMMs** (the default; kernels/conv.cu's `conv2d_*_f32`): each product is a tiled
//! GEMM whose operands are gathered from x, w and dy through the convolution's index map as the
//! tiles are loaded, so no columns are written or read and each product is one launch:
//!
//! - forward: y [C_out, (n, p)] = W [C_out, K] cols(x) [K, (n, p)] + bias, K = C_in kh kw;
//! - dX: dx [C_in, (n, ih, iw)] = W' [C_in, (o, i, j)] dy gathered at each tap's output position
//!   (+ the transposed convolution's bias);
//! - dW: dw [C_out, K] (and db as one more column, of ones) = dy [C_out, (n, p)] cols(x)^T,
//!   summed over all samples in one launch; over more than `DW_TERMS_PER_BLOCK` terms the sum is
//!   cut into parts that more blocks take, then a second launch adds them in order.
//!
//! Each thread sums its outputs in a fixed order, so results repeat bit for bit; the order
//! differs from the CPU's (its tolerances in tests/cuda_backend.rs say how close).
//!
//! **Columns** (`gpu_conv = "columns"`, and always with `train.tf32`, whose tensor-op math is
//! cuBLAS's): im2col / col2im around cuBLAS SGEMMs, the same decomposition as the CPU's
//! (conv/cpu.rs):
//!
//! - forward: y_n [C_out, Ho Wo] = W [C_out, K] cols(x_n) [K, Ho Wo] + bias as one
//!   strided-batched GEMM per chunk of samples (W's stride 0) onto y set to the bias by the
//!   columns' launch: two launches per chunk;
//! - dX: col2im(W^T dy_n), batched the same way (the transposed convolution's bias added by
//!   col2im);
//! - dW: dy [C_out, B Ho Wo] cols(x) [K, B Ho Wo]^T, one GEMM over the whole batch (per chunk of
//!   samples), with the output gradient and the columns laid out as matrices over (sample,
//!   position) first, both in one launch that also sums the bias gradient
//!   (`conv_dw_operands_f32`). The GEMM's order of additions is cuBLAS's (fixed for a shape and
//!   a card).
//!
//! A 1x1 kernel with stride 1 and no padding uses x_n itself as its forward columns (and adds its
//! bias after the GEMM). The columns of a chunk of samples are scratch from the memory pool, at
//! most `COLS_BUDGET` floats. cuBLAS is column-major; [`gemm_rm`] maps a row-major product onto
//! it.

use cudarc::cublas::{sys as bsys, Gemm, GemmConfig, StridedBatchedConfig};
use cudarc::driver::{CudaSlice, CudaView, CudaViewMut, LaunchConfig};

use super::ConvGeom;
use crate::backend::gpu::{check_len, elementwise_config, Gpu};
use crate::backend::{int, kernels};
use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// cuBLAS's column-major GEMM arguments for the row-major C [m, n] = op(A) [m, k] op(B) [k, n]:
/// a row-major matrix is its transpose in column-major order, so cuBLAS computes
/// C^T [n, m] = op(B)^T op(A)^T with B as its first operand and A as its second.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ColMajorGemm {
    /// Whether cuBLAS's first operand (the row-major B) is used transposed.
    pub transa: bool,
    /// Whether cuBLAS's second operand (the row-major A) is used transposed.
    pub transb: bool,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub lda: usize,
    pub ldb: usize,
    pub ldc: usize,
}

impl ColMajorGemm {
    /// `a_t`: A is stored as [k, m] (used transposed); `b_t`: B is stored as [n, k].
    pub fn of_row_major(m: usize, n: usize, k: usize, a_t: bool, b_t: bool) -> ColMajorGemm {
        ColMajorGemm { transa: b_t, transb: a_t, m: n, n: m, k, lda: if b_t { k } else { n }, ldb: if a_t { m } else { k }, ldc: n }
    }
}

/// A row-major operand: its buffer, whether it is used transposed, and the stride between the
/// matrices of a batch (0: the same matrix for every item).
pub struct Operand<'a> {
    pub data: CudaView<'a, f32>,
    pub transposed: bool,
    pub stride: usize,
}

impl<'a> Operand<'a> {
    pub fn new(data: CudaView<'a, f32>, transposed: bool, stride: usize) -> Self {
        Operand { data, transposed, stride }
    }
}

fn blas_err(op: &'static str) -> impl Fn(cudarc::cublas::result::CublasError) -> Error {
    move |e| Error::cuda_call(op, e)
}

/// For each of `batch` items: C [m, n] = op(A) [m, k] op(B) [k, n] + beta C, all row-major,
/// C's items `m n` apart. cuBLAS sees the column-major C^T = op(B)^T op(A)^T.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_rm(gpu: &Gpu, a: &Operand, b: &Operand, c: &mut CudaViewMut<f32>, m: usize, n: usize, k: usize, beta: f32, batch: usize) -> Result<()> {
    const OP: &str = "gemm";
    let need = |o: &Operand, rows: usize, cols: usize| o.stride * batch.saturating_sub(1) + rows * cols;
    if a.data.len() < need(a, m, k) || b.data.len() < need(b, k, n) || c.len() < m * n * batch {
        return Err(Error::invalid(OP, format!("operands do not fit {batch} x [{m}x{k}] x [{k}x{n}]")));
    }
    if m == 0 || n == 0 || batch == 0 {
        return Ok(());
    }
    let cm = ColMajorGemm::of_row_major(m, n, k, a.transposed, b.transposed);
    let op = |t: bool| if t { bsys::cublasOperation_t::CUBLAS_OP_T } else { bsys::cublasOperation_t::CUBLAS_OP_N };
    let gemm = GemmConfig {
        transa: op(cm.transa),
        transb: op(cm.transb),
        m: int(OP, cm.m)?,
        n: int(OP, cm.n)?,
        k: int(OP, cm.k)?,
        alpha: 1.0f32,
        lda: int(OP, cm.lda)?,
        ldb: int(OP, cm.ldb)?,
        beta,
        ldc: int(OP, cm.ldc)?,
    };
    let blas = gpu.blas()?;
    gpu.ctx.bind_to_thread().map_err(|e| Error::cuda_call(OP, e))?;
    // SAFETY: the lengths checked above cover every element the strides and leading dimensions
    // reach; all buffers are on this GPU's stream.
    unsafe {
        if batch == 1 {
            blas.gemm(gemm, &b.data, &a.data, c).map_err(blas_err(OP))
        } else {
            let cfg =
                StridedBatchedConfig { gemm, batch_size: int(OP, batch)?, stride_a: b.stride as i64, stride_b: a.stride as i64, stride_c: (m * n) as i64 };
            blas.gemm_strided_batched(cfg, &b.data, &a.data, c).map_err(blas_err(OP))
        }
    }
}

/// The columns of the nb samples in x, [nb, K, Ho Wo]. With `bias_into` = (bias [C_out], y
/// [nb, C_out, Ho Wo]), the same launch sets y to the bias.
fn im2col(
    gpu: &Gpu,
    x: &CudaView<f32>,
    cols: &mut CudaViewMut<f32>,
    bias_into: Option<(&CudaSlice<f32>, &mut CudaViewMut<f32>)>,
    nb: usize,
    g: ConvGeom,
) -> Result<()> {
    const OP: &str = "im2col_f32";
    let (bias, mut y) = bias_into.unzip();
    let c_out = bias.map_or(0, |b| b.len());
    if y.as_ref().is_some_and(|y| y.len() != nb * c_out * g.hw_out()) {
        return Err(Error::invalid(OP, format!("the output chunk does not hold {nb} x {c_out} x {} floats", g.hw_out())));
    }
    let cfg = elementwise_config(cols.len().max(y.as_ref().map_or(0, |y| y.len())));
    let (nb, c_out) = (int(OP, nb)?, int(OP, c_out)?);
    // SAFETY: the callers size x and cols for nb samples of this geometry; y holds nb c_out Ho Wo
    // floats (checked above) and bias c_out.
    unsafe { kernels::im2col_f32(gpu, cfg, x, &bias, cols, &mut y, nb, c_out, g) }
}

/// The weight gradient's GEMM operands for nb samples, in one launch: the columns of x as one
/// matrix cols [K, nb Ho Wo], and dy [nb, C_out, Ho Wo] as dy_rows [C_out, nb Ho Wo]; with `db`
/// also the rows' sums (added to what `db` holds when `accumulate`).
#[allow(clippy::too_many_arguments)]
fn dw_operands(
    gpu: &Gpu,
    x: &CudaView<f32>,
    dy: &CudaView<f32>,
    cols: &mut CudaViewMut<f32>,
    dy_rows: &mut CudaViewMut<f32>,
    mut db: Option<&mut CudaSlice<f32>>,
    accumulate: bool,
    (nb, c_out): (usize, usize),
    g: ConvGeom,
) -> Result<()> {
    const OP: &str = "conv_dw_operands_f32";
    let (k, hw) = (g.k(), g.hw_out());
    if x.len() != nb * g.plane_in() || dy.len() != nb * c_out * hw || cols.len() != k * nb * hw || dy_rows.len() != dy.len() {
        return Err(Error::invalid(OP, format!("operands do not fit {nb} samples of {c_out} output channels")));
    }
    if db.as_ref().is_some_and(|d| d.len() != c_out) {
        return Err(Error::invalid(OP, format!("the bias gradient does not hold {c_out} floats")));
    }
    // Blocks 0 .. c_out lay out dy's rows; the ones after them the columns.
    let mut cfg = elementwise_config(cols.len());
    cfg.grid_dim.0 += u32::try_from(c_out).map_err(|_| Error::invalid(OP, format!("{c_out} output channels exceed the grid")))?;
    let (nb, c_out, accumulate) = (int(OP, nb)?, int(OP, c_out)?, i32::from(accumulate));
    // SAFETY: every buffer's length checked above against the geometry.
    unsafe { kernels::conv_dw_operands_f32(gpu, cfg, x, dy, cols, dy_rows, &mut db, nb, c_out, g, accumulate) }
}

/// dx of the nb samples from their dcols [nb, K, Ho Wo], plus `bias` [C] per channel if given.
fn col2im(gpu: &Gpu, dcols: &CudaView<f32>, bias: Option<&CudaSlice<f32>>, dx: &mut CudaViewMut<f32>, nb: usize, g: ConvGeom) -> Result<()> {
    const OP: &str = "col2im_f32";
    if let Some(b) = bias {
        check_len(OP, "bias", b, g.c as usize)?;
    }
    let cfg = elementwise_config(dx.len());
    let nb = int(OP, nb)?;
    // SAFETY: the callers size dcols and dx for nb samples of this geometry; bias holds C floats.
    unsafe { kernels::col2im_f32(gpu, cfg, dcols, &bias, dx, nb, g) }
}

/// An uninitialised f32 scratch buffer from the pool (every element is written before it is read
/// by the callers).
fn scratch(gpu: &Gpu, n: usize) -> Result<CudaSlice<f32>> {
    // SAFETY: f32 has no invalid bit patterns; callers write before they read.
    unsafe { gpu.stream.alloc::<f32>(n.max(1)) }.map_err(gpu.alloc_err(n * 4))
}

/// Where a convolution's bias goes: into the launch that lays out its columns (the first), or,
/// for a pointwise kernel, which has no such launch, added after its GEMMs (the second).
fn bias_placement(g: ConvGeom, bias: Option<&Tensor>) -> Result<(Option<&CudaSlice<f32>>, Option<&Tensor>)> {
    if g.is_pointwise() {
        Ok((None, bias))
    } else {
        Ok((bias.map(Tensor::cuda).transpose()?, None))
    }
}

/// y [B, C_out, Ho, Wo] = conv(x [B, C_in, H, W], w [C_out, C_in, kh, kw]) + bias [C_out]. The
/// bias is written into y by the launch that lays out the columns, and the GEMM adds onto it
/// (beta = 1); a pointwise convolution, which has no columns, adds it after its GEMM.
fn conv2d_fwd_columns(gpu: &Gpu, g: ConvGeom, x: &Tensor, w: &Tensor, bias: Option<&Tensor>, y: &mut Tensor) -> Result<()> {
    let (batch, c_out) = (x.dims()[0], w.dims()[0]);
    let (fused, after) = bias_placement(g, bias)?;
    {
        let (x, w, y) = (x.cuda()?, w.cuda()?, y.cuda_mut()?);
        let (k, hw) = (g.k(), g.hw_out());
        check_len("conv2d_fwd", "x", x, batch * g.plane_in())?;
        check_len("conv2d_fwd", "w", w, c_out * k)?;
        check_len("conv2d_fwd", "y", y, batch * c_out * hw)?;
        if let Some(b) = fused {
            check_len("conv2d_fwd", "bias", b, c_out)?;
        }
        let chunk = g.chunk(batch);
        let mut cols = if g.is_pointwise() { None } else { Some(scratch(gpu, chunk * k * hw)?) };
        let beta = if fused.is_some() { 1.0 } else { 0.0 };
        for n0 in (0..batch).step_by(chunk) {
            let nb = chunk.min(batch - n0);
            let xs = x.slice(n0 * g.plane_in()..(n0 + nb) * g.plane_in());
            let mut ys = y.slice_mut(n0 * c_out * hw..(n0 + nb) * c_out * hw);
            let b = match &mut cols {
                None => Operand::new(xs, false, k * hw),
                Some(cols) => {
                    im2col(gpu, &xs, &mut cols.slice_mut(..nb * k * hw), fused.map(|b| (b, &mut ys)), nb, g)?;
                    Operand::new(cols.slice(..nb * k * hw), false, k * hw)
                }
            };
            gemm_rm(gpu, &Operand::new(w.slice(..), false, 0), &b, &mut ys, c_out, hw, k, beta, nb)?;
        }
    }
    after.map_or(Ok(()), |b| crate::backend::layout::add_channel_bias(y, b))
}

/// dx [B, C_in, H, W] from dy [B, C_out, Ho, Wo] and w [C_out, C_in, kh, kw], plus `bias` [C_in]
/// per channel if given (the transposed convolution, which runs on this, adds its bias here:
/// in the col2im pass, or after the GEMM of a pointwise kernel).
fn conv2d_bwd_input_columns(gpu: &Gpu, g: ConvGeom, dy: &Tensor, w: &Tensor, bias: Option<&Tensor>, dx: &mut Tensor) -> Result<()> {
    let (batch, c_out) = (dy.dims()[0], w.dims()[0]);
    let (fused, after) = bias_placement(g, bias)?;
    {
        let (dy, w, dx) = (dy.cuda()?, w.cuda()?, dx.cuda_mut()?);
        let (k, hw) = (g.k(), g.hw_out());
        check_len("conv2d_bwd_input", "dy", dy, batch * c_out * hw)?;
        check_len("conv2d_bwd_input", "w", w, c_out * k)?;
        check_len("conv2d_bwd_input", "dx", dx, batch * g.plane_in())?;
        let wt = || Operand::new(w.slice(..), true, 0);
        if g.is_pointwise() {
            let dys = Operand::new(dy.slice(..), false, c_out * hw);
            gemm_rm(gpu, &wt(), &dys, &mut dx.slice_mut(..), k, hw, c_out, 0.0, batch)?;
        } else {
            let chunk = g.chunk(batch);
            let mut dcols = scratch(gpu, chunk * k * hw)?;
            for n0 in (0..batch).step_by(chunk) {
                let nb = chunk.min(batch - n0);
                let dys = Operand::new(dy.slice(n0 * c_out * hw..(n0 + nb) * c_out * hw), false, c_out * hw);
                gemm_rm(gpu, &wt(), &dys, &mut dcols.slice_mut(..nb * k * hw), k, hw, c_out, 0.0, nb)?;
                let mut dxs = dx.slice_mut(n0 * g.plane_in()..(n0 + nb) * g.plane_in());
                col2im(gpu, &dcols.slice(..nb * k * hw), fused, &mut dxs, nb, g)?;
            }
        }
    }
    after.map_or(Ok(()), |b| crate::backend::layout::add_channel_bias(dx, b))
}

/// dw [C_out, C_in, kh, kw] = dy [C_out, B Ho Wo] cols(x) [K, B Ho Wo]^T: the output gradient and
/// the columns of a chunk of samples laid out as two matrices over (sample, position), then one
/// GEMM per chunk (one per convolution unless the columns exceed the columns budget). With `db`,
/// also the bias gradient db [C_out] = the sums of dy's rows, taken while dy is laid out.
fn conv2d_bwd_weight_columns(gpu: &Gpu, g: ConvGeom, x: &Tensor, dy: &Tensor, dw: &mut Tensor, db: Option<&mut Tensor>) -> Result<()> {
    let (batch, c_out) = (x.dims()[0], dw.dims()[0]);
    let (x, dy, dw) = (x.cuda()?, dy.cuda()?, dw.cuda_mut()?);
    let mut db = db.map(Tensor::cuda_mut).transpose()?;
    let (k, hw) = (g.k(), g.hw_out());
    check_len("conv2d_bwd_weight", "x", x, batch * g.plane_in())?;
    check_len("conv2d_bwd_weight", "dy", dy, batch * c_out * hw)?;
    check_len("conv2d_bwd_weight", "dw", dw, c_out * k)?;
    if let Some(db) = &db {
        check_len("conv2d_bwd_weight", "db", db, c_out)?;
    }
    if batch == 0 {
        if let Some(db) = db.as_deref_mut() {
            gpu.clear(db)?;
        }
        return gpu.clear(dw);
    }
    let chunk = g.chunk(batch);
    let mut cols = scratch(gpu, chunk * k * hw)?;
    let mut dy_rows = scratch(gpu, chunk * c_out * hw)?;
    for n0 in (0..batch).step_by(chunk) {
        let nb = chunk.min(batch - n0);
        let xs = x.slice(n0 * g.plane_in()..(n0 + nb) * g.plane_in());
        let mut cols = cols.slice_mut(..nb * k * hw);
        let mut dy_rows = dy_rows.slice_mut(..nb * c_out * hw);
        let dys = dy.slice(n0 * c_out * hw..(n0 + nb) * c_out * hw);
        dw_operands(gpu, &xs, &dys, &mut cols, &mut dy_rows, db.as_deref_mut(), n0 > 0, (nb, c_out), g)?;
        let beta = if n0 == 0 { 0.0 } else { 1.0 };
        let (a, b) = (Operand::new(dy_rows.as_view(), false, 0), Operand::new(cols.as_view(), true, 0));
        gemm_rm(gpu, &a, &b, &mut dw.slice_mut(..), c_out, k, nb * hw, beta, 1)?;
    }
    Ok(())
}

/// Threads per block of the implicit GEMMs and the sides of their output tiles (kernels/conv.cu's
/// IG_THREADS, IG_BM, IG_BN).
const IG_THREADS: u32 = 256;
const IG_TILE: usize = 64;

/// Terms of the weight gradient's sum per block: a longer sum (B Ho Wo of the shallow levels) is
/// cut into parts, summed by more blocks into a scratch buffer and then added in order, so that
/// the few outputs of a narrow level still fill the card. A fixed length keeps the number of
/// launches a function of the batch and the maps only.
const DW_TERMS_PER_BLOCK: usize = 4096;

/// A one-dimensional grid of `blocks` blocks of the implicit GEMMs' shape.
fn tiles_config(op: &'static str, blocks: usize) -> Result<LaunchConfig> {
    let blocks =
        u32::try_from(blocks.max(1)).ok().filter(|&b| b <= i32::MAX as u32).ok_or_else(|| Error::invalid(op, format!("{blocks} blocks exceed the grid")))?;
    Ok(LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (IG_THREADS, 1, 1), shared_mem_bytes: 0 })
}

/// y [B, C_out, Ho, Wo] = conv(x [B, C_in, H, W], w [C_out, C_in, kh, kw]) + bias [C_out].
/// With `gelu`, also GELU(y) into it, in the same launch: always by the implicit GEMM (the caller
/// asks for it only when that is the GPU's algorithm; a setting changed since then by another
/// thread does not split the pair).
pub(super) fn conv2d_fwd(gpu: &Gpu, g: ConvGeom, x: &Tensor, w: &Tensor, bias: Option<&Tensor>, y: &mut Tensor, gelu: Option<&mut Tensor>) -> Result<()> {
    if gelu.is_none() && gpu.conv_columns() {
        return conv2d_fwd_columns(gpu, g, x, w, bias, y);
    }
    const OP: &str = "conv2d_fwd_f32";
    let (batch, c_out) = (x.dims()[0], w.dims()[0]);
    let (x, w, y) = (x.cuda()?, w.cuda()?, y.cuda_mut()?);
    check_len(OP, "x", x, batch * g.plane_in())?;
    check_len(OP, "w", w, c_out * g.k())?;
    check_len(OP, "y", y, batch * c_out * g.hw_out())?;
    let bias = bias.map(Tensor::cuda).transpose()?;
    if let Some(b) = bias {
        check_len(OP, "bias", b, c_out)?;
    }
    let mut act = gelu.map(Tensor::cuda_mut).transpose()?;
    if let Some(a) = &act {
        check_len(OP, "act", a, y.len())?;
    }
    let cfg = tiles_config(OP, c_out.div_ceil(IG_TILE) * (batch * g.hw_out()).div_ceil(IG_TILE))?;
    let (nb, c_out) = (int(OP, batch)?, int(OP, c_out)?);
    // SAFETY: every buffer's length checked above against the geometry.
    unsafe { kernels::conv2d_fwd_f32(gpu, cfg, x, w, &bias, y, &mut act, nb, c_out, g) }
}

/// dx [B, C_in, H, W] from dy [B, C_out, Ho, Wo] and w [C_out, C_in, kh, kw], plus `bias` [C_in]
/// per channel if given (the transposed convolution, which runs on this), plus `acc` (of dx's
/// shape) if given: by the implicit GEMM as it writes dx, after the columns' products by a sum.
pub(super) fn conv2d_bwd_input(gpu: &Gpu, g: ConvGeom, dy: &Tensor, w: &Tensor, bias: Option<&Tensor>, acc: Option<&Tensor>, dx: &mut Tensor) -> Result<()> {
    if gpu.conv_columns() {
        conv2d_bwd_input_columns(gpu, g, dy, w, bias, dx)?;
        return acc.map_or(Ok(()), |a| crate::backend::elementwise::cuda::add_assign(gpu, dx, a));
    }
    const OP: &str = "conv2d_bwd_input_f32";
    let (batch, c_out) = (dy.dims()[0], w.dims()[0]);
    let (dy, w, dx) = (dy.cuda()?, w.cuda()?, dx.cuda_mut()?);
    check_len(OP, "dy", dy, batch * c_out * g.hw_out())?;
    check_len(OP, "w", w, c_out * g.k())?;
    check_len(OP, "dx", dx, batch * g.plane_in())?;
    let bias = bias.map(Tensor::cuda).transpose()?;
    if let Some(b) = bias {
        check_len(OP, "bias", b, g.c as usize)?;
    }
    let acc = acc.map(Tensor::cuda).transpose()?;
    if let Some(a) = acc {
        check_len(OP, "acc", a, dx.len())?;
    }
    let plane = (g.h * g.w) as usize;
    let cfg = tiles_config(OP, (g.c as usize).div_ceil(IG_TILE) * (batch * plane).div_ceil(IG_TILE))?;
    let (nb, c_out) = (int(OP, batch)?, int(OP, c_out)?);
    // SAFETY: every buffer's length checked above against the geometry.
    unsafe { kernels::conv2d_bwd_input_f32(gpu, cfg, dy, w, &bias, &acc, dx, nb, c_out, g) }
}

/// dw [C_out, C_in, kh, kw] = the sum over samples and positions of dy [B, C_out, Ho Wo] times
/// the columns of x, and with `db` the bias gradient (dy's sums) as one more output column; in
/// one launch, or with a long sum in parts and a second launch that adds them in order.
pub(super) fn conv2d_bwd_weight(gpu: &Gpu, g: ConvGeom, x: &Tensor, dy: &Tensor, dw: &mut Tensor, db: Option<&mut Tensor>) -> Result<()> {
    if gpu.conv_columns() {
        return conv2d_bwd_weight_columns(gpu, g, x, dy, dw, db);
    }
    const OP: &str = "conv2d_bwd_weight_f32";
    let (batch, c_out) = (x.dims()[0], dw.dims()[0]);
    let (x, dy, dw) = (x.cuda()?, dy.cuda()?, dw.cuda_mut()?);
    let mut db = db.map(Tensor::cuda_mut).transpose()?;
    let k = g.k();
    check_len(OP, "x", x, batch * g.plane_in())?;
    check_len(OP, "dy", dy, batch * c_out * g.hw_out())?;
    check_len(OP, "dw", dw, c_out * k)?;
    if let Some(db) = &db {
        check_len(OP, "db", db, c_out)?;
    }
    let cols = k + usize::from(db.is_some());
    let parts = (batch * g.hw_out()).div_ceil(DW_TERMS_PER_BLOCK).max(1);
    let cfg = tiles_config(OP, c_out.div_ceil(IG_TILE) * cols.div_ceil(IG_TILE) * parts)?;
    let sum_cfg = elementwise_config(c_out * cols);
    let (nb, c_out, with_bias, splits) = (int(OP, batch)?, int(OP, c_out)?, i32::from(db.is_some()), int(OP, parts)?);
    if parts == 1 {
        let mut part: Option<&mut CudaSlice<f32>> = None;
        // SAFETY: every buffer's length checked above against the geometry; without parts the
        // kernel writes dw and db.
        return unsafe { kernels::conv2d_bwd_weight_f32(gpu, cfg, x, dy, dw, &mut db, &mut part, nb, c_out, g, with_bias, splits) };
    }
    let mut part = scratch(gpu, parts * c_out as usize * cols)?;
    {
        // The sums of the parts go to `part` only.
        let (mut dw, mut db): (Option<&mut CudaSlice<f32>>, Option<&mut CudaSlice<f32>>) = (None, None);
        // SAFETY: part holds splits c_out (k + with_bias) floats, all the kernel writes.
        unsafe { kernels::conv2d_bwd_weight_f32(gpu, cfg, x, dy, &mut dw, &mut db, &mut part, nb, c_out, g, with_bias, splits)? };
    }
    let k = i64::try_from(k).map_err(|_| Error::invalid(OP, format!("{k} weights per output channel exceed the kernel's index")))?;
    // SAFETY: part as written above; dw and db checked above.
    unsafe { kernels::conv2d_bwd_weight_sum_f32(gpu, sum_cfg, &part, dw, &mut db, c_out, k, with_bias, splits) }
}

#[cfg(test)]
mod tests {
    use super::ColMajorGemm;

    /// BLAS's column-major SGEMM by its definition: C = op(A) op(B) + beta C, where element
    /// (i, j) of a column-major matrix with leading dimension ld is at i + j ld.
    fn sgemm(g: ColMajorGemm, a: &[f32], b: &[f32], c: &mut [f32], beta: f32) {
        let at = |i: usize, p: usize| if g.transa { a[p + i * g.lda] } else { a[i + p * g.lda] };
        let bt = |p: usize, j: usize| if g.transb { b[j + p * g.ldb] } else { b[p + j * g.ldb] };
        for i in 0..g.m {
            for j in 0..g.n {
                let s: f32 = (0..g.k).map(|p| at(i, p) * bt(p, j)).sum();
                c[i + j * g.ldc] = s + beta * c[i + j * g.ldc];
            }
        }
    }

    fn values(n: usize, seed: usize) -> Vec<f32> {
        (0..n).map(|i| ((i * 7 + seed * 13) % 11) as f32 - 5.0).collect()
    }

    /// The arguments gemm_rm hands to cuBLAS compute the row-major product, for every
    /// combination of transposed operands, on shapes where m, n and k differ (swapping two of
    /// them, or a wrong leading dimension, reads the wrong elements or leaves the buffers).
    #[test]
    fn the_column_major_mapping_computes_the_row_major_product() {
        let (m, n, k) = (3usize, 5usize, 4usize);
        for (a_t, b_t) in [(false, false), (true, false), (false, true), (true, true)] {
            let (a, b) = (values(m * k, 1), values(k * n, 2));
            let a_at = |i: usize, p: usize| if a_t { a[p * m + i] } else { a[i * k + p] };
            let b_at = |p: usize, j: usize| if b_t { b[j * k + p] } else { b[p * n + j] };
            let mut c = values(m * n, 3);
            let mut want = c.clone();
            for i in 0..m {
                for j in 0..n {
                    want[i * n + j] = (0..k).map(|p| a_at(i, p) * b_at(p, j)).sum::<f32>() + 0.5 * want[i * n + j];
                }
            }
            // cuBLAS's first operand is the row-major B, its second the row-major A.
            sgemm(ColMajorGemm::of_row_major(m, n, k, a_t, b_t), &b, &a, &mut c, 0.5);
            assert_eq!(c, want, "a transposed {a_t}, b transposed {b_t}");
        }
    }
}

//! conv2d on the CPU: im2col + GEMM per sample; on small maps with many channels (the batched
//! path, at least 128 in and out) 3x3 stride-1 padding-1 kernels run as Winograd F(2x2, 3x3)
//! (conv/winograd.rs): the forward and both gradients.
//!
//! Forward:  y_b [C_out, Ho*Wo] = W [C_out, K] @ cols(x_b) [K, Ho*Wo], K = C_in*kh*kw (the bias is
//!           added after the products, by the layout family's op).
//! dX:       col2im(W^T @ dy_b).
//! dW:       the transpose of dW^T = sum over b of cols(x_b) @ dy_b^T: in order within fixed groups
//!           of samples, then the groups' sums in order (the same on any number of threads).
//! A 1x1 kernel with stride 1 and no padding uses x_b itself as its columns.

#[allow(unused_imports)]
use crate::tensor::Element as _;
#[allow(unused_imports)]
use num_traits::{Float as _, One as _, Zero as _};
use rayon::prelude::*;
use std::ops::Range;

use super::{winograd, ConvGeom};
use crate::backend::cpu::{gemm, transpose, with_float, Float, Mat, SharedMut};
use crate::backend::layout::add_channel_bias;
use crate::error::Result;
use crate::tensor::Tensor;

/// Sizes of one convolution as the CPU indexes them: input [c, h, w], kernel kh x kw, output
/// ho x wo.
#[derive(Clone, Copy)]
struct Geom {
    c: usize,
    h: usize,
    w: usize,
    kh: usize,
    kw: usize,
    ho: usize,
    wo: usize,
    stride: usize,
    pad: usize,
}

impl Geom {
    fn new(g: &ConvGeom) -> Geom {
        let u = |v: i32| v as usize;
        Geom { c: u(g.c), h: u(g.h), w: u(g.w), kh: u(g.kh), kw: u(g.kw), ho: u(g.ho), wo: u(g.wo), stride: u(g.stride), pad: u(g.pad) }
    }
    fn k(&self) -> usize {
        self.c * self.kh * self.kw
    }
    fn plane_out(&self) -> usize {
        self.ho * self.wo
    }
    fn plane_in(&self) -> usize {
        self.c * self.h * self.w
    }
    fn is_pointwise(&self) -> bool {
        self.kh == 1 && self.kw == 1 && self.stride == 1 && self.pad == 0
    }
    /// Row length of an input plane inside its zero border of `pad`.
    fn wp(&self) -> usize {
        self.w + 2 * self.pad
    }
    /// Values in one input plane inside its zero border, [h + 2 pad, w + 2 pad].
    fn padded_plane(&self) -> usize {
        (self.h + 2 * self.pad) * self.wp()
    }
    /// Input coordinate of output index `o` and kernel tap `t`, if inside the map.
    #[inline]
    fn src(&self, o: usize, t: usize, size: usize) -> Option<usize> {
        (o * self.stride + t).checked_sub(self.pad).filter(|&v| v < size)
    }
}

/// Input planes inside a zero border of `pad` on each side, [h + 2 pad, w + 2 pad] each: there
/// every tap of every output lies inside its plane, so that the panel's rows are plain copies (no
/// bounds, no fills). The border is zeroed once and never written.
struct Padded<T> {
    buf: Vec<T>,
}

impl<T: Float> Padded<T> {
    /// Room for `planes` padded planes.
    fn new(g: &Geom, planes: usize) -> Padded<T> {
        Padded { buf: vec![T::zero(); if g.pad == 0 { 0 } else { planes * g.padded_plane() }] }
    }

    /// Planes `x` [n, h, w] padded, as [n, h + 2 pad, w + 2 pad] (x itself without padding).
    fn fill<'a>(&'a mut self, g: &Geom, x: &'a [T]) -> &'a [T] {
        if g.pad == 0 {
            return x;
        }
        let (plane, wp) = (g.padded_plane(), g.wp());
        for (n, xc) in x.chunks(g.h * g.w).enumerate() {
            for (ih, xr) in xc.chunks(g.w).enumerate() {
                let at = n * plane + (ih + g.pad) * wp + g.pad;
                self.buf[at..at + g.w].copy_from_slice(xr);
            }
        }
        &self.buf[..x.len() / (g.h * g.w) * plane]
    }
}

/// The kh*kw rows of the panel that one padded plane `xp` (from [`Padded::fill`]) gives for the
/// output rows `rows`: tap t = (i, j) into out[t * ld..][..rows.len() * Wo].
fn taps_of_plane<T: Float>(g: &Geom, xp: &[T], rows: Range<usize>, out: &mut [T], ld: usize) {
    let wp = g.wp();
    for t in 0..g.kh * g.kw {
        let (i, j) = (t / g.kw, t % g.kw);
        let row = &mut out[t * ld..t * ld + rows.len() * g.wo];
        for (oh, dst) in rows.clone().zip(row.chunks_exact_mut(g.wo)) {
            let src = &xp[(oh * g.stride + i) * wp + j..];
            if g.stride == 1 {
                dst.copy_from_slice(&src[..g.wo]);
            } else {
                for (ow, d) in dst.iter_mut().enumerate() {
                    *d = src[ow * g.stride];
                }
            }
        }
    }
}

/// cols [K, rows.len() * Wo] of one sample's padded planes `xp` (from [`Padded::fill`]) for the
/// output rows `rows`, written whole (no fill beforehand needed).
fn im2col<T: Float>(g: &Geom, xp: &[T], rows: Range<usize>, cols: &mut [T]) {
    let (taps, n) = (g.kh * g.kw, rows.len() * g.wo);
    for (xc, out) in xp.chunks(xp.len() / g.c).zip(cols.chunks_mut(taps * n)) {
        taps_of_plane(g, xc, rows.clone(), out, n);
    }
}

/// Columns of a block of the per-sample forward GEMM: the panel of that many outputs (a few whole
/// output rows) stays in L2, and the GEMM runs 2x faster than over a 64 x 64 map's 4096 columns
/// at once (the `gemm` crate's blocking suits a short, wide B poorly).
const PANEL_COLS: usize = 256;

/// Panels of the input gradient up to this many values are built whole (1 MiB of f32).
const PANEL_WHOLE: usize = 1 << 18;

/// cols [k, n] = W^T dy[:, p0..p0 + n], for W [m, k] and dy [m, ld] (row-major).
#[allow(clippy::too_many_arguments)]
fn gemm_wt_block<T: Float>(w: &[T], m: usize, k: usize, dy: &[T], ld: usize, p0: usize, n: usize, cols: &mut [T]) {
    assert!(w.len() >= m * k && dy.len() >= m * ld && p0 + n <= ld && cols.len() >= k * n, "gemm_wt_block: operands do not fit");
    // SAFETY: the assertion bounds every index: W read transposed (k x m, strides 1 and k), dy's
    // rows 0..m, columns p0..p0 + n, row stride ld, and cols (k x n).
    unsafe { T::gemm_raw(k, m, n, T::one(), w.as_ptr(), 1, k as isize, dy.as_ptr().add(p0), ld as isize, 1, T::zero(), cols.as_mut_ptr(), n as isize, 1) }
}

/// y[:, p0..p0 + n] (rows `ld` apart) = w [m, k] cols [k, n].
#[allow(clippy::too_many_arguments)]
fn gemm_block<T: Float>(w: &[T], m: usize, k: usize, cols: &[T], n: usize, y: &mut [T], ld: usize, p0: usize) {
    assert!(w.len() >= m * k && cols.len() >= k * n && p0 + n <= ld && y.len() >= m * ld, "gemm_block: operands do not fit");
    // SAFETY: the assertion bounds every index: w (m x k), cols (k x n), y's rows 0..m, columns
    // p0..p0 + n, row stride ld.
    unsafe { T::gemm_raw(m, k, n, T::one(), w.as_ptr(), k as isize, 1, cols.as_ptr(), n as isize, 1, T::zero(), y.as_mut_ptr().add(p0), ld as isize, 1) }
}

/// The output columns `ow` whose input column `ow * stride + j - pad` lies inside a row of `w`
/// (an empty range when none does).
#[inline]
fn valid_cols(g: &Geom, j: usize, w: usize) -> std::ops::Range<usize> {
    let first = g.pad.saturating_sub(j).div_ceil(g.stride);
    // ow * stride + j - pad <= w - 1  <=>  ow <= (w - 1 + pad - j) / stride
    let end = if w + g.pad > j { ((w - 1 + g.pad - j) / g.stride + 1).min(g.wo) } else { 0 };
    first.min(end)..end
}

/// dx [C, H, W] = scatter-add of one sample's columns: row r of its panel at cols[r * ld..][..Ho*Wo];
/// taps in order (each input gets at most one value per tap, so its sum runs over the taps in
/// order, the same bits either way below). On maps wider than their border the sums run in a
/// padded plane (whole rows, which vectorise); on smaller ones, which are mostly border, only
/// over each row's inputs inside the map.
fn col2im<T: Float>(g: &Geom, cols: &[T], ld: usize, dx: &mut [T]) {
    if g.padded_plane() <= 2 * g.h * g.w {
        col2im_padded(g, cols, ld, dx)
    } else {
        col2im_clipped(g, cols, ld, dx)
    }
}

fn col2im_padded<T: Float>(g: &Geom, cols: &[T], ld: usize, dx: &mut [T]) {
    let taps = g.kh * g.kw;
    sum_in_padded(g, dx, |acc| {
        for (c, acc_c) in acc.chunks_mut(g.padded_plane()).enumerate() {
            add_taps_to_plane(g, &cols[c * taps * ld..], ld, 0..g.ho, acc_c);
        }
    });
}

/// dx [C, H, W] = the sums that `add` makes into the sample's zeroed padded planes
/// [C, h + 2 pad, w + 2 pad] (dx itself without padding); the border is dropped.
fn sum_in_padded<T: Float>(g: &Geom, dx: &mut [T], add: impl FnOnce(&mut [T])) {
    if g.pad == 0 {
        dx.fill(T::zero());
        return add(dx);
    }
    let mut padded = vec![T::zero(); g.c * g.padded_plane()];
    add(&mut padded);
    let wp = g.wp();
    for (pc, dxc) in padded.chunks(g.padded_plane()).zip(dx.chunks_mut(g.h * g.w)) {
        for (ih, dr) in dxc.chunks_mut(g.w).enumerate() {
            let at = (ih + g.pad) * wp + g.pad;
            dr.copy_from_slice(&pc[at..at + g.w]);
        }
    }
}

/// acc (one padded plane) += the scatter of one channel's kh*kw panel rows (tap t at
/// cols[t * ld..], holding the output rows `rows`), taps in order.
fn add_taps_to_plane<T: Float>(g: &Geom, cols: &[T], ld: usize, rows: Range<usize>, acc: &mut [T]) {
    let wp = g.wp();
    for t in 0..g.kh * g.kw {
        let (i, j) = (t / g.kw, t % g.kw);
        let row = &cols[t * ld..t * ld + rows.len() * g.wo];
        for (oh, src) in rows.clone().zip(row.chunks_exact(g.wo)) {
            let dst = &mut acc[(oh * g.stride + i) * wp + j..];
            if g.stride == 1 {
                for (d, &v) in dst[..g.wo].iter_mut().zip(src) {
                    *d += v;
                }
            } else {
                for (ow, &v) in src.iter().enumerate() {
                    dst[ow * g.stride] += v;
                }
            }
        }
    }
}

fn col2im_clipped<T: Float>(g: &Geom, cols: &[T], ld: usize, dx: &mut [T]) {
    let hw = g.plane_out();
    let taps = g.kh * g.kw;
    for (c, dxc) in dx.chunks_mut(g.h * g.w).enumerate() {
        dxc.fill(T::zero());
        for t in 0..taps {
            let (i, j) = (t / g.kw, t % g.kw);
            let row = &cols[(c * taps + t) * ld..(c * taps + t) * ld + hw];
            let valid = valid_cols(g, j, g.w);
            for oh in 0..g.ho {
                let Some(ih) = g.src(oh, i, g.h) else { continue };
                let dr = &mut dxc[ih * g.w..(ih + 1) * g.w];
                let src = &row[oh * g.wo..(oh + 1) * g.wo];
                for ow in valid.clone() {
                    dr[ow * g.stride + j - g.pad] += src[ow];
                }
            }
        }
    }
}

/// The batch's im2col panel [K, B*Ho*Wo] (sample b's columns at b*Ho*Wo) is built whole when it
/// holds at most this many values: then each product is one GEMM over the batch, which packs the
/// weight once instead of once per sample (what the deep, wide, small maps need).
const BATCH_PANEL: usize = 1 << 22;

/// Blocks a batched GEMM is split into across threads: fixed, though any split gives the same
/// values (each output's sum over k runs in the same order).
const BATCH_SPLIT: usize = 4;

/// Whether the batched GEMMs pay: where the weight [C_out, K] is at least as large as a sample's
/// panel [K, Ho*Wo], packing it per sample costs as much as the product itself; on larger maps
/// the per-sample GEMMs are cheaper (no copies) and split the batch across threads.
fn batched(g: &Geom, batch: usize, c_out: usize) -> bool {
    batch > 1 && c_out >= g.plane_out() && g.k() * g.plane_out() * batch <= BATCH_PANEL
}

/// Whether the batched path runs as Winograd F(2x2, 3x3) (conv/winograd.rs): 3x3 kernels, stride
/// 1, padding 1, enough channels.
fn winograd_runs(g: &Geom, batch: usize, c_out: usize) -> bool {
    batched(g, batch, c_out) && winograd::applies(g.kh, g.kw, g.stride, g.pad, (g.c, c_out))
}

/// The whole batch's panel [K, B*Ho*Wo] of x [B, C, H, W] into `cols` (every value written),
/// one task per channel (its kh*kw rows).
fn im2col_batch<T: Float>(g: &Geom, x: &[T], batch: usize, cols: &mut [T]) {
    let ld = batch * g.plane_out();
    cols.par_chunks_mut(g.kh * g.kw * ld).enumerate().for_each(|(c, rows)| im2col_channel(g, x, batch, c, rows));
}

/// Channel c's kh*kw rows [kh*kw, B*Ho*Wo] of the panel of x [B, C, H, W] (every value written).
fn im2col_channel<T: Float>(g: &Geom, x: &[T], batch: usize, c: usize, rows: &mut [T]) {
    let (hw, ld) = (g.plane_out(), batch * g.plane_out());
    let mut pad = Padded::new(g, 1);
    for b in 0..batch {
        let xc = &x[b * g.plane_in() + c * g.h * g.w..][..g.h * g.w];
        taps_of_plane(g, pad.fill(g, xc), 0..g.ho, &mut rows[b * hw..], ld);
    }
}

/// Samples per task of the batched forward and input gradient: the batch in BATCH_SPLIT groups,
/// each task building its group's panel, multiplying it and writing its samples while they are
/// in its cache. One parallel pass per op instead of three (panel, GEMM, layout), with the
/// GEMMs of the column blocks that the whole-batch product was split into before: the same
/// sums, the same bits.
fn group_of(batch: usize) -> usize {
    batch.div_ceil(BATCH_SPLIT)
}

/// C[m, n] = A[m, k] B[k, n] (C row-major, every value written) in BATCH_SPLIT blocks in
/// parallel: blocks of C's rows where B is the smaller operand (each block packs its rows of A
/// and all of B), else blocks of its columns (each packs all of A): the larger operand is packed
/// once.
fn gemm_split<T: Float>(a: Mat<T>, b: Mat<T>, c: &mut [T]) -> Result<()> {
    let ((m, k, ars, acs), (k2, n, brs, bcs)) = (a.view(), b.view());
    if k != k2 || c.len() != m * n || a.data.len() < m * k || b.data.len() < k * n {
        return Err(crate::error::Error::invalid("gemm", format!("operands do not fit: [{m}x{k}] x [{k2}x{n}] into {} places", c.len())));
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    let by_rows = n < m;
    let width = if by_rows { m } else { n }.div_ceil(BATCH_SPLIT);
    let out = SharedMut(c.as_mut_ptr());
    (0..if by_rows { m } else { n }.div_ceil(width)).into_par_iter().for_each(|blk| {
        let (from, len) = if by_rows { (blk * width, width.min(m - blk * width)) } else { (blk * width, width.min(n - blk * width)) };
        let out = out.ptr();
        // SAFETY: the checks above bound A (m x k), B (k x n) and C (m x n, row stride n); this
        // task alone writes C's rows (or columns) from..from + len.
        unsafe {
            if by_rows {
                let a0 = a.data.as_ptr().offset(from as isize * ars);
                T::gemm_raw(len, k, n, T::one(), a0, ars, acs, b.data.as_ptr(), brs, bcs, T::zero(), out.add(from * n), n as isize, 1)
            } else {
                let b0 = b.data.as_ptr().offset(from as isize * bcs);
                T::gemm_raw(m, k, len, T::one(), a.data.as_ptr(), ars, acs, b0, brs, bcs, T::zero(), out.add(from), n as isize, 1)
            }
        }
    });
    Ok(())
}

/// [B, C, HW] -> [C, B*HW] (per-sample planes side by side), one task per channel.
fn batch_to_rows<T: Float>(v: &[T], batch: usize, c: usize, hw: usize) -> Vec<T> {
    let mut out = vec![T::zero(); v.len()];
    out.par_chunks_mut(batch * hw).enumerate().for_each(|(ch, row)| {
        for (b, seg) in row.chunks_mut(hw).enumerate() {
            seg.copy_from_slice(&v[(b * c + ch) * hw..(b * c + ch + 1) * hw]);
        }
    });
    out
}

/// Samples a task of the weight gradient sums (in order) before the groups' sums are added (in
/// order): at least 4, and enough that there are at most 8 groups (each holds a partial dW). It
/// depends on the batch alone, so that dW is the same on any number of threads.
fn dw_group(batch: usize) -> usize {
    batch.div_ceil(8).max(4)
}

// The batch is split across rayon's threads, one sample per task (each sample's GEMM runs on its
// task's thread: the `gemm` crate runs with `Parallelism::None`, so the two pools never compete).

/// y = conv(x, w), plus the bias per output channel after the products when given.
pub(super) fn conv2d_fwd(g: &ConvGeom, x: &Tensor, w: &Tensor, bias: Option<&Tensor>, y: &mut Tensor) -> Result<()> {
    conv2d_fwd_products(g, x, w, y)?;
    bias.map_or(Ok(()), |b| add_channel_bias(y, b))
}

fn conv2d_fwd_products(g: &ConvGeom, x: &Tensor, w: &Tensor, y: &mut Tensor) -> Result<()> {
    let g = Geom::new(g);
    let c_out = w.dims()[0];
    with_float!(x.dtype(), "conv2d_fwd", |T| {
        let (xs, ws) = (x.as_slice::<T>()?, w.as_slice::<T>()?);
        let ys = y.as_mut_slice::<T>()?;
        let hw = g.plane_out();
        let batch = xs.len() / g.plane_in();
        if winograd_runs(&g, batch, c_out) {
            winograd::conv(ws, (c_out, g.c), false, xs, batch, (g.h, g.w), ys);
            return Ok(());
        }
        if batched(&g, batch, c_out) {
            let group = group_of(batch);
            ys.par_chunks_mut(group * c_out * hw).zip(xs.par_chunks(group * g.plane_in())).for_each(|(yg, xg)| {
                let (samples, k) = (xg.len() / g.plane_in(), g.k());
                let n = samples * hw;
                // The group's panel [K, n] and its product [C_out, n], then each sample's
                // [C_out, HW] out of the product's columns.
                T::with_scratch(k * n + c_out * n, |buf| {
                    let (cols, prod) = buf.split_at_mut(k * n);
                    for (c, rows) in cols.chunks_mut(g.kh * g.kw * n).enumerate() {
                        im2col_channel(&g, xg, samples, c, rows);
                    }
                    gemm_block(ws, c_out, k, cols, n, prod, n, 0);
                    for (b, yb) in yg.chunks_mut(c_out * hw).enumerate() {
                        for (o, yo) in yb.chunks_mut(hw).enumerate() {
                            yo.copy_from_slice(&prod[o * n + b * hw..][..hw]);
                        }
                    }
                })
            });
            return Ok(());
        }
        if g.is_pointwise() {
            return ys
                .par_chunks_mut(c_out * hw)
                .zip(xs.par_chunks(g.plane_in()))
                .try_for_each(|(yb, xb)| gemm(Mat::new(ws, c_out, g.k()), Mat::new(xb, g.k(), hw), yb, T::zero()));
        }
        // Per sample, in blocks of whole output rows.
        let rows_per_block = (PANEL_COLS / g.wo).clamp(1, g.ho);
        ys.par_chunks_mut(c_out * hw).zip(xs.par_chunks(g.plane_in())).for_each(|(yb, xb)| {
            let mut pad = Padded::new(&g, g.c);
            let xp = pad.fill(&g, xb);
            T::with_scratch(g.k() * rows_per_block * g.wo, |cols| {
                for r0 in (0..g.ho).step_by(rows_per_block) {
                    let rows = r0..(r0 + rows_per_block).min(g.ho);
                    let n = rows.len() * g.wo;
                    im2col(&g, xp, rows, &mut cols[..g.k() * n]);
                    gemm_block(ws, c_out, g.k(), cols, n, yb, hw, r0 * g.wo);
                }
            })
        });
        Ok(())
    })
}

/// dx from dy and w, plus the bias per channel after the products when given (the transposed
/// convolution, which runs on this).
pub(super) fn conv2d_bwd_input(g: &ConvGeom, dy: &Tensor, w: &Tensor, bias: Option<&Tensor>, dx: &mut Tensor) -> Result<()> {
    conv2d_bwd_input_products(g, dy, w, dx)?;
    bias.map_or(Ok(()), |b| add_channel_bias(dx, b))
}

fn conv2d_bwd_input_products(g: &ConvGeom, dy: &Tensor, w: &Tensor, dx: &mut Tensor) -> Result<()> {
    let g = Geom::new(g);
    let c_out = w.dims()[0];
    with_float!(dy.dtype(), "conv2d_bwd_input", |T| {
        let (dys, ws) = (dy.as_slice::<T>()?, w.as_slice::<T>()?);
        let dxs = dx.as_mut_slice::<T>()?;
        let hw = g.plane_out();
        let batch = dys.len() / (c_out * hw);
        if winograd_runs(&g, batch, c_out) {
            winograd::conv(ws, (c_out, g.c), true, dys, batch, (g.h, g.w), dxs);
            return Ok(());
        }
        if batched(&g, batch, c_out) {
            let group = group_of(batch);
            dxs.par_chunks_mut(group * g.plane_in()).zip(dys.par_chunks(group * c_out * hw)).for_each(|(dxg, dyg)| {
                let (samples, k) = (dyg.len() / (c_out * hw), g.k());
                let n = samples * hw;
                // The group's dy as rows [C_out, n], its columns W^T dy [K, n], then each
                // sample's col2im.
                T::with_scratch(c_out * n + k * n, |buf| {
                    let (dy_rows, dcols) = buf.split_at_mut(c_out * n);
                    for (b, dyb) in dyg.chunks(c_out * hw).enumerate() {
                        for (o, dyo) in dyb.chunks(hw).enumerate() {
                            dy_rows[o * n + b * hw..][..hw].copy_from_slice(dyo);
                        }
                    }
                    gemm_wt_block(ws, c_out, k, dy_rows, n, 0, n, dcols);
                    for (b, dxb) in dxg.chunks_mut(g.plane_in()).enumerate() {
                        col2im(&g, &dcols[b * hw..], n, dxb);
                    }
                })
            });
            return Ok(());
        }
        if g.is_pointwise() {
            return dxs
                .par_chunks_mut(g.plane_in())
                .zip(dys.par_chunks(c_out * hw))
                .try_for_each(|(dxb, dyb)| gemm(Mat::new(ws, c_out, g.k()).t(), Mat::new(dyb, c_out, hw), dxb, T::zero()));
        }
        // Per sample, in blocks of whole output rows where the panel is large: each block's
        // columns W^T dY[:, block] are summed into the sample's padded planes while they are in
        // cache (a small panel is one block: splitting it leaves the GEMM too little to do). An
        // input's sum runs over the blocks in order, the taps in order within each (fixed by the
        // geometry).
        let rows_per_block = if g.k() * hw <= PANEL_WHOLE { g.ho } else { (PANEL_COLS / g.wo).clamp(1, g.ho) };
        let taps = g.kh * g.kw;
        dxs.par_chunks_mut(g.plane_in()).zip(dys.par_chunks(c_out * hw)).for_each(|(dxb, dyb)| {
            sum_in_padded(&g, dxb, |acc| {
                T::with_scratch(g.k() * rows_per_block * g.wo, |dcols| {
                    for r0 in (0..g.ho).step_by(rows_per_block) {
                        let rows = r0..(r0 + rows_per_block).min(g.ho);
                        let n = rows.len() * g.wo;
                        gemm_wt_block(ws, c_out, g.k(), dyb, hw, r0 * g.wo, n, dcols);
                        for (c, acc_c) in acc.chunks_mut(g.padded_plane()).enumerate() {
                            add_taps_to_plane(&g, &dcols[c * taps * n..], n, rows.clone(), acc_c);
                        }
                    }
                })
            })
        });
        Ok(())
    })
}

pub(super) fn conv2d_bwd_weight(g: &ConvGeom, x: &Tensor, dy: &Tensor, dw: &mut Tensor) -> Result<()> {
    let g = Geom::new(g);
    let c_out = dw.dims()[0];
    with_float!(x.dtype(), "conv2d_bwd_weight", |T| {
        let (xs, dys) = (x.as_slice::<T>()?, dy.as_slice::<T>()?);
        let dws = dw.as_mut_slice::<T>()?;
        let hw = g.plane_out();
        let scratch = if g.is_pointwise() { 0 } else { g.k() * hw };
        let (xin, yout) = (g.plane_in(), c_out * hw);
        let batch = xs.len() / xin;
        // Every product below is dW^T [K, C_out] = cols [K, HW] dY^T [HW, C_out], transposed into
        // dW at the end: with the panel as the row-major left operand the GEMM runs 1.2-3x faster
        // than dW = dY cols^T, which reads the panel down its columns.
        let k_all = g.k();
        if winograd_runs(&g, batch, c_out) {
            winograd::conv_bwd_weight(xs, dys, batch, (c_out, g.c), (g.h, g.w), dws);
            return Ok(());
        }
        if batched(&g, batch, c_out) {
            // The batch is the inner dimension of one GEMM (rows of dW^T in parallel blocks).
            let dy_rows = batch_to_rows(dys, batch, c_out, hw);
            let inner = batch * hw;
            let mut dwt = vec![T::zero(); dws.len()];
            T::with_scratch(k_all * inner, |cols| {
                im2col_batch(&g, xs, batch, cols);
                gemm_split(Mat::new(cols, k_all, inner), Mat::new(&dy_rows, c_out, inner).t(), &mut dwt)
            })?;
            transpose(&dwt, k_all, c_out, dws);
            return Ok(());
        }
        let sum_group = |xg: &[T], dyg: &[T], out: &mut [T], cols: &mut [T]| -> Result<()> {
            let mut pad = Padded::new(&g, g.c);
            for (n, (xb, dyb)) in xg.chunks(xin).zip(dyg.chunks(yout)).enumerate() {
                let cols_b: &[T] = if g.is_pointwise() {
                    xb
                } else {
                    im2col(&g, pad.fill(&g, xb), 0..g.ho, cols);
                    cols
                };
                let beta = if n == 0 { T::zero() } else { T::one() };
                gemm(Mat::new(cols_b, k_all, hw), Mat::new(dyb, c_out, hw).t(), out, beta)?;
            }
            Ok(())
        };
        let group = dw_group(batch);
        let groups = batch.div_ceil(group);
        let mut partial = vec![T::zero(); groups * dws.len()];
        partial
            .par_chunks_mut(dws.len())
            .zip(xs.par_chunks(group * xin).zip(dys.par_chunks(group * yout)))
            .try_for_each(|(out, (xg, dyg))| T::with_scratch(scratch, |cols| sum_group(xg, dyg, out, cols)))?;
        let (first, rest) = partial.split_at_mut(dws.len());
        for p in rest.chunks(dws.len()) {
            for (d, v) in first.iter_mut().zip(p) {
                *d += *v;
            }
        }
        transpose(first, k_all, c_out, dws);
        Ok(())
    })
}

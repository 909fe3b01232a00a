//! Winograd F(2x2, 3x3) for the CPU's 3x3, stride-1, padding-1 convolutions on small maps (Lavin
//! and Gray, "Fast Algorithms for Convolutional Neural Networks", 2016).
//!
//! The output is cut into 2 x 2 tiles (a partial tile at an odd edge); each tile needs the 4 x 4
//! input window around it (zeros outside the map). With the transforms
//!
//! ```text
//!   B^T = [1  0 -1  0]     G = [  1    0    0 ]     A^T = [1  1  1  0]
//!         [0  1  1  0]         [ 1/2  1/2  1/2]           [0  1 -1 -1]
//!         [0 -1  1  0]         [ 1/2 -1/2  1/2]
//!         [0  1  0 -1]         [  0    0    1 ]
//! ```
//!
//! V = B^T d B for each input window d, U = G g G^T for each 3x3 kernel g, and for each of the 16
//! transformed positions xi one GEMM M_xi [C_out, P] = U_xi [C_out, C_in] V_xi [C_in, P] over all
//! P tiles of the batch; a tile's outputs are A^T m A. That is 16 C_out C_in P multiply-adds where
//! im2col + GEMM does 36 C_out C_in P (4 outputs of 9 taps per tile): 2.25x fewer. The transforms
//! add and halve, so the result differs from the direct sum by rounding only (the tests bound it).
//!
//! The input gradient of such a convolution is the same convolution of dy with each kernel turned
//! by 180 degrees and C_in, C_out swapped; its weights are transformed in that layout
//! (`adjoint`), so both directions run the same GEMMs. The weights are
//! transformed on every call: with the batch's 16 small maps their transform is a fixed cost
//! beside the GEMMs (it reads 9 and writes 16 values per kernel).
//!
//! Every sum runs in a fixed order that depends on the shapes only (the 16 GEMMs are tasks that
//! each write their own outputs), so the result is the same on any number of threads.

use rayon::prelude::*;

use crate::backend::cpu::{Float, SharedMut};

/// Channels (in and out) from which the transforms pay: their cost grows with C_in C_out (the
/// weights) and C P (the tiles), the GEMMs' savings with C_in C_out P. Criterion on this 2-core
/// machine (`cargo bench --bench cpu_ops conv2d_3x3`, batch 16): at 256 channels on 8 x 8 and 512
/// on 4 x 4 Winograd took 11-32% less time per product; at 64 on 4 x 4 (the `cpu` preset's widest)
/// the difference stayed inside the noise; on maps of 16 x 16 and more it was 1.4-7x slower.
const MIN_CHANNELS: usize = 128;

/// Whether Winograd F(2x2, 3x3) runs a convolution of kernel kh x kw, stride and padding between
/// c_in and c_out channels (the caller runs it on small maps only).
pub(super) fn applies(kh: usize, kw: usize, stride: usize, pad: usize, (c_in, c_out): (usize, usize)) -> bool {
    kh == 3 && kw == 3 && stride == 1 && pad == 1 && c_in.min(c_out) >= MIN_CHANNELS
}

/// Source channels transformed at a time: their 16 transformed values go through a small buffer
/// and out as 16 runs of this many values (16 interleaved streams C_src apart, a power of two
/// apart on most models, would share cache sets and evict each other).
const STAGE: usize = 64;

/// The transformed weights U = G g G^T of w [C_out, C_in, 3, 3] for one direction, into u [C_dst,
/// 16, C_src]: U_xi is the matrix [C_dst, C_src] at offset xi C_src with row stride 16 C_src.
/// Forward: g = w[o, i] (dst o, src i); adjoint (the input gradient): g = w[o, i] turned by 180
/// degrees (dst i, src o). Every value of u is written.
fn transform_weights<T: Float>(w: &[T], (c_out, c_in): (usize, usize), adjoint: bool, u: &mut [T]) {
    let c_src = if adjoint { c_out } else { c_in };
    u.par_chunks_mut(16 * c_src).enumerate().for_each(|(d, ud)| {
        let mut stage = [[T::zero(); STAGE]; 16];
        for s0 in (0..c_src).step_by(STAGE) {
            let n = STAGE.min(c_src - s0);
            for (k, s) in (s0..s0 + n).enumerate() {
                // The adjoint's kernel is w[s, d] turned by 180 degrees: tap t is w's tap 8 - t.
                let g: [T; 9] =
                    if adjoint { std::array::from_fn(|t| w[(s * c_in + d) * 9 + 8 - t]) } else { std::array::from_fn(|t| w[(d * c_in + s) * 9 + t]) };
                for (xi, v) in kernel_transform(&g).iter().flatten().enumerate() {
                    stage[xi][k] = *v;
                }
            }
            for (xi, row) in stage.iter().enumerate() {
                ud[xi * c_src + s0..][..n].copy_from_slice(&row[..n]);
            }
        }
    });
}

/// G g G^T of a 3x3 kernel (row-major taps).
fn kernel_transform<T: Float>(g: &[T; 9]) -> [[T; 4]; 4] {
    let half = T::of_f64(0.5);
    let gt = |a: [T; 3]| [a[0], half * (a[0] + a[1] + a[2]), half * (a[0] - a[1] + a[2]), a[2]];
    // Columns first (G g, 4 x 3), then rows ((G g) G^T).
    let mut cols = [[T::zero(); 3]; 4];
    for c in 0..3 {
        let t = gt([g[c], g[3 + c], g[6 + c]]);
        for r in 0..4 {
            cols[r][c] = t[r];
        }
    }
    cols.map(gt)
}

/// Tiles of a map of `h` x `w` outputs: 2 x 2 each, the last row or column of tiles partial when
/// the side is odd.
fn tiles(h: usize, w: usize) -> (usize, usize) {
    (h.div_ceil(2), w.div_ceil(2))
}

/// The convolution (zero padding 1) of x [B, C_in, H, W] by w [C_out, C_in, 3, 3] into y [B,
/// C_out, H, W], or with `adjoint` its input-gradient product: dy [B, C_out, H, W] into dx [B,
/// C_in, H, W]. Every value of y is written. The transformed weights, the transformed inputs and
/// the GEMMs' products live in one scratch buffer of the calling thread, reused from call to call
/// (fresh buffers of this size cost more in page faults than the transforms themselves).
pub(super) fn conv<T: Float>(w: &[T], (c_out, c_in): (usize, usize), adjoint: bool, x: &[T], batch: usize, (h, w_): (usize, usize), y: &mut [T]) {
    let (c_dst, c_src) = if adjoint { (c_in, c_out) } else { (c_out, c_in) };
    assert!(
        w.len() == c_out * c_in * 9 && x.len() == batch * c_src * h * w_ && y.len() == batch * c_dst * h * w_,
        "winograd: operands do not fit [C_out {c_out}, C_in {c_in}, 3, 3] on {batch} maps of {h} x {w_}"
    );
    let (th, tw) = tiles(h, w_);
    let p = batch * th * tw;
    if p == 0 || c_dst == 0 {
        return;
    }
    let (nu, nv) = (c_dst * 16 * c_src, c_src * 16 * p);
    T::with_scratch(nu + nv + c_dst * 16 * p, |buf| {
        let (u, rest) = buf.split_at_mut(nu);
        let (v, m) = rest.split_at_mut(nv);
        transform_weights(w, (c_out, c_in), adjoint, u);
        transform_inputs(x, batch, c_src, (h, w_), v);
        products(u, v, m, (c_dst, c_src, p));
        transform_outputs(m, batch, c_dst, (h, w_), y);
    })
}

/// The weight gradient dw [C_out, C_in, 3, 3] of the convolution (zero padding 1) of x [B, C_in,
/// H, W] whose output gradient is dy [B, C_out, H, W]: the forward's chain run backwards. The
/// forward's tile outputs are A^T M A, so dM = A dY A^T for each tile's 2 x 2 output gradient dY
/// (zero outside the map); M_xi = U_xi V_xi, so dU_xi = dM_xi V_xi^T, one GEMM per xi over all
/// tiles; U = G g G^T, so dg = G^T dU G. 16 C_out C_in P multiply-adds, as in the forward.
pub(super) fn conv_bwd_weight<T: Float>(x: &[T], dy: &[T], batch: usize, (c_out, c_in): (usize, usize), (h, w): (usize, usize), dw: &mut [T]) {
    assert!(
        dw.len() == c_out * c_in * 9 && x.len() == batch * c_in * h * w && dy.len() == batch * c_out * h * w,
        "winograd: operands do not fit [C_out {c_out}, C_in {c_in}, 3, 3] on {batch} maps of {h} x {w}"
    );
    let (th, tw) = tiles(h, w);
    let p = batch * th * tw;
    if p == 0 {
        dw.fill(T::zero());
        return;
    }
    let (nv, nm) = (c_in * 16 * p, c_out * 16 * p);
    T::with_scratch(nv + nm + c_out * 16 * c_in, |buf| {
        let (v, rest) = buf.split_at_mut(nv);
        let (dm, du) = rest.split_at_mut(nm);
        transform_inputs(x, batch, c_in, (h, w), v);
        transform_output_grads(dy, batch, c_out, (h, w), dm);
        weight_products(dm, v, du, (c_out, c_in, p));
        untransform_weights(du, (c_out, c_in), dw);
    })
}

/// dM [C_out, 16, P] = A dY A^T per tile of dy [B, C_out, H, W] (the tile's values outside the
/// map 0), laid out as V. Every value written.
fn transform_output_grads<T: Float>(dy: &[T], batch: usize, c_out: usize, (h, w): (usize, usize), dm: &mut [T]) {
    let (th, tw) = tiles(h, w);
    let (per_sample, p) = (th * tw, batch * th * tw);
    let a = |u: [T; 2]| [u[0], u[0] + u[1], u[0] - u[1], -u[1]];
    dm.par_chunks_mut(16 * p).enumerate().for_each(|(o, dmo)| {
        for b in 0..batch {
            let plane = &dy[(b * c_out + o) * h * w..][..h * w];
            for ty in 0..th {
                for tx in 0..tw {
                    let at = |r: usize, c: usize| if 2 * ty + r < h && 2 * tx + c < w { plane[(2 * ty + r) * w + 2 * tx + c] } else { T::zero() };
                    // Rows first (dY A^T, 2 x 4), then columns (A (dY A^T)).
                    let rows = [a([at(0, 0), at(0, 1)]), a([at(1, 0), at(1, 1)])];
                    let tile = b * per_sample + ty * tw + tx;
                    for c in 0..4 {
                        for (r, val) in a([rows[0][c], rows[1][c]]).into_iter().enumerate() {
                            dmo[(r * 4 + c) * p + tile] = val;
                        }
                    }
                }
            }
        }
    });
}

/// dU [C_out, 16, C_in]: dU_xi = dM_xi V_xi^T.
fn weight_products<T: Float>(dm: &[T], v: &[T], du: &mut [T], (c_out, c_in, p): (usize, usize, usize)) {
    let dm = PerXi { data: dm, step: p, rs: 16 * p, cs: 1 };
    let vt = PerXi { data: v, step: p, rs: 1, cs: 16 * p };
    gemms_per_xi((c_out, p, c_in), dm, vt, du, (c_in, 16 * c_in));
}

/// dw[o, i] = G^T dU[o, :, i] G (4 x 4 -> 3 x 3), every value written.
fn untransform_weights<T: Float>(du: &[T], (c_out, c_in): (usize, usize), dw: &mut [T]) {
    assert!(du.len() == c_out * 16 * c_in && dw.len() == c_out * 9 * c_in, "winograd: weight gradients do not fit");
    let half = T::of_f64(0.5);
    let gt = |u: [T; 4]| [u[0] + half * (u[1] + u[2]), half * (u[1] - u[2]), half * (u[1] + u[2]) + u[3]];
    dw.par_chunks_mut(9 * c_in).zip(du.par_chunks(16 * c_in)).for_each(|(dwo, duo)| {
        let mut stage = [[T::zero(); STAGE]; 16];
        for s0 in (0..c_in).step_by(STAGE) {
            let n = STAGE.min(c_in - s0);
            for (xi, row) in stage.iter_mut().enumerate() {
                row[..n].copy_from_slice(&duo[xi * c_in + s0..][..n]);
            }
            for k in 0..n {
                let u = |r: usize, c: usize| stage[r * 4 + c][k];
                // Columns first (G^T dU, 3 x 4), then rows ((G^T dU) G).
                let cols: [[T; 4]; 3] = {
                    let t: [[T; 3]; 4] = std::array::from_fn(|c| gt([u(0, c), u(1, c), u(2, c), u(3, c)]));
                    std::array::from_fn(|r| [t[0][r], t[1][r], t[2][r], t[3][r]])
                };
                let g = &mut dwo[(s0 + k) * 9..][..9];
                for (r, row) in cols.iter().enumerate() {
                    g[r * 3..r * 3 + 3].copy_from_slice(&gt(*row));
                }
            }
        }
    });
}

/// V [C_src, 16, P] of x [B, C_src, H, W]: V_xi is [C_src, P] at offset xi P with row stride 16 P;
/// tile t of sample b is column b T + t (T tiles a sample, row-major). Every value written.
fn transform_inputs<T: Float>(x: &[T], batch: usize, c_src: usize, (h, w): (usize, usize), v: &mut [T]) {
    let (th, tw) = tiles(h, w);
    let (per_sample, p) = (th * tw, batch * th * tw);
    v.par_chunks_mut(16 * p).enumerate().for_each(|(c, vc)| {
        for b in 0..batch {
            let plane = &x[(b * c_src + c) * h * w..][..h * w];
            for ty in 0..th {
                for tx in 0..tw {
                    let mut d = [[T::zero(); 4]; 4];
                    for (r, row) in d.iter_mut().enumerate() {
                        let Some(ih) = (2 * ty + r).checked_sub(1).filter(|&i| i < h) else { continue };
                        for (cc, dv) in row.iter_mut().enumerate() {
                            if let Some(iw) = (2 * tx + cc).checked_sub(1).filter(|&i| i < w) {
                                *dv = plane[ih * w + iw];
                            }
                        }
                    }
                    let t = input_transform(&d);
                    let at = b * per_sample + ty * tw + tx;
                    for (xi, val) in t.iter().flatten().enumerate() {
                        vc[xi * p + at] = *val;
                    }
                }
            }
        }
    });
}

/// M [C_dst, 16, P]: M_xi = U_xi V_xi.
fn products<T: Float>(u: &[T], v: &[T], m: &mut [T], (c_dst, c_src, p): (usize, usize, usize)) {
    let u = PerXi { data: u, step: c_src, rs: 16 * c_src, cs: 1 };
    let v = PerXi { data: v, step: p, rs: 16 * p, cs: 1 };
    gemms_per_xi((c_dst, c_src, p), u, v, m, (p, 16 * p));
}

/// One operand of the 16 per-xi GEMMs: matrix xi starts at xi step, its rows rs and its columns
/// cs apart.
struct PerXi<'a, T> {
    data: &'a [T],
    step: usize,
    rs: usize,
    cs: usize,
}

impl<T> PerXi<'_, T> {
    /// Whether all 16 matrices of `rows` x `cols` lie inside the data.
    fn fits(&self, rows: usize, cols: usize) -> bool {
        rows == 0 || cols == 0 || 15 * self.step + (rows - 1) * self.rs + (cols - 1) * self.cs < self.data.len()
    }
}

/// C_xi [m, n] = A_xi [m, k] B_xi [k, n] for xi in 0..16, one task each; C_xi starts at xi c_step
/// in c with rows c_rs apart (columns adjacent), and every task writes only its own matrix.
fn gemms_per_xi<T: Float>((m, k, n): (usize, usize, usize), a: PerXi<T>, b: PerXi<T>, c: &mut [T], (c_step, c_rs): (usize, usize)) {
    let c_fits = PerXi { data: &*c, step: c_step, rs: c_rs, cs: 1 }.fits(m, n);
    assert!(a.fits(m, k) && b.fits(k, n) && c_fits && n <= c_step, "winograd: per-xi products do not fit");
    let out = SharedMut(c.as_mut_ptr());
    (0..16).into_par_iter().for_each(|xi| {
        let out = out.ptr();
        // SAFETY: `fits` bounds every element the strides reach, for all 16 matrices; C_xi's
        // columns xi c_step..xi c_step + n (n <= c_step) are this task's alone.
        unsafe {
            T::gemm_raw(
                m,
                k,
                n,
                T::one(),
                a.data.as_ptr().add(xi * a.step),
                a.rs as isize,
                a.cs as isize,
                b.data.as_ptr().add(xi * b.step),
                b.rs as isize,
                b.cs as isize,
                T::zero(),
                out.add(xi * c_step),
                c_rs as isize,
                1,
            )
        }
    });
}

/// y [B, C_dst, H, W] = A^T m A per tile (the part of a tile inside the map), one task per sample.
fn transform_outputs<T: Float>(m: &[T], batch: usize, c_dst: usize, (h, w): (usize, usize), y: &mut [T]) {
    let (th, tw) = tiles(h, w);
    let (per_sample, p) = (th * tw, batch * th * tw);
    y.par_chunks_mut(c_dst * h * w).enumerate().for_each(|(b, yb)| {
        for (o, plane) in yb.chunks_mut(h * w).enumerate() {
            let mo = &m[o * 16 * p..][..16 * p];
            for ty in 0..th {
                for tx in 0..tw {
                    let at = b * per_sample + ty * tw + tx;
                    let mut t = [[T::zero(); 4]; 4];
                    for (xi, val) in t.iter_mut().flatten().enumerate() {
                        *val = mo[xi * p + at];
                    }
                    let s = output_transform(&t);
                    for (r, row) in s.iter().enumerate() {
                        let oh = 2 * ty + r;
                        if oh >= h {
                            continue;
                        }
                        for (cc, &val) in row.iter().enumerate() {
                            if 2 * tx + cc < w {
                                plane[oh * w + 2 * tx + cc] = val;
                            }
                        }
                    }
                }
            }
        }
    });
}

/// B^T d B.
fn input_transform<T: Float>(d: &[[T; 4]; 4]) -> [[T; 4]; 4] {
    let bt = |a: [T; 4]| [a[0] - a[2], a[1] + a[2], a[2] - a[1], a[1] - a[3]];
    // Columns first (B^T d), then rows ((B^T d) B).
    let mut cols = [[T::zero(); 4]; 4];
    for c in 0..4 {
        let t = bt([d[0][c], d[1][c], d[2][c], d[3][c]]);
        for r in 0..4 {
            cols[r][c] = t[r];
        }
    }
    cols.map(bt)
}

/// A^T m A (2 x 2).
fn output_transform<T: Float>(m: &[[T; 4]; 4]) -> [[T; 2]; 2] {
    let at = |a: [T; 4]| [a[0] + a[1] + a[2], a[1] - a[2] - a[3]];
    let mut cols = [[T::zero(); 4]; 2];
    for c in 0..4 {
        let t = at([m[0][c], m[1][c], m[2][c], m[3][c]]);
        cols[0][c] = t[0];
        cols[1][c] = t[1];
    }
    cols.map(at)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The direct 3x3 cross-correlation with zero padding 1, in f64.
    fn direct(x: &[f64], wt: &[f64], batch: usize, (ci, co): (usize, usize), (h, w): (usize, usize)) -> Vec<f64> {
        let mut y = vec![0.0; batch * co * h * w];
        for b in 0..batch {
            for o in 0..co {
                for oh in 0..h {
                    for ow in 0..w {
                        let mut s = 0.0;
                        for i in 0..ci {
                            for (t, &g) in wt[(o * ci + i) * 9..][..9].iter().enumerate() {
                                let (ih, iw) = ((oh + t / 3).wrapping_sub(1), (ow + t % 3).wrapping_sub(1));
                                if ih < h && iw < w {
                                    s += g * x[((b * ci + i) * h + ih) * w + iw];
                                }
                            }
                        }
                        y[((b * co + o) * h + oh) * w + ow] = s;
                    }
                }
            }
        }
        y
    }

    fn values(n: usize, seed: u64) -> Vec<f64> {
        let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
            })
            .collect()
    }

    /// Forward, input and weight gradients against the direct sums (f64: rounding only), on even, odd and
    /// one-wide maps, C_in != C_out. The input gradient is checked through the adjoint identity
    /// <conv(x), dy> = <x, conv_adjoint(dy)>, and directly on a turned-kernel convolution.
    #[test]
    fn forward_and_input_gradient_match_the_direct_sums() {
        for &(batch, ci, co, h, w) in &[(2, 3, 5, 4, 4), (1, 2, 3, 5, 3), (3, 4, 2, 1, 6), (2, 1, 1, 2, 2), (1, 6, 4, 7, 8)] {
            let x = values(batch * ci * h * w, 1);
            let wt = values(co * ci * 9, 2);
            let mut y = vec![f64::NAN; batch * co * h * w];
            conv(&wt, (co, ci), false, &x, batch, (h, w), &mut y);
            let want = direct(&x, &wt, batch, (ci, co), (h, w));
            for (i, (a, b)) in y.iter().zip(&want).enumerate() {
                assert!((a - b).abs() <= 1e-12 * (1.0 + b.abs()), "forward {batch}x{ci}->{co} {h}x{w}: [{i}] {a} vs {b}");
            }
            // dx = the convolution of dy with the kernels turned, channels swapped.
            let dy = values(batch * co * h * w, 3);
            let mut dx = vec![f64::NAN; batch * ci * h * w];
            conv(&wt, (co, ci), true, &dy, batch, (h, w), &mut dx);
            let mut turned_w = vec![0.0; ci * co * 9];
            for o in 0..co {
                for i in 0..ci {
                    for t in 0..9 {
                        turned_w[(i * co + o) * 9 + 8 - t] = wt[(o * ci + i) * 9 + t];
                    }
                }
            }
            let want = direct(&dy, &turned_w, batch, (co, ci), (h, w));
            for (i, (a, b)) in dx.iter().zip(&want).enumerate() {
                assert!((a - b).abs() <= 1e-12 * (1.0 + b.abs()), "input gradient {batch}x{ci}->{co} {h}x{w}: [{i}] {a} vs {b}");
            }
            // dw[o, i, t] = sum over samples and outputs of dy[o] x[i] at the tap's offset.
            let mut dw = vec![f64::NAN; co * ci * 9];
            conv_bwd_weight(&x, &dy, batch, (co, ci), (h, w), &mut dw);
            for o in 0..co {
                for i in 0..ci {
                    for t in 0..9 {
                        let mut want = 0.0;
                        for b in 0..batch {
                            for oh in 0..h {
                                for ow in 0..w {
                                    let (ih, iw) = ((oh + t / 3).wrapping_sub(1), (ow + t % 3).wrapping_sub(1));
                                    if ih < h && iw < w {
                                        want += dy[((b * co + o) * h + oh) * w + ow] * x[((b * ci + i) * h + ih) * w + iw];
                                    }
                                }
                            }
                        }
                        let got = dw[(o * ci + i) * 9 + t];
                        assert!(
                            (got - want).abs() <= 1e-12 * (1.0 + want.abs()),
                            "weight gradient {batch}x{ci}->{co} {h}x{w}: [{o}, {i}, {t}] {got} vs {want}"
                        );
                    }
                }
            }
            let lhs: f64 = y.iter().zip(&dy).map(|(a, b)| a * b).sum();
            let rhs: f64 = x.iter().zip(&dx).map(|(a, b)| a * b).sum();
            assert!((lhs - rhs).abs() <= 1e-10 * lhs.abs().max(1.0), "adjoint identity: {lhs} vs {rhs}");
        }
    }
}

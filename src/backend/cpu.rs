//! What the CPU kernels of every family share: the float types they compute in, the GEMM, and
//! parallel maps and sums.
//!
//! Kernels are generic over f32 and f64 (`Float`). Parallel work is split in fixed-size pieces
//! whose results are combined in a fixed order, so every result is bit-for-bit the same whatever
//! the thread count. Reductions accumulate in f64.

#[allow(unused_imports)]
use crate::tensor::Element as _;
#[allow(unused_imports)]
use num_traits::{Float as _, One as _, Zero as _};
use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::tensor::{Element, Tensor};

/// Elements per parallel piece of an element-wise kernel or a reduction.
pub(crate) const CHUNK: usize = 1 << 14;

/// A floating-point type the CPU computes in.
pub trait Float: Element + num_traits::Float + rustfft::FftNum + Default + std::iter::Sum + std::ops::AddAssign {
    /// Runs `f` on `len` elements of the calling thread's scratch (see `with_scratch_in`): no
    /// allocation and no zero-fill on the hot path; the contents are stale.
    fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [Self]) -> R) -> R;

    /// C = alpha * A B + beta * C with explicit row and column strides (the `gemm` crate, on the
    /// calling thread; C is not read when beta is zero).
    ///
    /// # Safety
    /// The strides and sizes must describe memory inside the pointed-to buffers.
    #[allow(clippy::too_many_arguments)]
    unsafe fn gemm_raw(
        m: usize,
        k: usize,
        n: usize,
        alpha: Self,
        a: *const Self,
        rsa: isize,
        csa: isize,
        b: *const Self,
        rsb: isize,
        csb: isize,
        beta: Self,
        c: *mut Self,
        rsc: isize,
        csc: isize,
    );
}

/// Scratch requests up to this many bytes reuse their thread's buffer; larger ones (an im2col
/// panel of a huge map) get a fresh buffer, freed after. A fresh buffer costs its page faults on
/// first touch (about 0.4 ms per MiB here, more than the Winograd transforms that fill it), so
/// the kept size covers the study model's Winograd scratch (21 MiB at 512 channels on 4 x 4).
const SCRATCH_KEEP: usize = 32 << 20;

/// Runs `f` on `len` elements of this thread's scratch buffer (reused across calls, so its
/// contents are stale: `f` must write every element it reads). A nested request on the same
/// thread, or one over [`SCRATCH_KEEP`], gets a fresh buffer.
fn with_scratch_in<T: Copy + Default, R>(cell: &'static std::thread::LocalKey<std::cell::RefCell<Vec<T>>>, len: usize, f: impl FnOnce(&mut [T]) -> R) -> R {
    if len * std::mem::size_of::<T>() > SCRATCH_KEEP {
        return f(&mut vec![T::default(); len]);
    }
    cell.with(|c| match c.try_borrow_mut() {
        Ok(mut buf) => {
            if buf.len() < len {
                buf.resize(len, T::default());
            }
            f(&mut buf[..len])
        }
        Err(_) => f(&mut vec![T::default(); len]),
    })
}

thread_local! {
    static SCRATCH_F32: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    static SCRATCH_F64: std::cell::RefCell<Vec<f64>> = const { std::cell::RefCell::new(Vec::new()) };
}

impl Float for f32 {
    fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
        with_scratch_in(&SCRATCH_F32, len, f)
    }

    unsafe fn gemm_raw(
        m: usize,
        k: usize,
        n: usize,
        alpha: f32,
        a: *const f32,
        rsa: isize,
        csa: isize,
        b: *const f32,
        rsb: isize,
        csb: isize,
        beta: f32,
        c: *mut f32,
        rsc: isize,
        csc: isize,
    ) {
        gemm_on_thread(m, k, n, alpha, a, rsa, csa, b, rsb, csb, beta, c, rsc, csc)
    }
}

impl Float for f64 {
    fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [f64]) -> R) -> R {
        with_scratch_in(&SCRATCH_F64, len, f)
    }

    unsafe fn gemm_raw(
        m: usize,
        k: usize,
        n: usize,
        alpha: f64,
        a: *const f64,
        rsa: isize,
        csa: isize,
        b: *const f64,
        rsb: isize,
        csb: isize,
        beta: f64,
        c: *mut f64,
        rsc: isize,
        csc: isize,
    ) {
        gemm_on_thread(m, k, n, alpha, a, rsa, csa, b, rsb, csb, beta, c, rsc, csc)
    }
}

/// [`Float::gemm_raw`] through the `gemm` crate, single-threaded (the callers split work across
/// rayon's threads, so that one pool runs everything). Its argument order differs: its `alpha`
/// scales the old C (read only when asked) and its `beta` the product.
///
/// # Safety
/// As [`Float::gemm_raw`].
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_on_thread<T: 'static + Copy + num_traits::Zero + PartialEq>(
    m: usize,
    k: usize,
    n: usize,
    alpha: T,
    a: *const T,
    rsa: isize,
    csa: isize,
    b: *const T,
    rsb: isize,
    csb: isize,
    beta: T,
    c: *mut T,
    rsc: isize,
    csc: isize,
) {
    // SAFETY: the caller's promise on the strides and sizes.
    unsafe { gemm::gemm(m, n, k, c, csc, rsc, beta != T::zero(), a, csa, rsa, b, csb, rsb, beta, alpha, false, false, false, gemm::Parallelism::None) }
}

/// A row-major matrix operand of `gemm`: its data, and whether to use it transposed.
#[derive(Clone, Copy)]
pub(crate) struct Mat<'a, T> {
    pub data: &'a [T],
    pub rows: usize,
    pub cols: usize,
    pub transposed: bool,
}

impl<'a, T> Mat<'a, T> {
    pub fn new(data: &'a [T], rows: usize, cols: usize) -> Self {
        Mat { data, rows, cols, transposed: false }
    }
    pub fn t(self) -> Self {
        Mat { transposed: !self.transposed, ..self }
    }
    /// (rows, cols, row stride, column stride) of the operand as used.
    pub fn view(&self) -> (usize, usize, isize, isize) {
        if self.transposed {
            (self.cols, self.rows, 1, self.cols as isize)
        } else {
            (self.rows, self.cols, self.cols as isize, 1)
        }
    }
}

/// c [m, n] (row-major) = a b + beta c. Sizes are checked, so the unsafe call stays in bounds.
pub(crate) fn gemm<T: Float>(a: Mat<T>, b: Mat<T>, c: &mut [T], beta: T) -> Result<()> {
    let (m, k, rsa, csa) = a.view();
    let (k2, n, rsb, csb) = b.view();
    if k != k2 || a.data.len() < a.rows * a.cols || b.data.len() < b.rows * b.cols || c.len() < m * n {
        return Err(Error::invalid("gemm", format!("operands do not fit: [{m}x{k}] x [{k2}x{n}] into {} places", c.len())));
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    // SAFETY: the checks above bound every index the strides can reach.
    unsafe { T::gemm_raw(m, k, n, T::one(), a.data.as_ptr(), rsa, csa, b.data.as_ptr(), rsb, csb, beta, c.as_mut_ptr(), n as isize, 1) }
    Ok(())
}

/// A pointer that parallel tasks share to write disjoint parts of one buffer (columns of a
/// GEMM's output, the modes of a spectrum) that no slice split can express.
#[derive(Clone, Copy)]
pub(crate) struct SharedMut<T>(pub *mut T);
// SAFETY: its users write disjoint elements from each task and read nothing through it.
unsafe impl<T> Send for SharedMut<T> {}
unsafe impl<T> Sync for SharedMut<T> {}

impl<T> SharedMut<T> {
    /// The pointer (a method, so that a closure captures the whole `SharedMut`, not its field).
    pub fn ptr(self) -> *mut T {
        self.0
    }
}

/// Runs `$body` with `$T` bound to the Rust type of `$dtype` (f32 or f64).
macro_rules! with_float {
    ($dtype:expr, $op:literal, |$T:ident| $body:expr) => {
        match $dtype {
            $crate::tensor::DType::F32 => {
                type $T = f32;
                $body
            }
            $crate::tensor::DType::F64 => {
                type $T = f64;
                $body
            }
            other => Err($crate::error::Error::UnsupportedDType { op: $op, dtype: other, why: "the CPU computes in f32 or f64" }),
        }
    };
}
pub(crate) use with_float;

/// y[i] = f(i-th elements) in parallel pieces.
pub(crate) fn map1<T: Float>(x: &[T], y: &mut [T], f: impl Fn(T) -> T + Sync) {
    y.par_chunks_mut(CHUNK).zip(x.par_chunks(CHUNK)).for_each(|(yc, xc)| yc.iter_mut().zip(xc).for_each(|(y, &x)| *y = f(x)));
}

pub(crate) fn map2<T: Float>(a: &[T], b: &[T], y: &mut [T], f: impl Fn(T, T) -> T + Sync) {
    y.par_chunks_mut(CHUNK).zip(a.par_chunks(CHUNK).zip(b.par_chunks(CHUNK))).for_each(|(yc, (ac, bc))| {
        for ((y, &a), &b) in yc.iter_mut().zip(ac).zip(bc) {
            *y = f(a, b)
        }
    });
}

/// sum_i f(a_i, b_i) in f64: fixed pieces summed in order, so the result does not depend on threads.
pub(crate) fn sum_pairs<T: Float>(a: &[T], b: &[T], f: impl Fn(f64, f64) -> f64 + Sync) -> f64 {
    let parts: Vec<f64> = a.par_chunks(CHUNK).zip(b.par_chunks(CHUNK)).map(|(ac, bc)| sum_piece(ac, bc, &f)).collect();
    parts.iter().sum()
}

/// Independent accumulators of [`sum_piece`]: one f64 add chain waits 4 cycles per add (about
/// 3 GB/s of f32); eight chains, which vectorise, run at memory speed.
const LANES: usize = 8;

/// sum_i f(a_i, b_i) of one piece in f64: value i goes to accumulator i mod 8, and the eight are
/// added pairwise in a fixed order.
pub(crate) fn sum_piece<T: Float>(a: &[T], b: &[T], f: &impl Fn(f64, f64) -> f64) -> f64 {
    let mut acc = [0.0f64; LANES];
    let (a8, b8) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let (ra, rb) = (a8.remainder(), b8.remainder());
    for (ca, cb) in a8.zip(b8) {
        for i in 0..LANES {
            acc[i] += f(ca[i].as_f64(), cb[i].as_f64());
        }
    }
    for (i, (&x, &y)) in ra.iter().zip(rb).enumerate() {
        acc[i] += f(x.as_f64(), y.as_f64());
    }
    ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]))
}

pub(crate) fn scalar<T: Float>(t: &Tensor) -> Result<T> {
    Ok(t.as_slice::<T>()?[0])
}

/// Rows and columns of one tile of [`transpose`]: a tile's reads and writes (16 KiB of f32
/// each) stay in L1, and each of its writes is a contiguous run of `TILE` values.
const TILE: usize = 64;

/// dst [cols, rows] = src [rows, cols] transposed (both row-major), in parallel tiles. Written
/// tile by tile, not row by row: copying a whole row of `src` into `cols` rows of `dst` at once
/// writes `cols` streams a power of two apart, which share cache sets and evict each other.
pub(crate) fn transpose<T: Copy + Send + Sync>(src: &[T], rows: usize, cols: usize, dst: &mut [T]) {
    assert!(dst.len() == rows * cols, "transpose: {} values for {rows} x {cols}", dst.len());
    // SAFETY: dst holds rows * cols values.
    unsafe { transpose_to(src, rows, cols, dst.as_mut_ptr()) }
}

/// src [rows, cols] transposed into a new buffer (not zero-filled first: every value is written).
pub(crate) fn transposed<T: Copy + Send + Sync>(src: &[T], rows: usize, cols: usize) -> Vec<T> {
    let mut v = Vec::with_capacity(rows * cols);
    // SAFETY: the capacity holds rows * cols values, and transpose_to writes each of them.
    unsafe {
        transpose_to(src, rows, cols, v.as_mut_ptr());
        v.set_len(rows * cols);
    }
    v
}

/// The tiles of [`transpose`], written through `dst`, which must have room for rows * cols values.
unsafe fn transpose_to<T: Copy + Send + Sync>(src: &[T], rows: usize, cols: usize, dst: *mut T) {
    assert!(src.len() == rows * cols, "transpose: {} values for {rows} x {cols}", src.len());
    let out = SharedMut(dst);
    let (tr, tc) = (rows.div_ceil(TILE), cols.div_ceil(TILE));
    (0..tr * tc).into_par_iter().for_each(|t| {
        let (r0, c0) = ((t / tc) * TILE, (t % tc) * TILE);
        let (r1, c1) = ((r0 + TILE).min(rows), (c0 + TILE).min(cols));
        let out = out.ptr();
        // SAFETY: c < cols and r < rows, so c * rows + r < rows * cols, within dst (the
        // caller's promise); the tiles partition dst, and this task alone writes its tile.
        let put = |r: usize, c: usize| unsafe { out.add(c * rows + r).write(src[r * cols + c]) };
        // The inner loop runs along the side whose other end has the short stride: a tile's
        // 64 lines a long power-of-two stride apart would share one cache set.
        if cols <= rows {
            (c0..c1).for_each(|c| (r0..r1).for_each(|r| put(r, c)));
        } else {
            (r0..r1).for_each(|r| (c0..c1).for_each(|c| put(r, c)));
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transpose_matches_the_definition_on_ragged_tiles() {
        // Shapes around the tile size, both orientations, and a single row or column.
        for (rows, cols) in [(1, 1), (1, 130), (130, 1), (63, 65), (65, 63), (128, 200), (200, 128), (7, 300)] {
            let src: Vec<u32> = (0..(rows * cols) as u32).collect();
            let t = transposed(&src, rows, cols);
            let mut back = vec![0u32; rows * cols];
            transpose(&t, cols, rows, &mut back);
            for r in 0..rows {
                for c in 0..cols {
                    assert_eq!(t[c * rows + r], src[r * cols + c], "{rows} x {cols} at ({r}, {c})");
                }
            }
            assert_eq!(back, src, "{rows} x {cols} there and back");
        }
    }
}

//! Darcy flow, the FNO paper's benchmark (Li et al., arXiv 2010.08895, section 5.2), generated here.
//!
//! - The coefficient: a Gaussian random field mu ~ N(0, (-Laplacian + tau^2 I)^-alpha) with zero
//!   Neumann boundary conditions, drawn in the Laplacian's orthonormal eigenbasis (1 and
//!   sqrt(2) cos(pi k x), as the paper's GRF.m draws it with MATLAB's orthonormal idct2) on the
//!   grid's nodes (x_i = i / (s - 1)), mean mode removed, then thresholded: a = `high` where
//!   mu >= 0, `low` elsewhere ([`grf`], [`threshold`]).
//! - The solution of -div(a grad u) = f, u = 0 on the boundary: the five-point finite-difference
//!   scheme with the coefficient averaged onto cell faces (second order for smooth a; the scheme
//!   of the paper's MATLAB generator), solved by conjugate gradients preconditioned with a
//!   geometric multigrid V-cycle ([`solve`]).
//! - Subsampling every `subsample`-th point (421 -> 85 for 5), a cache keyed by every field of
//!   `[darcy]`, and import of existing `coeff`/`sol` arrays from NPZ files.
//! - The pointwise unit-Gaussian normaliser of the paper's scripts ([`Normalizer`]).

use std::path::{Path, PathBuf};

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};
use rayon::prelude::*;

use crate::config::DarcyConfig;
use crate::error::{Error, Result};
use crate::tensor::{DType, Tensor};

/// Bumped whenever the generation changes, so that old caches are not reused. 2: the field's
/// basis is orthonormal (version 1 left out the sqrt(2) of each non-constant factor, which gave
/// the modes along the axes twice their relative variance).
const DARCY_VERSION: u32 = 2;

/// The square root of the covariance's eigenvalue for cosine mode (k1, k2):
/// tau^(alpha - 1) (pi^2 |k|^2 + tau^2)^(-alpha / 2), the scale of the paper's generator.
pub fn grf_sqrt_eigenvalue(k1: usize, k2: usize, alpha: f64, tau: f64) -> f64 {
    let k2sum = (k1 * k1 + k2 * k2) as f64;
    tau.powf(alpha - 1.0) * (std::f64::consts::PI.powi(2) * k2sum + tau * tau).powf(-alpha / 2.0)
}

/// The cosine basis on s nodes: c[i * s + k] = cos(pi k x_i), x_i = i / (s - 1).
fn cosine_basis(s: usize) -> Vec<f64> {
    let mut c = vec![0.0; s * s];
    for i in 0..s {
        for k in 0..s {
            c[i * s + k] = (std::f64::consts::PI * (k * i) as f64 / (s - 1) as f64).cos();
        }
    }
    c
}

/// C A C^T for square s x s row-major matrices (the basis C and coefficients A).
fn basis_sandwich(c: &[f64], a: &[f64], s: usize) -> Vec<f64> {
    let mut t = vec![0.0; s * s];
    let mut u = vec![0.0; s * s];
    let si = s as isize;
    // SAFETY: every pointer covers an s x s row-major matrix (strides s, 1 or 1, s).
    unsafe {
        matrixmultiply::dgemm(s, s, s, 1.0, c.as_ptr(), si, 1, a.as_ptr(), si, 1, 0.0, t.as_mut_ptr(), si, 1);
        matrixmultiply::dgemm(s, s, s, 1.0, t.as_ptr(), si, 1, c.as_ptr(), 1, si, 0.0, u.as_mut_ptr(), si, 1);
    }
    u
}

/// The orthonormal Neumann eigenfunction's factor: phi_k(x) = `neumann_norm(k)` cos(pi k x), that
/// is 1 for the constant and sqrt(2) for every other mode.
pub fn neumann_norm(k: usize) -> f64 {
    if k == 0 {
        1.0
    } else {
        std::f64::consts::SQRT_2
    }
}

/// One draw of the random field on an s x s node grid (row-major), from `rng`:
/// mu(x, y) = sum over (k1, k2) != (0, 0) of xi_k sqrt(lambda_k) phi_k1(x) phi_k2(y), xi ~ N(0, 1),
/// phi the orthonormal eigenfunctions ([`neumann_norm`]): the law of the paper's GRF.m, whose
/// `idct2(s * coef .* xi)` is this sum at the cell midpoints.
pub fn grf(s: usize, alpha: f64, tau: f64, rng: &mut ChaCha8Rng) -> Vec<f64> {
    grf_with_basis(&cosine_basis(s), s, alpha, tau, rng)
}

fn grf_with_basis(basis: &[f64], s: usize, alpha: f64, tau: f64, rng: &mut ChaCha8Rng) -> Vec<f64> {
    let mut coef = vec![0.0; s * s];
    for k1 in 0..s {
        for k2 in 0..s {
            let xi: f64 = StandardNormal.sample(rng);
            let scale = neumann_norm(k1) * neumann_norm(k2) * grf_sqrt_eigenvalue(k1, k2, alpha, tau);
            coef[k1 * s + k2] = if k1 == 0 && k2 == 0 { 0.0 } else { xi * scale };
        }
    }
    basis_sandwich(basis, &coef, s)
}

/// Interfaces per grid line of an s x s coefficient field: the changes of value between
/// neighbours along every row and every column, divided by the 2 s lines. The paper's data at
/// s 85 cross about 2.06 times per line (REFERENCE section 5).
pub fn interfaces_per_line(a: &[f32], s: usize) -> f64 {
    let mut n = 0usize;
    for i in 0..s {
        for j in 1..s {
            n += usize::from(a[i * s + j] != a[i * s + j - 1]);
            n += usize::from(a[j * s + i] != a[(j - 1) * s + i]);
        }
    }
    n as f64 / (2 * s) as f64
}

/// psi(mu): `high` where mu >= 0, `low` where mu < 0.
pub fn threshold(mu: &[f64], high: f64, low: f64) -> Vec<f64> {
    mu.iter().map(|&m| if m >= 0.0 { high } else { low }).collect()
}

/// A nine-point stencil on the m x m interior nodes of a square grid, zero outside (Dirichlet):
/// (A x)[p] = sum over d of c[p][d] x[p + offset(d)], d = 3 (di + 1) + (dj + 1).
struct Stencil {
    m: usize,
    c: Vec<[f64; 9]>,
}

impl Stencil {
    /// The five-point scheme of -div(a grad .) on an s x s node grid with spacing h = 1 / (s - 1):
    /// face coefficients are the means of the two nodes' values.
    fn five_point(a: &[f64], s: usize) -> Stencil {
        let m = s - 2;
        let inv_h2 = ((s - 1) * (s - 1)) as f64;
        let at = |i: usize, j: usize| a[i * s + j];
        let mut c = vec![[0.0; 9]; m * m];
        for i in 0..m {
            for j in 0..m {
                let (gi, gj) = (i + 1, j + 1);
                let centre = at(gi, gj);
                let north = (centre + at(gi - 1, gj)) / 2.0 * inv_h2;
                let south = (centre + at(gi + 1, gj)) / 2.0 * inv_h2;
                let west = (centre + at(gi, gj - 1)) / 2.0 * inv_h2;
                let east = (centre + at(gi, gj + 1)) / 2.0 * inv_h2;
                let st = &mut c[i * m + j];
                st[1] = -north;
                st[7] = -south;
                st[3] = -west;
                st[5] = -east;
                st[4] = north + south + west + east;
            }
        }
        Stencil { m, c }
    }

    /// Row p of A times x without the diagonal: the neighbours' terms.
    fn off_diagonal(&self, x: &[f64], p: usize) -> f64 {
        let m = self.m as isize;
        let (i, j) = ((p / self.m) as isize, (p % self.m) as isize);
        let st = &self.c[p];
        let mut acc = 0.0;
        for di in -1..=1isize {
            let ii = i + di;
            if ii < 0 || ii >= m {
                continue;
            }
            for dj in -1..=1isize {
                let jj = j + dj;
                if jj < 0 || jj >= m || (di == 0 && dj == 0) {
                    continue;
                }
                acc += st[((di + 1) * 3 + dj + 1) as usize] * x[(ii * m + jj) as usize];
            }
        }
        acc
    }

    fn apply(&self, x: &[f64], y: &mut [f64]) {
        for (p, yp) in y.iter_mut().enumerate() {
            *yp = self.c[p][4] * x[p] + self.off_diagonal(x, p);
        }
    }

    /// One lexicographic Gauss-Seidel sweep on A x = b, forward or backward (the pair is
    /// symmetric, so a V-cycle with one before and one after is a symmetric preconditioner).
    fn gauss_seidel(&self, b: &[f64], x: &mut [f64], forward: bool) {
        let n = self.m * self.m;
        for q in 0..n {
            let p = if forward { q } else { n - 1 - q };
            x[p] = (b[p] - self.off_diagonal(x, p)) / self.c[p][4];
        }
    }
}

/// Bilinear prolongation from m_c x m_c interior nodes to (2 m_c + 1)^2 (vertex-centred grids,
/// zero boundary), along one axis: fine[2I + 1] = c[I], fine[2I] = (c[I - 1] + c[I]) / 2.
fn prolong_1d(c: &[f64], f: &mut [f64]) {
    let mc = c.len();
    for i in 0..mc {
        f[2 * i + 1] = c[i];
    }
    for i in 0..=mc {
        let left = if i > 0 { c[i - 1] } else { 0.0 };
        let right = if i < mc { c[i] } else { 0.0 };
        f[2 * i] = 0.5 * (left + right);
    }
}

/// The transpose of [`prolong_1d`].
fn restrict_1d(f: &[f64], c: &mut [f64]) {
    for (i, ci) in c.iter_mut().enumerate() {
        *ci = f[2 * i + 1] + 0.5 * (f[2 * i] + f[2 * i + 2]);
    }
}

/// P (coarse m_c x m_c -> fine m_f x m_f) or its transpose, separably.
fn transfer(x: &[f64], from: usize, to: usize, up: bool) -> Vec<f64> {
    let one = |src: &[f64], dst: &mut [f64]| if up { prolong_1d(src, dst) } else { restrict_1d(src, dst) };
    // Along rows (j), then along columns (i).
    let mut rows = vec![0.0; from * to];
    for i in 0..from {
        one(&x[i * from..(i + 1) * from], &mut rows[i * to..(i + 1) * to]);
    }
    let mut out = vec![0.0; to * to];
    let (mut col_in, mut col_out) = (vec![0.0; from], vec![0.0; to]);
    for j in 0..to {
        for i in 0..from {
            col_in[i] = rows[i * to + j];
        }
        one(&col_in, &mut col_out);
        for i in 0..to {
            out[i * to + j] = col_out[i];
        }
    }
    out
}

/// The Galerkin coarse operator P^T A P, read off by probing with nine colourings of the coarse
/// grid (each 3 x 3 neighbourhood holds one node of each colour).
fn galerkin(fine: &Stencil) -> Stencil {
    let (mf, mc) = (fine.m, (fine.m - 1) / 2);
    let mut c = vec![[0.0; 9]; mc * mc];
    let mut ax = vec![0.0; mf * mf];
    for ci in 0..3 {
        for cj in 0..3 {
            let v: Vec<f64> = (0..mc * mc).map(|p| if (p / mc) % 3 == ci && (p % mc) % 3 == cj { 1.0 } else { 0.0 }).collect();
            fine.apply(&transfer(&v, mc, mf, true), &mut ax);
            let w = transfer(&ax, mf, mc, false);
            for i in 0..mc {
                for j in 0..mc {
                    for di in -1..=1isize {
                        for dj in -1..=1isize {
                            let (ii, jj) = (i as isize + di, j as isize + dj);
                            if ii >= 0 && jj >= 0 && (ii as usize) < mc && (jj as usize) < mc && ii as usize % 3 == ci && jj as usize % 3 == cj {
                                c[i * mc + j][((di + 1) * 3 + dj + 1) as usize] = w[i * mc + j];
                            }
                        }
                    }
                }
            }
        }
    }
    Stencil { m: mc, c }
}

/// The Cholesky factor of a stencil's matrix in band storage (half-bandwidth m + 1): the
/// coarsest level's exact solve.
struct BandCholesky {
    n: usize,
    bw: usize,
    /// l[i * (bw + 1) + (i - j)] = L[i][j] for i - bw <= j <= i.
    l: Vec<f64>,
}

impl BandCholesky {
    fn new(a: &Stencil) -> Result<BandCholesky> {
        let (m, n) = (a.m, a.m * a.m);
        let bw = m + 1;
        let w = bw + 1;
        let mut l = vec![0.0; n * w];
        // A[i][j] for j <= i from the stencil.
        let entry = |i: usize, j: usize| -> f64 {
            let (ri, ci, rj, cj) = ((i / m) as isize, (i % m) as isize, (j / m) as isize, (j % m) as isize);
            let (di, dj) = (rj - ri, cj - ci);
            if di.abs() > 1 || dj.abs() > 1 {
                0.0
            } else {
                a.c[i][((di + 1) * 3 + dj + 1) as usize]
            }
        };
        for i in 0..n {
            for j in i.saturating_sub(bw)..=i {
                let mut sum = entry(i, j);
                for k in i.saturating_sub(bw).max(j.saturating_sub(bw))..j {
                    sum -= l[i * w + (i - k)] * l[j * w + (j - k)];
                }
                if i == j {
                    if sum.partial_cmp(&0.0) != Some(std::cmp::Ordering::Greater) {
                        return Err(Error::invalid("darcy solver", "the coarse operator is not positive definite"));
                    }
                    l[i * w] = sum.sqrt();
                } else {
                    l[i * w + (i - j)] = sum / l[j * w];
                }
            }
        }
        Ok(BandCholesky { n, bw, l })
    }

    fn solve(&self, b: &[f64]) -> Vec<f64> {
        let (n, bw, w) = (self.n, self.bw, self.bw + 1);
        let mut y = b.to_vec();
        for i in 0..n {
            let lo = i.saturating_sub(bw);
            let s: f64 = y[i] - y[lo..i].iter().enumerate().map(|(d, &yk)| self.l[i * w + (i - lo - d)] * yk).sum::<f64>();
            y[i] = s / self.l[i * w];
        }
        for i in (0..n).rev() {
            let hi = (i + bw + 1).min(n);
            let s: f64 = y[i] - y[i + 1..hi].iter().enumerate().map(|(d, &yk)| self.l[(i + 1 + d) * w + 1 + d] * yk).sum::<f64>();
            y[i] = s / self.l[i * w];
        }
        y
    }
}

/// A multigrid hierarchy: Galerkin operators down to a grid too small or too even to halve,
/// solved exactly there.
struct Multigrid {
    levels: Vec<Stencil>,
    coarse: BandCholesky,
}

/// Coarsest interior size: below it (or at an even size, which does not halve) the band solve
/// takes over.
const COARSEST: usize = 15;

impl Multigrid {
    fn new(fine: Stencil) -> Result<Multigrid> {
        let mut levels = vec![fine];
        loop {
            let m = levels[levels.len() - 1].m;
            if m % 2 == 0 || m < COARSEST {
                break;
            }
            let c = galerkin(&levels[levels.len() - 1]);
            levels.push(c);
        }
        let coarse = BandCholesky::new(&levels[levels.len() - 1])?;
        Ok(Multigrid { levels, coarse })
    }

    /// One V-cycle from x = 0 for A_l x = b: a forward Gauss-Seidel sweep, the coarse correction,
    /// a backward sweep.
    fn vcycle(&self, l: usize, b: &[f64]) -> Vec<f64> {
        if l + 1 == self.levels.len() {
            return self.coarse.solve(b);
        }
        let a = &self.levels[l];
        let (mf, mc) = (a.m, self.levels[l + 1].m);
        let mut x = vec![0.0; mf * mf];
        a.gauss_seidel(b, &mut x, true);
        let mut ax = vec![0.0; mf * mf];
        a.apply(&x, &mut ax);
        let r: Vec<f64> = b.iter().zip(&ax).map(|(b, a)| b - a).collect();
        let e = self.vcycle(l + 1, &transfer(&r, mf, mc, false));
        for (xi, ei) in x.iter_mut().zip(transfer(&e, mc, mf, true)) {
            *xi += ei;
        }
        a.gauss_seidel(b, &mut x, false);
        x
    }
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// The solution of a solve and what it took.
pub struct Solution {
    /// u on the s x s grid, boundary included (zero there).
    pub u: Vec<f64>,
    pub iterations: usize,
    /// ||f - A u|| / ||f|| at the end.
    pub relative_residual: f64,
}

/// Solves -div(a grad u) = f on the unit square's s x s node grid with u = 0 on the boundary;
/// `a` and `f` are s x s row-major (f is read at the interior nodes). Conjugate gradients with a
/// multigrid V-cycle preconditioner, to a relative residual of `tol`.
pub fn solve(a: &[f64], f: &[f64], s: usize, tol: f64) -> Result<Solution> {
    if s < 3 || a.len() != s * s || f.len() != s * s {
        return Err(Error::invalid("darcy solver", format!("a ({}) and f ({}) must be s x s with s = {s} >= 3", a.len(), f.len())));
    }
    if let Some(bad) = a.iter().find(|&&v| !(v.is_finite() && v > 0.0)) {
        return Err(Error::invalid("darcy solver", format!("the coefficient must be finite and > 0 everywhere, found {bad}")));
    }
    let m = s - 2;
    let b: Vec<f64> = (0..m * m).map(|p| f[(p / m + 1) * s + p % m + 1]).collect();
    let mg = Multigrid::new(Stencil::five_point(a, s))?;
    let op = &mg.levels[0];
    let bnorm = dot(&b, &b).sqrt();
    let mut x = vec![0.0; m * m];
    let mut iterations = 0;
    let mut rel = 0.0;
    if bnorm > 0.0 {
        let mut r = b.clone();
        let mut z = mg.vcycle(0, &r);
        let mut p = z.clone();
        let mut rz = dot(&r, &z);
        let mut ap = vec![0.0; m * m];
        const MAX_ITERATIONS: usize = 500;
        loop {
            op.apply(&p, &mut ap);
            let alpha = rz / dot(&p, &ap);
            for i in 0..m * m {
                x[i] += alpha * p[i];
                r[i] -= alpha * ap[i];
            }
            iterations += 1;
            rel = dot(&r, &r).sqrt() / bnorm;
            if rel <= tol {
                break;
            }
            if iterations >= MAX_ITERATIONS || !rel.is_finite() {
                return Err(Error::invalid("darcy solver", format!("no convergence: relative residual {rel:.3e} after {iterations} iterations")));
            }
            z = mg.vcycle(0, &r);
            let rz_new = dot(&r, &z);
            let beta = rz_new / rz;
            rz = rz_new;
            for i in 0..m * m {
                p[i] = z[i] + beta * p[i];
            }
        }
    }
    let mut u = vec![0.0; s * s];
    for p in 0..m * m {
        u[(p / m + 1) * s + p % m + 1] = x[p];
    }
    Ok(Solution { u, iterations, relative_residual: rel })
}

/// Samples of a split: coefficient and solution fields, each [count, s, s] row-major.
#[derive(Clone, Debug, PartialEq)]
pub struct DarcySplit {
    pub s: usize,
    pub coeff: Vec<f32>,
    pub sol: Vec<f32>,
}

impl DarcySplit {
    pub fn len(&self) -> usize {
        if self.s == 0 {
            0
        } else {
            self.coeff.len() / (self.s * self.s)
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn field(v: &[f32], s: usize, i: usize) -> &[f32] {
        &v[i * s * s..(i + 1) * s * s]
    }

    pub fn coeff_of(&self, i: usize) -> &[f32] {
        Self::field(&self.coeff, self.s, i)
    }

    pub fn sol_of(&self, i: usize) -> &[f32] {
        Self::field(&self.sol, self.s, i)
    }
}

/// Pointwise mean and standard deviation over a split's samples (torch.std's unbiased estimate),
/// as the paper's UnitGaussianNormalizer: encode (x - mean) / (std + eps), decode x (std + eps) + mean.
#[derive(Clone, Debug, PartialEq)]
pub struct Normalizer {
    pub mean: Vec<f32>,
    pub std: Vec<f32>,
    pub eps: f32,
}

impl Normalizer {
    pub const EPS: f32 = 1e-5;

    /// Of `count` fields of `len` values stacked in `v`.
    pub fn fit(v: &[f32], len: usize) -> Normalizer {
        let count = v.len() / len.max(1);
        let mut mean = vec![0.0f64; len];
        for x in v.chunks_exact(len) {
            for (m, &xi) in mean.iter_mut().zip(x) {
                *m += xi as f64;
            }
        }
        mean.iter_mut().for_each(|m| *m /= count.max(1) as f64);
        let mut var = vec![0.0f64; len];
        for x in v.chunks_exact(len) {
            for ((s, &xi), &m) in var.iter_mut().zip(x).zip(&mean) {
                *s += (xi as f64 - m).powi(2);
            }
        }
        let denom = count.saturating_sub(1).max(1) as f64;
        Normalizer { mean: mean.iter().map(|&m| m as f32).collect(), std: var.iter().map(|&s| (s / denom).sqrt() as f32).collect(), eps: Self::EPS }
    }

    /// The identity (mean 0, std + eps = 1): a model's normaliser before any data is seen.
    pub fn identity(len: usize) -> Normalizer {
        Normalizer { mean: vec![0.0; len], std: vec![1.0 - Self::EPS; len], eps: Self::EPS }
    }

    pub fn encode(&self, x: &[f32]) -> Vec<f32> {
        x.iter().zip(self.mean.iter().zip(&self.std)).map(|(&x, (&m, &s))| (x - m) / (s + self.eps)).collect()
    }

    /// The decode's factor per point: std + eps.
    pub fn scale(&self) -> Vec<f32> {
        self.std.iter().map(|&s| s + self.eps).collect()
    }
}

/// The Darcy data set: both splits, and the normalisers fitted on the training split.
#[derive(Clone, Debug)]
pub struct DarcyData {
    pub train: DarcySplit,
    pub test: DarcySplit,
    pub x_normalizer: Normalizer,
    pub y_normalizer: Normalizer,
    pub source: String,
    pub from_cache: bool,
}

impl DarcyData {
    fn new(train: DarcySplit, test: DarcySplit, source: String, from_cache: bool) -> DarcyData {
        let n2 = train.s * train.s;
        let (x_normalizer, y_normalizer) = (Normalizer::fit(&train.coeff, n2), Normalizer::fit(&train.sol, n2));
        DarcyData { train, test, x_normalizer, y_normalizer, source, from_cache }
    }

    /// The model's input for samples `idx` of `split`: [B, 3, s, s] of the normalised coefficient
    /// and the grid's row and column coordinates in [0, 1].
    pub fn inputs(&self, split: &DarcySplit, idx: &[usize], dtype: DType, dev: &crate::device::Device) -> Result<Tensor> {
        let s = split.s;
        let n2 = s * s;
        check_idx(split, idx)?;
        let mut v = Vec::with_capacity(idx.len() * 3 * n2);
        for &i in idx {
            v.extend(self.x_normalizer.encode(split.coeff_of(i)).iter().map(|&x| x as f64));
            v.extend((0..n2).map(|p| (p / s) as f64 / (s - 1) as f64));
            v.extend((0..n2).map(|p| (p % s) as f64 / (s - 1) as f64));
        }
        Tensor::from_f64_vec(v, [idx.len(), 3, s, s], dtype, dev)
    }

    /// The solutions of samples `idx`: [B, 1, s, s], unnormalised.
    pub fn targets(&self, split: &DarcySplit, idx: &[usize], dtype: DType, dev: &crate::device::Device) -> Result<Tensor> {
        check_idx(split, idx)?;
        let s = split.s;
        let v: Vec<f64> = idx.iter().flat_map(|&i| split.sol_of(i).iter().map(|&x| x as f64)).collect();
        Tensor::from_f64_vec(v, [idx.len(), 1, s, s], dtype, dev)
    }
}

fn check_idx(split: &DarcySplit, idx: &[usize]) -> Result<()> {
    match idx.iter().find(|&&i| i >= split.len()) {
        Some(bad) => Err(Error::invalid("batch", format!("sample {bad} of a split of {}", split.len()))),
        None => Ok(()),
    }
}

/// About how many bytes the data set holds in memory (coefficient and solution fields in f32),
/// and while it is generated, the solver's working set (the cosine basis and a few full-resolution
/// fields per thread, in f64: the stencils of every multigrid level, the CG vectors, the coarse
/// band factor).
pub fn estimated_bytes(cfg: &DarcyConfig) -> u64 {
    let s = cfg.s() as u64;
    let stored = (cfg.train_samples + cfg.test_samples) as u64 * s * s * 4 * 2;
    let full = (cfg.resolution as u64).pow(2) * 8;
    let solving = if cfg.npz.is_some() { 0 } else { full * (1 + 40 * rayon::current_num_threads() as u64) };
    stored + solving
}

/// The cache directory of a config: every field of `[darcy]` that changes the data, hashed.
pub fn cache_path(cfg: &DarcyConfig, cache_dir: &Path) -> PathBuf {
    let mut key = cfg.clone();
    key.npz = None;
    key.npz_test = None;
    let text = format!("darcy-v{DARCY_VERSION}:{}", serde_json::to_string(&key).unwrap_or_default());
    cache_dir.join(format!("darcy-{:016x}", super::fnv1a(text.as_bytes())))
}

/// One sample, subsampled: the coefficient, the solution, and the CG iterations it took.
type Sample = (Vec<f32>, Vec<f32>, usize);

/// One sample at full resolution, subsampled.
fn sample(cfg: &DarcyConfig, basis: &[f64], split_seed: u64, i: usize) -> Result<Sample> {
    let s = cfg.resolution;
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed ^ split_seed ^ (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
    let a = threshold(&grf_with_basis(basis, s, cfg.alpha, cfg.tau, &mut rng), cfg.high, cfg.low);
    let sol = solve(&a, &vec![1.0; s * s], s, cfg.tolerance)?;
    let r = cfg.subsample;
    let keep = |v: &[f64]| -> Vec<f32> { (0..s).step_by(r).flat_map(|i| (0..s).step_by(r).map(move |j| v[i * s + j] as f32)).collect() };
    Ok((keep(&a), keep(&sol.u), sol.iterations))
}

/// Generates `count` samples of one split in parallel, telling progress every chunk.
fn generate(cfg: &DarcyConfig, basis: &[f64], split_seed: u64, count: usize, what: &str, progress: &mut dyn FnMut(&str)) -> Result<(DarcySplit, usize)> {
    let s = cfg.s();
    let (mut coeff, mut sol) = (Vec::with_capacity(count * s * s), Vec::with_capacity(count * s * s));
    let mut max_iterations = 0;
    let chunk = 50;
    let started = std::time::Instant::now();
    for start in (0..count).step_by(chunk) {
        let done: Vec<Result<Sample>> = (start..(start + chunk).min(count)).into_par_iter().map(|i| sample(cfg, basis, split_seed, i)).collect();
        for r in done {
            let (a, u, it) = r?;
            coeff.extend(a);
            sol.extend(u);
            max_iterations = max_iterations.max(it);
        }
        let n = (start + chunk).min(count);
        progress(&format!("  {what}: {n}/{count} samples solved ({:.0} s)", started.elapsed().as_secs_f64()));
    }
    Ok((DarcySplit { s, coeff, sol }, max_iterations))
}

/// Writes a split as an NPZ with arrays `coeff` and `sol` ([samples, s, s], f32), atomically.
pub fn save_split(path: &Path, split: &DarcySplit) -> Result<()> {
    let shape = vec![split.len() as u64, split.s as u64, split.s as u64];
    super::npz::save_arrays(path, &[super::npz::Array::F32("coeff", shape.clone(), &split.coeff), super::npz::Array::F32("sol", shape, &split.sol)])
}

/// Reads a split from an NPZ with arrays `coeff` and `sol`, each [samples, s, s].
pub fn load_split(path: &Path) -> Result<DarcySplit> {
    let (cshape, coeff) = super::npz::read_array(path, "coeff")?;
    let (sshape, sol) = super::npz::read_array(path, "sol")?;
    let bad = |why: String| crate::io::bad(path, why);
    let s = match cshape.as_slice() {
        [_, a, b] if a == b && *a >= 4 => *a as usize,
        other => return Err(bad(format!("`coeff` has shape {other:?}; expected (samples, s, s) with s >= 4"))),
    };
    if sshape != cshape {
        return Err(bad(format!("`sol` has shape {sshape:?} but `coeff` has {cshape:?}")));
    }
    if cshape[0] == 0 {
        return Err(bad("the split holds no samples".into()));
    }
    if let Some(v) = coeff.iter().chain(&sol).find(|v| !v.is_finite()) {
        return Err(bad(format!("non-finite value {v} in `coeff` or `sol`")));
    }
    Ok(DarcySplit { s, coeff, sol })
}

/// Generates the data set of `cfg` (or reads its cache, or the configured NPZ files).
pub fn load_or_generate(cfg: &DarcyConfig, cache_dir: &Path, progress: &mut dyn FnMut(&str)) -> Result<DarcyData> {
    cfg.validate()?;
    if let (Some(train), Some(test)) = (&cfg.npz, &cfg.npz_test) {
        let (tr, te) = (load_split(train)?, load_split(test)?);
        if tr.s != te.s {
            return Err(Error::invalid("darcy data", format!("the training fields are {0}x{0} but the test fields {1}x{1}", tr.s, te.s)));
        }
        if tr.s != cfg.s() {
            return Err(Error::invalid(
                "darcy data",
                format!("the NPZ fields are {0}x{0} but resolution and subsample give s = {1}: set them to match", tr.s, cfg.s()),
            ));
        }
        return Ok(DarcyData::new(tr, te, format!("{} + {}", train.display(), test.display()), false));
    }
    let dir = cache_path(cfg, cache_dir);
    let source = dir.display().to_string();
    let read = |_: &serde_json::Value| -> Result<DarcyData> {
        let (train, test) = (load_split(&dir.join("train.npz"))?, load_split(&dir.join("test.npz"))?);
        // A swapped pair of splits, or a split of another config, does not pass.
        if (train.len(), test.len(), train.s, test.s) != (cfg.train_samples, cfg.test_samples, cfg.s(), cfg.s()) {
            return Err(Error::invalid(
                "data cache",
                format!("its splits hold {} and {} samples of {}x{}, not the config's", train.len(), test.len(), train.s, train.s),
            ));
        }
        Ok(DarcyData::new(train, test, source.clone(), true))
    };
    let mut make = |progress: &mut dyn FnMut(&str)| -> Result<(DarcyData, serde_json::Value)> {
        progress(&format!(
            "generating Darcy data: {} + {} samples solved on a {}x{} grid, subsampled to {}x{}",
            cfg.train_samples,
            cfg.test_samples,
            cfg.resolution,
            cfg.resolution,
            cfg.s(),
            cfg.s()
        ));
        let started = std::time::Instant::now();
        let basis = cosine_basis(cfg.resolution);
        let (train, it_train) = generate(cfg, &basis, 0x7472_6169_6e00, cfg.train_samples, "train", progress)?;
        let (test, it_test) = generate(cfg, &basis, 0x7465_7374_0000, cfg.test_samples, "test", progress)?;
        save_split(&dir.join("train.npz"), &train)?;
        save_split(&dir.join("test.npz"), &test)?;
        let params = serde_json::json!({
            "darcy_version": DARCY_VERSION,
            "config": cfg,
            "s": cfg.s(),
            "max_cg_iterations": it_train.max(it_test),
            "seconds": started.elapsed().as_secs_f64(),
        });
        progress(&format!("cached at {} ({:.0} s, at most {} CG iterations per solve)", dir.display(), started.elapsed().as_secs_f64(), it_train.max(it_test)));
        Ok((DarcyData::new(train, test, source.clone(), false), params))
    };
    super::cache::read_or_make(&dir, &["train.npz", "test.npz"], "Darcy data", &read, &mut make, progress)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prolongation_and_restriction_are_transposes() {
        let mc = 5;
        let mf = 2 * mc + 1;
        let x: Vec<f64> = (0..mc * mc).map(|i| ((i * 7) % 11) as f64 - 3.0).collect();
        let y: Vec<f64> = (0..mf * mf).map(|i| ((i * 5) % 13) as f64 - 6.0).collect();
        let px = transfer(&x, mc, mf, true);
        let rty = transfer(&y, mf, mc, false);
        assert!((dot(&px, &y) - dot(&x, &rty)).abs() < 1e-9);
    }

    #[test]
    fn galerkin_operator_is_symmetric_and_matches_the_product() {
        let s = 17;
        let a: Vec<f64> = (0..s * s).map(|p| if (p * 37) % 5 < 2 { 12.0 } else { 3.0 }).collect();
        let fine = Stencil::five_point(&a, s);
        let coarse = galerkin(&fine);
        let (mf, mc) = (fine.m, coarse.m);
        let v: Vec<f64> = (0..mc * mc).map(|i| (i as f64 * 0.37).sin()).collect();
        let mut ax = vec![0.0; mf * mf];
        fine.apply(&transfer(&v, mc, mf, true), &mut ax);
        let want = transfer(&ax, mf, mc, false);
        let mut got = vec![0.0; mc * mc];
        coarse.apply(&v, &mut got);
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() < 1e-9 * w.abs().max(1.0), "{g} vs {w}");
        }
        let w: Vec<f64> = (0..mc * mc).map(|i| (i as f64 * 0.91).cos()).collect();
        let mut aw = vec![0.0; mc * mc];
        coarse.apply(&w, &mut aw);
        assert!((dot(&v, &aw) - dot(&w, &got)).abs() < 1e-8 * dot(&v, &aw).abs().max(1.0));
    }

    #[test]
    fn band_cholesky_solves_exactly() {
        let s = 12;
        let a: Vec<f64> = (0..s * s).map(|p| 1.0 + (p % 3) as f64).collect();
        let st = Stencil::five_point(&a, s);
        let m = st.m;
        let x: Vec<f64> = (0..m * m).map(|i| (i as f64).sqrt()).collect();
        let mut b = vec![0.0; m * m];
        st.apply(&x, &mut b);
        let got = BandCholesky::new(&st).unwrap().solve(&b);
        for (g, w) in got.iter().zip(&x) {
            assert!((g - w).abs() < 1e-9 * w.abs().max(1.0));
        }
    }
}

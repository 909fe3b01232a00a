"""What limits the main job's reconstruction: per-patch diagnostics of a run's predictions.

Reads a run's prediction (`fnokern predict RUN` writes RUN/prediction/prediction.npz) and the
run's test split (the data cache's test.npz), and measures, on the test object's patches:

- amplitude error of the illuminated wave |O P| (what the physics loss sees) against the truth,
  inside the probe;
- the per-patch constant phase offset between prediction and truth (the physics loss cannot see a
  constant phase: |F(e^{ic} O P)| = |F(O P)|), its spread over the patches, and how much of the
  phase error is that offset;
- the twin: conj(psi(-r)) has the same diffraction amplitude as psi(r); the fraction of patches
  whose prediction is closer to the truth's twin than to the truth;
- the scores of the stitched test object (the engine's score: amplitude rescaled by the mean
  ratio, a least-squares phase plane removed, skimage-default SSIM; this port reproduces the
  engine's numbers) under five stitchings: the reference's `center` (central stride x stride of
  each patch), the same after removing each patch's phase offset against the truth (an oracle:
  the best any offset alignment could do), the engine's `blend` (every covering patch, weighted by
  the probe's intensity), blend after offsets synchronised from the patches' overlaps (no truth
  used), and blend after the oracle offsets.

Usage: python analyse.py RUN [RUN...]  (prints one JSON line per run; numpy only)
"""

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np


def uniform7(img):
    p = np.pad(img, 3, mode="symmetric")
    k = np.ones(7) / 7.0
    t = np.apply_along_axis(lambda r: np.convolve(r, k, mode="valid"), 1, p)
    return np.apply_along_axis(lambda c: np.convolve(c, k, mode="valid"), 0, t)


def ssim(a, b, data_range):
    ux, uy = uniform7(a), uniform7(b)
    uxx, uyy, uxy = uniform7(a * a), uniform7(b * b), uniform7(a * b)
    cn = 49.0 / 48.0
    vx, vy, vxy = cn * (uxx - ux * ux), cn * (uyy - uy * uy), cn * (uxy - ux * uy)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = (2 * ux * uy + c1) * (2 * vxy + c2) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    return float(s[3:-3, 3:-3].mean())


def remove_plane(img):
    r, c = np.indices(img.shape)
    A = np.stack([np.ones(img.size), r.ravel(), c.ravel()], 1)
    coef, *_ = np.linalg.lstsq(A, img.ravel(), rcond=None)
    return img - (A @ coef).reshape(img.shape)


def wrap(x):
    return x - 2 * np.pi * np.round(x / (2 * np.pi))


def score(pred_amp, pred_phase, gt_amp, gt_phase):
    amp = pred_amp * gt_amp.mean() / pred_amp.mean()
    centred = lambda p: wrap(p - np.angle(np.mean(np.exp(1j * p))))
    ph, gph = wrap(remove_plane(centred(pred_phase))), wrap(remove_plane(centred(gt_phase)))
    rng = gt_amp.max() - gt_amp.min()
    unit = lambda p: (p + np.pi) / (2 * np.pi)
    return {
        "amp_ssim": ssim(gt_amp, amp, rng),
        "phase_ssim": ssim(unit(gph), unit(ph), 1.0),
        "amp_mae": float(np.abs(amp - gt_amp).mean()),
        "phase_mae": float(np.abs(ph - gph).mean()),
        "phase_range": [float(np.percentile(ph, 1)), float(np.percentile(ph, 99))],
        "gt_phase_range": [float(np.percentile(gph, 1)), float(np.percentile(gph, 99))],
    }


def analyse(run):
    run = Path(run)
    pred = np.load(run / "prediction" / "prediction.npz")
    test = np.load(_test_split(run))
    obj = pred["object"]
    n = obj.shape[-1]
    P = test["probeGuess"]
    gt = test["YY_ground_truth"]
    rows, cols = test["ycoords"], test["xcoords"]
    mine = np.nonzero(test["object_index"] == 0)[0]
    w = np.abs(P) ** 2
    mask = np.abs(P) > 0.1 * np.abs(P).max()
    stride = int(np.min(np.diff(np.unique(rows))))
    half = stride // 2

    def window(i):
        r0, c0 = int(round(rows[i])) - n // 2, int(round(cols[i])) - n // 2
        return gt[r0:r0 + n, c0:c0 + n]

    # The prediction's global amplitude scale against the truth (the data are scaled).
    num = sum(np.sum(np.abs(window(i) * P) * np.abs(obj[i] * P)) for i in mine)
    den = sum(np.sum(np.abs(obj[i] * P) ** 2) for i in mine)
    obj = obj * (num / den)
    offsets, amp_err, err_raw, err_aligned, twin_closer = [], [], [], [], 0
    for i in mine:
        t, o = window(i), obj[i]
        c = np.angle(np.sum(w * np.conj(t) * o))
        offsets.append(c)
        psi_t, psi_o = t * P, o * P
        nt = np.sqrt(np.sum(np.abs(psi_t) ** 2))
        amp_err.append(np.sqrt(np.sum((np.abs(psi_o) - np.abs(psi_t)) ** 2)) / nt)
        err_raw.append(np.sqrt(np.sum(np.abs(psi_o - psi_t) ** 2)) / nt)
        err_aligned.append(np.sqrt(np.sum(np.abs(psi_o * np.exp(-1j * c) - psi_t) ** 2)) / nt)
        # The twin conj(psi(-r)) about the FFT's centre (index n/2): same |F|.
        twin = np.conj(np.roll(np.flip(psi_t), 1, axis=(0, 1)))
        ct = np.angle(np.sum(np.conj(twin) * psi_o))
        if np.sum(np.abs(psi_o * np.exp(-1j * ct) - twin) ** 2) < np.sum(np.abs(psi_o * np.exp(-1j * c) - psi_t) ** 2):
            twin_closer += 1
    offsets = np.array(offsets)
    R = np.abs(np.mean(np.exp(1j * offsets)))
    out = {
        "run": run.name,
        "patches": len(mine),
        "illuminated_amp_rel_err": float(np.mean(amp_err)),
        "wave_rel_err": float(np.mean(err_raw)),
        "wave_rel_err_offset_removed": float(np.mean(err_aligned)),
        "offset_circular_std": float(np.sqrt(-2 * np.log(max(R, 1e-12)))),
        "twin_closer_fraction": len(mine) and twin_closer / len(mine),
    }

    # Stitchings.
    r_min, c_min = int(rows[mine].min()), int(cols[mine].min())
    top, left = r_min - half, c_min - half
    h, wd = int(rows[mine].max()) - r_min + stride, int(cols[mine].max()) - c_min + stride
    gwin = gt[top:top + h, left:left + wd]

    def central(phase_shift):
        a, p = np.zeros((h, wd)), np.zeros((h, wd))
        for k, i in enumerate(mine):
            r0, c0 = int(round(rows[i])) - top - half, int(round(cols[i])) - left - half
            sl = slice(n // 2 - half, n // 2 - half + stride)
            z = obj[i][sl, sl] * np.exp(-1j * phase_shift[k])
            a[r0:r0 + stride, c0:c0 + stride] = np.abs(z)
            p[r0:r0 + stride, c0:c0 + stride] = np.angle(z)
        return score(a, p, np.abs(gwin), np.angle(gwin))

    out["stitch_reference"] = central(np.zeros(len(mine)))
    out["stitch_reference_oracle_offsets"] = central(offsets)

    # Overlap stitching: each patch's phase offset from its overlaps with the others (the phase
    # synchronisation of M_ij = sum_r w_i w_j O_i conj(O_j) over the canvas), then a blend
    # weighted by the probe's intensity.
    big = np.zeros((len(mine), h + n, wd + n), complex)
    wts = np.zeros((len(mine), h + n, wd + n))
    pad = n // 2
    for k, i in enumerate(mine):
        r0, c0 = int(round(rows[i])) - top - n // 2 + pad, int(round(cols[i])) - left - n // 2 + pad
        big[k, r0:r0 + n, c0:c0 + n] = obj[i]
        wts[k, r0:r0 + n, c0:c0 + n] = w
    flat, fw = big.reshape(len(mine), -1), wts.reshape(len(mine), -1)
    a = np.exp(1j * synchronise((fw * flat) @ np.conj(fw * flat).T))
    # Aligned U_i = O_i conj(a_i) agree on the overlaps.
    def blend(a):
        u = (fw * flat * np.conj(a)[:, None]).sum(0) / np.maximum(fw.sum(0), 1e-12)
        return u.reshape(h + n, wd + n)[pad:pad + h, pad:pad + wd]
    u = blend(np.ones(len(mine)))
    out["stitch_blend"] = score(np.abs(u), np.angle(u), np.abs(gwin), np.angle(gwin))
    u = blend(a)
    out["stitch_blend_synchronised"] = score(np.abs(u), np.angle(u), np.abs(gwin), np.angle(gwin))
    u = blend(np.exp(1j * offsets))
    out["stitch_blend_oracle_offsets"] = score(np.abs(u), np.angle(u), np.abs(gwin), np.angle(gwin))
    return out


def synchronise(M):
    """Per-patch phase offsets c (c_0 = 0) from the overlap products M_ij = sum w_i w_j O_i conj(O_j):
    the weighted least-squares solution of c_i - c_j = angle(M_ij) over the overlapping pairs."""
    k = M.shape[0]
    W = np.abs(M).copy()
    np.fill_diagonal(W, 0.0)
    W[W < 1e-3 * W.max()] = 0.0
    phi = np.angle(M)
    L = np.diag(W.sum(1)) - W
    b = (W * phi).sum(1)
    L[0, :] = 0.0
    L[0, 0] = 1.0
    b[0] = 0.0
    return np.linalg.solve(L, b)


def _test_split(run):
    """The run's test split: `fnokern data` on its config names the cached data set."""
    exe = Path(__file__).resolve().parents[3] / "target" / "release" / "fnokern"
    said = subprocess.run([str(exe), "data", "--config", str(run / "config.toml")], capture_output=True, text=True, check=True)
    m = re.search(r"source: (\S+) ", said.stdout)
    if not m:
        raise SystemExit(f"{run}: `fnokern data` named no data set:\n{said.stdout}{said.stderr}")
    return Path(m.group(1)) / "test.npz"


if __name__ == "__main__":
    for r in sys.argv[1:]:
        print(json.dumps(analyse(r)))

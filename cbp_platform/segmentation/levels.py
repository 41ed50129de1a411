"""Vertebral levels along a whole-body scan: where T10 and S1 lie, for the region of interest.

The study's region runs from T10 to S1. The platform's muscle model cannot say where that is on a whole-body scan:
the autochthonous muscles run on from the sacrum to the neck, and in any one slice they look the same at T8 as at
T11. What changes along the body is the rest of the slice: lungs and ribs above the diaphragm, kidneys and bowel
in the abdomen, the iliac wings and sacrum in the pelvis, two legs below.

This module regresses each axial slice's level from its content, as body-part regression does (Yan et al.,
"Unsupervised body part regression via spatially self-ordering convolutional neural networks", ISBI 2018;
Schuhegger, "Body part regression for CT images", 2021, BPReg): a small 2D network maps a slice, resampled to an
8 mm grid, to a score. Here the score is supervised, in vertebral units of the study region: 0 at S1's centre,
1 at T10's centre, linear in the slice's position along the body (so beyond the region it goes on below 0 and
above 1). Training data are simulated whole-body scans, whose vertebrae are known (the phantom's truth
``vertebra_z_mm``). On a scan, a robust straight line through (slice position, score) (Theil-Sen: a slice that
looks like another level moves it little) gives T10's and S1's positions. A slice carries no position: the
network sees only its content.

The locator of region-of-interest inference (:class:`cbp_platform.segmentation.roi.RoiSegmenter`) uses the levels
for the region's extent along the body axis and the platform's muscle model for its extent across the body.
"""

from __future__ import annotations

import hashlib
import io
import json
import time
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from scipy import ndimage, stats

from cbp_platform.segmentation.data import normalise, ornt_to_model, to_model_orientation

GRID_MM = 8.0                 # the slices' in-plane grid
GRID = (48, 40)               # 384 x 320 mm around the image centre (left-right, posterior-anterior)
TOP, BOTTOM = "T10", "S1"     # the study region's vertebrae: score 1 and 0
FORMAT = "cbp-levels/1"
PLAUSIBLE_MM = (150.0, 450.0)   # T10's centre above S1's, for levels to be used at all


def _net() -> torch.nn.Module:
    """Four 3x3 convolution blocks with pooling, a global average and a linear score (47 k weights)."""
    def block(a, b):
        return [torch.nn.Conv2d(a, b, 3, padding=1), torch.nn.BatchNorm2d(b), torch.nn.ReLU()]

    return torch.nn.Sequential(*block(2, 16), torch.nn.MaxPool2d(2), *block(16, 32), torch.nn.MaxPool2d(2),
                               *block(32, 48), torch.nn.MaxPool2d(2), *block(48, 64),
                               torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(64, 1))


def slices(water: np.ndarray, fat: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A scan's axial slices as the network sees them, (n, 2, 48, 40) float32 (water and fat, the platform's
    normalisation, RAS in-plane, resampled to 8 mm and cut or padded around the image centre), and each slice's
    position along the body (mm, superior positive)."""
    img, _back = to_model_orientation(normalise(water, fat), affine, "RAS")
    ras = affine @ nib.orientations.inv_ornt_aff(ornt_to_model(affine, "RAS"), np.shape(water))
    zooms = nib.affines.voxel_sizes(ras)
    small = ndimage.zoom(img, (1, zooms[0] / GRID_MM, zooms[1] / GRID_MM, 1), order=1, grid_mode=True,
                         mode="nearest")
    out = np.zeros((small.shape[-1], 2, *GRID), np.float32)
    src, dst = [], []
    for n, g in zip(small.shape[1:3], GRID):
        a = max((n - g) // 2, 0)
        b = max((g - n) // 2, 0)
        m = min(n, g)
        src.append(slice(a, a + m))
        dst.append(slice(b, b + m))
    out[:, :, dst[0], dst[1]] = small[:, src[0], src[1], :].transpose(3, 0, 1, 2)
    z = (ras @ np.c_[np.zeros((img.shape[-1], 2)), np.arange(img.shape[-1]), np.ones(img.shape[-1])].T)[2]
    return out, z


def level_scores(z: np.ndarray, vertebra_z_mm: dict) -> np.ndarray:
    """The training target: each slice's position in study-region units (0 at S1's centre, 1 at T10's)."""
    lo, hi = float(vertebra_z_mm[BOTTOM]), float(vertebra_z_mm[TOP])
    return ((np.asarray(z, float) - lo) / (hi - lo)).astype(np.float32)


@dataclass
class LevelModel:
    """A trained level regressor and where it came from."""

    network: torch.nn.Module
    provenance: dict
    sha256: str = ""

    @torch.inference_mode()
    def predict(self, x: np.ndarray, batch: int = 256) -> np.ndarray:
        self.network.eval()
        return np.concatenate([self.network(torch.from_numpy(x[i:i + batch])).numpy()[:, 0]
                               for i in range(0, len(x), batch)])

    def locate(self, water: np.ndarray, fat: np.ndarray, affine: np.ndarray) -> "Levels":
        """T10's and S1's positions in a scan: a Theil-Sen line through each slice's (position, score)."""
        t = time.perf_counter()
        x, z = slices(water, fat, affine)
        s = self.predict(x)
        slope, icpt, _lo, _hi = stats.theilslopes(s, z)
        if not slope > 0:
            return Levels(None, None, float(slope), float("nan"), time.perf_counter() - t)
        resid = float(np.median(np.abs(s - (icpt + slope * z))))
        return Levels(float((1.0 - icpt) / slope), float(-icpt / slope), float(slope), resid,
                      time.perf_counter() - t)


@dataclass(frozen=True)
class Levels:
    """Where the study region's vertebrae lie (mm along the body, the scan's world z); None if not found."""

    top_mm: float | None          # T10's centre
    bottom_mm: float | None       # S1's centre
    slope: float                  # score per mm: 1 / the T10-S1 distance
    residual: float               # the slices' median distance from the line, in scores
    seconds: float

    @property
    def plausible(self) -> bool:
        """Found, with T10 above S1 by an adult's distance (150-450 mm; about 250 mm in the study's cohort)."""
        return self.top_mm is not None and PLAUSIBLE_MM[0] <= self.top_mm - self.bottom_mm <= PLAUSIBLE_MM[1]

    def slice_range(self, affine: np.ndarray, n: int, axis: int, extra_mm: float) -> slice | None:
        """The slices along voxel ``axis`` (the body axis) from S1's centre to T10's, each end grown by
        ``extra_mm``; None when the levels were not found, are implausible, or lie outside the scan."""
        if not self.plausible:
            return None
        k = np.arange(n)
        idx = np.zeros((n, 4))
        idx[:, axis], idx[:, 3] = k, 1.0
        z = (np.asarray(affine) @ idx.T)[2]
        inside = (z >= self.bottom_mm - extra_mm) & (z <= self.top_mm + extra_mm)
        if not inside.any():
            return None
        hit = np.flatnonzero(inside)
        return slice(int(hit[0]), int(hit[-1]) + 1)

    def to_dict(self) -> dict:
        return {"top_mm": self.top_mm, "bottom_mm": self.bottom_mm, "slope": self.slope,
                "residual": self.residual}


def simulated_slices(n: int, seed: int, preset: str = "fast", log=None) -> tuple[np.ndarray, np.ndarray]:
    """Slices and scores of ``n`` simulated whole-body scans (the cohort model's participants, their own seed)."""
    from cbp_platform.segmentation.train import cohort_subjects
    from cbp_platform.synth.phantom import PRESETS, render_phantom

    xs, ys = [], []
    for i, subj in enumerate(cohort_subjects(n, seed)):
        ph = render_phantom(subj, PRESETS[preset], np.random.default_rng(np.random.SeedSequence([seed, 11, i])),
                            extent="whole-body")
        x, z = slices(ph.water, ph.fat, ph.affine)
        xs.append(x)
        ys.append(level_scores(z, ph.truth["vertebra_z_mm"]))
        if log:
            log(f"levels: rendered {i + 1} of {n} whole-body scans")
    return np.concatenate(xs), np.concatenate(ys)


def train_levels(*, n_scans: int = 24, iterations: int = 1500, seed: int = 4000, batch: int = 64,
                 lr: float = 2e-3, log=None) -> LevelModel:
    """Train the regressor on ``n_scans`` simulated whole-body scans for a fixed number of iterations
    (reproducible: seeded data, initialisation and batches; intensity scale and in-plane shift augmentation)."""
    torch.manual_seed(seed)
    g = np.random.default_rng(seed)
    t0 = time.perf_counter()
    x, y = simulated_slices(n_scans, seed, log=log)
    data_s = time.perf_counter() - t0
    net = _net()
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=iterations, pct_start=0.1)
    net.train()
    t1 = time.perf_counter()
    loss_v = float("nan")
    for it in range(iterations):
        pick = g.integers(0, len(x), batch)
        xb = x[pick] * g.uniform(0.8, 1.2, (batch, 1, 1, 1)).astype(np.float32)
        sh = g.integers(-2, 3, 2)
        xb = np.roll(xb, (int(sh[0]), int(sh[1])), axis=(2, 3))
        loss = torch.nn.functional.smooth_l1_loss(net(torch.from_numpy(xb))[:, 0], torch.from_numpy(y[pick]),
                                                  beta=0.1)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        loss_v = float(loss.detach())
        if log and (it + 1) % 500 == 0:
            log(f"levels: iteration {it + 1} of {iterations}, loss {loss_v:.4f}")
    net.eval()
    prov = {"format": FORMAT, "generator": "cbp_platform.synth whole-body phantoms (fast preset), in memory",
            "seed": seed, "n_scans": n_scans, "n_slices": int(len(x)), "iterations": iterations, "batch": batch,
            "loss": "smooth L1 (beta 0.1)", "final_loss": loss_v, "optimizer": f"AdamW, one-cycle lr max {lr}",
            "augmentation": ["intensity scale 0.8-1.2", "in-plane shift +-16 mm"], "grid_mm": GRID_MM,
            "grid": list(GRID), "score": f"0 at {BOTTOM}'s centre, 1 at {TOP}'s", "data_seconds": round(data_s, 1),
            "training_seconds": round(time.perf_counter() - t1, 1)}
    return LevelModel(net, prov)


def validate_levels(model: LevelModel, *, n_scans: int = 4, seed: int = 4001, preset: str = "fast") -> dict:
    """T10's and S1's errors (mm, located minus true) on ``n_scans`` held-out simulated whole-body scans (their
    own seed)."""
    from cbp_platform.segmentation.train import cohort_subjects
    from cbp_platform.synth.phantom import PRESETS, render_phantom

    errors = []
    for i, subj in enumerate(cohort_subjects(n_scans, seed)):
        ph = render_phantom(subj, PRESETS[preset], np.random.default_rng(np.random.SeedSequence([seed, 13, i])),
                            extent="whole-body")
        found = model.locate(ph.water, ph.fat, ph.affine)
        truth = ph.truth["vertebra_z_mm"]
        errors.append((found.top_mm - truth[TOP], found.bottom_mm - truth[BOTTOM]) if found.plausible else None)
    flat = np.abs(np.asarray([e for e in errors if e is not None], float)).ravel()
    return {"n_scans": n_scans, "seed": seed, "preset": preset, "not_found": sum(e is None for e in errors),
            "max_abs_error_mm": round(float(flat.max()), 1) if flat.size else None,
            "median_abs_error_mm": round(float(np.median(flat)), 1) if flat.size else None,
            "errors_mm": [None if e is None else [round(e[0], 1), round(e[1], 1)] for e in errors]}


def save_levels(path_for, model: LevelModel) -> tuple[Path, str]:
    """Write ``model`` to ``path_for(sha256)`` (weights and provenance in one file); returns (path, sha256)."""
    from cbp_platform.imaging.nifti import atomic_write_bytes

    buf = io.BytesIO()
    torch.save({"format": FORMAT, "state_dict": model.network.state_dict(),
                "provenance": json.dumps(model.provenance, sort_keys=True)}, buf)
    raw = buf.getvalue()
    sha = hashlib.sha256(raw).hexdigest()
    path = Path(path_for(sha))
    atomic_write_bytes(path, raw)
    model.sha256 = sha
    return path, sha


def load_levels(path: Path, sha256: str) -> LevelModel:
    """A saved regressor, verified against the sha256 recorded when it was trained."""
    from cbp_platform.segmentation.manifest import ManifestError

    raw = Path(path).read_bytes()
    got = hashlib.sha256(raw).hexdigest()
    if got != sha256:
        raise ManifestError(f"{path}: sha256 {got[:12]} differs from the recorded {sha256[:12]}: the level model "
                            "was changed after training; train the platform model again")
    ck = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    if ck.get("format") != FORMAT:
        raise ManifestError(f"{path}: not a level model ({FORMAT})")
    net = _net()
    net.load_state_dict(ck["state_dict"])
    return LevelModel(net.eval(), json.loads(ck["provenance"]), sha256)

"""Training the back-muscle segmentation network on labelled simulated scans.

The training and held-out sets are drawn from their own cohort seeds and rendered in memory by the phantom
renderer, so they never overlap the analysed deliveries. Augmentation (MONAI transforms): intensity scale and
shift, a smooth multiplicative bias field, small affine (rotation, scale), Gaussian noise, and a left-right flip
that swaps the left and right labels. Training runs a fixed number of iterations under a one-cycle learning-rate
schedule (reproducible). An optional wall-clock cap never shortens training silently: reaching it raises
:class:`TrainingCapReached` and no model comes out, since a model trained for fewer iterations is another model.
The network trains in channels-last memory layout (NDHWC): oneDNN's 3D convolutions, above all their backward pass,
run faster in it on the CPU (0.24 instead of 0.31 s an iteration on two cores), with the same arithmetic up to
float rounding; the trained network is handed back, and saved, in the usual contiguous layout.
"""

import time
from dataclasses import dataclass

import numpy as np
import torch
from monai.data import DataLoader, Dataset
from monai.losses import DiceCELoss
from monai.transforms import (Compose, MapTransform, RandAffined, RandBiasFieldd, RandGaussianNoised,
                              RandomizableTransform, RandScaleIntensityd, RandShiftIntensityd)
from monai.utils import set_determinism

from cbp_platform.progress import RateLogger
from cbp_platform.classes import swap_lr
from cbp_platform.segmentation.data import normalise
from cbp_platform.synth.cohort import simulate_cohort
from cbp_platform.synth.phantom import PRESETS, Subject, render_phantom


class RandFlipLRd(RandomizableTransform, MapTransform):
    """Flip along the left-right axis (axis 0 of a channel-first LAS volume) and swap left/right labels."""

    def __init__(self, keys=("image", "label"), prob: float = 0.5):
        MapTransform.__init__(self, keys)
        RandomizableTransform.__init__(self, prob)

    def __call__(self, data):
        d = dict(data)
        self.randomize(None)
        if not self._do_transform:
            return d
        d["image"] = torch.flip(torch.as_tensor(d["image"]), dims=[1])
        d["label"] = swap_lr(torch.flip(torch.as_tensor(d["label"]), dims=[1]))
        return d


def augmentations() -> Compose:
    return Compose([
        RandFlipLRd(prob=0.5),
        # small affine, sparingly: nearest-neighbour resampling of the labels at 4 mm shifts borders by up to half a
        # voxel against the image's partial volume, which blurs exactly the fascial borders InterMAT depends on
        RandAffined(keys=["image", "label"], prob=0.15, rotate_range=(0.0, 0.0, 0.08), scale_range=(0.05, 0.05, 0.05),
                    mode=("bilinear", "nearest"), padding_mode="zeros"),
        RandBiasFieldd(keys="image", prob=0.3, coeff_range=(0.0, 0.15), degree=3),
        RandScaleIntensityd(keys="image", factors=0.2, prob=0.5),
        RandShiftIntensityd(keys="image", offsets=0.05, prob=0.3),
        RandGaussianNoised(keys="image", prob=0.2, std=0.02),
    ])


def cohort_subjects(n: int, seed: int) -> list[Subject]:
    """``n`` phantom participants (no fat-water swaps) drawn by the cohort model with its own seed."""
    out = []
    for r in simulate_cohort(n, seed).to_dicts():
        lean, ps = r["lean_volume_target_cm3"], r["psoas_share"]
        lr_a, lr_p = r["lr_ratio_autochthonous"], r["lr_ratio_psoas"]
        auto, pso = lean * (1 - ps), lean * ps
        out.append(Subject(female=r["sex"] == "F", age=float(r["age"]), height_cm=r["height_cm"],
                           weight_kg=r["weight_kg"], imat_pct=r["imat_true"], mfi=r["mfi_true"],
                           lean_ml=(auto * lr_a / (1 + lr_a), auto / (1 + lr_a), pso * lr_p / (1 + lr_p),
                                    pso / (1 + lr_p))))
    return out


def simulated_set(n: int, seed: int, preset: str = "fast") -> list[dict]:
    """``n`` labelled scans (no fat-water swaps) from the cohort model with its own seed."""
    p = PRESETS[preset]
    out = []
    for i, s in enumerate(cohort_subjects(n, seed)):
        ph = render_phantom(s, p, np.random.default_rng(np.random.SeedSequence([seed, 7, i])))
        out.append({"image": normalise(ph.water, ph.fat), "label": ph.labels[None].astype(np.int64),
                    "water": ph.water, "fat": ph.fat, "labels": ph.labels, "affine": ph.affine, "truth": ph.truth})
    return out


INITIALISATION = "reset_parameters() after seeding"   # recorded in the provenance: the weights follow the seed


class TrainingCapReached(RuntimeError):
    """The wall-clock cap was reached before the fixed iteration count: no (shorter-trained) model is returned."""


@dataclass
class TrainResult:
    network: torch.nn.Module
    iterations: int
    seconds: float
    final_loss: float
    provenance: dict


def train(network: torch.nn.Module, *, n_train: int = 120, budget_s: float | None = None, max_iterations: int = 900,
          seed: int = 1000, batch_size: int = 2, lr: float = 3e-3, log=None) -> TrainResult:
    """Train ``network`` for exactly ``max_iterations`` iterations.

    ``budget_s``: an optional wall-clock cap (None or <= 0: none). Reaching it raises :class:`TrainingCapReached`.
    """
    set_determinism(seed)
    torch.manual_seed(seed)
    # the initial weights from the seed too: ``network`` was built before this call, from whatever state the
    # process's torch generator was in (other models, tests), so two trainings with one seed differed
    for m in network.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    t_data = time.perf_counter()
    items = simulated_set(n_train, seed)
    data = [{"image": it["image"], "label": it["label"]} for it in items]
    data_s = time.perf_counter() - t_data
    loader = DataLoader(Dataset(data, transform=augmentations()), batch_size=batch_size, shuffle=True,
                        num_workers=0, drop_last=True)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    network.to(memory_format=torch.channels_last_3d)        # (in place: the optimiser below sees these parameters)
    opt = torch.optim.AdamW(network.parameters(), lr=lr, weight_decay=1e-4)
    # one-cycle schedule over the fixed iteration count: warm-up, then cosine decay to ~0, so the final weights
    # are a converged model rather than a snapshot of a noisy constant-rate walk (steadier fascial borders)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(max_iterations, 1), pct_start=0.1)
    network.train()
    it = 0
    t0 = time.perf_counter()
    loss_v = float("nan")
    done = False
    steady = RateLogger(log, max_iterations, "training", unit="iterations", every_s=15.0) if log else None
    while not done:
        for batch in loader:
            opt.zero_grad()
            image = batch["image"].float().contiguous(memory_format=torch.channels_last_3d)
            loss = loss_fn(network(image), batch["label"].long())
            loss.backward()
            opt.step()
            sched.step()
            it += 1
            loss_v = float(loss.detach())
            if steady is not None:
                steady.suffix = f"loss {loss_v:.4f}"
                steady(it)
            if it >= max_iterations:
                done = True
                break
            if budget_s and budget_s > 0 and time.perf_counter() - t0 >= budget_s:
                raise TrainingCapReached(
                    f"training reached its wall-clock cap of {budget_s:g} s after {it} of {max_iterations} iterations; "
                    "a shorter-trained model is a different model, so none was kept. Raise train_budget_s (0: no "
                    "cap) or lower max_iterations deliberately")
    network.to(memory_format=torch.contiguous_format).eval()
    seconds = time.perf_counter() - t0
    prov = {"generator": "cbp_platform.synth (phantom renderer), in memory", "cohort_seed": seed, "n_train": n_train,
            "initialisation": INITIALISATION,
            "preset": "fast", "fat_water_swaps": "none in training", "data_seconds": round(data_s, 1),
            "augmentation": ["lr_flip_with_label_swap", "affine(p 0.15, rot z 0.08 rad, scale 5 %)", "bias_field",
                             "intensity_scale", "intensity_shift", "gaussian_noise"],
            "loss": "DiceCE", "optimizer": f"AdamW, one-cycle lr max {lr} over {max_iterations} iterations",
            "batch_size": batch_size}
    return TrainResult(network, it, seconds, loss_v, prov)

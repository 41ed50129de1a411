"""Inference: one loaded model, any number of scans, any grid.

Device ``auto`` takes CUDA when present (mixed precision) and otherwise the CPU with deterministic algorithms.
``sliding_window_inference`` over 96 x 72 x 48 windows at model spacing keeps memory bounded for any volume
size; probabilities are resampled back to the scan's grid before the argmax.
"""

import numpy as np
import torch
from monai.inferers import sliding_window_inference

from cbp_platform.segmentation.bundle import Bundle
from cbp_platform.segmentation.data import (from_model_orientation, model_shape, normalise, resample,
                                            spacing_in_model_orientation, to_model_orientation)

ROI = (96, 72, 48)


def refine_fascial_border(labels: np.ndarray, probs: np.ndarray, water: np.ndarray, fat: np.ndarray,
                          threshold: float = 0.5, min_prob: float = 0.3, max_peel_prob: float = 0.8) -> np.ndarray:
    """Snap compartment borders to the fascia using the voxel's own fat fraction.

    A compartment is bounded by a thin layer of fascial fat. At the coarse model spacing the network places
    borders by shape, so a border voxel may be assigned by geometry rather than content: a fat-dominant voxel on
    the outer surface of a compartment is fascial fat and is taken out; a water-dominant voxel just outside it
    that the network gives at least ``min_prob`` for the compartment is muscle and is taken in. One pass each;
    fat inside the compartment is untouched.
    """
    from scipy import ndimage

    s = water + fat
    ff = np.divide(fat, s, out=np.zeros_like(s), where=s > 0)
    out = labels.copy()
    any_c = labels > 0
    for c in range(1, probs.shape[0]):
        m = labels == c
        if not m.any():
            continue
        surface = m & ~ndimage.binary_erosion(m)
        out[surface & (ff >= threshold) & (probs[c] < max_peel_prob)] = 0
        ring = ndimage.binary_dilation(m) & ~any_c
        out[ring & (ff < threshold) & (probs[c] >= min_prob)] = c
    return out


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class Segmenter:
    def __init__(self, bundle: Bundle, device: str = "auto", sw_batch_size: int = 2, overlap: float = 0.25,
                 amp: bool = True, refine: bool = True):
        self.refine = refine
        self.bundle = bundle
        self.device = pick_device(device)
        self.amp = amp and self.device.type == "cuda"
        if self.device.type == "cpu":
            torch.use_deterministic_algorithms(True, warn_only=True)
        self.net = bundle.network.to(self.device).eval()
        self.sw_batch_size = sw_batch_size
        self.overlap = overlap

    def prepare(self, water: np.ndarray, fat: np.ndarray, affine: np.ndarray) -> dict:
        """CPU-side work (normalise, reorient): runs in DataLoader workers."""
        img, back = to_model_orientation(normalise(water, fat), affine)
        return {"image": img, "back": back, "spacing": spacing_in_model_orientation(affine)}

    @torch.no_grad()
    def predict(self, prepared: dict) -> np.ndarray:
        img = torch.from_numpy(np.asarray(prepared["image"]))[None].float()
        native = tuple(img.shape[-3:])
        target = model_shape(native, tuple(prepared["spacing"]))
        x = resample(img, target).to(self.device)
        with torch.autocast(device_type=self.device.type, enabled=self.amp):
            logits = sliding_window_inference(x, roi_size=ROI, sw_batch_size=self.sw_batch_size, predictor=self.net,
                                              overlap=self.overlap, mode="gaussian")
        probs = torch.softmax(logits.float(), dim=1)
        probs = resample(probs.cpu(), native)[0].numpy()
        labels = probs.argmax(axis=0).astype(np.uint8)
        if self.refine:
            img_np = img[0].numpy()
            labels = refine_fascial_border(labels, probs, img_np[0], img_np[1])
        back = np.asarray(prepared["back"])
        return from_model_orientation(labels, back)

    def segment(self, water: np.ndarray, fat: np.ndarray, affine: np.ndarray) -> np.ndarray:
        return self.predict(self.prepare(water, fat, affine))

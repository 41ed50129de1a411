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


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class Segmenter:
    def __init__(self, bundle: Bundle, device: str = "auto", sw_batch_size: int = 2, overlap: float = 0.25,
                 amp: bool = True):
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
        back = np.asarray(prepared["back"])
        return from_model_orientation(labels, back)

    def segment(self, water: np.ndarray, fat: np.ndarray, affine: np.ndarray) -> np.ndarray:
        return self.predict(self.prepare(water, fat, affine))

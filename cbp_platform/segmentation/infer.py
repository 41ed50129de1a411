"""Inference with the ``monai-bundle`` backend: one loaded model, any number of scans, any grid.

Spacing, orientation and classes come from the bundle's metadata (:attr:`Bundle.geometry`, :attr:`Bundle.classes`).

Device ``auto`` takes CUDA when present (mixed precision) and otherwise the CPU with deterministic algorithms.
``sliding_window_inference`` over 96 x 72 x 48 windows at model spacing keeps memory bounded for any volume
size; probabilities are resampled back to the scan's grid before the argmax. By default each window is also
segmented mirrored left-right and the two softmaxes averaged (test-time augmentation: steadier borders, twice
the compute).
"""

import math

import numpy as np
import torch
from monai.inferers import sliding_window_inference

from cbp_platform.classes import BY_NAME, LR_SWAP
from cbp_platform.segmentation.bundle import Bundle, background_offset
from cbp_platform.segmentation.data import (from_model_orientation, model_shape, normalise, resample,
                                            spacing_in_model_orientation, to_model_orientation)

ROI = (96, 72, 48)


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class FlipAveraged(torch.nn.Module):
    """Test-time augmentation: average the softmax of the volume and of its left-right mirror image (with the
    left/right classes exchanged back). Returns log-probabilities, so the argmax is that of the mean."""

    def __init__(self, net: torch.nn.Module, swap: list[int], lr_axis: int = 2):
        super().__init__()
        self.net = net
        self.swap = swap
        self.lr_axis = lr_axis

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.softmax(self.net(x).float(), dim=1)
        b = torch.softmax(self.net(torch.flip(x, dims=[self.lr_axis])).float(), dim=1)
        b = torch.flip(b, dims=[self.lr_axis])[:, self.swap]
        return torch.log((a + b) / 2 + 1e-8)


class Segmenter:
    def __init__(self, bundle: Bundle, device: str = "auto", sw_batch_size: int = 2, overlap: float = 0.25,
                 amp: bool = True, flip_tta: bool = True):
        self.bundle = bundle
        self.device = pick_device(device)
        self.amp = amp and self.device.type == "cuda"
        if self.device.type == "cpu":
            torch.use_deterministic_algorithms(True, warn_only=True)
        self.net = bundle.network.to(self.device).eval()
        self.offset = background_offset(bundle.network)
        self.spacing, self.orientation = bundle.geometry
        n_out = int(bundle.metadata["network"]["out_channels"])
        to_platform = {ch: BY_NAME[name].id for ch, name in bundle.classes.items()}
        # output channel -> platform label (channels of classes the platform does not use -> background)
        self.lut = np.zeros(n_out, np.uint8)
        for ch, cid in to_platform.items():
            self.lut[ch] = cid
        # under a left-right mirror, each lateral class's channel exchanges with its partner's
        of_platform = {cid: ch for ch, cid in to_platform.items()}
        swap = [of_platform.get(LR_SWAP.get(int(self.lut[ch]), -1), ch) if self.lut[ch] else ch
                for ch in range(n_out)]
        if "L" not in self.orientation.upper() and "R" not in self.orientation.upper():
            raise ValueError(f"orientation {self.orientation!r} has no left-right axis")
        self.lr_axis = 2 + [c.upper() in "LR" for c in self.orientation].index(True)
        self.predictor = FlipAveraged(self.net, swap, self.lr_axis) if flip_tta else self.net
        self.sw_batch_size = sw_batch_size
        self.overlap = overlap

    def prepare(self, water: np.ndarray, fat: np.ndarray, affine: np.ndarray) -> dict:
        """CPU-side work (normalise, reorient): runs in DataLoader workers."""
        img, back = to_model_orientation(normalise(water, fat), affine, self.orientation)
        return {"image": img, "back": back, "spacing": spacing_in_model_orientation(affine, self.orientation)}

    @torch.no_grad()
    def probabilities(self, prepared: dict) -> np.ndarray:
        """Class probabilities (C, X, Y, Z) on the scan's grid, still in model orientation."""
        img = torch.from_numpy(np.asarray(prepared["image"]))[None].float()
        native = tuple(img.shape[-3:])
        target = model_shape(native, tuple(prepared["spacing"]), self.spacing)
        x = resample(img, target).to(self.device)
        with torch.autocast(device_type=self.device.type, enabled=self.amp):
            logits = sliding_window_inference(x, roi_size=ROI, sw_batch_size=self.sw_batch_size, predictor=self.predictor,
                                              overlap=self.overlap, mode="gaussian")
        probs = torch.softmax(logits.float(), dim=1)
        return resample(probs.cpu(), native)[0].numpy()

    def predict(self, prepared: dict) -> np.ndarray:
        """Label map on the scan's grid: argmax of the probabilities with the background's weighted by
        exp(offset), the model's calibrated border (:mod:`cbp_platform.segmentation.calibrate`)."""
        probs = self.probabilities(prepared)
        return from_model_orientation(self._labels(probs), np.asarray(prepared["back"]))

    def predict_qc(self, prepared: dict) -> tuple[np.ndarray, float]:
        """:meth:`predict`'s label map and the model's uncertainty over it: the mean normalised entropy of the
        (mirror-averaged) probabilities over the voxels labelled muscle (:func:`cbp_platform.qc.features.
        entropy_in_muscle`)."""
        from cbp_platform.qc.features import entropy_in_muscle

        probs = self.probabilities(prepared)
        labels = self._labels(probs)
        if self.offset:
            probs[0] *= math.exp(-self.offset)        # the model's own probabilities again, for the entropy
        return from_model_orientation(labels, np.asarray(prepared["back"])), entropy_in_muscle(probs, labels > 0)

    def _labels(self, probs: np.ndarray) -> np.ndarray:
        """Platform labels (model orientation); weights the background channel of ``probs`` in place (no copy of
        a NAKO-size probability volume)."""
        if self.offset:
            probs[0] *= math.exp(self.offset)
        return self.lut[probs.argmax(axis=0)]

    def segment(self, water: np.ndarray, fat: np.ndarray, affine: np.ndarray) -> np.ndarray:
        return self.predict(self.prepare(water, fat, affine))

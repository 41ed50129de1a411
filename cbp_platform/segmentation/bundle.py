"""Versioned model bundles in the MONAI bundle spirit.

```
<bundle>/configs/metadata.json   inputs, outputs, classes, spacing, network, training provenance, validation
<bundle>/models/model.pt         the weights (a state dict)
```
The sha256 of ``models/model.pt`` is the model's identity everywhere in lineage. Besides the network's
parameters it holds the border calibration (buffer ``background_logit_offset``,
:mod:`cbp_platform.segmentation.calibrate`), so the identity covers the decision rule too; a bundle written
before calibration existed loads with offset 0.
"""

import json
from dataclasses import dataclass
from pathlib import Path

import monai
import torch
from monai.networks.nets import UNet

from cbp_platform.imaging.nifti import atomic_write_bytes, sha256_file
from cbp_platform.segmentation.data import MODEL_ORIENTATION, MODEL_SPACING, NUM_CLASSES

METADATA = "configs/metadata.json"
WEIGHTS = "models/model.pt"
OFFSET_BUFFER = "background_logit_offset"
CLASSES = {0: "background", 1: "autochthonous_left", 2: "autochthonous_right", 3: "psoas_left", 4: "psoas_right"}

# A 3D residual UNet (MONAI): four levels, 16-128 channels, one residual unit per level, batch norm; ~1.2 M
# parameters. Chosen over DynUNet/nnU-Net-sized networks because it trains to Dice > 0.9 in minutes on two CPU
# cores at 4 x 4 x 6 mm and infers a NAKO-size volume in seconds; over SegResNet because the residual UNet's
# skip connections keep thin fascial borders sharp at this coarse spacing.
NETWORK = {"name": "monai.networks.nets.UNet", "spatial_dims": 3, "in_channels": 2, "out_channels": NUM_CLASSES,
           "channels": [16, 32, 64, 128], "strides": [2, 2, 2], "num_res_units": 1, "norm": "batch"}


class BundleError(ValueError):
    """A bundle cannot be used; the message names the file and the problem."""


@dataclass
class Bundle:
    path: Path
    metadata: dict
    sha256: str
    network: torch.nn.Module


def build_network(spec: dict | None = None) -> torch.nn.Module:
    s = dict(spec or NETWORK)
    if s.pop("name", NETWORK["name"]) != NETWORK["name"]:
        raise BundleError(f"unsupported network {spec.get('name')!r}")
    net = UNet(spatial_dims=s["spatial_dims"], in_channels=s["in_channels"], out_channels=s["out_channels"],
               channels=tuple(s["channels"]), strides=tuple(s["strides"]), num_res_units=s["num_res_units"],
               norm=s["norm"])
    net.register_buffer(OFFSET_BUFFER, torch.zeros((), dtype=torch.float64))
    return net


def background_offset(network: torch.nn.Module) -> float:
    """The calibrated offset added to the background log-probability before the argmax (0: uncalibrated)."""
    return float(getattr(network, OFFSET_BUFFER, torch.zeros(())))


def set_background_offset(network: torch.nn.Module, offset: float) -> None:
    getattr(network, OFFSET_BUFFER).fill_(float(offset))


def save_bundle(path: Path, network: torch.nn.Module, metadata: dict) -> str:
    path = Path(path)
    (path / "models").mkdir(parents=True, exist_ok=True)
    tmp = path / "models" / ".model.pt.tmp"
    torch.save(network.state_dict(), tmp)
    tmp.replace(path / WEIGHTS)
    sha = sha256_file(path / WEIGHTS)
    meta = {
        "name": "cbp_back_muscles", "version": metadata.get("version", "1.0.0"),
        "task": "segmentation of left/right autochthonous back muscles and psoas on 2-point Dixon MRI",
        "inputs": {"image": {"channels": ["water", "fat"], "orientation": "".join(MODEL_ORIENTATION),
                             "spacing_mm": list(MODEL_SPACING),
                             "normalisation": "each channel / p99(water + fat), clipped to [0, 2]"}},
        "outputs": {"pred": {"classes": CLASSES, "note": "a compartment includes the fat inside its fascia"}},
        "network": NETWORK, "weights_sha256": sha,
        "versions": {"torch": torch.__version__, "monai": monai.__version__},
        **{k: v for k, v in metadata.items() if k != "version"},
    }
    atomic_write_bytes(path / METADATA, (json.dumps(meta, indent=1, default=str) + "\n").encode())
    return sha


def load_bundle(path: str | Path) -> Bundle:
    path = Path(path)
    meta_p, w_p = path / METADATA, path / WEIGHTS
    if not path.is_dir():
        raise BundleError(f"{path}: model bundle folder not found")
    try:
        meta = json.loads(meta_p.read_text())
    except FileNotFoundError:
        raise BundleError(f"{meta_p}: missing (a bundle needs configs/metadata.json)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{meta_p}: not valid JSON ({exc})") from None
    if not w_p.exists():
        raise BundleError(f"{w_p}: missing (a bundle needs models/model.pt)")
    for key in ("network", "inputs", "outputs"):
        if key not in meta:
            raise BundleError(f"{meta_p}: field {key!r} missing")
    sha = sha256_file(w_p)
    if meta.get("weights_sha256") and meta["weights_sha256"] != sha:
        raise BundleError(f"{w_p}: sha256 {sha[:12]}... differs from metadata's {meta['weights_sha256'][:12]}...")
    net = build_network(meta["network"])
    try:
        state = torch.load(w_p, map_location="cpu", weights_only=True)
        state.setdefault(OFFSET_BUFFER, torch.zeros((), dtype=torch.float64))   # bundles from before calibration
        net.load_state_dict(state)
    except Exception as exc:
        raise BundleError(f"{w_p}: cannot load weights ({type(exc).__name__}: {str(exc)[:200]})") from None
    net.eval()
    return Bundle(path, meta, sha, net)

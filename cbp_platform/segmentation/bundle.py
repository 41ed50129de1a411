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

from cbp_platform.classes import LABELS, NUM_CLASSES
from cbp_platform.imaging.nifti import atomic_write_bytes, sha256_file
from cbp_platform.synth.phantom import PRESETS

METADATA = "configs/metadata.json"
WEIGHTS = "models/model.pt"
OFFSET_BUFFER = "background_logit_offset"
# The default model's geometry: that of the simulated scans it is trained on (the phantom's ``fast`` preset, LAS).
# Written into every bundle's metadata; inference reads it from there, never from here.
TRAINING_PRESET = "fast"
ORIENTATION = "LAS"
SPACING_MM = tuple(float(v) for v in PRESETS[TRAINING_PRESET].spacing)

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
    path: Path | None
    metadata: dict
    sha256: str
    network: torch.nn.Module

    @classmethod
    def in_memory(cls, network: torch.nn.Module) -> "Bundle":
        """A network not yet saved (training, calibration, benchmarks), with the default model's metadata."""
        return cls(None, bundle_metadata("", {}), "", network)

    @property
    def geometry(self) -> tuple[tuple[float, float, float], str]:
        """(spacing in mm along the model's axes, orientation codes), as the bundle declares them."""
        img = self.metadata["inputs"]["image"]
        return tuple(float(v) for v in img["spacing_mm"]), str(img["orientation"])

    @property
    def classes(self) -> dict[int, str]:
        """The network's output channel -> the platform class name (background and unmapped channels absent)."""
        return {int(k): v for k, v in self.metadata["outputs"]["pred"]["classes"].items() if v in LABELS.values()
                and int(k) != 0}


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
    meta = bundle_metadata(sha, metadata)
    atomic_write_bytes(path / METADATA, (json.dumps(meta, indent=1, default=str) + "\n").encode())
    return sha


def bundle_metadata(sha: str, metadata: dict) -> dict:
    return {
        "name": "cbp_back_muscles", "version": metadata.get("version", "1.0.0"),
        "task": "segmentation of left/right autochthonous back muscles and psoas on 2-point Dixon MRI",
        "inputs": {"image": {"channels": ["water", "fat"], "orientation": ORIENTATION,
                             "spacing_mm": list(SPACING_MM),
                             "normalisation": "each channel / p99(water + fat), clipped to [0, 2]"}},
        "outputs": {"pred": {"classes": LABELS, "note": "a compartment includes the fat inside its fascia"}},
        "network": NETWORK, "weights_sha256": sha,
        "versions": {"torch": torch.__version__, "monai": monai.__version__},
        **{k: v for k, v in metadata.items() if k != "version"},
    }


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
    _check_declared(meta_p, meta)
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


def _check_declared(meta_p: Path, meta: dict) -> None:
    """The geometry, inputs and classes inference takes from the metadata are there and usable."""
    img = meta["inputs"].get("image", {})
    try:
        spacing = [float(v) for v in img["spacing_mm"]]
        orientation = str(img["orientation"])
        classes = {int(k): v for k, v in meta["outputs"]["pred"]["classes"].items()}
    except (KeyError, TypeError, ValueError) as exc:
        raise BundleError(f"{meta_p}: inputs.image.spacing_mm/orientation or outputs.pred.classes missing or "
                          f"malformed ({type(exc).__name__}: {exc})") from None
    if len(spacing) != 3 or min(spacing) <= 0:
        raise BundleError(f"{meta_p}: inputs.image.spacing_mm must be three positive numbers, got {spacing}")
    if len(orientation) != 3 or set(orientation.upper()) - set("LRAPSI") or \
            len({c.upper().translate(str.maketrans("RPI", "LAS")) for c in orientation}) != 3:
        raise BundleError(f"{meta_p}: inputs.image.orientation {orientation!r} is not three axis codes such as LAS")
    if img.get("channels") != ["water", "fat"]:
        raise BundleError(f"{meta_p}: inputs.image.channels {img.get('channels')} unsupported: the monai-bundle "
                          "backend feeds ['water', 'fat'] normalised as its metadata states")
    missing = set(LABELS.values()) - {"background"} - set(classes.values())
    if missing:
        raise BundleError(f"{meta_p}: outputs.pred.classes lacks the platform classes {sorted(missing)}")

"""Model manifests: what the platform must know to run a segmentation model, and how it proves it ran that model.

A registered model is a backend plus a manifest (``$CBP_DATA_ROOT/models/registry/<name>.json``):

* ``inputs``: the Dixon contrasts fed to the network, in channel order (:data:`CONTRASTS`);
* ``labels``: the model's own label ids mapped onto the platform's class names (:mod:`cbp_platform.classes`); every
  platform class exactly once, every other label of the model ignored (background);
* ``spacing_mm`` and ``orientation``: the geometry the model works in, read from the model folder (a bundle's
  metadata, nnU-Net's ``plans.json`` and reader) and recorded here, never assumed by the platform;
* ``weights``: the sha256 of every weight file (relative path -> hex digest). Before each use the files are hashed
  again; a changed file stops the run with the file's name. :attr:`ModelManifest.sha256` is the model's identity in
  lineage (the weight file's own sha256 when there is one file, so a ``monai-bundle`` keeps its identity);
* ``backend`` (a name of :data:`cbp_platform.segmentation.backends.BACKENDS`) and ``backend_version``; ``folder``;
  ``preset`` and ``source`` (where the label table comes from).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from cbp_platform.classes import BY_NAME, NAMES
from cbp_platform.imaging.nifti import atomic_write_bytes, sha256_file
from cbp_platform.paths import resolve_under, stored_under
from cbp_platform.segmentation.backends import BACKENDS
from cbp_platform.segmentation.errors import ManifestError  # (its own module: the backend registry raises it too)

# The Dixon contrasts a model may ask for. Deliveries carry water and fat images; in-phase and opposed-phase are
# derived from them when a delivery has no such images: in a two-point Dixon magnitude model (no T2* decay between
# the echoes), in-phase = W + F and opposed-phase = |W - F|.
CONTRASTS = {
    "water": "Dixon water image",
    "fat": "Dixon fat image",
    "in_phase": "in-phase image (W + F from the water and fat images)",
    "opposed_phase": "opposed-phase image (|W - F| from the water and fat images)",
}

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")


@dataclass(frozen=True)
class ModelManifest:
    name: str
    backend: str
    backend_version: str
    folder: str
    inputs: tuple[str, ...]
    labels: dict[int, str]                      # the model's label id -> platform class name
    spacing_mm: tuple[float, float, float]      # along the axes of ``orientation``
    orientation: str                            # nibabel axis codes of the voxel axes the model works in
    weights: dict[str, str]                     # path relative to ``folder`` -> sha256
    preset: str = ""
    options: dict = field(default_factory=dict)  # backend settings (folds, configuration, checkpoint, ...)
    source: dict = field(default_factory=dict)   # where labels, inputs and geometry were read or cited from

    def __post_init__(self):
        problems = validate(self)
        if problems:
            raise ManifestError(f"manifest of model {self.name!r}: " + "; ".join(problems))

    @property
    def sha256(self) -> str:
        """The model's identity: the weight file's sha256, or for several files the sha256 of their sorted
        ``path sha256`` lines."""
        return weights_identity(self.weights)

    @property
    def classes(self) -> dict[int, int]:
        """The model's label id -> the platform's label id."""
        return {k: BY_NAME[v].id for k, v in self.labels.items()}

    def lineage(self) -> dict:
        """What provenance rows and metadata record about the model."""
        return {"name": self.name, "backend": self.backend, "backend_version": self.backend_version,
                "folder": self.folder, "weights_sha256": self.sha256, "preset": self.preset}

    def to_json(self) -> str:
        d = asdict(self)
        d["labels"] = {str(k): v for k, v in sorted(self.labels.items())}
        d["sha256"] = self.sha256
        return json.dumps(d, indent=1, sort_keys=False) + "\n"

    @classmethod
    def from_json(cls, text: str, where: str = "manifest") -> "ModelManifest":
        try:
            d = json.loads(text)
            d.pop("sha256", None)
            d["labels"] = {int(k): v for k, v in d["labels"].items()}
            d["inputs"] = tuple(d["inputs"])
            d["spacing_mm"] = tuple(float(v) for v in d["spacing_mm"])
            return cls(**d)
        except ManifestError:
            raise
        except (ValueError, KeyError, TypeError) as exc:
            raise ManifestError(f"{where}: not a model manifest ({type(exc).__name__}: {exc})") from None


def weights_identity(weights: dict[str, str]) -> str:
    if len(weights) == 1:
        return next(iter(weights.values()))
    lines = "".join(f"{p} {h}\n" for p, h in sorted(weights.items()))
    return hashlib.sha256(lines.encode()).hexdigest()


def validate(m: ModelManifest) -> list[str]:
    problems = []
    if not NAME_RE.match(m.name or ""):
        problems.append(f"name {m.name!r} must be lower-case letters, digits, '_', '.', '-' (at most 64)")
    if m.backend not in BACKENDS:
        problems.append(f"backend {m.backend!r} is not one of {', '.join(BACKENDS)}")
    unknown = [c for c in m.inputs if c not in CONTRASTS]
    if not m.inputs or unknown:
        problems.append(f"inputs {list(m.inputs)} must be contrasts from {', '.join(CONTRASTS)}")
    mapped = list(m.labels.values())
    bad = sorted(set(mapped) - set(NAMES.values()))
    if bad:
        problems.append(f"labels map onto unknown platform classes {bad}")
    missing = sorted(set(NAMES.values()) - set(mapped))
    if missing:
        problems.append(f"no model label is mapped onto the platform classes {missing}")
    twice = sorted({v for v in mapped if mapped.count(v) > 1})
    if twice:
        problems.append(f"platform classes {twice} are mapped from more than one model label")
    if any(k <= 0 for k in m.labels):
        problems.append("label 0 is the background and cannot be mapped onto a muscle class")
    if len(m.spacing_mm) != 3 or min(m.spacing_mm) <= 0:
        problems.append(f"spacing_mm {list(m.spacing_mm)} must be three positive numbers")
    if not valid_orientation(m.orientation):
        problems.append(f"orientation {m.orientation!r} is not three axis codes such as RAS or LPS")
    if not m.weights:
        problems.append("no weight files")
    return problems


def valid_orientation(codes: str) -> bool:
    codes = str(codes).upper()
    axes = {c.translate(str.maketrans("RPI", "LAS")) for c in codes}
    return len(codes) == 3 and not set(codes) - set("LRAPSI") and axes == {"L", "A", "S"}


def hash_weights(folder: Path, relpaths: list[str]) -> dict[str, str]:
    out = {}
    for rel in sorted(relpaths):
        p = folder / rel
        if not p.is_file():
            raise ManifestError(f"{p}: weight file missing")
        out[rel] = sha256_file(p)
    return out


def verify_weights(m: ModelManifest) -> None:
    """Hash every weight file again; raise naming the first file that is missing or changed since registration."""
    folder = Path(m.folder)
    for rel, expected in sorted(m.weights.items()):
        p = folder / rel
        if not p.is_file():
            raise ManifestError(f"{p}: weight file of model {m.name!r} missing (registered {expected[:12]}...)")
        got = sha256_file(p)
        if got != expected:
            raise ManifestError(f"{p}: weights changed since registration of model {m.name!r} (sha256 {got[:12]}... "
                                f"!= registered {expected[:12]}...); register the model again if the change is "
                                "intended")


def save_manifest(registry_dir: Path, m: ModelManifest) -> Path:
    registry_dir = Path(registry_dir)
    registry_dir.mkdir(parents=True, exist_ok=True)
    path = registry_dir / f"{m.name}.json"
    # a folder under the models folder is stored relative to it: a data root copied elsewhere works there
    stored = replace(m, folder=stored_under(registry_dir.parent, m.folder))
    atomic_write_bytes(path, stored.to_json().encode())
    return path


def load_manifest(registry_dir: Path, name: str) -> ModelManifest:
    path = Path(registry_dir) / f"{name}.json"
    if not path.is_file():
        known = sorted(p.stem for p in Path(registry_dir).glob("*.json")) if Path(registry_dir).is_dir() else []
        raise ManifestError(f"{path}: no registered model {name!r} (registered: {', '.join(known) or 'none'}; "
                            "see `cbp model register`)")
    return _absolute(ModelManifest.from_json(path.read_text(), where=str(path)), Path(registry_dir))


def _absolute(m: ModelManifest, registry_dir: Path) -> ModelManifest:
    return m if Path(m.folder).is_absolute() else replace(m, folder=str(resolve_under(registry_dir.parent, m.folder)))


def list_manifests(registry_dir: Path) -> list[ModelManifest]:
    d = Path(registry_dir)
    return [_absolute(ModelManifest.from_json(p.read_text(), where=str(p)), d) for p in sorted(d.glob("*.json"))] \
        if d.is_dir() else []

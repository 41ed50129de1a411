"""The data-root convention.

One environment variable, ``CBP_DATA_ROOT`` (default ``./data``), roots everything the platform reads or
writes:

``$CBP_DATA_ROOT/landing``   deliveries as the data centre (or ``cbp synth``) writes them; read-only to the platform
``$CBP_DATA_ROOT/truth``     ground truth of simulated cohorts; never inside the landing zone
``$CBP_DATA_ROOT/models``    trained bundles, ``current.json`` (the primary model), ``registry/<name>.json`` manifests
``$CBP_DATA_ROOT/derived``   what the platform computes from deliveries: ``dicom/<delivery>/<pseudonym>/`` (volumes
                            converted and stitched from DICOM), ``segmentations/<delivery>/``, ``comparisons/``
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

ENV_VAR = "CBP_DATA_ROOT"
DEFAULT_ROOT = "data"


def data_root(override: str | os.PathLike[str] | None = None) -> Path:
    """The data root: ``override`` if given, else ``$CBP_DATA_ROOT``, else ``./data``; absolute."""
    raw = override if override is not None else os.environ.get(ENV_VAR) or DEFAULT_ROOT
    return Path(raw).expanduser().resolve()


@dataclass(frozen=True)
class DataLayout:
    root: Path

    @classmethod
    def from_env(cls, override: str | os.PathLike[str] | None = None) -> "DataLayout":
        return cls(data_root(override))

    @property
    def landing(self) -> Path:
        return self.root / "landing"

    @property
    def truth(self) -> Path:
        return self.root / "truth"

    @property
    def models(self) -> Path:
        return self.root / "models"

    @property
    def derived(self) -> Path:
        return self.root / "derived"

    def derived_dicom(self, delivery_id: str) -> Path:
        """Volumes converted and stitched from a DICOM delivery (never inside the landing zone)."""
        return self.derived / "dicom" / delivery_id

    def scan_path(self, delivery_id: str, rel: str, source_format: str | None = "nifti") -> Path:
        """A validated scan's file: NIfTI deliveries' paths are relative to the delivery folder, the volumes
        derived from DICOM deliveries' relative to the data root (``raw_mri_scans.source_format``)."""
        return self.root / rel if source_format == "dicom" else self.landing / delivery_id / rel

    @staticmethod
    def model_registry(models: Path) -> Path:
        """Registered model manifests under a models folder (:mod:`cbp_platform.segmentation.manifest`)."""
        return Path(models) / "registry"

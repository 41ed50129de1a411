"""The data-root convention.

One environment variable, ``CBP_DATA_ROOT`` (default ``./data``), roots everything the platform reads or
writes:

``$CBP_DATA_ROOT/landing``   deliveries as the data centre (or ``cbp synth``) writes them; read-only to the platform
``$CBP_DATA_ROOT/truth``     ground truth of simulated cohorts; never inside the landing zone
``$CBP_DATA_ROOT/models``    trained bundles, ``current.json`` (the primary model), ``registry/<name>.json`` manifests
``$CBP_DATA_ROOT/derived``   what the platform computes from deliveries: ``dicom/<delivery>/<pseudonym>/`` (volumes
                            converted and stitched from DICOM), ``segmentations/<delivery>/``,
                            ``comparisons/<model>/<delivery>/``
``$CBP_DATA_ROOT/registry``  the delivery and batch registry (``deliveries/``, ``batches/``, the sensor's cursor),
                            retired deliveries (``retirements/``), redaction records (``redactions/``) and the
                            internal release manifests
                            (``releases/<n>.json``, with pseudonyms: operator only)
``$CBP_DATA_ROOT/warehouse`` the embedded DuckDB warehouse ``cbp.duckdb`` (local profile; production profiles use
                            PostgreSQL, :mod:`resources.warehouse`)
``$CBP_DATA_ROOT/published`` published reports, one folder per cohort hash, and ``latest.json``; each release's
                            public summary (``releases/<n>/release.json``, no pseudonym)
``$CBP_DATA_ROOT/dagster_home`` the local Dagster instance (``make``'s default ``DAGSTER_HOME``)

Outside the data root, beside it: ``<data root>.withdrawals`` (or ``$CBP_WITHDRAWALS_DIR``), the withdrawal register
and its key (:mod:`cbp_platform.withdrawals`): erasure never touches it, and a data root restored from a backup
still finds the withdrawals made since.

:class:`DataLayout` is the one place these subpaths are spelt: resources, assets, the CLI and the tests ask it.
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


def stored_under(base: str | os.PathLike[str], path: str | os.PathLike[str]) -> str:
    """``path`` relative to ``base`` (POSIX) when inside it, else as given: how the platform stores a path."""
    p = Path(path)
    if not p.is_absolute():
        return p.as_posix()
    try:
        return p.resolve().relative_to(Path(base).resolve()).as_posix()
    except ValueError:
        return str(p)


def resolve_under(base: str | os.PathLike[str], stored: str | os.PathLike[str] | None) -> Path | None:
    """The path that ``stored`` (from :func:`stored_under`) names, relative to ``base``."""
    if stored is None or str(stored) == "":
        return None
    p = Path(stored)
    return p if p.is_absolute() else Path(base) / p


@dataclass(frozen=True)
class DataLayout:
    root: Path

    @classmethod
    def from_env(cls, override: str | os.PathLike[str] | None = None) -> "DataLayout":
        return cls(data_root(override))

    def stored(self, path: str | os.PathLike[str]) -> str:
        """How a path is stored (warehouse rows, pointers): relative to the data root when inside it (POSIX
        separators), so that a data root restored or copied elsewhere works there and touches nothing at the old
        place; absolute otherwise (:func:`stored_under`)."""
        return stored_under(self.root, path)

    def resolve(self, stored: str | os.PathLike[str] | None) -> Path | None:
        """The file a stored path names: relative to this data root, or absolute as stored (rows written before
        paths were stored relative)."""
        return resolve_under(self.root, stored)

    def stored_paths(self, df, *columns: str):
        """``df`` (a polars frame) with the path ``columns`` as :meth:`stored` (nulls kept)."""
        import polars as pl

        return df.with_columns(pl.col(c).map_elements(self.stored, return_dtype=pl.String)
                               for c in columns if c in df.columns)

    def resolved_paths(self, df, *columns: str):
        """``df`` with the stored path ``columns`` resolved against this data root (:meth:`resolve`)."""
        import polars as pl

        return df.with_columns(pl.col(c).map_elements(lambda v: str(self.resolve(v)), return_dtype=pl.String)
                               for c in columns if c in df.columns)

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

    @property
    def registry(self) -> Path:
        return self.root / "registry"

    @property
    def dagster_home(self) -> Path:
        """The local Dagster instance of this data root (``make``'s and the demo runner's ``DAGSTER_HOME``)."""
        return self.root / "dagster_home"

    @property
    def batch_registry(self) -> Path:
        return self.registry / "batches"

    @property
    def delivery_registry(self) -> Path:
        return self.registry / "deliveries"

    @property
    def withdrawals(self) -> Path:
        """The withdrawal register's folder: ``$CBP_WITHDRAWALS_DIR``, else ``<data root>.withdrawals`` beside the
        data root (never inside it)."""
        override = os.environ.get("CBP_WITHDRAWALS_DIR")
        return Path(override).expanduser().resolve() if override else self.root.parent / f"{self.root.name}.withdrawals"

    @property
    def retirements(self) -> Path:
        """Retired deliveries: ``<delivery id>.json`` each (``cbp delivery retire``)."""
        return self.registry / "retirements"

    @property
    def redactions(self) -> Path:
        """Redaction records: ``<delivery id>.json`` each, one entry per erasure that removed a participant's files
        from the delivery (:mod:`cbp_platform.ingest.redaction`; no pseudonym)."""
        return self.registry / "redactions"

    def release_manifest(self, release_id: int) -> Path:
        """A release's internal manifest (which version of which participant: pseudonyms; operator only)."""
        return self.registry / "releases" / f"{int(release_id)}.json"

    def release_summary(self, release_id: int) -> Path:
        """A release's public summary (counts, changes since the previous release, content hash; no pseudonym)."""
        return self.published / "releases" / str(int(release_id)) / "release.json"

    def release_report(self, release_id: int) -> Path:
        """The pointer to a release's latest published report (its folder, cohort hash, settings); its published
        tables are kept beside it (``tables/``) for ``cbp reproduce``."""
        return self.published / "releases" / str(int(release_id)) / "report.json"

    @property
    def release_impact(self) -> Path:
        """What the pending changes would do to the latest release's results (``release_impact``; no pseudonym)."""
        return self.published / "releases" / "impact.json"

    @property
    def warehouse_file(self) -> Path:
        """The embedded DuckDB warehouse (local profile)."""
        return self.root / "warehouse" / "cbp.duckdb"

    @property
    def published(self) -> Path:
        return self.root / "published"

    @property
    def latest_report(self) -> Path:
        """Pointer to the newest published report (``{"path": ..., "cohort_hash": ...}``)."""
        return self.published / "latest.json"

    def report_dir(self, cohort_hash: str) -> Path:
        return self.published / cohort_hash[:16]

    def segmentations(self, delivery_id: str) -> Path:
        """Label maps and QC images of the primary model for one delivery."""
        return self.derived / "segmentations" / delivery_id

    def comparisons(self, model_name: str, delivery_id: str) -> Path:
        """Label maps of a comparison model for one delivery."""
        return self.derived / "comparisons" / model_name / delivery_id

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

    @staticmethod
    def platform_model_pointer(models: Path) -> Path:
        """The platform's own trained model (name and weights), the locator of region-of-interest inference
        (:mod:`cbp_platform.segmentation.roi`), whichever model is primary."""
        return Path(models) / "platform.json"

    @staticmethod
    def level_model(models: Path, sha256: str) -> Path:
        """The platform's vertebral-level regressor (:mod:`cbp_platform.segmentation.levels`), named by its
        weights' sha256 and recorded in the platform model's pointer."""
        return Path(models) / f"cbp_levels-{sha256[:12]}.pt"

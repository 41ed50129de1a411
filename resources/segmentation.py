"""The segmentation runtime: device, batch sizes, prefetch workers, where model bundles live."""

from pathlib import Path

import dagster as dg

from cbp_platform.paths import DataLayout
from resources.data_root import DataRootResource


class SegmentationRuntime(dg.ConfigurableResource):
    """``device``: auto (CUDA with mixed precision when present, else deterministic CPU), cpu or cuda[:n]."""

    device: str = "auto"
    sw_batch_size: int = 2
    num_workers: int = 1
    threads: int = 0            # torch intra-op threads on CPU; 0 = all cores
    models_dir: str = ""        # default: the data root's models/
    data_root: DataRootResource | None = None

    @property
    def models_path(self) -> Path:
        return Path(self.models_dir) if self.models_dir else (self.data_root or DataRootResource()).layout.models

    @property
    def registry_path(self) -> Path:
        return DataLayout.model_registry(self.models_path)

    @property
    def current_pointer(self) -> Path:
        return self.models_path / "current.json"

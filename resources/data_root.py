"""The data root as a Dagster resource."""

from __future__ import annotations

from pathlib import Path

import dagster as dg

from cbp_platform.ingest.deliveries import DEFAULT_BATCH_SIZE, BatchRegistry
from cbp_platform.paths import DataLayout, data_root
from cbp_platform.withdrawals import DEFAULT_DEADLINE_DAYS


class DataRootResource(dg.ConfigurableResource):
    """Where deliveries land and where derived data go. ``root`` empty = ``$CBP_DATA_ROOT`` or ``./data``."""

    root: str = ""
    batch_size: int = DEFAULT_BATCH_SIZE
    ingest_threads: int = 2
    withdrawal_deadline_days: int = DEFAULT_DEADLINE_DAYS    # a withdrawal must be applied (erased) within it

    @property
    def path(self) -> Path:
        return data_root(self.root or None)

    @property
    def layout(self) -> DataLayout:
        return DataLayout(self.path)

    @property
    def landing(self) -> Path:
        return self.layout.landing

    @property
    def registry(self) -> BatchRegistry:
        return BatchRegistry(self.path)

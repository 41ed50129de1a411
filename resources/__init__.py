"""Dagster resources: the data root (landing zone, registry, derived data), the warehouse (DuckDB or PostgreSQL)
and the segmentation runtime.

Which resources a deployment uses is chosen in one place, :func:`orchestration.profiles.resources_for`; paths
under the data root come from :class:`cbp_platform.paths.DataLayout`.
"""

from resources.data_root import DataRootResource
from resources.segmentation import SegmentationRuntime
from resources.warehouse import (WAREHOUSE_KIND, DuckDBWarehouse, DuplicateRows, MissingTable, PostgresWarehouse,
                                 Warehouse)

__all__ = ["WAREHOUSE_KIND", "DataRootResource", "DuckDBWarehouse", "DuplicateRows", "MissingTable", "PostgresWarehouse",
           "SegmentationRuntime", "Warehouse"]

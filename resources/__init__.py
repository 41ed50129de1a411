"""Dagster resources: the data root (landing zone, registry, derived data) and the DuckDB warehouse.

Environment-specific choices are made here, in one place: ``CBP_DATA_ROOT`` roots everything, and the
warehouse file defaults to ``$CBP_DATA_ROOT/warehouse/cbp.duckdb``.
"""

from resources.data_root import DataRootResource
from resources.segmentation import SegmentationRuntime
from resources.warehouse import Warehouse

__all__ = ["DataRootResource", "SegmentationRuntime", "Warehouse"]

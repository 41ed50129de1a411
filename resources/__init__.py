"""Dagster resources: data roots and landing zone, the DuckDB warehouse, the segmentation runtime."""

"""Dagster software-defined assets, one module per pipeline stage (ingestion, segmentation, metrics, analysis).

Thin layer: read inputs, call :mod:`cbp_platform`, write outputs, attach metadata.
"""

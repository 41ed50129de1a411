"""Ingestion: deliveries -> batches, scan validation, covariate parsing (framework-free)."""

"""Partitions: one dynamic partition per batch of a delivery (``<delivery_id>.b<NNN>``), not per participant."""

import dagster as dg

BATCHES = "batches"
batches_partitions = dg.DynamicPartitionsDefinition(name=BATCHES)

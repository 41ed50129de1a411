"""What the delivery sensor's tick does for the tests that launch runs themselves: register the landing zone's
deliveries and add their batch partitions (the same sensor function, without its run requests)."""

from __future__ import annotations

from pathlib import Path


def register_batches(root: Path) -> list[str]:
    """Register the deliveries under ``root`` in its own instance; the batch keys, sorted."""
    import dagster as dg

    from assets.partitions import BATCHES
    from orchestration.runner import pipeline_environment
    from assets.sensors import delivery_sensor
    from resources import DataRootResource

    with pipeline_environment(root):
        with dg.DagsterInstance.get() as inst:
            with dg.build_sensor_context(instance=inst, resources={"data_root": DataRootResource()}) as ctx:
                res = delivery_sensor(ctx)
            for req in res.dynamic_partitions_requests or []:
                inst.add_dynamic_partitions(BATCHES, list(req.partition_keys))
            return sorted(inst.get_dynamic_partitions(BATCHES))

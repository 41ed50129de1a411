"""``delivery_sensor``: complete deliveries -> batches (dynamic partitions) -> one run request per batch.

Exactly-once: batches with a successful run (tag ``cbp/batch``) are not requested again, the cursor records
every delivery already registered (and malformed ones with their manifest's
modification time, so a corrected manifest is looked at again); each run request's ``run_key`` is its batch
key, so even a lost cursor never launches a batch twice. Registering a delivery writes its batch membership
files first and the delivery record last; partitions and run requests are then returned together in one
``SensorResult``. A tick lists the landing zone once and stats only deliveries it has not registered yet.
"""


import json

import dagster as dg

from assets.partitions import BATCHES
from cbp_platform.deployment import automation_running
from cbp_platform.ingest.batch import register_delivery
from cbp_platform.ingest.deliveries import scan_landing
from resources import DataRootResource

INGEST_JOB = "ingest_batch"
PROCESS_JOB = "process_batch"


def _load_cursor(raw: str | None) -> dict:
    if not raw:
        return {"registered": [], "malformed": {}}
    doc = json.loads(raw)
    doc.setdefault("registered", [])
    doc.setdefault("malformed", {})
    return doc


@dg.sensor(job_name=PROCESS_JOB, minimum_interval_seconds=30,
           default_status=dg.DefaultSensorStatus.RUNNING if automation_running() else dg.DefaultSensorStatus.STOPPED,
           description="Registers complete deliveries as batches and requests a processing run per batch.")
def delivery_sensor(context: dg.SensorEvaluationContext, data_root: DataRootResource) -> dg.SensorResult:
    cur = _load_cursor(context.cursor)
    registered = set(cur["registered"])
    malformed: dict = cur["malformed"]
    new_keys: list[str] = []
    runs: list[dg.RunRequest] = []
    waiting = 0
    # malformed deliveries are looked at again only when their manifest changes
    unchanged = {d for d, info in malformed.items() if _manifest_mtime(data_root.landing / d) == info.get("mtime")}
    for st in scan_landing(data_root.landing, skip=registered | unchanged):
        if st.state == "incomplete":
            waiting += 1
            continue
        if st.state == "malformed":
            mtime = _manifest_mtime(st.path)
            context.log.warning(f"delivery {st.delivery_id} rejected: {st.reason}")
            malformed[st.delivery_id] = {"reason": st.reason, "mtime": mtime}
            continue
        batches = register_delivery(data_root.path, st.manifest, data_root.batch_size)
        for b in batches:
            new_keys.append(b.key)
            if batch_already_ingested(context.instance, b.key):   # e.g. by `make demo` before the daemon ran
                continue
            runs.append(dg.RunRequest(run_key=b.key, partition_key=b.key,
                                      tags={"cbp/delivery": b.delivery_id, "cbp/batch": b.key}))
        registered.add(st.delivery_id)
        malformed.pop(st.delivery_id, None)
        context.log.info(f"delivery {st.delivery_id}: {len(st.manifest['participants'])} participants "
                         f"in {len(batches)} batches")
    cursor = json.dumps({"registered": sorted(registered), "malformed": malformed}, separators=(",", ":"))
    if not new_keys:
        reason = f"no new complete deliveries ({waiting} incomplete, {len(malformed)} malformed)"
        return dg.SensorResult(skip_reason=reason, cursor=cursor)
    return dg.SensorResult(run_requests=runs, cursor=cursor,
                           dynamic_partitions_requests=[dg.AddDynamicPartitionsRequest(BATCHES, new_keys)])


def batch_already_ingested(instance: dg.DagsterInstance, key: str, job_name: str = PROCESS_JOB) -> bool:
    """A successful run of ``job_name`` for this batch exists (launched by this sensor, the demo runner, the UI)."""
    return bool(instance.get_runs(filters=dg.RunsFilter(job_name=job_name, tags={"cbp/batch": key},
                                                        statuses=[dg.DagsterRunStatus.SUCCESS]), limit=1))


def _manifest_mtime(path) -> float | None:
    try:
        return (path / "manifest.json").stat().st_mtime
    except OSError:
        return None

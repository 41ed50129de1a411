"""``delivery_sensor``: closed deliveries -> batches (dynamic partitions) -> one run request per batch, and what
every delivery in the landing zone is waiting for.

Exactly-once: batches with a successful run (tag ``cbp/batch``) are not requested again, the cursor records
every delivery already registered (and refused ones with their manifest's modification time, so a corrected
manifest is looked at again); each run request's ``run_key`` is its batch key, so even a lost cursor never
launches a batch twice. Registering a delivery writes its batch membership files first and the delivery record
last (:mod:`cbp_platform.ingest.registry`); partitions and run requests are then returned together in one
``SensorResult``. Deliveries closed in the same tick register oldest manifest first (first registered wins).

Each tick also checks registered deliveries for changes (a stat of the manifest and the covariates file) and
reports every delivery that is waiting, refused, changed or gone: in the tick's message in the UI, in the log
(once per new reason), and as an observation of the ``landing_zone`` asset whenever the picture changes.
Messages name deliveries and files by id and manifest position, never by a path holding a pseudonym.
"""


import hashlib
import json

import dagster as dg

from assets.ingestion import LANDING_ZONE
from assets.partitions import BATCHES
from cbp_platform.deployment import automation_running
from cbp_platform.ingest.deliveries import READY, REFUSED, REGISTERED, WAITING, Batch, ManifestError, scan_landing
from cbp_platform.ingest.registry import register_delivery, registered_deliveries, registered_state
from cbp_platform.warehouse import STAGE_PART
from resources import DataRootResource

INGEST_JOB = "ingest_batch"
PROCESS_JOB = "process_batch"
# the assets of the per-batch job (assets/schedules.py), in order; a correction's batch runs only those of its parts
PROCESS_ASSETS = ("raw_mri_scans", "participant_covariates", "muscle_segmentations", "muscle_metrics")
INGEST_ASSETS = PROCESS_ASSETS[:2]       # ... and of the ingestion-only job


def batch_assets(batch: Batch, job_name: str = PROCESS_JOB) -> list[dg.AssetKey]:
    """The assets a batch's run of ``job_name`` materialises: all of the job's for a delivery's batch; for a
    correction's batch only the stages of the parts it corrects (a covariate correction: participant_covariates
    alone, no image stage)."""
    return [dg.AssetKey(a) for a in (INGEST_ASSETS if job_name == INGEST_JOB else PROCESS_ASSETS)
            if batch.covers(STAGE_PART[a])]


def _load_cursor(raw: str | None) -> dict:
    doc = json.loads(raw) if raw else {}
    doc.setdefault("registered", [])
    doc.setdefault("refused", doc.pop("malformed", {}))
    doc.setdefault("problems", {})
    doc.setdefault("observed", "")
    return doc


@dg.sensor(job_name=PROCESS_JOB, minimum_interval_seconds=30,
           default_status=dg.DefaultSensorStatus.RUNNING if automation_running() else dg.DefaultSensorStatus.STOPPED,
           description="Registers closed deliveries as batches, requests a processing run per batch, and reports "
                       "deliveries that are waiting, refused or changed (landing_zone observations).")
def delivery_sensor(context: dg.SensorEvaluationContext, data_root: DataRootResource) -> dg.SensorResult:
    cur = _load_cursor(context.cursor)
    registered = set(cur["registered"])
    refused: dict = cur["refused"]
    landing = data_root.landing
    # refused deliveries are looked at again only when their manifest changes
    unchanged = {d for d, info in refused.items() if _manifest_mtime(landing / d) == info.get("mtime")}
    statuses = scan_landing(landing, skip=registered | unchanged)
    waiting = {s.delivery_id: s.reason for s in statuses if s.state == WAITING}
    for st in statuses:
        if st.state == REFUSED:
            if refused.get(st.delivery_id, {}).get("reason") != st.reason:
                context.log.warning(f"delivery refused: {st.reason}")
            refused[st.delivery_id] = {"reason": st.reason, "mtime": _manifest_mtime(st.path)}
    new_keys: list[str] = []
    runs: list[dg.RunRequest] = []
    for st in sorted((s for s in statuses if s.state == READY),
                     key=lambda s: (s.manifest["created_at"], s.delivery_id)):
        try:
            batches = register_delivery(data_root.path, st.path, st.manifest, st.manifest_bytes,
                                        data_root.batch_size)
        except ManifestError as exc:       # a correction naming what the platform does not hold
            if refused.get(st.delivery_id, {}).get("reason") != str(exc):
                context.log.warning(f"delivery refused: {exc}")
            refused[st.delivery_id] = {"reason": str(exc), "mtime": _manifest_mtime(st.path)}
            continue
        except Exception as exc:  # noqa: BLE001  (this delivery's boundary: the others are registered)
            reason = f"{st.delivery_id}: registration failed ({type(exc).__name__}); the other deliveries go on"
            context.log.warning(f"delivery refused: {reason}")
            refused[st.delivery_id] = {"reason": reason, "mtime": _manifest_mtime(st.path)}
            continue
        for b in batches:
            new_keys.append(b.key)
            if batch_already_ingested(context.instance, b.key):   # e.g. by `make demo` before the daemon ran
                continue
            runs.append(dg.RunRequest(run_key=b.key, partition_key=b.key,
                                      asset_selection=batch_assets(b) if b.parts else None,
                                      tags={"cbp/delivery": b.delivery_id, "cbp/batch": b.key}))
        registered.add(st.delivery_id)
        refused.pop(st.delivery_id, None)
        context.log.info(f"delivery {st.delivery_id}: registered, {len(st.manifest['participants'])} participants "
                         f"in {len(batches)} batches")
    # registered deliveries that changed or left the landing zone
    problems = {}
    recs = registered_deliveries(data_root.path)
    for rec in recs:
        state, reason = registered_state(data_root.path, landing, rec)
        if state != REGISTERED:
            problems[rec["delivery_id"]] = {"state": state, "reason": reason}
            if cur["problems"].get(rec["delivery_id"], {}).get("reason") != reason:
                context.log.warning(f"delivery {state}: {reason}")
    refused = {d: v for d, v in refused.items() if (landing / d).exists() or (landing / d).is_symlink()}
    counts = {"registered": len(recs) - len(problems), "waiting": len(waiting), "refused": len(refused),
              **{s: sum(1 for p in problems.values() if p["state"] == s)
                 for s in ("changed", "gone", "retired", "redacted")}}
    summary = ", ".join(f"{n} {s}" for s, n in counts.items() if n)
    events = []
    picture = {"counts": counts, "waiting": waiting, "refused": {d: v["reason"] for d, v in refused.items()},
               "problems": problems}
    digest = hashlib.sha256(json.dumps(picture, sort_keys=True).encode()).hexdigest()[:16]
    if digest != cur["observed"]:
        events.append(dg.AssetObservation(asset_key=LANDING_ZONE, metadata=_observation_metadata(picture)))
    cursor = json.dumps({"registered": sorted(registered), "refused": refused, "problems": problems,
                         "observed": digest}, separators=(",", ":"))
    if not new_keys:
        detail = "; ".join([f"{d}: {r}" for d, r in list(picture["refused"].items())[:3]]
                           + [p["reason"] for p in list(problems.values())[:3]])
        reason = f"no newly closed deliveries ({summary or 'landing zone empty'})" + (f": {detail}" if detail else "")
        return dg.SensorResult(skip_reason=reason, cursor=cursor, asset_events=events)
    return dg.SensorResult(run_requests=runs, cursor=cursor, asset_events=events,
                           dynamic_partitions_requests=[dg.AddDynamicPartitionsRequest(BATCHES, new_keys)])


def _observation_metadata(picture: dict) -> dict:
    rows = ([(d, "waiting", r) for d, r in picture["waiting"].items()]
            + [(d, "refused", r) for d, r in picture["refused"].items()]
            + [(d, p["state"], p["reason"]) for d, p in picture["problems"].items()])
    table = "\n".join(["| delivery | state | reason |", "|---|---|---|"]
                      + [f"| {d} | {s} | {r.replace('|', '/')} |" for d, s, r in sorted(rows)]) if rows else "_none_"
    return {**{f"deliveries_{k}": v for k, v in picture["counts"].items()},
            "not_registered_or_changed": dg.MetadataValue.md(table)}


def batch_already_ingested(instance: dg.DagsterInstance, key: str, job_name: str = PROCESS_JOB) -> bool:
    """A successful run of ``job_name`` for this batch exists (launched by this sensor, the demo runner, the UI)."""
    return bool(instance.get_runs(filters=dg.RunsFilter(job_name=job_name, tags={"cbp/batch": key},
                                                        statuses=[dg.DagsterRunStatus.SUCCESS]), limit=1))


def _manifest_mtime(path) -> float | None:
    try:
        return (path / "manifest.json").stat().st_mtime
    except OSError:
        return None

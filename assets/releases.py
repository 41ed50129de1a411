"""Data releases in the asset graph: ``data_release``, one partition per release (``1``, ``2``, ...).

Materialising partition ``n`` cuts release ``n`` (:mod:`cbp_platform.releases`): it freezes the version in force of
every participant in every versioned stage, with the quarantine, the reviewers' rejections in force and the retired
deliveries, in the append-only tables ``releases``, ``release_versions``, ``release_participants`` and
``release_quarantine`` (one transaction), and writes the internal manifest (pseudonyms: the registry, operator only)
and the public summary (``published/releases/<n>/release.json``, no pseudonym). Its data version is the release's
content hash. A release is cut once: materialising it again changes nothing and reports the same data version; the
next release's number is one more than the last (``cbp release cut`` adds the partition and runs it).
``analysis_cohort`` reads the latest release (or the one its config names), so every published number names one.
"""


import hashlib
import json

import dagster as dg
import polars as pl

from assets.ingestion import participant_covariates, raw_mri_scans
from assets.segmentation import muscle_metrics, muscle_segmentations
from cbp_platform import __version__
from cbp_platform import releases as rl
from cbp_platform.deployment import k8s_step_tags
from cbp_platform.imaging.nifti import atomic_write_bytes
from cbp_platform.ingest.registry import corrections_of, registered_deliveries, registry_lock, retirements
from cbp_platform.withdrawals import Register
from resources import WAREHOUSE_KIND, DataRootResource, Warehouse
from resources.reviews import REVIEWS_ASSET, ReviewStore

RELEASES = "releases"
releases_partitions = dg.DynamicPartitionsDefinition(name=RELEASES)
DATA_RELEASE_VERSION = "data_release/1"
RELEASE_TABLES = ("releases", "release_versions", "release_participants", "release_quarantine", "release_salts",
                  "release_leaves")
DATA_RELEASE = dg.AssetKey("data_release")
WITHDRAWALS_ASSET = dg.AssetKey("withdrawal_register")


class NoRelease(LookupError):
    """No release has been cut yet (or not the one asked for)."""


def review_state(warehouse: Warehouse) -> tuple[pl.DataFrame, tuple[int, str]]:
    """The reviewers' decisions in force on the label maps in force, and the reviews' (count, sha256)."""
    from cbp_platform.qc import reviews as rv

    reviews = ReviewStore(warehouse)
    history = reviews.reviews()
    prov = warehouse.table("provenance", columns=["pseudonym", "input_checksums", "recorded_at"],
                           where={"stage": "muscle_metrics"}, order_by=["recorded_at", "pseudonym"], missing_ok=True)
    decisions = rv.effective_reviews(history, rv.analysed_maps(reviews.current_maps(), prov))
    return decisions, rv.digest(history)


def releases_table(warehouse: Warehouse) -> pl.DataFrame:
    """Every release cut so far, in order (empty when none)."""
    df = warehouse.table("releases", order_by=["release_id"], missing_ok=True)
    return df if df is not None else pl.DataFrame(schema={"release_id": pl.Int64})


def release_info(warehouse: Warehouse, release_id: int | None = None) -> dict:
    """The ``releases`` row of ``release_id`` (the latest when None); :class:`NoRelease` when there is none."""
    rows = releases_table(warehouse)
    if rows.height == 0:
        raise NoRelease("no release has been cut yet: cut one (`cbp release cut`, or materialise a data_release "
                        "partition)")
    if release_id is None:
        return rows.row(rows.height - 1, named=True)
    hit = rows.filter(pl.col("release_id") == int(release_id))
    if hit.height == 0:
        raise NoRelease(f"release {release_id} does not exist (releases: {', '.join(map(str, rows['release_id']))})")
    return hit.row(0, named=True)


def release_commitment(warehouse: Warehouse, release_id: int) -> dict | None:
    """Verify release ``release_id``'s Merkle root from its surviving rows and its opaque leaves
    (:func:`cbp_platform.releases.verify_commitment`); None for a release cut before commitments existed."""
    info = release_info(warehouse, release_id)
    root = info.get("merkle_root")
    if not root:
        return None
    where = {"release_id": int(release_id)}
    leaves = warehouse.table("release_leaves", where=where)["leaf"].to_list()
    return {"root": root, **rl.verify_commitment(
        root, leaves, warehouse.table("release_salts", where=where),
        warehouse.table("release_versions", where=where), warehouse.table("release_participants", where=where),
        warehouse.table("release_quarantine", where=where))}


def release_inputs(warehouse: Warehouse, release_id: int) -> dict[str, pl.DataFrame]:
    """What the analysis reads of release ``release_id``: the covariates, scans and metrics it froze, its
    quarantine rows, and its rejected and retired participants (frames with ``pseudonym``)."""
    empty = pl.DataFrame()
    cov = warehouse.release_rows("participant_covariates", release_id, order_by=["pseudonym"])
    scans = warehouse.release_rows("raw_mri_scans", release_id, order_by=["pseudonym"])
    metrics = warehouse.release_rows("muscle_metrics", release_id, order_by=["pseudonym", "muscle"])
    if cov is None or cov.height == 0 or scans is None or scans.height == 0:
        raise ValueError(f"release {release_id} holds no covariates or no scans: ingest at least one batch, then "
                         "cut a release")
    parts = warehouse.table("release_participants", where={"release_id": release_id}, order_by=["pseudonym"])
    return {"covariates": cov, "scans": scans, "metrics": metrics if metrics is not None else empty,
            "quarantine": warehouse.table("release_quarantine", where={"release_id": release_id},
                                          order_by=["pseudonym", "stage", "reason"]),
            "rejected": parts.filter(pl.col("qc_rejected")).select("pseudonym"),
            "retired": parts.filter(pl.col("retired_by") != "").select("pseudonym"),
            "withdrawn": (parts.filter(pl.col("withdrawn").fill_null("") != "").select("pseudonym")
                          if "withdrawn" in parts.columns else parts.head(0).select("pseudonym"))}


def release_cohort(warehouse: Warehouse, info: dict, *, lmm_normaliser: str = "weight_per_height"):
    """The analysis cohort of a release (its ``releases`` row, :func:`release_info`) and the inputs it was built
    from: what ``analysis_cohort`` stores and ``cbp reproduce`` rebuilds."""
    from cbp_platform.analysis.cohort import build_analysis_cohort

    inputs = release_inputs(warehouse, int(info["release_id"]))
    cohort = build_analysis_cohort(inputs["covariates"], inputs["scans"], inputs["metrics"], inputs["quarantine"],
                                   lmm_normaliser=lmm_normaliser, rejected=inputs["rejected"],
                                   retired=inputs["retired"], withdrawn=inputs["withdrawn"])
    return cohort, inputs


def prepare_release(warehouse: Warehouse, data_root: DataRootResource, release_id: int) -> tuple[rl.Release, dict]:
    """What cutting release ``release_id`` now would freeze (nothing written): the release and its row's extras."""
    stages = {}
    for s in rl.STAGES:
        rows = warehouse.table(s, versions="all", missing_ok=True)
        if rows is not None and "superseded_by" in rows.columns:
            rows = rows.filter(pl.col("superseded_by").fill_null("") == "")
        stages[s] = rows
    quarantine = warehouse.table("quarantine", columns=["pseudonym", "stage", "reason", "delivery_id"],
                                 missing_ok=True)
    decisions, reviews = review_state(warehouse)
    rejected = decisions.filter(pl.col("decision") == "reject")["pseudonym"].to_list() if decisions.height else []
    recs = registered_deliveries(data_root.path)
    kinds = {r["delivery_id"]: r.get("kind", "delivery") for r in recs}
    reasons = {(d, p): e["reason"] for d, k in kinds.items() if k == "correction"
               for p, e in corrections_of(data_root.path, d, data_root.landing).items()}
    for rows in stages.values():            # a version that names what it supersedes is a correction's
        if rows is not None and "supersedes" in rows.columns:
            kinds.update({d: "correction" for d in rows.filter(pl.col("supersedes").fill_null("") != "")[
                "delivery_id"].unique().to_list()})
    retired = {d: r["reason"] for d, r in retirements(data_root.path).items()}
    prev = releases_table(warehouse).filter(pl.col("release_id") < release_id)
    previous, previous_id, previous_retired, previous_withdrawn = None, None, set(), 0
    if prev.height:
        last = prev.row(prev.height - 1, named=True)
        previous_id = int(last["release_id"])
        previous = warehouse.table("release_versions", where={"release_id": previous_id})
        previous_retired = set(json.loads(last["summary"]).get("retired_deliveries", []))
        parts = warehouse.table("release_participants", where={"release_id": previous_id})
        previous_withdrawn = int((parts["withdrawn"].fill_null("") != "").sum()) if "withdrawn" in parts.columns else 0
    people = set()
    for rows in [*stages.values(), quarantine]:
        if rows is not None and "pseudonym" in rows.columns:
            people |= set(rows["pseudonym"].drop_nulls().to_list())
    withdrawn = {p: r["scope"] for p, r in Register(data_root.layout.withdrawals).match(sorted(people)).items()}
    rel = rl.cut(release_id, stages, quarantine=quarantine, rejected=rejected, retired=retired, kinds=kinds,
                 reasons=reasons, withdrawn=withdrawn, previous=previous, previous_id=previous_id,
                 previous_retired=previous_retired, previous_withdrawn=previous_withdrawn)
    outdated = int(decisions["outdated"].sum()) if decisions.height else 0
    return rel, {"reviews": reviews, "qc_outdated": outdated}


def write_release(warehouse: Warehouse, data_root: DataRootResource, rel: rl.Release, extras: dict) -> dict:
    """Write release ``rel``: its tables in one transaction (with its salted Merkle commitment: salts, leaves,
    the root in its row and summary), then the internal manifest and the public summary. Returns its ``releases``
    row."""
    from cbp_platform.warehouse import now_utc

    salts, leaves, root = rl.commit(rel)
    row = rel.row(cut_at=now_utc().isoformat(), code_version=__version__, reviews=extras["reviews"],
                  qc_outdated=extras["qc_outdated"]).with_columns(pl.lit(root).alias("merkle_root"))
    rel.summary["merkle_root"] = root
    where = {"release_id": rel.release_id}
    warehouse.replace_many([("releases", row, where), ("release_versions", rel.versions, where),
                            ("release_participants", rel.participants, where),
                            ("release_quarantine", rel.quarantine, where), ("release_salts", salts, where),
                            ("release_leaves", leaves, where)])
    layout = data_root.layout
    internal = {"release": rel.release_id, "content_hash": rel.content_hash, "format": rl.RELEASE_FORMAT,
                "cut_at": row["cut_at"][0], "summary": rel.summary,
                "versions": rel.versions.drop("release_id").rows(),
                "version_columns": rel.versions.drop("release_id").columns,
                "retired": rel.participants.filter(pl.col("retired_by") != "").select("pseudonym", "retired_by").rows(),
                "qc_rejected": rel.participants.filter(pl.col("qc_rejected"))["pseudonym"].to_list()}
    atomic_write_bytes(layout.release_manifest(rel.release_id), json.dumps(internal).encode())
    public = {**rel.summary, "cut_at": row["cut_at"][0], "code_version": __version__}
    atomic_write_bytes(layout.release_summary(rel.release_id), (json.dumps(public, indent=1) + "\n").encode())
    return row.row(0, named=True)


def _metadata(row: dict) -> dict:
    summary = json.loads(row["summary"])
    since = summary.get("since_previous", {})
    return {"release": int(row["release_id"]), "content_hash": row["content_hash"],
            "participants": int(row["participants"]), "previous": row["previous"] or 0,
            "cut_at": row["cut_at"], "versions_per_stage": dg.MetadataValue.json(summary["versions_per_stage"]),
            "since_previous": dg.MetadataValue.json(since),
            "excluded_as_retired": str(summary["excluded_as_retired"])}


@dg.asset(partitions_def=releases_partitions, deps=[raw_mri_scans, participant_covariates, muscle_segmentations,
                                                     muscle_metrics, REVIEWS_ASSET, WITHDRAWALS_ASSET],
          code_version=DATA_RELEASE_VERSION, group_name="analysis", kinds={WAREHOUSE_KIND},
          op_tags=k8s_step_tags("cpu-large"),
          description="A data release per partition (1, 2, ...): which version of which participant the analysis "
                      "uses, frozen when it is cut, with the quarantine, the reviewers' rejections and the retired "
                      "deliveries. Append-only; its data version is the release's content hash. Cut the next with "
                      "`cbp release cut` (docs/lifecycle.md).")
def data_release(context: dg.AssetExecutionContext, data_root: DataRootResource,
                 warehouse: Warehouse) -> dg.MaterializeResult:
    try:
        release_id = int(context.partition_key)
    except ValueError:
        raise dg.Failure(description=f"data_release partition {context.partition_key!r}: releases are numbered "
                                     "1, 2, ...") from None
    with registry_lock(data_root.path):          # one cut at a time
        rows = releases_table(warehouse)
        done = rows.filter(pl.col("release_id") == release_id) if rows.height else rows
        if done.height:                          # frozen: never cut twice
            row = done.row(0, named=True)
            context.log.info(f"release {release_id} was cut {row['cut_at']}; it stays as it is")
            return dg.MaterializeResult(metadata=_metadata(row), data_version=dg.DataVersion(row["content_hash"]))
        latest = int(rows["release_id"].max()) if rows.height else 0
        if release_id != latest + 1:
            raise dg.Failure(description=f"release {release_id} cannot be cut: the next release is {latest + 1}")
        rel, extras = prepare_release(warehouse, data_root, release_id)
        row = write_release(warehouse, data_root, rel, extras)
    context.log.info(f"release {release_id} cut: {rel.summary['participants']} participants, content hash "
                     f"{rel.content_hash[:12]}")
    return dg.MaterializeResult(metadata=_metadata(row), data_version=dg.DataVersion(rel.content_hash))


# --- what a release's report holds, rebuilt; and what the data in force would change (cbp reproduce, cbp impact) --

def _stored(cohort) -> tuple[pl.DataFrame, pl.DataFrame]:
    """The cohort's frame and flow as the warehouse stores and the analysis assets read them back."""
    from resources.warehouse import storable

    return storable(cohort.frame).sort("pseudonym"), storable(cohort.flow).sort("step")


def outputs_of(cohort, *, nagq: int = 25, min_epv: float = 10.0, imputations: int = 20):
    """The report's numeric tables of an analysis cohort, as the analysis assets compute them."""
    from cbp_platform.analysis.outputs import analysis_outputs
    from resources.warehouse import storable

    frame, flow = _stored(cohort)
    mi = storable(cohort.imputation_frame).sort("pseudonym") if cohort.imputation_frame is not None else None
    return analysis_outputs(frame, flow, lmm_unit=cohort.lmm_unit, cohort_hash=cohort.cohort_hash, nagq=nagq,
                            min_epv=min_epv, imputation_frame=mi, imputations=imputations)


def version_drift(warehouse: Warehouse, release_id: int) -> dict[str, int]:
    """Per analysed stage, how many versions release ``release_id`` names whose rows changed since it was cut (a
    batch re-run by other code rewrites its rows under the same version); {} when none changed."""
    out = {}
    frozen = warehouse.table("release_versions", where={"release_id": release_id})
    for stage in rl.ANALYSIS_STAGES:
        rows = warehouse.release_rows(stage, release_id)
        now = rl.version_digests(stage, rows).select("pseudonym", "model_name", "delivery_id", "version_sha256")
        then = frozen.filter(pl.col("stage") == stage).select("pseudonym", "model_name", "delivery_id",
                                                             pl.col("version_sha256").alias("then"))
        j = then.join(now, on=["pseudonym", "model_name", "delivery_id"], how="left")
        n = j.filter(pl.col("version_sha256").is_null() | (pl.col("version_sha256") != pl.col("then"))).height
        if n:
            out[stage] = n
    return out


def pending_impact(warehouse: Warehouse, data_root: DataRootResource, *, min_count: int | None = None) -> dict:
    """What cutting the next release now would change in the latest release's published results
    (:func:`cbp_platform.analysis.outputs.impact`): no pseudonym; withheld under ``min_count`` changed
    participants."""
    from cbp_platform.analysis.cohort import build_analysis_cohort
    from cbp_platform.analysis.disclosure import MIN_COUNT
    from cbp_platform.analysis.outputs import impact

    limit = MIN_COUNT if min_count is None else min_count
    info = release_info(warehouse)
    release_id = int(info["release_id"])
    rel, _ = prepare_release(warehouse, data_root, release_id + 1)
    base = {"release": release_id, "release_content_hash": info["content_hash"],
            "pending_content_hash": rel.content_hash}
    if rel.content_hash == info["content_hash"]:
        return {**base, "pending": False, "withheld": False, "changed_participants": 0,
                "note": f"nothing changed since release {release_id}"}
    changed = _changed_participants(warehouse, release_id, rel)
    report = published_report(data_root, release_id)
    normaliser = report.get("lmm_normaliser", "weight_per_height")
    nagq = int(report.get("nagq", 25))
    if changed < limit:
        return {**base, "pending": True, **impact(None, None, changed_participants=changed, min_count=limit)}
    withdrawals = _new_withdrawals(warehouse, release_id, rel)
    if 0 < withdrawals < limit:         # the difference would be the effect of fewer than 5 withdrawn participants
        return {**base, "pending": True, "withheld": True, "changed_participants": changed,
                "why": f"fewer than {limit} withdrawals of consent are pending: an impact that includes them could "
                       "reveal a withdrawn participant's values; it is shown once more are pending or they are "
                       "released"}
    before_cohort, _ = release_cohort(warehouse, info, lmm_normaliser=normaliser)
    parts = rel.participants
    after_cohort = build_analysis_cohort(
        *(warehouse.table(s, order_by=["pseudonym"]) for s in ("participant_covariates", "raw_mri_scans")),
        warehouse.table("muscle_metrics", order_by=["pseudonym", "muscle"], missing_ok=True) if
        warehouse.has_table("muscle_metrics") else pl.DataFrame(),
        rel.quarantine, lmm_normaliser=normaliser, rejected=parts.filter(pl.col("qc_rejected")),
        retired=parts.filter(pl.col("retired_by") != ""), withdrawn=parts.filter(pl.col("withdrawn") != ""))
    # the impact compares the reported models' ORs: the multiple-imputation sensitivity fits are not needed
    out = impact(outputs_of(before_cohort, nagq=nagq, imputations=0),
                 outputs_of(after_cohort, nagq=nagq, imputations=0),
                 changed_participants=changed, min_count=limit)
    return {**base, "pending": True, "cohort_hash": [before_cohort.cohort_hash, after_cohort.cohort_hash],
            "analysed": [before_cohort.n, after_cohort.n], **out,
            "since_release": rel.summary["since_previous"]}


def _new_withdrawals(warehouse: Warehouse, release_id: int, rel: rl.Release) -> int:
    """Participants the next release would exclude as withdrawn whom release ``release_id`` did not."""
    p0 = warehouse.table("release_participants", where={"release_id": release_id})
    before = set(p0.filter(pl.col("withdrawn").fill_null("") != "")["pseudonym"]) if "withdrawn" in p0.columns \
        else set()
    return len(set(rel.participants.filter(pl.col("withdrawn") != "")["pseudonym"]) - before)


def _changed_participants(warehouse: Warehouse, release_id: int, rel: rl.Release) -> int:
    """Participants whose data the next release would change: another version (or rows) of any stage, newly
    present or gone, retired or rejected since."""
    key = ["stage", "pseudonym", "model_name"]
    then = warehouse.table("release_versions", where={"release_id": release_id}).select(
        *key, pl.col("delivery_id").alias("d0"), pl.col("version_sha256").alias("s0"))
    now = rel.versions.select(*key, "delivery_id", "version_sha256")
    j = then.join(now, on=key, how="full", coalesce=True)
    moved = set(j.filter(pl.col("d0").is_null() | pl.col("delivery_id").is_null() | (pl.col("d0") != pl.col(
        "delivery_id")) | (pl.col("s0") != pl.col("version_sha256")))["pseudonym"].to_list())
    p0 = warehouse.table("release_participants", where={"release_id": release_id})
    w0 = pl.col("withdrawn") if "withdrawn" in p0.columns else pl.lit("")
    p0 = p0.select("pseudonym", pl.col("retired_by").alias("r0"), pl.col("qc_rejected").alias("q0"), w0.alias("w0"))
    pj = p0.join(rel.participants.select("pseudonym", "retired_by", "qc_rejected", "withdrawn"), on="pseudonym",
                 how="full", coalesce=True)
    flags = set(pj.filter((pl.col("r0").fill_null("") != pl.col("retired_by").fill_null(""))
                          | (pl.col("q0").fill_null(False) != pl.col("qc_rejected").fill_null(False))
                          | (pl.col("w0").fill_null("") != pl.col("withdrawn").fill_null("")))
                ["pseudonym"].to_list())
    return len(moved | flags)


def published_report(data_root: DataRootResource, release_id: int) -> dict:
    """The pointer to release ``release_id``'s latest published report ({} when it was never published)."""
    path = data_root.layout.release_report(release_id)
    return json.loads(path.read_text()) if path.exists() else {}


@dg.asset(deps=[DATA_RELEASE, raw_mri_scans, participant_covariates, muscle_segmentations, muscle_metrics,
                REVIEWS_ASSET, WITHDRAWALS_ASSET],
          code_version="release_impact/1", group_name="analysis", kinds={"polars"}, op_tags=k8s_step_tags("cpu-large"),
          description="What cutting the next release now would change in the latest release's published results: "
                      "each reported OR and its CI (and whether a CI now crosses 1), the exclusion flow, Table 1. "
                      "No pseudonym; withheld when fewer than 5 participants changed. Written to "
                      "published/releases/impact.json (`cbp impact` prints the same).")
def release_impact(context: dg.AssetExecutionContext, data_root: DataRootResource,
                   warehouse: Warehouse) -> dg.MaterializeResult:
    from cbp_platform.analysis.outputs import format_impact

    try:
        doc = pending_impact(warehouse, data_root)
    except NoRelease as exc:
        raise dg.Failure(description=f"release_impact: {exc}") from None
    payload = json.dumps(doc, indent=1, default=str, sort_keys=True).encode()
    atomic_write_bytes(data_root.layout.release_impact, payload)
    context.log.info(format_impact(doc).splitlines()[-1])
    return dg.MaterializeResult(metadata={
        "release": doc["release"], "pending": doc["pending"], "withheld": doc.get("withheld", False),
        "changed_participants": str(doc.get("changed_participants", 0)),
        "ci_crossing_changed": dg.MetadataValue.json(doc.get("ci_crossing_changed", [])),
        "impact": dg.MetadataValue.md(f"```\n{format_impact(doc)}\n```"),
        "path": dg.MetadataValue.path(str(data_root.layout.release_impact))},
        data_version=dg.DataVersion(hashlib.sha256(payload).hexdigest()[:16]))

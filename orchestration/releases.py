"""Cutting a data release through Dagster: ``cbp release cut`` and ``make demo``'s runner.

The next release's number is one more than the last; the ``data_release`` partition of that number is added to the
instance and materialised by the ``cut_release`` job, so the release shows in the asset graph with its content hash
as data version (``assets/releases.py``). ``if_changed`` cuts only when the versions in force (with the
quarantine, the reviewers' rejections and the retirements) differ from the latest release's.
"""

from __future__ import annotations

import dagster as dg

from assets.releases import (RELEASES, NoRelease, pending_impact, prepare_release, release_info,  # noqa: F401
                             releases_table)
from assets.schedules import CUT_RELEASE_JOB
from orchestration.profiles import warehouse as profile_warehouse
from orchestration.reaper import host_tag
from resources import DataRootResource


class ReleaseError(RuntimeError):
    """The cut failed (the run's error is in the message)."""


def next_release(wh) -> int:
    rows = releases_table(wh)
    return int(rows["release_id"].max()) + 1 if rows.height else 1


def unchanged_since_latest(wh, data_root: DataRootResource) -> dict | None:
    """The latest release's row when a cut now would freeze the same content; None otherwise (or when there is
    no release yet)."""
    rows = releases_table(wh)
    if rows.height == 0:
        return None
    latest = release_info(wh)
    rel, _ = prepare_release(wh, data_root, int(latest["release_id"]) + 1)
    return latest if rel.content_hash == latest["content_hash"] else None


def cut_release(instance: dg.DagsterInstance, *, if_changed: bool = False, log=print,
                data_root: DataRootResource | None = None) -> dict:
    """Cut the next release through the ``cut_release`` job; its ``releases`` row. With ``if_changed``, the latest
    release's row (and nothing cut) when nothing changed since it."""
    from cbp_platform.definitions import build_definitions

    data_root = data_root or DataRootResource()
    wh = profile_warehouse()
    if if_changed:
        same = unchanged_since_latest(wh, data_root)
        if same is not None:
            log(f"  data release {same['release_id']}: nothing changed since it was cut; no new release")
            return {**same, "cut": False}
    release_id = next_release(wh)
    instance.add_dynamic_partitions(RELEASES, [str(release_id)])
    job = build_definitions().resolve_job_def(CUT_RELEASE_JOB)
    res = job.execute_in_process(partition_key=str(release_id), instance=instance, raise_on_error=False,
                                 run_config={"loggers": {"console": {"config": {"log_level": "WARNING"}}}},
                                 tags=host_tag())
    if not res.success:
        failure = next((e.event_specific_data.error.message for e in res.all_events if e.is_step_failure), "")
        raise ReleaseError(f"release {release_id}: the cut failed (run {res.run_id[:8]}): {failure.strip()}")
    row = release_info(wh, release_id)
    log(f"  data release {release_id}: cut, {row['participants']} participants, content hash "
        f"{row['content_hash'][:16]} (run {res.run_id[:8]})")
    return {**row, "cut": True}


def reproduce(release_id: int, *, data_root: DataRootResource | None = None, out=print) -> bool:
    """Rebuild release ``release_id``'s analysis cohort from the versioned rows it froze, re-fit every model,
    re-make every published table and compare them, and the cohort hash, with the release's published report.
    Prints the comparison (side by side where they differ); True when everything matches."""
    from assets.releases import outputs_of, published_report, release_cohort, release_commitment, version_drift
    from cbp_platform.analysis.outputs import compare_tables, published_tables, read_tables

    data_root = data_root or DataRootResource()
    wh = profile_warehouse()
    info = release_info(wh, release_id)
    report = published_report(data_root, release_id)
    if not report:
        raise ReleaseError(f"release {release_id} has no published report to compare with (publish it: the cohort "
                           f"refresh with analysis_cohort's config release={release_id})")
    out(f"release {release_id}: cut {info['cut_at'][:19]}, content hash {info['content_hash'][:16]}; its report "
        f"published {report['published_at'][:19]} (run {report['run_id'][:8]})")
    drift = version_drift(wh, release_id)
    if drift:
        out(f"  versions whose rows changed since the release was cut (a batch re-run): "
            f"{', '.join(f'{s} {n}' for s, n in drift.items())}")
    commitment = release_commitment(wh, release_id)
    erased = commitment["erased"] if commitment else 0
    if commitment:
        out(f"  Merkle root {commitment['root'][:16]}: "
            f"{'verifies' if commitment['root_ok'] else 'DOES NOT VERIFY'} from {commitment['recomputed']} "
            f"participants' rows and {erased} opaque leaves (participants erased since)"
            + (f"; {commitment['mismatched']} participants' rows no longer match their leaf"
               if commitment["mismatched"] else ""))
    cohort, _ = release_cohort(wh, info, lmm_normaliser=report["lmm_normaliser"])
    tables = outputs_of(cohort, nagq=int(report.get("nagq", 25)), imputations=int(report.get("imputations", 20)))
    rebuilt = published_tables(tables, standardisation=cohort.standardisation, lmm_unit=cohort.lmm_unit,
                               min_count=int(report["disclosure_min_count"]))
    published = read_tables(data_root.layout.release_report(release_id).parent)
    diffs = compare_tables(published, rebuilt)
    same_hash = cohort.cohort_hash == report["cohort_hash"]
    out(f"  cohort hash: published {report['cohort_hash'][:16]}, rebuilt {cohort.cohort_hash[:16]}"
        f"{'' if same_hash else '  DIFFERENT'}")
    cells = sum(len(p.decode().splitlines()) for p in published.values())
    out(f"  published tables compared: {len(published)} ({cells} rows); cells that differ: {len(diffs)}")
    if diffs:
        if erased:
            out(f"  the re-fitted numbers beside the published ones (they differ by the {erased} erased "
                "participant(s)' data):")
        width = max(len(f"{d.table} {d.row} {d.column}") for d in diffs[:50])
        out(f"  {'table, row, column':<{width}}  {'published':>14}  {'rebuilt':>14}")
        for d in diffs[:50]:
            out(f"  {f'{d.table} {d.row} {d.column}':<{width}}  {d.published:>14}  {d.rebuilt:>14}")
        if len(diffs) > 50:
            out(f"  ... and {len(diffs) - 50} more")
    if erased:
        # what an erasure leaves reproducible: every surviving participant's rows match the release's commitment
        ok = bool(commitment["root_ok"]) and not commitment["mismatched"] and not drift
        n = commitment["participants"]
        out(f"{n} \u2212 {erased} reproduced, {erased} erased since" if ok else
            f"NOT reproduced: the release's commitment does not hold for the rows that survive ({n} participants, "
            f"{erased} erased since)")
        return ok
    ok = same_hash and not diffs and (commitment is None or (commitment["root_ok"] and not commitment["mismatched"]))
    out("reproduced exactly" if ok else f"NOT reproduced: {len(diffs)} cells differ"
        f"{'' if same_hash else ', and the cohort hash'}")
    return ok

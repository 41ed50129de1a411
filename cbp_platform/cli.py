"""The ``cbp`` command line.

``cbp synth``               simulate a NAKO-like cohort into the landing zone (ground truth beside it)
``cbp calibration-report``  paper (docs/study.md) vs simulated cohort figures, computed from a fresh draw
``cbp accuracy``            segmentation Dice, and ICC / bias / limits of agreement of LMM and InterMAT vs truth
``cbp lineage``             the chain behind the published results; ``--participant`` one participant's path
``cbp instance init``       write ``$DAGSTER_HOME/dagster.yaml`` for the deployment profile, size the gpu pool
``cbp k8s-plan``            the Kubernetes Job every step would get in the kubernetes profile
``cbp model register``      check and register a segmentation model folder (a preset, or labels and inputs)
``cbp model list``          the registered models, their backends, inputs and weights
``cbp model compare``       a registered model beside the primary on every batch; the comparison in the report
``cbp status``              every delivery of the landing zone: state, reason, counts (no pseudonyms)
``cbp qc serve``            the QC review app (keyboard review of the triage queue) on the loopback interface
``cbp qc list``             the QC queue in triage order; ``cbp qc accept|reject`` record a decision
"""

from __future__ import annotations

import argparse
import json
import sys
from contextlib import contextmanager
from pathlib import Path


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error message and exit code 2."""

    def error(self, message: str):  # noqa: D401
        self.exit(2, f"{self.prog}: error: {message}\n")


def _progress_args(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--progress", dest="progress", action="store_const", const=True, default=None,
                   help="always show the progress bar (default: only on a terminal)")
    g.add_argument("--quiet", "-q", dest="progress", action="store_const", const=False, help="no progress bar")


def _progress_flag(args: argparse.Namespace) -> bool | None:
    return getattr(args, "progress", None)


def _cmd_synth(args: argparse.Namespace) -> int:
    from cbp_platform.landing import SUCCESS_MARKER
    from cbp_platform.paths import DataLayout
    from cbp_platform.synth.delivery import SynthError, delivery_ids_for, synthesize

    prefix = args.delivery_prefix or f"sim{args.seed}"
    if args.if_absent and args.deliveries >= 1:
        layout = DataLayout.from_env(args.data_root)
        ids = delivery_ids_for(prefix, args.deliveries)
        if all((layout.landing / d / SUCCESS_MARKER).exists() for d in ids):
            print(f"cbp synth: deliveries {ids[0]}..{ids[-1]} already complete in {layout.landing}; nothing to do")
            return 0
    try:
        res = synthesize(participants=args.participants, deliveries=args.deliveries, seed=args.seed,
                         resolution=args.resolution, data_root=args.data_root, fault_rate=args.faults,
                         in_opp=args.in_opp, workers=args.workers, delivery_prefix=args.delivery_prefix,
                         progress=_progress_flag(args), scan_format=args.format, composed=args.composed)
    except SynthError as exc:
        print(f"cbp synth: error: {exc}", file=sys.stderr)
        return 2
    rate = res.n_participants / res.seconds
    print(f"cbp synth: {res.n_participants} participants in {len(res.delivery_ids)} deliveries "
          f"({', '.join(res.delivery_ids)}), {res.bytes_written / 1e6:.1f} MB in {res.seconds:.1f} s "
          f"({rate:.1f} participants/s); faults injected: {len(res.faults)}")
    print(f"  landing zone: {res.landing_dirs[0].parent}")
    print(f"  ground truth: {res.truth_dirs[0].parent}")
    return 0


def _cmd_calibration(args: argparse.Namespace) -> int:
    from cbp_platform.synth.report import calibration_table

    print(calibration_table(args.participants, args.seed))
    return 0


def _open_warehouse(cmd: str, data_root: str | None):
    """The deployment profile's warehouse (DuckDB under the data root, or PostgreSQL), or None with the reason
    on stderr when it holds nothing yet or cannot be reached."""
    from cbp_platform.definitions import warehouse

    try:
        wh = warehouse(data_root)
        if wh.tables():
            return wh
        print(f"cbp {cmd}: error: the warehouse {wh.location} holds no tables yet (run the pipeline first: "
              "make demo)", file=sys.stderr)
    except Exception as exc:  # noqa: BLE001  (a server down or a wrong setting: reported, not a traceback)
        print(f"cbp {cmd}: error: cannot open the warehouse: {type(exc).__name__}: {str(exc).splitlines()[0]}",
              file=sys.stderr)
    return None


def _warehouse_tables(wh, reads: dict[str, tuple[str, dict]]) -> dict:
    """Several reads for display (name -> (table, ``Warehouse.table`` arguments)); a table not created yet
    shows as empty here, on purpose: an operator command lists what exists."""
    import polars as pl

    out = {}
    for name, (table, kw) in reads.items():
        df = wh.table(table, missing_ok=True, **kw)
        out[name] = pl.DataFrame() if df is None else df
    return out


def _cmd_accuracy(args: argparse.Namespace) -> int:
    from cbp_platform.paths import DataLayout
    from cbp_platform.segmentation.accuracy import evaluate, format_report

    layout = DataLayout.from_env(args.data_root)
    wh = _open_warehouse("accuracy", args.data_root)
    if wh is None:
        return 2
    if not {"muscle_metrics", "muscle_segmentations"} <= set(wh.tables()):
        print("cbp accuracy: error: no segmentations in the warehouse yet", file=sys.stderr)
        return 2
    segs = wh.table("muscle_segmentations", columns=["delivery_id", "pseudonym", "label_path"],
                    order_by=["pseudonym"])
    mets = wh.table("muscle_metrics", order_by=["pseudonym", "muscle"])
    rep = evaluate(segs, mets, layout.truth, progress=_progress_flag(args))
    print(json.dumps(rep, indent=1) if args.json else format_report(rep))
    return 0 if rep.get("n") else 2


def _cmd_lineage(args) -> int:
    from cbp_platform.lineage import MANIFEST_NAME, format_chain, read_manifest
    from cbp_platform.paths import DataLayout

    layout = DataLayout.from_env(args.data_root)
    if args.participant:
        return _participant_lineage(args.participant, args.data_root)
    if args.manifest:
        mpath = Path(args.manifest)
    else:
        latest = layout.latest_report
        if not latest.exists():
            print(f"cbp lineage: error: {latest} not found (materialise published_results first: make demo)",
                  file=sys.stderr)
            return 2
        mpath = Path(json.loads(latest.read_text())["path"]) / MANIFEST_NAME
    try:
        m = read_manifest(mpath)
        print(f"lineage manifest {mpath}")
        print(format_chain(m, args.asset))
    except (FileNotFoundError, ValueError, KeyError) as exc:
        print(f"cbp lineage: error: {exc}", file=sys.stderr)
        return 2
    return 0


def _participant_lineage(pseudonym: str, data_root: str | None) -> int:
    """Operator command: every stage one participant went through (prints the pseudonym; never published)."""
    from cbp_platform.analysis.cohort import participant_trace
    from cbp_platform.landing import PSEUDONYM_RE

    if not PSEUDONYM_RE.match(pseudonym):
        print(f"cbp lineage: error: {pseudonym!r} is not a pseudonym (10 characters of the pseudonym alphabet)",
              file=sys.stderr)
        return 2
    wh = _open_warehouse("lineage", data_root)
    if wh is None:
        return 2
    p = {"pseudonym": pseudonym}
    t = _warehouse_tables(wh, {
        "covariates": ("participant_covariates", {"where": p}),
        "scans": ("raw_mri_scans", {"where": p}),
        "metrics": ("muscle_metrics", {"where": p, "order_by": ["muscle"]}),
        "quarantine": ("quarantine", {"where": p, "order_by": ["recorded_at", "stage"]}),
        "provenance": ("provenance", {"where": p, "order_by": ["recorded_at", "stage"],
                                      "columns": ["stage", "batch_key", "input_checksums", "output_checksum",
                                                  "code_version", "run_id", "recorded_at"]}),
        "exclusion": ("analysis_exclusions", {"where": p, "columns": ["reason"]}),
        "analysed": ("analysis_cohort", {"where": p, "columns": ["pseudonym"]}),
        "reviews": ("qc_reviews", {"where": p, "order_by": ["reviewed_at", "review_id"]}),
        "maps": ("muscle_segmentations", {"where": p, "columns": ["pseudonym", "label_sha256"]}),
    })
    review = None
    if t["reviews"].height:
        from cbp_platform.qc.reviews import effective_reviews

        review = effective_reviews(t["reviews"], t["maps"]).row(0, named=True)
    trace = participant_trace(pseudonym, t["covariates"], t["scans"], t["metrics"], t["quarantine"], review)
    print(trace.to_text())
    if t["reviews"].height:
        print("  review history (append-only qc_reviews; the latest review of the current label map is in force):")
        current = set(t["maps"]["label_sha256"].to_list()) if t["maps"].height else set()
        for r in t["reviews"].sort("reviewed_at").iter_rows(named=True):
            state = "current map" if r["label_sha256"] in current else "outdated: an earlier label map"
            print(f"    {r['reviewed_at']} {r['decision']:<6} {r['reason'] or '-':<18} by {r['reviewer']} "
                  f"({state} {str(r['label_sha256'])[:12]}, model {str(r['model_sha256'])[:12]})")
    if t["provenance"].height:
        print("  provenance (row-level lineage):")
        for r in t["provenance"].iter_rows(named=True):
            print(f"    {r['stage']:<22} batch {r['batch_key']} run {r['run_id'][:8]} code {r['code_version']} "
                  f"inputs {_inputs_text(r['input_checksums'])} -> {r['output_checksum'][:16] or '-'}")
    if t["analysed"].height:
        print("  last analysis_cohort materialisation: included")
    elif t["exclusion"].height:
        print(f"  last analysis_cohort materialisation: excluded ({t['exclusion']['reason'][0]})")
    else:
        print("  last analysis_cohort materialisation: not seen (not delivered, or analysis not run since)")
    return 0 if (t["covariates"].height or t["scans"].height or t["quarantine"].height) else 1


def _inputs_text(raw: str) -> str:
    """A provenance row's inputs for the console: a DICOM participant's files (``<zip>#<member>``) are counted
    per zip; their sha256 stay in the provenance table."""
    import json

    try:
        inputs = json.loads(raw)
    except (TypeError, ValueError):
        return str(raw)
    members: dict[str, int] = {}
    for k in inputs:
        if "#" in k:
            members[k.split("#")[0]] = members.get(k.split("#")[0], 0) + 1
    if not members:
        return raw
    return "; ".join(f"{z} {inputs.get(z, '')[:12]} ({n} DICOM files)" for z, n in sorted(members.items()))


def _cmd_instance_init(args: argparse.Namespace) -> int:
    import os

    from cbp_platform import deployment

    home = Path(args.dagster_home or os.environ.get("DAGSTER_HOME") or "")
    if not str(home):
        print("cbp instance init: error: set DAGSTER_HOME or pass --dagster-home", file=sys.stderr)
        return 2
    try:
        name = args.profile or deployment.profile()
        target, doc = deployment.write_instance_config(home, name, args.gpus)
    except deployment.DeploymentError as exc:
        print(f"cbp instance init: error: {exc}", file=sys.stderr)
        return 2
    print(f"{target}: profile {name}")
    pools = (doc.get("concurrency") or {}).get("pools")
    if pools is None:
        print("  pools: no limit (local profile)")
        return 0
    from cbp_platform.definitions import set_pool_limit

    try:   # the explicit limit of pool `gpu` (the UI's concurrency page shows it); creates the schema on first use
        storage = set_pool_limit(home, deployment.GPU_POOL, int(pools["default_limit"]))
    except Exception as exc:  # a database that is not reachable yet: say which and how
        print(f"cbp instance init: error: {target} written, but the instance storage is not reachable: {exc}",
              file=sys.stderr)
        return 1
    runs = (doc.get("concurrency") or {}).get("runs", {})
    print(f"  storage {storage}; pool {deployment.GPU_POOL}: {pools['default_limit']} slot(s); "
          f"at most {runs.get('max_concurrent_runs', 'unlimited')} runs at once")
    return 0


def _cmd_k8s_plan(args: argparse.Namespace) -> int:
    from cbp_platform.definitions import render_step_jobs, step_summary, validate_manifests

    if args.validate:
        from cbp_platform.deployment import K8S_VERSION

        version = args.k8s_version or K8S_VERSION
        res = validate_manifests(version)
        bad = {k: v for k, v in res.items() if v}
        if args.json:
            print(json.dumps({"kubernetes": version, "manifests": res}, indent=1))
        else:
            for name, err in res.items():
                print(f"{'ok     ' if not err else 'INVALID'} {name}" + (f": {err}" if err else ""))
            print(f"{len(res) - len(bad)} of {len(res)} manifests valid against the Kubernetes {version} API "
                  "schema (strict: unknown fields are errors)")
        return 1 if bad else 0
    rows = step_summary(render_step_jobs(args.job, image=args.image))
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    print(f"{'step':<48} {'node pool':<10} {'cpu req/lim':<12} {'memory req/lim':<16} gpu")
    for r in rows:
        print(f"{r['step']:<48} {r['node_pool']:<10} {r['cpu']:<12} {r['memory']:<16} {r['gpu']}")
    return 0


def _models_dir(args) -> Path:
    from cbp_platform.paths import DataLayout

    return Path(args.models_dir) if args.models_dir else DataLayout.from_env(args.data_root).models


def _cmd_model_register(args: argparse.Namespace) -> int:
    from cbp_platform.paths import DataLayout
    from cbp_platform.segmentation.manifest import ManifestError
    from cbp_platform.segmentation.registry import register

    labels = None
    if args.label:
        try:
            labels = {int(v): k for k, v in (item.split("=", 1) for item in args.label)}
        except ValueError:
            print(f"cbp model register: error: --label takes CLASS=ID, got {args.label}", file=sys.stderr)
            return 2
    try:
        m, path = register(DataLayout.model_registry(_models_dir(args)), args.folder, preset=args.preset or "",
                           name=args.name or "", backend=args.backend or "", labels=labels,
                           inputs=tuple(args.inputs.split(",")) if args.inputs else None,
                           orientation=args.orientation or "",
                           folds=args.folds.split(",") if args.folds else None,
                           configuration=args.configuration or "")
    except ManifestError as exc:
        print(f"cbp model register: error: {exc}", file=sys.stderr)
        return 2
    print(f"registered {m.name}: {m.backend} {m.backend_version}, {len(m.weights)} weight file(s), sha256 "
          f"{m.sha256[:16]}...")
    print(f"  inputs {', '.join(m.inputs)}; orientation {m.orientation}; spacing {list(m.spacing_mm)} mm")
    print("  labels " + ", ".join(f"{k} -> {v}" for k, v in sorted(m.labels.items())))
    print(f"  manifest {path}")
    print(f"  use it: materialise segmentation_model with config {{model: {m.name}}}, or compare it: "
          f"cbp model compare {m.name}")
    return 0


def _cmd_model_list(args: argparse.Namespace) -> int:
    from cbp_platform.paths import DataLayout
    from cbp_platform.segmentation.manifest import list_manifests

    models = _models_dir(args)
    cur = {}
    if (models / "current.json").exists():
        cur = json.loads((models / "current.json").read_text())
    rows = list_manifests(DataLayout.model_registry(models))
    if args.json:
        print(json.dumps([json.loads(m.to_json()) for m in rows], indent=1))
        return 0
    if not rows:
        print(f"no registered models in {DataLayout.model_registry(models)}")
        return 0
    for m in rows:
        star = "*" if m.name == cur.get("name") else " "
        print(f"{star} {m.name:<36} {m.backend:<13} {m.preset or '-':<22} {','.join(m.inputs):<16} "
              f"{m.orientation} {'x'.join(f'{v:g}' for v in m.spacing_mm)} mm  sha256 {m.sha256[:12]}")
    print("(* the primary model, models/current.json)")
    return 0


def _cmd_model_compare(args: argparse.Namespace) -> int:
    import os

    if args.data_root:
        os.environ["CBP_DATA_ROOT"] = str(Path(args.data_root).resolve())
    from cbp_platform.definitions import compare_models
    from cbp_platform.paths import DataLayout

    print(f"cbp model compare: {args.name} beside the primary model, batch by batch")
    summary = compare_models(args.name)
    print(json.dumps(summary))
    latest = DataLayout.from_env().latest_report
    if not summary["failed"] and latest.exists():
        out = Path(json.loads(latest.read_text())["path"])
        print(f"report with the comparison (section 9): {out / 'report.html'}")
    return 1 if summary["failed"] else 0


def _status_counts(data_root: str | None) -> dict | None:
    """Per delivery: valid scans and covariate rows, quarantined participants by reason; None without a warehouse
    (or while a run holds the DuckDB file's lock)."""
    from cbp_platform.definitions import warehouse

    try:
        wh = warehouse(data_root, lock_timeout_s=5.0)
        t = wh.ingestion_counts(stages=("raw_mri_scans", "participant_covariates"))
    except Exception:  # noqa: BLE001  (no warehouse yet, a run holding its lock, a server down: no counts shown)
        return None
    out: dict = {}
    for name, col in (("scans", "scans_valid"), ("covariates", "covariates_valid"), ("quarantined", "quarantined")):
        for r in t[name].iter_rows(named=True):
            out.setdefault(r["delivery_id"], {})[col] = int(r[col])
    for r in t["reasons"].iter_rows(named=True):
        out.setdefault(r["delivery_id"], {}).setdefault("quarantine_reasons", {})[r["reason"]] = int(r["n"])
    for d in out.values():
        for col in ("scans_valid", "covariates_valid", "quarantined"):
            d.setdefault(col, 0)
    return out


def _cmd_status(args) -> int:
    import os

    from cbp_platform.ingest.status import format_report, landing_report
    from cbp_platform.paths import DataLayout

    layout = DataLayout.from_env(args.data_root)
    counts = _status_counts(args.data_root)
    runs = None
    if os.environ.get("DAGSTER_HOME"):
        from cbp_platform.definitions import batch_run_states

        runs = batch_run_states()
    reports = landing_report(layout.root, layout.landing, deep=args.deep, counts=counts, runs=runs)
    if args.json:
        print(json.dumps([r.as_dict() for r in reports], indent=1))
    else:
        print(f"landing zone {layout.landing}"
              + ("" if counts is not None else " (no warehouse counts: none yet, a run holds its lock, or the "
                                               "warehouse cannot be reached)"))
        print(format_report(reports))
    return 0


# --- cbp qc: the segmentation review queue and reviewers' decisions --------------------------------------------

QC_LOOPBACK = ("127.0.0.1", "localhost", "::1", "[::1]")


@contextmanager
def _qc_store(data_root: str | None):
    """The review store of the data root; closes its Dagster instance (``$DAGSTER_HOME``) afterwards."""
    from cbp_platform.definitions import review_store

    store = review_store(data_root)
    try:
        yield store
    finally:
        if store.instance is not None:
            store.instance.dispose()


def _qc_warehouse_missing(cmd: str, data_root: str | None) -> bool:
    return _open_warehouse(f"qc {cmd}", data_root) is None


def _cmd_qc_serve(args: argparse.Namespace) -> int:
    import logging
    import os

    import uvicorn

    from cbp_platform.qc.app import create_app

    if _qc_warehouse_missing("serve", args.data_root):
        return 2
    loopback = args.host in QC_LOOPBACK
    if not loopback:
        print(f"cbp qc serve: warning: --host {args.host} is not the loopback interface. QC images and the queue "
              "name pseudonyms: they must stay inside the secure environment (the loopback host check is off).",
              file=sys.stderr)
    reviewer = args.reviewer if args.reviewer is not None else os.environ.get("CBP_REVIEWER", "")
    host = f"[{args.host}]" if ":" in args.host and not args.host.startswith("[") else args.host
    with _qc_store(args.data_root) as store:
        app = create_app(store, reviewer=reviewer, loopback_only=loopback)
        print(f"cbp qc serve: review app on http://{host}:{args.port}/ (Ctrl-C stops it)", flush=True)
        # the app's own lines (counts, decision kinds); no access log: request lines name pseudonyms
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        app_log = logging.getLogger("cbp.qc.app")
        app_log.setLevel(logging.INFO)
        app_log.addHandler(handler)
        uvicorn.run(app, host=args.host.strip("[]"), port=args.port, access_log=False, log_level="info",
                    server_header=False)
    return 0


def _cmd_qc_list(args: argparse.Namespace) -> int:
    from cbp_platform.qc.reviews import ReviewError

    if _qc_warehouse_missing("list", args.data_root):
        return 2
    with _qc_store(args.data_root) as store:
        try:
            q = store.queue(batch=args.batch, site=args.site, model=args.model, status=args.status)
        except ReviewError as exc:
            print(f"cbp qc list: error: {exc}", file=sys.stderr)
            return 2
    total = q.height
    if args.limit and args.limit > 0:
        q = q.head(args.limit)
    cols = ["triage_rank", "pseudonym", "batch_key", "delivery_id", "site", "model_name", "label_sha256",
            "triage_score", "triage_flags", "lean_ml", "imat_pct", "decision", "reason", "reviewer", "reviewed_at",
            "outdated"]
    rows = [{c: r.get(c) for c in cols} for r in q.iter_rows(named=True)] if total else []
    if args.json:
        print(json.dumps(rows, indent=1, default=str))
        return 0
    print(f"{'rank':>4}  {'pseudonym':<10}  {'batch':<14} {'site':<10} {'score':>7}  {'decision':<28} flags")
    for r in rows:
        dec = r["decision"] or "-"
        if r["decision"] == "reject":
            dec = f"reject: {r['reason']}"
        if r["outdated"]:
            dec += " (outdated)"
        score = "-" if r["triage_score"] is None else f"{r['triage_score']:.2f}"
        print(f"{r['triage_rank'] if r['triage_rank'] is not None else '-':>4}  {r['pseudonym']:<10}  "
              f"{r['batch_key'] or '-':<14} {r['site'] or '-':<10} {score:>7}  {dec:<28} {r['triage_flags'] or ''}")
    print(f"({len(rows)} of {total} shown; status {args.status}; riskiest first)")
    return 0


def _cmd_qc_decide(args: argparse.Namespace) -> int:
    import os

    from cbp_platform.qc.reviews import ReviewError

    name = f"cbp qc {args.decision}"
    reviewer = (args.reviewer or os.environ.get("CBP_REVIEWER") or "").strip()
    if not reviewer:
        print(f"{name}: error: name the reviewer: --reviewer NAME or $CBP_REVIEWER", file=sys.stderr)
        return 2
    if _qc_warehouse_missing(args.decision, args.data_root):
        return 2
    with _qc_store(args.data_root) as store:
        try:
            row = store.record(args.pseudonym, args.decision, reviewer=reviewer, reason=args.reason,
                               note=args.note or "", source="cli", label_sha256=args.label_sha or None)
        except ReviewError as exc:
            print(f"{name}: error: {exc}", file=sys.stderr)
            return 2
    what = f"rejected ({row['reason']})" if row["decision"] == "reject" else "accepted"
    print(f"{row['pseudonym']}: {what} by {row['reviewer']} on label map {row['label_sha256'][:16]}... "
          f"(review {row['review_id'][:12]})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="cbp", description="cbp-platform: MRI back-muscle composition and chronic back pain")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    s = sub.add_parser("synth", help="simulate a NAKO-like cohort into the landing zone",
                       description="Write K complete deliveries of N simulated participants (Dixon NIfTI + "
                                   "covariates + manifest) into $CBP_DATA_ROOT/landing and the ground truth into "
                                   "$CBP_DATA_ROOT/truth.")
    s.add_argument("--participants", "-n", type=int, required=True, help="number of participants (N >= 1)")
    s.add_argument("--deliveries", "-k", type=int, default=1, help="number of deliveries (1 <= K <= N)")
    s.add_argument("--seed", type=int, required=True, help="random seed: same seed, same data")
    s.add_argument("--resolution", default="fast", help="fast (4x4x6 mm, tests/demos) or nako (1.41x1.41x3 mm)")
    s.add_argument("--data-root", default=None, help="data root (default $CBP_DATA_ROOT or ./data)")
    s.add_argument("--faults", type=float, default=0.0, metavar="RATE",
                   help="share of participants given a realistic delivery fault (0-1)")
    s.add_argument("--in-opp", action="store_true", help="also write in-phase and opposed-phase images")
    s.add_argument("--format", default="nifti", choices=("nifti", "dicom"),
                   help="nifti: one .nii.gz per Dixon channel; dicom: zipped DICOM series of 4 overlapping "
                        "stations per contrast, as the scanner writes them (default nifti)")
    s.add_argument("--composed", action="store_true",
                   help="with --format dicom: also write the scanner-composed whole-body series")
    s.add_argument("--workers", type=int, default=None, help="worker processes (default: all cores)")
    s.add_argument("--delivery-prefix", default=None, help="delivery id prefix (default sim<seed>)")
    s.add_argument("--if-absent", action="store_true",
                   help="exit 0 without writing when these deliveries are already complete")
    _progress_args(s)
    s.set_defaults(func=_cmd_synth)

    a = sub.add_parser("accuracy", help="segmentation and metric accuracy against the simulated ground truth")
    a.add_argument("--data-root", default=None)
    a.add_argument("--json", action="store_true")
    _progress_args(a)
    a.set_defaults(func=_cmd_accuracy)

    g = sub.add_parser("lineage", help="where a published number comes from, or one participant's path",
                       description="Print the chain behind the published report (or one analysis asset): analysis "
                                   "assets and their runs, the cohort hash, batches and data versions, deliveries, "
                                   "input-file and label-map digests, model weights, code and package versions. "
                                   "With --participant: every stage one participant went through and why they "
                                   "were excluded (an operator command: its output names the pseudonym).")
    g.add_argument("--data-root", default=None)
    g.add_argument("--asset", default=None, help="an analysis asset (default published_results)")
    g.add_argument("--manifest", default=None, help="a lineage.json (default: the latest published report's)")
    g.add_argument("--participant", default=None, metavar="PSEUDONYM")
    g.set_defaults(func=_cmd_lineage)

    i = sub.add_parser("instance", help="the Dagster instance of a deployment profile")
    isub = i.add_subparsers(dest="instance_command", required=True, parser_class=_Parser)
    ii = isub.add_parser("init", help="write $DAGSTER_HOME/dagster.yaml for the profile; size the gpu pool",
                         description="Render deploy/dagster.<profile>.yaml into $DAGSTER_HOME/dagster.yaml (profile "
                                     "from --profile or CBP_DEPLOYMENT) with the gpu pool sized to the GPU count, "
                                     "and set that pool's limit in the instance storage.")
    ii.add_argument("--profile", default=None, help="local, production or kubernetes (default $CBP_DEPLOYMENT)")
    ii.add_argument("--gpus", type=int, default=None, help="GPU count (default $CBP_GPU_COUNT or nvidia-smi)")
    ii.add_argument("--dagster-home", default=None, help="default $DAGSTER_HOME")
    ii.set_defaults(func=_cmd_instance_init)

    k = sub.add_parser("k8s-plan", help="the Kubernetes Job each step would get (kubernetes profile), no cluster",
                       description="Render every step's Kubernetes Job as the k8s_job_executor would build it and "
                                   "print node pool, CPU and memory requests/limits and GPUs per step.")
    k.add_argument("--job", default="process_batch", help="process_batch, cohort_refresh, train_segmentation_model")
    k.add_argument("--image", default=None, help="image (default: the one in deploy/helm/values.yaml)")
    k.add_argument("--json", action="store_true")
    k.add_argument("--validate", action="store_true",
                   help="validate every step Job of every job, the objects the Helm values configure and "
                        "deploy/k8s/storage.yaml against the Kubernetes API schema (offline)")
    k.add_argument("--k8s-version", default=None, help="Kubernetes release to validate against (default: the "
                                                        "targeted one, cbp_platform/deployment.py K8S_VERSION)")
    k.set_defaults(func=_cmd_k8s_plan)

    m = sub.add_parser("model", help="register and list segmentation models (MONAI bundles, nnU-Net v2 folders)")
    msub = m.add_subparsers(dest="model_command", required=True, parser_class=_Parser)
    mr = msub.add_parser("register", help="check a model folder and register it",
                         description="Read a model folder (an nnU-Net v2 trained-model folder or a MONAI bundle), "
                                     "check it against the preset (label ids and names, channel count, readable "
                                     "checkpoints), hash every weight file and write the manifest to "
                                     "$CBP_DATA_ROOT/models/registry/<name>.json. Nothing is downloaded.")
    mr.add_argument("--folder", required=True, help="the model folder (kept where it is; never copied)")
    mr.add_argument("--preset", default=None, help="mrsegmentator, totalvibesegmentator, total_mr, cbp-default")
    mr.add_argument("--name", default=None, help="registry name (default: the preset's)")
    mr.add_argument("--backend", default=None, help="nnunetv2 or monai-bundle (without a preset)")
    mr.add_argument("--label", action="append", default=None, metavar="CLASS=ID",
                    help="without a preset: the model's label id of each platform class (repeat)")
    mr.add_argument("--inputs", default=None, help="without a preset: contrasts in channel order, e.g. water,fat")
    mr.add_argument("--orientation", default=None,
                    help="the orientation the model was trained in, when its reader keeps the stored voxel order")
    mr.add_argument("--folds", default=None, help="folds to ensemble, e.g. 0,1,2 (default: the preset's, or all)")
    mr.add_argument("--configuration", default=None, help="nnU-Net configuration (default: the checkpoint's)")
    mr.add_argument("--data-root", default=None)
    mr.add_argument("--models-dir", default=None, help="default $CBP_DATA_ROOT/models")
    mr.set_defaults(func=_cmd_model_register)
    ml = msub.add_parser("list", help="the registered models")
    ml.add_argument("--data-root", default=None)
    ml.add_argument("--models-dir", default=None)
    ml.add_argument("--json", action="store_true")
    ml.set_defaults(func=_cmd_model_list)
    mc = msub.add_parser("compare", help="run a registered model beside the primary and publish the comparison",
                         description="Segment and measure every processed batch with the registered model NAME "
                                     "(its results kept apart from the primary's), compare the two models (Dice, "
                                     "ICC, Bland-Altman, odds ratios, truth), and refresh the report. Runs through "
                                     "Dagster against $DAGSTER_HOME.")
    mc.add_argument("name", help="a registered model (cbp model list)")
    mc.add_argument("--data-root", default=None)
    mc.set_defaults(func=_cmd_model_compare)

    st = sub.add_parser("status", help="every delivery in the landing zone: state, reason and counts",
                        description="List every delivery folder of the landing zone and every registered delivery "
                                    "with its state (waiting, refused, ready, registered, changed, gone), the "
                                    "reason when it is not registered, participants, batches (and their runs, "
                                    "with $DAGSTER_HOME), valid scans and covariate rows, and quarantined "
                                    "participants by reason. Names no pseudonym.")
    st.add_argument("--data-root", default=None)
    st.add_argument("--deep", action="store_true",
                    help="check every listed file of registered deliveries for changes (default: the manifest "
                         "and the covariates file)")
    st.add_argument("--json", action="store_true")
    st.set_defaults(func=_cmd_status)

    q = sub.add_parser("qc", help="the segmentation QC queue: review app, list, accept, reject",
                       description="Reviewers' decisions on segmentations, in the append-only warehouse table "
                                   "qc_reviews (reported to $DAGSTER_HOME's instance when set). A rejected "
                                   "participant leaves the analysis at the next cohort refresh. These commands "
                                   "name pseudonyms: operator use inside the secure environment.")
    qsub = q.add_subparsers(dest="qc_command", required=True, parser_class=_Parser)
    qs = qsub.add_parser("serve", help="the review app (keyboard review of the queue) on the loopback interface")
    from cbp_platform.qc import DEFAULT_HOST, DEFAULT_PORT

    qs.add_argument("--host", default=DEFAULT_HOST, help=f"interface (default {DEFAULT_HOST}). Another one exposes "
                                                         "QC images that name pseudonyms: secure environment only")
    qs.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"default {DEFAULT_PORT}")
    qs.add_argument("--reviewer", default=None, metavar="NAME", help="prefill the reviewer (default $CBP_REVIEWER)")
    qs.add_argument("--data-root", default=None)
    qs.set_defaults(func=_cmd_qc_serve)
    ql = qsub.add_parser("list", help="the queue in triage order (riskiest first)")
    ql.add_argument("--batch", default=None)
    ql.add_argument("--site", default=None)
    ql.add_argument("--model", default=None, help="a model name or a weights sha256 prefix")
    ql.add_argument("--status", default="todo", help="todo, reviewed, rejected, accepted, outdated or all "
                                                    "(default todo)")
    ql.add_argument("--limit", type=int, default=20, help="at most this many rows (0: all; default 20)")
    ql.add_argument("--json", action="store_true")
    ql.add_argument("--data-root", default=None)
    ql.set_defaults(func=_cmd_qc_list)
    from cbp_platform.qc.reviews import REJECT_REASONS

    reasons = "; ".join(f"{r.code}: {r.description}" for r in REJECT_REASONS)
    for decision, text in (("accept", "accept a participant's current segmentation"),
                           ("reject", "reject a participant's current segmentation, with a reason")):
        qd = qsub.add_parser(decision, help=text)
        qd.add_argument("pseudonym", metavar="PSEUDONYM")
        qd.add_argument("--reviewer", default=None, metavar="NAME", help="who decides (default $CBP_REVIEWER)")
        if decision == "reject":
            qd.add_argument("--reason", default=None, metavar="CODE", help=f"why: {reasons}")
        qd.add_argument("--note", default=None, metavar="TEXT")
        qd.add_argument("--label-sha", default=None, metavar="SHA256",
                        help="the label map's sha256 (or a prefix) as shown by `cbp qc list --json`: refuse the "
                             "decision if the map was replaced since")
        qd.add_argument("--data-root", default=None)
        qd.set_defaults(func=_cmd_qc_decide, decision=decision, reason=None)

    c = sub.add_parser("calibration-report", help="paper vs simulated cohort figures (markdown)")
    c.add_argument("--participants", "-n", type=int, default=30868)
    c.add_argument("--seed", type=int, default=1)
    c.set_defaults(func=_cmd_calibration)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())

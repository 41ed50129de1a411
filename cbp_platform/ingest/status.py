"""``cbp status``: every delivery of the landing zone (and every registered one) with its state, reason and counts.

States (:data:`cbp_platform.ingest.deliveries.STATES`): ``waiting`` (no marker yet), ``refused`` (never
registered; the reason says why), ``ready`` (closed; the next sensor tick registers it), ``registered``,
``changed`` (registered, then changed in the landing zone: reported, never re-ingested) and ``gone``
(registered, folder removed). Counts come from the registry and the warehouse: participants, batches, valid
scans and covariate rows, quarantined participants by reason. Reasons are read through the registry
(:mod:`cbp_platform.reasons`): the JSON carries each one's explanation, ``--explain`` lists them under the table, and
a code the registry does not know (a row of another platform version) is marked, never hidden. Nothing here names
a pseudonym.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from cbp_platform.ingest.accounting import account_registered
from cbp_platform.ingest.deliveries import GONE, READY, REFUSED, REGISTERED, scan_landing
from cbp_platform.ingest.registry import check_correction, registered_deliveries, registered_state, unreadable_records
from cbp_platform.reasons import REASONS, explain


@dataclass
class DeliveryReport:
    delivery_id: str
    state: str
    reason: str = ""
    participants: int | None = None
    batches: int | None = None
    batch_runs: dict = field(default_factory=dict)        # run status -> batches (from the Dagster instance)
    scans_valid: int | None = None
    covariates_valid: int | None = None
    quarantined: int | None = None
    quarantine_reasons: dict = field(default_factory=dict)
    accounting: dict | None = None      # where every file and covariate row went (cbp status --json)

    def as_dict(self) -> dict:
        return {**asdict(self), "quarantine_explained": {k: explain(k) for k in sorted(self.quarantine_reasons)}}


def reason_label(code: str) -> str:
    """A quarantine reason as the table shows it: its code, marked when the registry does not know it."""
    return code if code in REASONS else f"{code} (unregistered)"


def landing_report(root: Path, landing: Path, *, deep: bool = False, counts: dict | None = None,
                   runs: dict | None = None, outcomes=None) -> list[DeliveryReport]:
    """One report per delivery folder and per registered delivery, sorted by id.

    ``counts``: delivery id -> warehouse counts (``scans_valid``, ``covariates_valid``, ``quarantined``,
    ``quarantine_reasons``); ``runs``: batch key -> latest run status; ``deep``: look at every listed file of a
    registered delivery for changes (a stat each; a hash when only the modification time moved); ``outcomes``:
    delivery id -> the warehouse's ingestion outcomes (rows), to account for every file and covariate row of each
    registered delivery still in the landing zone (:mod:`cbp_platform.ingest.accounting`). Never raises for one
    delivery's sake: a delivery that cannot be looked at is reported with the error's type."""
    recs = {r["delivery_id"]: r for r in registered_deliveries(root)}
    out: dict[str, DeliveryReport] = {}
    for st in scan_landing(Path(landing), skip=set(recs)):
        rep = DeliveryReport(st.delivery_id, st.state, st.reason)
        if st.state == READY:        # a correction naming what the platform does not hold: the sensor refuses it
            problem = check_correction(root, st.manifest, list(recs.values()))
            if problem:
                rep = DeliveryReport(st.delivery_id, REFUSED, problem)
        if st.manifest is not None:
            rep.participants = len(set(st.manifest["participants"]))
        out[st.delivery_id] = rep
    for did, rec in recs.items():
        state, reason = registered_state(root, landing, rec, deep=deep)
        rep = DeliveryReport(did, state, reason, participants=len(rec["participants"]), batches=len(rec["batches"]))
        if runs is not None:
            for key in rec["batches"]:
                s = runs.get(key, "not run")
                rep.batch_runs[s] = rep.batch_runs.get(s, 0) + 1
        for k, v in (counts or {}).get(did, {}).items():
            setattr(rep, k, v)
        if state == REGISTERED and counts is not None and did not in counts:
            rep.scans_valid = rep.covariates_valid = rep.quarantined = 0
        if outcomes is not None and state != GONE:
            try:
                rep.accounting = account_registered(root, landing, rec, outcomes(did))
            except Exception as exc:  # noqa: BLE001  (this delivery's boundary)
                rep.accounting = {"error": f"could not be accounted for ({type(exc).__name__})"}
        out[did] = rep
    for bad in unreadable_records(root):           # its folder may look ready, but it cannot register again
        out[bad["delivery_id"]] = DeliveryReport(bad["delivery_id"], REFUSED, bad["problem"])
    return [out[k] for k in sorted(out)]


def format_report(reports: list[DeliveryReport], *, explain_reasons: bool = False) -> str:
    """The table of ``reports``; ``explain_reasons``: then one line per quarantine reason shown, with its stages and
    explanation from the registry."""
    if not reports:
        return "landing zone empty: no deliveries"
    head = ("delivery", "state", "participants", "batches", "scans ok", "covariates ok", "quarantined", "reason")
    rows = []
    for r in reports:
        batches = "" if r.batches is None else str(r.batches)
        if r.batch_runs:
            batches += " (" + ", ".join(f"{n} {s.lower()}" for s, n in sorted(r.batch_runs.items())) + ")"
        q = "" if r.quarantined is None else str(r.quarantined)
        if r.quarantine_reasons:
            q += " (" + ", ".join(f"{reason_label(k)} {v}" for k, v in sorted(r.quarantine_reasons.items())) + ")"
        rows.append((r.delivery_id, r.state, "" if r.participants is None else str(r.participants), batches,
                     "" if r.scans_valid is None else str(r.scans_valid),
                     "" if r.covariates_valid is None else str(r.covariates_valid), q, r.reason))
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head[:-1])]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head[:-1], widths)) + "  " + head[-1]]
    for row in rows:
        lines.append("  ".join(c.ljust(w) for c, w in zip(row[:-1], widths)) + "  " + row[-1])
    by_state: dict[str, int] = {}
    for r in reports:
        by_state[r.state] = by_state.get(r.state, 0) + 1
    lines.append("")
    lines.append(f"{len(reports)} deliveries: " + ", ".join(f"{n} {s}" for s, n in sorted(by_state.items())))
    shown = sorted({k for r in reports for k in r.quarantine_reasons})
    if explain_reasons and shown:
        lines += ["", "quarantine reasons (cbp_platform/reasons.py):"]
        for k in shown:
            where = f" [{', '.join(REASONS[k].stages)}]" if k in REASONS else ""
            lines.append(f"  {reason_label(k)}{where}: {explain(k)}")
    return "\n".join(lines)

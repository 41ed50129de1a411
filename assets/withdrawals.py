"""The withdrawal register in the asset graph: ``withdrawal_register``, an observable source asset (written by
``cbp withdraw``, not by a run; its data version is the register's sha256), and the check that every withdrawal is
applied within the deadline (``DataRootResource.withdrawal_deadline_days``, 30 days by default). ``data_release``
reads the register: a withdrawn participant leaves the next release at ``consent_withdrawn``
(:mod:`cbp_platform.withdrawals`). Nothing here holds a pseudonym: the register keeps keyed hashes.
"""

import os
from datetime import datetime, timezone
from pathlib import Path

import dagster as dg

from cbp_platform.withdrawals import Register
from resources import DataRootResource, Warehouse


@dg.observable_source_asset(
    key=dg.AssetKey("withdrawal_register"), group_name="analysis", kinds={"filesystem"},
    description="Participants who withdrew consent, as keyed hashes (HMAC-SHA256 with the deployment's withdrawal "
                "key), outside the data root; `cbp withdraw --request FILE` records requests. Its data version is "
                "the register's sha256. The next data release excludes them at consent_withdrawn.")
def withdrawal_register(data_root: DataRootResource) -> dg.ObserveResult:
    reg = Register(data_root.layout.withdrawals)
    requests = [r for r in reg.records() if r.get("type") == "request"]
    return dg.ObserveResult(data_version=dg.DataVersion(reg.digest()),
                            metadata={"requests": len(requests),
                                      "participants": len({r["keyed_hash"] for r in requests}),
                                      "overdue": len(reg.overdue(datetime.now(timezone.utc).date(),
                                                                 data_root.withdrawal_deadline_days))})


@dg.asset_check(asset=withdrawal_register, description="Every withdrawal is applied (erased) within the deadline "
                                                        "(DataRootResource.withdrawal_deadline_days, default 30).")
def withdrawals_applied_in_time(data_root: DataRootResource) -> dg.AssetCheckResult:
    reg = Register(data_root.layout.withdrawals)
    late = reg.overdue(datetime.now(timezone.utc).date(), data_root.withdrawal_deadline_days)
    return dg.AssetCheckResult(passed=not late, metadata={
        "overdue": len(late), "deadline_days": data_root.withdrawal_deadline_days,
        "overdue_requests": dg.MetadataValue.json(sorted(r["request_id"] for r in late))})


@dg.op(description="Apply every pending withdrawal of consent: erase the participants from every store of the data "
                   "map, verify with the byte scan, write one signed, hash-chained certificate each "
                   "(cbp_platform.erasure; the same as `cbp erase`). Nothing of a participant reaches the run's "
                   "logs or metadata: request ids and certificate names only.")
def erase_pending_withdrawals(context: dg.OpExecutionContext, data_root: DataRootResource,
                              warehouse: Warehouse) -> dg.Output:
    from cbp_platform.erasure import backup_days_from_env, erase_pending, pg_data_dirs_from_env

    home = os.environ.get("DAGSTER_HOME")
    outcomes = erase_pending(data_root.layout, warehouse, extra_db_dirs=pg_data_dirs_from_env(),
                             dagster_home=Path(home) if home else None, backup_days=backup_days_from_env(),
                             log=context.log.info)
    for o in outcomes:
        context.log.info(f"{o.summary}: certificate {o.certificate.name}")
    failed = [o for o in outcomes if not o.verified]
    if failed:
        raise dg.Failure(description=f"{len(failed)} erasure(s) not verified: "
                                     + "; ".join(o.summary for o in failed))
    return dg.Output(None, metadata={"certificates": dg.MetadataValue.json([o.certificate.name for o in outcomes]),
                                     "erased": sum(o.held for o in outcomes),
                                     "held_nothing": sum(not o.held for o in outcomes)})


@dg.job(description="Erase every participant whose withdrawal of consent is pending, with proof (docs/lifecycle.md); "
                    "launch it from the UI, or run `cbp erase`.")
def erase_withdrawn():
    erase_pending_withdrawals()

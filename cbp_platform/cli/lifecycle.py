"""The living cohort's commands (docs/lifecycle.md): ``cbp release cut|list``, ``cbp reproduce``, ``cbp impact``,
``cbp withdraw``, ``cbp erase`` and ``cbp delivery retire``."""

from __future__ import annotations

import argparse
import json
import sys

from cbp_platform.cli.common import Parser


def register(sub) -> None:
    r = sub.add_parser("release", help="data releases: cut the next one, list them",
                       description="A data release freezes which version of which participant the analysis uses; "
                                   "every published result names one (docs/lifecycle.md).")
    rsub = r.add_subparsers(dest="release_command", required=True, parser_class=Parser)
    c = rsub.add_parser("cut", help="cut the next release (through Dagster: a data_release partition)",
                        description="Freeze the versions in force, the quarantine, the reviewers' rejections and the "
                                    "retirements as the next release; write its internal manifest (registry, with "
                                    "pseudonyms) and its public summary (published/releases/<n>/release.json).")
    c.add_argument("--data-root", default=None)
    c.add_argument("--if-changed", action="store_true",
                   help="cut only when something changed since the latest release")
    c.set_defaults(func=_cmd_release_cut)
    ls = rsub.add_parser("list", help="the releases, one per line, id first")
    ls.add_argument("--data-root", default=None)
    ls.add_argument("--json", action="store_true", help="the public summaries as JSON")
    ls.set_defaults(func=_cmd_release_list)

    rp = sub.add_parser("reproduce", help="rebuild a release's report and compare every published number",
                        description="Rebuild release R's analysis cohort from the versioned rows it froze, re-fit the "
                                    "models, re-make every published table and compare them and the cohort hash "
                                    "with R's published report. Exit 0 and a last line 'reproduced exactly' when "
                                    "all match; else the differences side by side and exit 1.")
    rp.add_argument("--release", type=int, required=True)
    rp.add_argument("--data-root", default=None)
    rp.set_defaults(func=_cmd_reproduce)
    im = sub.add_parser("impact", help="what the pending corrections and retirements would change",
                        description="Compare the latest release's published results with what the data in force "
                                    "now would give (the next release): each reported OR and its CI, whether a CI "
                                    "now crosses 1, the exclusion flow, Table 1. No pseudonym; withheld when fewer "
                                    "than 5 participants changed.")
    im.add_argument("--data-root", default=None)
    im.add_argument("--json", action="store_true")
    im.set_defaults(func=_cmd_impact)

    w = sub.add_parser("withdraw", help="record withdrawals of consent (keyed hashes only)",
                       description="Record the requests of a withdrawal file from the trusted third party (CSV: "
                                   "request_id,pseudonym,scope,effective_date; scope all or imaging) in the "
                                   "withdrawal register, outside the data root, as keyed hashes. The next data release "
                                   "excludes the participants at consent_withdrawn (docs/lifecycle.md).")
    w.add_argument("--request", required=True, metavar="FILE")
    w.add_argument("--data-root", default=None)
    w.set_defaults(func=_cmd_withdraw)

    e = sub.add_parser("erase", help="apply every pending withdrawal: erase, verify, certify",
                       description="Erase every participant with a pending withdrawal of consent from every store of "
                                   "the data map (landing zone, derived files, warehouse with its files rewritten, "
                                   "registry), verify it with a byte scan for the pseudonym and each file's sha256, "
                                   "and write one signed, hash-chained certificate each (printed). --verify CERT "
                                   "re-checks a certificate, its chain and that the participant is still erased "
                                   "(exit 0 only when all hold). docs/lifecycle.md.")
    e.add_argument("--verify", metavar="CERT", default=None, help="re-check this certificate and its chain")
    e.add_argument("--request", metavar="FILE", default=None,
                   help="the request file again: finishes an erasure that was interrupted or did not verify (the "
                        "platform may no longer hold the pseudonym the scan needs); read, never copied")
    e.add_argument("--data-root", default=None)
    e.set_defaults(func=_cmd_erase)

    d = sub.add_parser("delivery", help="a registered delivery's lifecycle")
    dsub = d.add_subparsers(dest="delivery_command", required=True, parser_class=Parser)
    rt = dsub.add_parser("retire", help="take a delivery's participants out of the next release",
                         description="Retire a registered delivery: from the next release on, every participant "
                                     "with data in force from it is excluded at the step delivery_retired. "
                                     "Nothing is deleted. The reason is published with the next release.")
    rt.add_argument("delivery_id")
    rt.add_argument("--reason", required=True, help="why (published with the release: no pseudonym)")
    rt.add_argument("--data-root", default=None)
    rt.set_defaults(func=_cmd_retire)


def _cmd_release_cut(args: argparse.Namespace) -> int:
    from orchestration.instance import shell_instance
    from orchestration.releases import ReleaseError, cut_release

    try:
        with shell_instance(args.data_root) as inst:
            row = cut_release(inst, if_changed=args.if_changed, log=lambda m: print(m.strip()))
    except ReleaseError as exc:
        print(f"cbp release cut: error: {exc}", file=sys.stderr)
        return 1
    summary = json.loads(row["summary"])
    since = summary["since_previous"]
    print(f"release {row['release_id']}: {row['participants']} participants; since release "
          f"{summary['previous'] or '-'}: {since['new_participants']} new, {since['corrected_participants']} "
          f"corrected, {len(since['retirements'])} deliveries retired")
    return 0


def _cmd_release_list(args: argparse.Namespace) -> int:
    from cbp_platform.cli.common import open_warehouse
    from orchestration.releases import releases_table

    wh = open_warehouse("release list", args.data_root)
    if wh is None:
        return 2
    rows = releases_table(wh)
    if args.json:
        print(json.dumps([{**json.loads(r["summary"]), "cut_at": r["cut_at"]} for r in rows.iter_rows(named=True)],
                         indent=1))
        return 0
    for r in rows.iter_rows(named=True):
        s = json.loads(r["summary"])
        since = s["since_previous"]
        print(f"{r['release_id']}\t{r['cut_at'][:19]}\t{r['participants']} participants\t"
              f"content {r['content_hash'][:16]}\t+{since['new_participants']} new, "
              f"{since['corrected_participants']} corrected, {len(since['retirements'])} retired deliveries")
    if rows.height == 0:
        print("no release cut yet (cbp release cut)", file=sys.stderr)
    return 0


def _cmd_retire(args: argparse.Namespace) -> int:
    from cbp_platform.ingest.registry import RetireError, retire_delivery
    from cbp_platform.paths import DataLayout

    try:
        rec = retire_delivery(DataLayout.from_env(args.data_root).root, args.delivery_id, args.reason)
    except RetireError as exc:
        print(f"cbp delivery retire: error: {exc}", file=sys.stderr)
        return 2
    print(f"{rec['delivery_id']}: retired {rec['retired_at'][:19]} ({rec['reason']}); its participants leave the "
          "next release (cbp release cut)")
    return 0


def _cmd_reproduce(args: argparse.Namespace) -> int:
    from orchestration.instance import pipeline_environment
    from orchestration.releases import NoRelease, ReleaseError, reproduce
    from cbp_platform.paths import DataLayout

    with pipeline_environment(DataLayout.from_env(args.data_root).root):
        try:
            return 0 if reproduce(args.release) else 1
        except (ReleaseError, NoRelease) as exc:
            print(f"cbp reproduce: error: {exc}", file=sys.stderr)
            return 2


def _cmd_impact(args: argparse.Namespace) -> int:
    from orchestration.instance import pipeline_environment
    from orchestration.releases import NoRelease, pending_impact
    from cbp_platform.paths import DataLayout
    from resources import DataRootResource

    root = DataLayout.from_env(args.data_root).root
    with pipeline_environment(root):
        try:
            from orchestration.profiles import warehouse

            doc = pending_impact(warehouse(), DataRootResource(root=str(root)))
        except NoRelease as exc:
            print(f"cbp impact: error: {exc}", file=sys.stderr)
            return 2
    if args.json:
        print(json.dumps(doc, indent=1, default=str))
        return 0
    from cbp_platform.analysis.outputs import format_impact

    print(format_impact(doc))
    return 0


def _cmd_withdraw(args: argparse.Namespace) -> int:
    from cbp_platform.paths import DataLayout
    from cbp_platform.withdrawals import Register, WithdrawalError, read_request

    reg = Register(DataLayout.from_env(args.data_root).withdrawals)
    try:
        added, known = reg.add(read_request(args.request))
    except WithdrawalError as exc:
        print(f"cbp withdraw: error: {exc}", file=sys.stderr)
        return 2
    print(f"cbp withdraw: {len(added)} request(s) recorded, {len(known)} recorded already; register {reg.path} "
          f"(keyed hashes only). The next release excludes them: cbp release cut")
    return 0


def _cmd_erase(args: argparse.Namespace) -> int:
    from cbp_platform.erasure.certificates import CertificateError, Signer, key_id
    from cbp_platform.paths import DataLayout
    from cbp_platform.withdrawals import Register, WithdrawalError

    layout = DataLayout.from_env(args.data_root)
    reg = Register(layout.withdrawals)
    if args.verify:
        return _verify_certificate(args.verify, layout, reg)
    from cbp_platform.erasure import ErasureError
    from cbp_platform.withdrawals import read_request
    from orchestration.erasure import run_erasure

    try:
        supplied = [q.pseudonym for q in read_request(args.request)] if args.request else []
        outcomes = run_erasure(args.data_root, supplied=supplied)
    except (WithdrawalError, CertificateError, ErasureError) as exc:
        print(f"cbp erase: error: {exc}", file=sys.stderr)
        return 2
    if not outcomes:
        print("cbp erase: no pending withdrawal (every request of the register is applied)")
        return 0
    for o in outcomes:
        print(f"{o.summary}\n  certificate: {o.certificate}")
    print(f"signed with key {key_id(Signer(layout.withdrawals).public_key())} (publish this fingerprint); "
          f"verify: cbp erase --verify CERT")
    return 0 if all(o.verified for o in outcomes) else 1


def _verify_certificate(cert: str, layout, reg) -> int:
    from pathlib import Path

    from cbp_platform.erasure import held_pseudonyms, image_data_left, marks
    from cbp_platform.erasure.certificates import verify
    from cbp_platform.withdrawals import keyed_hash
    from orchestration.profiles import warehouse

    wh = warehouse(str(layout.root))
    problems = verify(Path(cert), layout.withdrawals, reg.applied(), marks(wh))
    doc = {}
    if not problems:
        doc = json.loads(Path(cert).read_text())
        if not doc.get("verified"):
            problems.append(f"{Path(cert).name}: the erasure it certifies was not verified (incomplete)")
        key = reg.key()
        held = {keyed_hash(key, p): p for p in held_pseudonyms(layout, wh)}
        p = held.get(doc["keyed_hash"])
        if p is not None and (doc.get("scope") == "all" or image_data_left(layout, wh, p)):
            problems.append("the participant's data is held again (a restore?): run cbp erase")
    if problems:
        for p in problems:
            print(f"cbp erase --verify: {p}", file=sys.stderr)
        print(f"{Path(cert).name}: does NOT hold")
        return 1
    print(f"{Path(cert).name}: holds: signature by key {doc['key_id']}, chain intact "
          f"({len(list((layout.withdrawals / 'certificates').glob('*.json')))} certificates), recorded in the "
          f"register, and the platform holds {'no image data' if doc.get('scope') == 'imaging' else 'nothing'} of "
          "the participant now")
    return 0

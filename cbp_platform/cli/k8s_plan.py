"""``cbp k8s-plan``: the Kubernetes Job every step would get in the kubernetes profile; ``--validate``."""

from __future__ import annotations

import argparse
import json


def register(sub) -> None:
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


def _cmd_k8s_plan(args: argparse.Namespace) -> int:
    from orchestration.k8s_plan import render_step_jobs, step_summary, validate_manifests

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

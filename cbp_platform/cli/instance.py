"""``cbp instance init``: write ``$DAGSTER_HOME/dagster.yaml`` for the deployment profile, size the gpu pool."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cbp_platform.cli.common import Parser


def register(sub) -> None:
    i = sub.add_parser("instance", help="the Dagster instance of a deployment profile")
    isub = i.add_subparsers(dest="instance_command", required=True, parser_class=Parser)
    ii = isub.add_parser("init", help="write $DAGSTER_HOME/dagster.yaml for the profile; size the gpu pool",
                         description="Render deploy/dagster.<profile>.yaml into $DAGSTER_HOME/dagster.yaml (profile "
                                     "from --profile or CBP_DEPLOYMENT) with the gpu pool sized to the GPU count, "
                                     "and set that pool's limit in the instance storage.")
    ii.add_argument("--profile", default=None, help="local, production or kubernetes (default $CBP_DEPLOYMENT)")
    ii.add_argument("--gpus", type=int, default=None, help="GPU count (default $CBP_GPU_COUNT or nvidia-smi)")
    ii.add_argument("--dagster-home", default=None, help="default $DAGSTER_HOME")
    ii.set_defaults(func=_cmd_instance_init)


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
    from orchestration.instance import set_pool_limit

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

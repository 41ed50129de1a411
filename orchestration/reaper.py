"""Runs whose process died: marked failed, their orphaned step processes stopped (local and production profiles).

Dagster's run monitoring detects dead run workers only for launchers that can check a worker's health (the
Kubernetes, ECS and Docker launchers); the default launcher of the ``local`` and ``production`` profiles cannot,
and a run run in the foreground (``make demo``) has no launcher at all. A run whose process was killed then
stays STARTED forever. Every Dagster event records the pid of the process that emitted it, so this module reads
the run worker's pid (``RUN_START``) and the step processes' pids (``STEP_START``) from the event log, and a run
whose worker is gone (:func:`cbp_platform.processes.alive`, which also rules out a reused pid) is reported
failed; its step processes still running are sent SIGTERM, then SIGKILL. Their writes are discarded anyway
(:mod:`assets.writes`, which reads the same pids: :func:`assets.writes.run_processes`). Dagster's run retries (``run_retries`` in the instance) then re-run a crashed batch a
bounded number of times.

``run_reaper`` runs this every minute; the foreground runner calls it before it starts, for its own host's runs.
Pids mean something only on their host: the daemon's sensor assumes the run workers it judges run beside it (the
default launcher of the ``local`` and one-server ``production`` profiles), foreground runs carry their host in a
tag. Not in the ``kubernetes`` profile, whose pods live in other pid namespaces (the K8s run launcher's
monitoring covers it).
"""

import socket

import dagster as dg
from dagster._core.events import JobFailureData, RunFailureReason

from assets.writes import run_processes
from cbp_platform.deployment import automation_running, profile
from cbp_platform.processes import alive, terminate

HOST_TAG = "cbp/host"
ACTIVE = [dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.CANCELING]


def host_tag() -> dict:
    """Tag of runs executed in the foreground (``make demo``, ``cbp model compare``): the host they run on."""
    return {HOST_TAG: socket.gethostname()}


def reap(instance: dg.DagsterInstance, log=print, grace_s: float = 10.0, own_host_only: bool = False) -> list[str]:
    """Mark failed every active run whose worker process is gone; stop its step processes. Returns run ids.

    A pid means something only on its own host: a run tagged with another host is never touched, and with
    ``own_host_only`` (the foreground runner, which may share a production database with other hosts) untagged
    runs are left to the daemon's ``run_reaper``, which runs beside the launcher's run workers."""
    if profile() == "kubernetes":
        return []
    me = socket.gethostname()
    reaped = []
    for rec in instance.get_run_records(filters=dg.RunsFilter(statuses=ACTIVE)):
        run = rec.dagster_run
        host = run.tags.get(HOST_TAG)
        if (host is not None and host != me) or (host is None and own_host_only):
            continue
        worker, steps = run_processes(instance, run.run_id)
        if worker is None or alive(*worker):
            continue
        stopped = terminate(steps, grace_s=grace_s)
        msg = (f"run worker (pid {worker[0]}) is gone: the run was killed or crashed; marked failed by "
               f"cbp's run reaper{f', {len(stopped)} orphaned step process(es) stopped' if stopped else ''}")
        # the reason tells Dagster's run retries that this was a crash, not a failed step (those are not retried)
        instance.report_run_failed(run, message=msg, job_failure_data=JobFailureData(
            error=None, failure_reason=RunFailureReason.UNEXPECTED_TERMINATION))
        batch = f", batch {run.tags['cbp/batch']}" if "cbp/batch" in run.tags else ""
        log(f"run {run.run_id[:8]} ({run.job_name}{batch}): {msg}")
        reaped.append(run.run_id)
    return reaped


@dg.sensor(minimum_interval_seconds=60,
           default_status=dg.DefaultSensorStatus.RUNNING if automation_running() else dg.DefaultSensorStatus.STOPPED,
           description="Marks failed the runs whose process was killed (local and production profiles, whose run "
                       "launcher cannot check a worker's health) and stops their orphaned step processes; Dagster's "
                       "run retries then re-run a crashed batch.")
def run_reaper(context: dg.SensorEvaluationContext) -> dg.SkipReason:
    reaped = reap(context.instance, log=context.log.warning)
    return dg.SkipReason(f"{len(reaped)} dead runs marked failed" if reaped else "no dead runs")

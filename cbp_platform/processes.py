"""Processes of runs on this host: is a recorded pid still the process it was, and stopping orphans.

A pid alone is not an identity: the kernel reuses pids. A process counts as the one recorded only when it exists
*and* started no later than the moment it was recorded (its start time from ``/proc/<pid>/stat``). Linux only
(``/proc``); elsewhere the start time is unknown and existence alone is used.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

_SLACK_S = 2.0


def _boot_time() -> float | None:
    try:
        for line in Path("/proc/stat").read_text().splitlines():
            if line.startswith("btime "):
                return float(line.split()[1])
    except OSError:
        return None
    return None


def start_time(pid: int) -> float | None:
    """When ``pid`` started (epoch seconds), or None when unknown or gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2:].split()
    boot = _boot_time()
    if boot is None:
        return None
    return boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")


def alive(pid: int, recorded_at: float | None = None) -> bool:
    """``pid`` exists (and, when ``recorded_at`` is given, started before it was recorded, so it is not a later
    process that reused the number). A zombie counts as gone."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        if state == "Z":
            return False
    except (OSError, IndexError):
        pass
    if recorded_at is not None:
        t = start_time(pid)
        if t is not None and t > recorded_at + _SLACK_S:
            return False
    return True


def terminate(pids: list[tuple[int, float | None]], grace_s: float = 10.0) -> list[int]:
    """SIGTERM each live (pid, recorded_at), SIGKILL what is left after ``grace_s``; returns the pids signalled."""
    live = [(p, t) for p, t in pids if alive(p, t)]
    for p, _ in live:
        try:
            os.kill(p, signal.SIGTERM)
        except OSError:
            pass
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(alive(p, t) for p, t in live):
        time.sleep(0.2)
    for p, t in live:
        if alive(p, t):
            try:
                os.kill(p, signal.SIGKILL)
            except OSError:
                pass
    return [p for p, _ in live]


@contextlib.contextmanager
def environment(values: dict[str, str]):
    """This process's environment with ``values`` set, restored afterwards (a with-block)."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield values
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v

"""``make test``: the whole suite as two pytest processes side by side, one stream of work per core.

The streams are chosen in ``tests/conftest.py`` (``CBP_TEST_STREAM``): ``monai``, the module that trains the default
MONAI model (about half the suite's CPU time, one fixture), and ``rest``, everything else. Each process runs torch
on one thread. ``rest`` prints to the console as it goes; ``monai`` writes to a log file, shown when it ends (and
its last line every 30 s while ``rest`` is done and it is not). The exit status is pytest's, 0 only when both
streams pass. Arguments are passed to both pytest processes (``python tools/run_tests.py -x``).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STREAMS = ("monai", "rest")            # tests/conftest.py's STREAMS; the first runs beside, the second in front
NO_TESTS = 5                           # pytest's exit status when a selection (e.g. -k) leaves a stream empty


def _env(stream: str) -> dict:
    return {**os.environ, "CBP_TEST_STREAM": stream, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _last_line(log: Path) -> str:
    lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    return lines[-1][-120:] if lines else "(no output yet)"


def main(args: list[str]) -> int:
    cmd = [sys.executable, "-m", "pytest", *args]
    log = Path(tempfile.mkdtemp(prefix="cbp-tests-")) / "monai.log"
    t0 = time.monotonic()
    with open(log, "wb") as out:
        beside = subprocess.Popen([*cmd, "-p", "no:cacheprovider"], env=_env(STREAMS[0]), stdout=out,
                                  stderr=subprocess.STDOUT)
    print(f"stream {STREAMS[0]} (the MONAI training module) runs beside this one; its log: {log}", flush=True)
    try:
        front = subprocess.call(cmd, env=_env(STREAMS[1]))
        while beside.poll() is None:
            try:
                beside.wait(timeout=30)
            except subprocess.TimeoutExpired:
                print(f"  waiting for stream {STREAMS[0]} ({time.monotonic() - t0:.0f} s): {_last_line(log)}",
                      flush=True)
    except KeyboardInterrupt:
        beside.terminate()
        beside.wait()
        raise
    print(f"\n--- stream {STREAMS[0]} ---", flush=True)
    sys.stdout.write(log.read_text(errors="replace"))
    print(f"\nboth streams done in {time.monotonic() - t0:.0f} s (rest: exit {front}, {STREAMS[0]}: exit "
          f"{beside.returncode})", flush=True)
    codes = [c for c in (front, beside.returncode) if c != NO_TESTS]
    return max(codes, default=NO_TESTS)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

"""Progress: steady, rate-limited log lines from assets; a progress bar from the CLI commands."""

import io
import os
import subprocess
import sys
from pathlib import Path

from cbp_platform.progress import RateLogger, bar


class _Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_rate_logger_logs_at_a_steady_rate_whatever_the_batch_size():
    for total, step_s in ((30, 2.0), (3000, 0.02)):      # 60 s of work either way
        clock, lines = _Clock(), []
        log = RateLogger(lines.append, total, "batch x: segmented", unit="scans", every_s=10, clock=clock)
        for done in range(1, total + 1):
            clock.t += step_s
            log(done)
        assert 6 <= len(lines) <= 7, (total, lines)       # every ~10 s, and the final line
        assert lines[-1].startswith(f"batch x: segmented {total}/{total} scans") and "in all" in lines[-1]
        assert "ETA" in lines[0]
        rate = total / 60
        assert f"({rate:.2f}/s" in lines[-1]


def test_rate_logger_always_reports_the_end_even_when_fast():
    clock, lines = _Clock(), []
    log = RateLogger(lines.append, 3, "x", clock=clock)
    for d in (1, 2, 3):
        log(d)
    assert lines == ["x 3/3 items (0.00/s, 0s in all)"]


def test_bar_only_on_a_terminal_unless_forced():
    quiet = io.StringIO()
    for _ in bar(range(5), desc="t", stream=quiet):
        pass
    assert quiet.getvalue() == ""
    shown = io.StringIO()
    for _ in bar(range(5), desc="t", stream=shown, enabled=True):
        pass
    assert "5/5" in shown.getvalue()


def test_cli_synth_shows_a_progress_bar(tmp_path):
    cbp = str(Path(sys.executable).with_name("cbp"))
    env = {**os.environ, "CBP_DATA_ROOT": str(tmp_path)}
    out = subprocess.run([cbp, "synth", "-n", "4", "--seed", "3", "--workers", "1", "--progress"], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "synth" in out.stderr and "4/4" in out.stderr and "participant" in out.stderr
    out = subprocess.run([cbp, "synth", "-n", "4", "--seed", "4", "--workers", "1", "--delivery-prefix", "q"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "4/4" not in out.stderr          # not a terminal: no bar

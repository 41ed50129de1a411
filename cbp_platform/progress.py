"""Progress for long work: a bar on the terminal for CLI commands, steady log lines inside assets.

* :func:`bar`: a tqdm progress bar on stderr. ``enabled=None`` shows it only on a terminal (so redirected output
  and CI logs stay clean); ``--progress`` / ``--quiet`` force it on or off.
* :class:`RateLogger`: called with the count done so far, it logs ``label done/total (rate/s, ETA)`` at most
  every ``every_s`` seconds and always at the end, whatever the batch size: a 30-scan batch and a 3,000-scan
  batch both log about every ``every_s`` seconds. Log lines carry counts only, never a pseudonym.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable


def bar(iterable: Iterable | None = None, *, total: int | None = None, desc: str = "", unit: str = "it",
        enabled: bool | None = None, stream=None):
    """A tqdm bar on stderr; ``enabled=None``: only when stderr is a terminal."""
    from tqdm import tqdm

    stream = stream or sys.stderr
    if enabled is None:
        enabled = bool(getattr(stream, "isatty", lambda: False)())
    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=not enabled, file=stream, dynamic_ncols=True,
                mininterval=0.5, smoothing=0.1)


def _eta(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


class RateLogger:
    """``RateLogger(context.log.info, total, "segmented", unit="scans")(done)``: steady, rate-limited progress."""

    def __init__(self, log: Callable[[str], None], total: int, label: str, *, unit: str = "items",
                 every_s: float = 10.0, clock: Callable[[], float] = time.monotonic, suffix: str = ""):
        self.log, self.total, self.label, self.unit = log, int(total), label, unit
        self.every_s, self.clock, self.suffix = float(every_s), clock, suffix
        self.t0 = clock()
        self.last = self.t0
        self.lines = 0

    def __call__(self, done: int, *_ignored) -> None:
        now = self.clock()
        final = done >= self.total
        if not final and now - self.last < self.every_s:
            return
        self.last = now
        elapsed = now - self.t0
        rate = done / elapsed if elapsed > 0 else 0.0
        msg = f"{self.label} {done}/{self.total} {self.unit} ({rate:.2f}/s"
        if final:
            msg += f", {_eta(elapsed)} in all"
        elif rate > 0:
            msg += f", ETA {_eta((self.total - done) / rate)}"
        self.log(msg + ")" + (f" {self.suffix}" if self.suffix else ""))
        self.lines += 1

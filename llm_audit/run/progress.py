"""Progress of long work on stderr: done / total, rate and ETA, on one line.

Why on stderr: stdout carries results (tables, JSON) that scripts parse.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable


def stderr_progress(label: str, unit: str = "matrices") -> Callable[[int, int], None]:
    """A callback(done, total) printing done / total, rate and ETA on stderr.

    On a terminal one line is rewritten at most every 0.2 s; in a log (a Ray job, CI) a
    new line is printed at most every 10 s. The last call always prints.
    """
    start = time.perf_counter()
    tty = sys.stderr.isatty()
    last = [-1e9]

    def report(done: int, total: int) -> None:
        now = time.perf_counter()
        if done < total and now - last[0] < (0.2 if tty else 10.0):
            return
        last[0] = now
        elapsed = now - start
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = (total - done) / rate if rate > 0 else 0.0
        text = f"{label}: {done}/{total} {unit}, {rate:.1f}/s, ETA {eta:.0f} s"
        end = "\n" if done == total or not tty else "\r"
        print(text, end=end, file=sys.stderr, flush=True)

    return report

"""``SHARDCONV_PROFILE=1``: where a conversion's time goes, printed as ``profile:`` lines.

The stage clock sums seconds per stage over threads (always kept: it costs a lock per stage);
the disk timeline samples the machine's disk traffic every second, which shows when the disk idles,
which stage sums cannot; the process age places start-up against both.
"""

from __future__ import annotations

import collections
import os
import threading
import time

ENABLED = bool(os.environ.get("SHARDCONV_PROFILE"))
# SHARDCONV_PROFILE=cprofile: also a Python profile of the pipeline loop (what issuing costs); on the H200
# machine's Python 3.12 it also held the reader and writer threads' calls, so read it as the whole process's
PYTHON = os.environ.get("SHARDCONV_PROFILE") == "cprofile"


def say(message: str) -> None:
    """Print ``profile: message`` when profiling is on."""
    if ENABLED:
        print(f"profile: {message}", flush=True)


def process_age() -> float:
    """Seconds since this process started (Linux), for the start-up figure."""
    try:
        with open("/proc/self/stat") as stat, open("/proc/uptime") as uptime:
            ticks = int(stat.read().rsplit(")", 1)[1].split()[19])
            return float(uptime.read().split()[0]) - ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return float("nan")


def peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class StageClock:
    """Seconds spent per stage, summed over threads."""

    def __init__(self):
        self.seconds: dict[str, float] = collections.defaultdict(float)
        self.lock = threading.Lock()

    def add(self, stage: str, since: float) -> None:
        with self.lock:
            self.seconds[stage] += time.perf_counter() - since

    def report(self) -> str:
        return "  ".join(f"{k} {v:.1f}s" for k, v in sorted(self.seconds.items()))


class DiskTimeline:
    """The machine's disk traffic per second (``/proc/vmstat`` pgpgin/pgpgout) and marked events."""

    def __init__(self, period: float = 1.0):
        self.period, self.samples = period, [(time.perf_counter(), *self._read())]
        self.events: list[tuple[float, str]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True, name="shardconv-disk-timeline")
        self.thread.start()

    @staticmethod
    def _read() -> tuple[int, int]:
        try:
            with open("/proc/vmstat") as f:
                stats = dict(line.split() for line in f)
            return int(stats["pgpgin"]) * 1024, int(stats["pgpgout"]) * 1024
        except (OSError, KeyError, ValueError):
            return 0, 0

    def _run(self) -> None:
        while not self.stop.wait(self.period):
            self.samples.append((time.perf_counter(), *self._read()))

    def mark(self, what: str) -> None:
        self.events.append((time.perf_counter(), what))

    def report(self) -> str:
        self.stop.set()
        self.thread.join()
        self.samples.append((time.perf_counter(), *self._read()))
        t0 = self.samples[0][0]
        rows = [f"{a[0] - t0:.0f}s {(b[1] - a[1]) / (b[0] - a[0]) / 1e9:.2f}/{(b[2] - a[2]) / (b[0] - a[0]) / 1e9:.2f}"
                for a, b in zip(self.samples, self.samples[1:])]
        events = ", ".join(f"{what} {t - t0:.1f}s" for t, what in self.events)
        return f"disk in/out GB/s per second: {'  '.join(rows)}\nprofile: events: {events}"


def python_profile(run):
    """``run()``, under cProfile when :data:`PYTHON`: the 25 costliest calls by cumulative time are printed."""
    if not PYTHON:
        return run()
    import cProfile
    import io
    import pstats

    prof = cProfile.Profile()
    try:
        return prof.runcall(run)
    finally:
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats("cumulative").print_stats(25)
        print("profile: pipeline loop (cProfile)\n" + out.getvalue(), flush=True)

"""``SHARDCONV_PROFILE=1``: where a conversion's time goes, printed as ``profile:`` lines.

The stage clock sums seconds per stage over threads (always kept: it costs a lock per stage);
the disk timeline samples the machine's disk traffic every second, which shows when the disk idles,
which stage sums cannot; the process age places start-up against both. ``SHARDCONV_PROFILE=cprofile``
adds a Python profile of the pipeline loop, ``SHARDCONV_PROFILE=sample`` where its main thread is.
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
# SHARDCONV_PROFILE=sample: also where the pipeline's main thread is, sampled every millisecond (what
# bounds a MoE model's cached rate: ~1.3 ms of issuing per expert group on the H200 machine, stop 20)
SAMPLE = os.environ.get("SHARDCONV_PROFILE") == "sample"
SAMPLE_INTERVAL = 0.001


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


class MainThreadSampler:
    """Where one thread is, sampled from another: the innermost line of shardconv's own code on its stack,
    with the call it is in below that line (a torch function, a lock, a read).

    Why: cProfile on Python 3.12 counts every thread's calls together, so the main thread's issuing cost
    could not be told from the readers' and writers' work. A sample is taken only when this thread gets
    the GIL, so a line that holds the GIL for long is under-counted, and one that waits in C code, where
    the time goes, is counted in full.
    """

    def __init__(self, thread_id: int, interval: float = SAMPLE_INTERVAL, code_root: str | None = None):
        """``code_root``: the folder whose code counts as "own" (shardconv's by default)."""
        self.thread_id, self.interval = thread_id, interval
        self.code_root = os.path.join(code_root or os.path.dirname(os.path.abspath(__file__)), "")
        self.samples = 0
        self.lines: collections.Counter = collections.Counter()  # shardconv line -> samples
        self.calls: collections.Counter = collections.Counter()  # (shardconv line, innermost call) -> samples
        self.leaves: collections.Counter = collections.Counter()  # innermost call, wherever it came from -> samples
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="shardconv-sampler", daemon=True)

    def __enter__(self):
        self.started = time.perf_counter()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.seconds = time.perf_counter() - self.started

    def _run(self) -> None:
        import sys

        package = self.code_root
        while not self._stop.wait(self.interval):
            frame = sys._current_frames().get(self.thread_id)
            if frame is None:
                continue
            leaf, own = frame, None
            while frame is not None:
                if frame.f_code.co_filename.startswith(package):
                    own = frame
                    break
                frame = frame.f_back
            self.samples += 1
            self.leaves[f"{os.path.basename(leaf.f_code.co_filename)} {leaf.f_code.co_name}"] += 1
            if own is None:
                continue
            line = f"{os.path.basename(own.f_code.co_filename)}:{own.f_lineno} {own.f_code.co_name}"
            self.lines[line] += 1
            if leaf is not own:
                self.calls[(line, f"{os.path.basename(leaf.f_code.co_filename)} {leaf.f_code.co_name}")] += 1

    def report(self, top: int = 20) -> str:
        """The lines with the most samples, each with its estimated seconds and its costliest call."""
        if not self.samples:
            return "main thread: no samples"
        per = self.seconds / self.samples
        rows = [f"main thread, {self.samples} samples over {self.seconds:.1f} s (shardconv line: samples, ~s; "
                "the call below it with the most samples)"]
        for line, n in self.lines.most_common(top):
            below = [(c, k) for (ln, c), k in self.calls.items() if ln == line]
            call = max(below, key=lambda ck: ck[1]) if below else None
            rows.append(f"  {line}: {n}, ~{n * per:.2f} s" + (f"; {call[0]} {call[1]}" if call else ""))
        rows.append("innermost calls (samples, ~s): " + ", ".join(
            f"{leaf} {n} ~{n * per:.2f}" for leaf, n in self.leaves.most_common(top // 2)))
        return "\n".join(rows)


def python_profile(run):
    """``run()``, under cProfile when :data:`PYTHON` (the 25 costliest calls by cumulative time are
    printed), or with its thread sampled when :data:`SAMPLE` (:class:`MainThreadSampler`)."""
    if SAMPLE:
        sampler = MainThreadSampler(threading.get_ident())
        try:
            with sampler:
                return run()
        finally:
            print("profile: " + sampler.report(), flush=True)
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

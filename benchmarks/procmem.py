"""The memory of a process tree, from /proc: the sum of RSS (an upper bound: shared pages
counted once per process) and of PSS (shared pages divided among the processes that map them;
closer to what a container's cgroup charges), sampled in a thread with peaks per phase."""

from __future__ import annotations

import os
import threading
from pathlib import Path

MIB = 1024 * 1024


def tree(pid: int) -> list[int]:
    """pid and all its descendants (from /proc/PID/task/*/children)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        for task in Path(f"/proc/{p}/task").glob("*/children"):
            try:
                todo += [int(c) for c in task.read_text().split()]
            except OSError:
                pass
    return out


def rss_pss_bytes(pids: list[int]) -> tuple[int, int]:
    """(sum of RSS, sum of PSS) of these processes, from /proc/PID/smaps_rollup (kB there)."""
    rss = pss = 0
    for p in pids:
        try:
            text = Path(f"/proc/{p}/smaps_rollup").read_text()
        except OSError:
            continue
        for line in text.splitlines():
            key, _, rest = line.partition(":")
            if key == "Rss":
                rss += int(rest.split()[0]) * 1024
            elif key == "Pss":
                pss += int(rest.split()[0]) * 1024
    return rss, pss


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds used so far by these processes (from /proc/PID/stat)."""
    total = 0
    for p in pids:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime: fields 14 and 15 of stat
    return total / os.sysconf("SC_CLK_TCK")


class Sampler(threading.Thread):
    """Samples the process tree of `pid` every `interval` s; keeps the peaks (bytes) per
    phase (set .phase to start one)."""

    def __init__(self, pid: int, interval: float = 0.05):
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.phase = "start-up"
        self.peaks: dict[str, dict[str, int]] = {}
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(self.interval):
            rss, pss = rss_pss_bytes(tree(self.pid))
            peak = self.peaks.setdefault(self.phase, {"rss": 0, "pss": 0})
            peak["rss"], peak["pss"] = max(peak["rss"], rss), max(peak["pss"], pss)

    def peak_mib(self, phase: str) -> dict[str, float]:
        """The phase's peaks in MiB; a phase shorter than the interval has none (an error, not
        a zero that would read as a negative peak over idle)."""
        if phase not in self.peaks:
            raise ValueError(f"phase {phase!r} ended before the first sample: lower the interval")
        return {k + "_mib": round(v / MIB, 1) for k, v in self.peaks[phase].items()}

"""Shared by the benchmarks: timing with medians, machine description, BENCHMARKS.md sections."""
from __future__ import annotations

import datetime
import os
import platform
import re
import statistics
import time
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "BENCHMARKS.md"
HEADER = ("# Benchmarks\n\nEvery figure here is written by a script in `bench/`; none is typed by hand. "
          "Each section names its script, the machine and the date.\n")


def median_seconds(run, repeats: int) -> float:
    """Median wall time of `run()` over `repeats` calls (one warm-up call first)."""
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}, Python {platform.python_version()}"


def write_section(name: str, body: str, script: str | None = None) -> None:
    """Replace (or append) the section `name` of BENCHMARKS.md with `body` (written by bench/`script`.py,
    by default bench/`name`.py)."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    stamp = f"_Written by `bench/{script or name}.py` on {datetime.date.today().isoformat()}; machine: {machine()}._\n\n"
    block = f"{start}\n{stamp}{body.strip()}\n{end}"
    text = BENCHMARKS.read_text() if BENCHMARKS.exists() else HEADER
    pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    BENCHMARKS.write_text(text)


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)

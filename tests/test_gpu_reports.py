"""The GPU benchmarks' reports (bench/gpu_bench.py --report): rendered on a CPU machine from the JSON the
GPU machine wrote, so they are checked here, against a copy of BENCHMARKS.md."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture
def gpu_bench(monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(BENCH))
    import gpu_bench
    import report

    monkeypatch.setattr(report, "BENCHMARKS", tmp_path / "BENCHMARKS.md")
    yield gpu_bench
    sys.modules.pop("gpu_bench", None)


def rendered(gpu_bench, tmp_path, results: dict) -> str:
    path = tmp_path / "gpu.json"
    path.write_text(json.dumps(results))
    gpu_bench.report(path)
    return (tmp_path / "BENCHMARKS.md").read_text()


def test_the_report_names_the_runs_its_parts_came_from(gpu_bench, tmp_path):
    results = json.loads((BENCH / "results" / "gpu.json").read_text())
    text = rendered(gpu_bench, tmp_path, results)
    assert "<!-- gpu:start -->" in text and "<!-- gpu:end -->" in text
    for part in results["provenance"]:
        assert part in text
    for shape, figures in results["shapes"].items():
        assert f"| {shape} | {figures['trimtab_us']:.1f} |" in text


def test_a_single_runs_report_says_so(gpu_bench, tmp_path):
    results = json.loads((BENCH / "results" / "gpu.json").read_text())
    del results["provenance"]
    text = rendered(gpu_bench, tmp_path, results)
    assert "was measured on it in one run" in text

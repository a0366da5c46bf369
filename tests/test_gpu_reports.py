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


def test_runs_of_parts_merge_into_one_result_naming_each(gpu_bench, tmp_path):
    kernels = {"card": "H100", "date": "2026-11-26", "parts": ["gemv"], "commit": "abc1234",
               "shapes": {"4096x4096": {"trimtab_us": 6.4}}, "decode_tok_s": {"trimtab_4bpw": 1.0}}
    peers = {"card": "H100", "date": "2026-11-27", "parts": ["decode", "exl2kernel"], "commit": "def5678",
             "shapes": {"4096x4096": {"exllamav2_us": 9.5}}, "decode_tok_s": {"trimtab_4bpw": 450.0},
             "failed_parts": ["exl2kernel"]}
    paths = []
    for i, run in enumerate((kernels, peers)):
        paths.append(tmp_path / f"run{i}.json")
        paths[-1].write_text(json.dumps(run))
    gpu_bench.merge_runs(paths, tmp_path / "gpu.json")
    merged = json.loads((tmp_path / "gpu.json").read_text())
    assert merged["shapes"] == {"4096x4096": {"trimtab_us": 6.4, "exllamav2_us": 9.5}}
    assert merged["decode_tok_s"] == {"trimtab_4bpw": 450.0}     # the later run's figure
    assert merged["provenance"] == ["gemv at abc1234 on 2026-11-26", "decode, exl2kernel at def5678 on 2026-11-27"]
    assert merged["failed_parts"] == ["exl2kernel"] and "parts" not in merged and "commit" not in merged

    again = {"card": "H100", "date": "2026-11-28", "parts": ["exl2kernel"], "commit": "def5678"}
    paths.append(tmp_path / "run2.json")
    paths[-1].write_text(json.dumps(again))
    gpu_bench.merge_runs(paths, tmp_path / "gpu.json")
    assert "failed_parts" not in json.loads((tmp_path / "gpu.json").read_text())  # the part ran again, and ran
    paths.pop()

    peers["card"] = "H200"
    paths[1].write_text(json.dumps(peers))
    with pytest.raises(SystemExit, match="different cards"):
        gpu_bench.merge_runs(paths, tmp_path / "gpu.json")

"""The benchmarks in bench/ run: their pure parts here, and the GPU benchmark's CPU-safe parts
end to end with ``--smoke`` (a tiny model, few steps). Nothing here asserts a speed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

import overhead  # noqa: E402


def test_overhead_space_pins_the_demo_to_one_point(tmp_path: Path) -> None:
    from stagebudget.space.schema import SearchSpace

    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(overhead.space_document("builtin:test", 0.002, 100, 20)))
    space = SearchSpace.load(path)
    dims = space.dimensions()
    assert dims and all(len(d.choices) == 1 for d in dims.values())
    point = {name: d.choices[0] for name, d in dims.items()}
    schedule = space.schedule_from_params(point, space.cost_model("cpu"))
    assert [s.kind for s in schedule.stages] == ["sft", "rl"]
    assert space.trials == 1 and space.concurrency == 1


def test_a_benchmark_section_is_replaced_where_it_stands(tmp_path: Path) -> None:
    """A re-run benchmark rewrites its own section in place: the file keeps its order (the
    prose sections that discuss a table stay next to it) and every other section as it was."""
    from bench_results import replace_section

    path = tmp_path / "RESULTS.md"
    path.write_text("# Benchmark results\n\n## A\n\na\n\n## Search quality\n\nold\n\n"
                    "## Search quality: what we take from it\n\nprose\n\n### sub\n\nx\n")
    replace_section(path, "## A", ["## A", "", "new a"])
    assert path.read_text() == ("# Benchmark results\n\n## A\n\nnew a\n\n## Search quality\n\n"
                                "old\n\n## Search quality: what we take from it\n\nprose\n\n"
                                "### sub\n\nx\n")
    replace_section(path, "## Search quality: what we take from it", ["## Search quality: what we"
                                                                     " take from it", "", "p2"])
    assert path.read_text().endswith("old\n\n## Search quality: what we take from it\n\np2\n")
    replace_section(path, "## New", ["## New", "", "n"])
    assert path.read_text().endswith("p2\n\n## New\n\nn\n")


def test_trial_split_adds_up() -> None:
    metrics = {"stages": [{"measured_seconds": 3.0}, {"measured_seconds": 1.0}],
               "eval_seconds": 2.0}
    split = overhead.trial_split(metrics, 10.0)
    assert split["train_steps_s"] == 4.0 and split["eval_s"] == 2.0
    assert split["other_s"] == 4.0 and split["fixed_share"] == pytest.approx(0.6)


@pytest.mark.slow
def test_gpu_bench_smoke_runs_every_cpu_part(tmp_path: Path) -> None:
    out = tmp_path / "gpu.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    results = tmp_path / "RESULTS.md"
    res = subprocess.run([sys.executable, str(BENCH / "gpu.py"), "--smoke", "--parts",
                          "sft,grpo,search", "--work", str(tmp_path / "work"), "--json", str(out),
                          "--results", str(results)],
                         env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["params"] > 0 and result["peak_flops"] > 0
    assert set(result["sft"]) == {"plain_loop", "plain_trl", "stagebudget"}
    for row in result["sft"].values():
        assert row["tokens_per_s"] > 0 and row["mfu"] > 0
    for name in ("plain_trl", "stagebudget"):
        row = result["grpo"][name]
        assert row["s_per_step"] > 0 and 0 < row["generate_share"] <= 1  # the timer was hooked
    assert "| SFT (full FT) |" in res.stdout and "GRPO" in res.stdout
    # vLLM needs CUDA: its rows are skipped with the reason, not faked
    assert "stagebudget_vllm" not in result["grpo"] and "CUDA" in result["grpo"]["vllm_skipped"]
    search = result["search"]  # calibrate --space, then 4 distinct trials two at a time
    assert search["complete"] == 4 and len(search["measured_over_planned"]) == 4
    assert all(r > 0 for r in search["measured_over_planned"]) and "CUDA" in result["search_vllm_skipped"]
    assert "4-trial search, 2 per GPU" in results.read_text()

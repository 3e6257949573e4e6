"""bench/time_to_quality.py stops at the first evaluation that reaches the target and reports
what it took in its last JSON line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["meta_batch_size=4", "episodes_per_task=4", "evaluation.num_tasks=4",
         "evaluation.episodes_per_task=4", "policy.hidden_sizes=[16,16]"]


def _run(*args: str) -> dict:
    cmd = [sys.executable, str(ROOT / "bench" / "time_to_quality.py"), "--config",
           str(ROOT / "configs" / "navigation2d-fast.yaml"), *args]
    for item in SMALL:
        cmd += ["--set", item]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_stops_at_the_first_evaluation_that_reaches_the_target():
    result = _run("--target", "-1000", "--eval-every", "2", "--max-iterations", "10")
    assert result["reached"] and result["iterations_to_target"] == 2
    assert len(result["history"]) == 1
    assert result["seconds_to_target"] == result["history"][0]["seconds"] > 0
    assert result["config"].endswith("navigation2d-fast.yaml")


def test_reports_not_reached_within_the_iteration_budget():
    result = _run("--target", "0", "--eval-every", "2", "--max-iterations", "3")
    assert not result["reached"] and result["seconds_to_target"] is None
    # evaluations after iterations 2 and 3 (the last one), none reaching a return of 0
    assert [h["iteration"] for h in result["history"]] == [2, 3]
    assert all(h["post_adaptation_return"] < 0 for h in result["history"])

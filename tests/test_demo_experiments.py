"""The experiment scripts kept in docs/demo_experiments/ run against today's library (one of them, cheaply)."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_fresh_seed_script_runs_on_the_committed_checkpoint():
    """fresh_seed.py on 2 fresh rows per subset: the JSON it prints names every subset with both images."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLM_COURSE_OFFLINE": "1", "OMP_NUM_THREADS": "2"}
    result = subprocess.run([sys.executable, "docs/demo_experiments/fresh_seed.py", "assets/demo_checkpoint", "7", "2"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout[result.stdout.index("{"):])
    assert report["seed"] == 7 and report["rows_per_subset"] == 2
    assert set(report["right_image"]) == set(report["other_image"]) == {"shapes", "count", "position", "spatial", "mc"}
    assert all(0 <= v <= 1 for v in report["right_image"].values())
    assert report["count_tally_accuracy"] is not None  # the committed model has count tokens


def test_word_head_script_trains_and_reports():
    """word_head.py for a few seconds on a few pictures: it trains (the loss starts at log(119), the zero-init head),
    and its JSON reports the held-out accuracy against the closed list's chance."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLM_COURSE_OFFLINE": "1", "OMP_NUM_THREADS": "2"}
    result = subprocess.run([sys.executable, "docs/demo_experiments/word_head.py", "--minutes", "0.05", "--train", "16",
                             "--test", "8", "--batch-size", "4", "--eval-every", "1"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.strip().splitlines()
    report = json.loads(lines[-1])
    assert report["steps"] >= 1 and 0 <= report["held_out_accuracy"] <= 1
    assert abs(report["chance"] - 1 / 119) < 1e-9
    first = next(line for line in lines if line.startswith("step 1:"))
    assert abs(float(first.split("loss ")[1].split(",")[0]) - 4.779) < 0.05  # log(119): a zero-init head

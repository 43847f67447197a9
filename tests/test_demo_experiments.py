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

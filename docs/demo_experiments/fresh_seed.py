"""Evaluate a demo checkpoint on freshly generated scenes from any seed (not the committed test split).

    .venv/bin/python docs/demo_experiments/fresh_seed.py CHECKPOINT SEED [N_PER_SUBSET]

Prints accuracy per subset with the right image and with another scene's image, chance, and how often the
image side's own tally answers the count questions (None for a checkpoint without count tokens).
"""
import json
import sys

from vlm_course import demo
from vlm_course.data import synthetic
from vlm_course.demo_panel import load_demo_checkpoint

folder, seed = sys.argv[1], int(sys.argv[2])
n = int(sys.argv[3]) if len(sys.argv) > 3 else 100
model, processor = load_demo_checkpoint(folder)
samples = []
for subset in demo.EVAL_SUBSETS:
    for row in synthetic.generate(subset, n, seed=seed):
        for turn in row["texts"]:
            samples.append({"subset": subset, "image": row["images"][0], "question": turn["user"],
                            "answer": turn["assistant"]})
right, _ = demo.evaluate(model, processor, samples, 50, 4, progress=False)
other, _ = demo.evaluate(model, processor, demo.with_other_images(samples), 50, 4, progress=False)
print(json.dumps({"seed": seed, "rows_per_subset": n, "right_image": right, "other_image": other,
                  "chance": demo.CHANCE, "count_tally_accuracy": demo.tally_accuracy(model, processor, samples)},
                 indent=1))

"""Why the demo's evaluation after training took 1.4-2.8 GB more than in a fresh process (docs/demo_findings.md
section 15).

    .venv/bin/python docs/demo_experiments/eval_memory_after_training.py CHECKPOINT none|mallopt

Loads a demo checkpoint, trains 3 QA steps, then (with `mallopt`) sets glibc's mmap threshold back to 128 kB and
trims the heap, and evaluates 150 held-out shapes questions (batch 50) while a thread samples the RSS every 0.1 s.
Prints the evaluation's peak RSS and time. Idle machine, 2 threads, about 1.5 minutes.
"""
import ctypes
import os
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import torch

from vlm_course import demo

torch.set_num_threads(2)
folder, mode = sys.argv[1], sys.argv[2]
peak = [0]


def sample_rss():
    while True:
        peak[0] = max(peak[0], int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE"))
        time.sleep(0.1)


threading.Thread(target=sample_rss, daemon=True).start()
model, processor = demo.load_checkpoint(folder)
questions = [s for s in demo.load_samples("test", demo.EVAL_SUBSETS, 200) if s["subset"] == "shapes"][:150]
recipe = demo.recipe_from_json(Path(folder) / "recipe.json")
recipe = replace(recipe, stages=(replace(recipe.stages[1], steps=3, warmup_steps=1),))
demo.train(model, processor, demo.load_samples("train", recipe.subsets, 50), recipe,
           Path("runs/experiments/eval_memory"), progress=False)
if mode == "mallopt":
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD, as demo.release_freed_memory does
    libc.malloc_trim(0)
peak[0] = 0
start = time.time()
demo.evaluate(model, processor, questions, 50, 4, progress=False)
print(f"{mode}: evaluation peak {peak[0] / 1e9:.2f} GB, {time.time() - start:.1f} s")

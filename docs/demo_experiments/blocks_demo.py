"""The demo with a given starting ViT and stage lengths: experiment script (writes runs/experiments/NAME/).

    .venv/bin/python docs/demo_experiments/blocks_demo.py NAME VIT_FOLDER WORDS_STEPS QA_STEPS [LORA_LR] [EVAL_N]
        [LR_VISION_WORDS]

WORDS_STEPS: 0 solves the projector by least squares (the default recipe). N > 0 (N AdamW steps on word targets,
section 12's run b1) was retired with the demo's own training loop: see docs/demo_findings.md.
VIT_FOLDER: a ViT in SigLIP naming at 72 px (e.g. written by vit_blocks.py), or "-" for the smol ViT resized.
"""
import sys
from dataclasses import replace

import torch

from vlm_course import demo

name, vit, words, qa = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
lora_lr = float(sys.argv[5]) if len(sys.argv) > 5 else 1e-3
eval_n = int(sys.argv[6]) if len(sys.argv) > 6 else 100
lr_vision_words = float(sys.argv[7]) if len(sys.argv) > 7 else 0.0
recipe = demo.DemoRecipe()
words_stage = recipe.stages[0]  # the projector solved by least squares (the recipe's default)
if words or lr_vision_words:
    raise SystemExit("WORDS_STEPS > 0 (gradient word stages) was retired: pass 0")
stages = (words_stage, replace(recipe.stages[1], steps=qa, lr_lora=lora_lr))
recipe = replace(recipe, stages=stages, vision_weights=None if vit == "-" else vit, eval_per_subset=eval_n)
torch.set_num_threads(int(__import__("os").environ.get("THREADS", torch.get_num_threads())))
demo.run_demo("smol", recipe, f"runs/experiments/{name}", progress=False, log_every=25)

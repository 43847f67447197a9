"""Lesson 05, training with QLoRA: collate_batch, quantize_nf4, dequantize_nf4, LoRALinear, param_groups.

The checks, their seeded inputs and the known mistakes they recognise live in
vlm_course/grading/exercises/l05_training.py (the same checks the notebook's check cells run). The end-to-end
tests below put the learner's pieces next to the real libraries: the course processor, bitsandbytes and peft.
"""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from grading_helpers import assert_exercise_passes, explained, learner_object, lesson_exercises, run_learner

from vlm_course.grading.inputs import randn, randomised

NOTEBOOK = "05_training_qlora.ipynb"


@pytest.mark.parametrize("exercise", lesson_exercises("05"))
def test_training(notebook, exercise):
    assert_exercise_passes(notebook, exercise)


@explained("make_labels", "collate_batch")
def test_training_collate_matches_the_processor_on_real_rows(notebook):
    """Your collate_batch (on your make_labels) on real mini-cauldron conversations (one- and two-turn, several
    subsets) gives exactly the processor's padded input_ids, attention_mask and answer-only labels."""
    from vlm_course.config import get_profile
    from vlm_course.data.cauldron import load_mini_cauldron
    from vlm_course.processing import VLMProcessor

    collate_batch = learner_object(notebook, "collate_batch")
    processor = VLMProcessor.from_config(get_profile("tiny").config, system_prompt="You are a helpful assistant.")
    rows = load_mini_cauldron("test", max_per_subset=4, verbose=False)
    assert any(len(r["texts"]) > 1 for r in rows), "the sample should include a multi-turn conversation"
    encoded = [processor.encode_conversation(r["texts"], r["images"]) for r in rows]
    expected = processor.pad(encoded, padding_side="right")
    got = run_learner("collate_batch", collate_batch, [e["input_ids"].tolist() for e in encoded],
                      processor.text_ids("<|im_start|>assistant\n"), processor.eos_token_id, processor.pad_token_id)
    for key in ("input_ids", "attention_mask", "labels"):
        assert isinstance(got, dict) and key in got, f"collate_batch returned no {key!r}"
        assert torch.equal(got[key], expected[key]), f"{key} differs from VLMProcessor.pad's on real conversations"


@explained("quantize_nf4", "dequantize_nf4", "LoRALinear")
def test_training_qlora_layer_end_to_end(notebook):
    """Your LoRALinear over a base that runs on your NF4 weights equals bitsandbytes Linear4bit (NF4) wrapped by
    peft's LoRA layer, with the same adapter weights: forward and the gradients that reach the adapters."""
    import bitsandbytes as bnb
    from peft import LoraConfig
    from peft.tuners.lora import Linear as PeftLoraLinear

    quantize_nf4, dequantize_nf4, LoRALinear = (learner_object(notebook, n)
                                                 for n in ("quantize_nf4", "dequantize_nf4", "LoRALinear"))
    torch.manual_seed(5)
    linear = randomised(nn.Linear(128, 192), seed=5)  # rows of 128 = two blocks of 64
    codes, absmax = run_learner("quantize_nf4", quantize_nf4, linear.weight.detach(), 64)
    weight = run_learner("dequantize_nf4", dequantize_nf4, codes, absmax, 64)

    class MyNF4Linear(nn.Module):
        in_features, out_features = 128, 192

        def __init__(self):
            super().__init__()
            self.register_buffer("weight", weight)
            self.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

        def forward(self, x):
            return F.linear(x, self.weight, self.bias)

    reference_base = bnb.nn.Linear4bit(128, 192, bias=True, compute_dtype=torch.float32, compress_statistics=False,
                                       quant_type="nf4", device="meta")
    reference_base.weight = bnb.nn.Params4bit(linear.weight.detach().clone(), requires_grad=False,
                                              compress_statistics=False, quant_type="nf4")
    reference_base.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
    reference_base.support_avx512bf16_for_cpu = False  # keep bitsandbytes' standard layout (no CPU repacking)
    reference_base = reference_base.to("cpu")  # quantises
    reference = PeftLoraLinear(reference_base, adapter_name="default", config=LoraConfig(r=4, lora_alpha=12),
                               r=4, lora_alpha=12)
    mine = run_learner("LoRALinear(base, 4, 12)", LoRALinear, MyNF4Linear(), 4, 12)
    a, b = randn(4, 128, seed=6, scale=0.1), randn(192, 4, seed=7, scale=0.1)
    with torch.no_grad():
        for lora_a, lora_b in [(mine.lora_A, mine.lora_B), (reference.lora_A["default"], reference.lora_B["default"])]:
            lora_a.weight.copy_(a)
            lora_b.weight.copy_(b)
    x = randn(3, 7, 128, seed=8)
    expected = reference(x)
    got = run_learner("LoRALinear.forward", mine, x)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5,
                               msg=lambda m: f"your QLoRA layer differs from bitsandbytes + peft: {m}")
    expected.square().mean().backward()
    got.square().mean().backward()
    for name, ours, theirs in [("lora_A", mine.lora_A, reference.lora_A["default"]),
                               ("lora_B", mine.lora_B, reference.lora_B["default"])]:
        torch.testing.assert_close(ours.weight.grad, theirs.weight.grad, atol=1e-5, rtol=1e-4,
                                   msg=lambda m, name=name: f"the gradient of {name} differs from peft's: {m}")


@explained("param_groups")
def test_training_param_groups_drive_adamw_like_the_library(notebook):
    """One AdamW step with your groups moves a QLoRA-recipe model exactly as the library's optimiser does."""
    from vlm_course import training
    from vlm_course.vlm import VisionLanguageModel

    param_groups = learner_object(notebook, "param_groups")
    cfg = training.TrainConfig(vision="full", projector="full", decoder="lora", lora_r=2, lr_vision=3e-4,
                               lr_projector=2e-3, lr_decoder=1e-4, lr_lora=5e-3, weight_decay=0.05, progress=False)
    models = []
    for _ in range(2):
        torch.manual_seed(9)
        model = VisionLanguageModel.from_profile("tiny")
        torch.manual_seed(10)
        training.apply_recipe(model, cfg)
        models.append(model)
    lrs = {"vision": cfg.lr_vision, "projector": cfg.lr_projector, "decoder": cfg.lr_decoder, "lora": cfg.lr_lora}
    optimizers = [torch.optim.AdamW(run_learner("param_groups", param_groups, models[0], lrs, cfg.weight_decay)),
                  training.build_optimizer(models[1], cfg)]
    for model, optimizer in zip(models, optimizers):
        for p in model.parameters():
            if p.requires_grad:
                p.grad = torch.ones_like(p)  # the same gradient everywhere: only lr and decay tell groups apart
        optimizer.step()
    for (name, ours), theirs in zip(models[0].named_parameters(), models[1].parameters()):
        assert torch.equal(ours, theirs), f"after one AdamW step {name} differs from the library's update"

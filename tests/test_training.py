"""Training on the tiny profile: recipes, optimiser groups, schedule, QLoRA, merging, overfitting, exact resume,
atomic checkpoints and the CLI. All on CPU, random-init tiny model, in-memory rows: no network."""

import json
import math
import subprocess
import sys
import textwrap

import bitsandbytes as bnb
import pytest
import torch
from peft.tuners.lora import LoraLayer
from PIL import Image

from vlm_course import training
from vlm_course.config import get_profile
from vlm_course.processing import VLMProcessor
from vlm_course.training import (
    TrainConfig,
    Trainer,
    apply_recipe,
    build_optimizer,
    build_scheduler,
    latest_checkpoint,
    load_checkpoint,
    merge_lora,
    neftune_noise,
    plot_loss_curve,
    save_checkpoint,
    train,
    trainable_counts,
)
from vlm_course.vlm import VisionLanguageModel

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return VisionLanguageModel.from_profile("tiny")


@pytest.fixture(scope="module")
def processor():
    return VLMProcessor.from_config(get_profile("tiny").config, system_prompt=None)


@pytest.fixture(scope="module")
def rows():
    """Solid-colour images with their colour as the answer (a few phrasings, one with two turns)."""
    out = []
    for i, (name, rgb) in enumerate(COLOURS.items()):
        turns = [{"user": "What colour is the image?", "assistant": name, "source": "test"}]
        if i % 2:
            turns.append({"user": "Is it dark?", "assistant": "no" if name == "yellow" else "a little", "source": "t"})
        out.append({"images": [Image.new("RGB", (64, 64), rgb)], "texts": turns})
    return out * 4  # 16 rows


def config(tmp_path, **kw):
    defaults = dict(output_dir=str(tmp_path / "run"), batch_size=4, max_steps=6, precision="fp32", progress=False,
                    warmup_fraction=0.0)
    return TrainConfig(**{**defaults, **kw})


def numel(module):
    return sum(p.numel() for p in {id(p): p for p in module.parameters()}.values())


# -- recipes ------------------------------------------------------------------------------------


def expected_lora(model, targets, r, dora=False):
    """r * (in + out) per wrapped linear layer (+ out for DoRA's magnitude), from the module shapes."""
    total = 0
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in targets:
            total += r * (m.in_features + m.out_features) + (m.out_features if dora else 0)
    return total


@pytest.mark.parametrize("vision, projector, decoder", [
    ("frozen", "full", "frozen"), ("full", "full", "full"), ("lora", "frozen", "lora"), ("frozen", "full", "qlora"),
])
def test_recipe_trainable_counts(tmp_path, vision, projector, decoder):
    model = tiny_model()
    cfg = config(tmp_path, vision=vision, projector=projector, decoder=decoder, lora_r=4)
    expected = {
        "vision": {"frozen": 0, "full": numel(model.vision),
                   "lora": expected_lora(model.vision, cfg.vision_lora_targets, 4)}[vision],
        "projector": numel(model.projector) if projector == "full" else 0,
        "decoder": {"frozen": 0, "full": numel(model.decoder),  # tied embeddings counted once
                    "lora": expected_lora(model.decoder, cfg.lora_targets, 4),
                    "qlora": expected_lora(model.decoder, cfg.lora_targets, 4)}[decoder],
    }
    assert apply_recipe(model, cfg) == expected
    assert trainable_counts(model) == expected
    if decoder == "frozen":
        assert not any(p.requires_grad for p in model.decoder.parameters())


def test_dora_adds_one_magnitude_per_output(tmp_path):
    model = tiny_model()
    expected = expected_lora(model.decoder, TrainConfig().lora_targets, 2, dora=True)
    counts = apply_recipe(model, config(tmp_path, decoder="lora", use_dora=True, lora_r=2, projector="frozen"))
    assert counts["decoder"] == expected > 0


def test_qlora_builds_nf4_layers_keeps_embeddings_float_and_trains(tmp_path, processor, rows):
    """The demo's path: NF4 base, bf16 compute and autocast, LoRA only (projector frozen: the loss can only
    fall through the adapters, i.e. gradients flow through the 4-bit base)."""
    model = tiny_model()
    cfg = config(tmp_path, decoder="qlora", projector="frozen", lora_r=8, lora_alpha=16, lr_lora=1e-2,
                 max_steps=10, batch_size=4, double_quant=True, precision="bf16")
    trainer = Trainer(model, processor, rows[:4], cfg)
    layers = model.decoder.layers
    float_linears = [name for name, m in layers.named_modules() if type(m) is torch.nn.Linear]
    wrapped = [m for m in layers.modules() if isinstance(m, LoraLayer)]
    assert len(wrapped) == 7 * len(layers)
    assert all(isinstance(m.get_base_layer(), bnb.nn.Linear4bit) for m in wrapped)
    assert all(m.get_base_layer().weight.dtype == torch.uint8 for m in wrapped)  # packed 4-bit
    assert float_linears and all(".lora_" in name for name in float_linears)  # only LoRA A/B stay float
    assert model.decoder.embed_tokens.weight.dtype == torch.float32
    assert model.decoder.lm_head.weight is model.decoder.embed_tokens.weight
    assert all(m.get_base_layer().compute_dtype == torch.bfloat16 for m in wrapped)
    losses = [trainer.train_step()["loss"] for _ in range(cfg.max_steps)]
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0] - 0.5 and losses[-1] == min(losses), losses


# -- optimiser and schedule ---------------------------------------------------------------------


def test_param_groups_have_per_component_lr_and_no_decay_on_norms(tmp_path):
    model = tiny_model()
    cfg = config(tmp_path, vision="full", projector="full", decoder="lora", lr_vision=1e-4, lr_projector=2e-3,
                 lr_lora=2e-4, weight_decay=0.1)
    apply_recipe(model, cfg)
    groups = {g["name"]: g for g in build_optimizer(model, cfg).param_groups}
    assert set(groups) == {"vision", "vision_no_decay", "projector", "decoder_lora"}
    assert groups["projector"]["lr"] == 2e-3 and groups["decoder_lora"]["lr"] == 2e-4
    assert groups["vision"]["lr"] == groups["vision_no_decay"]["lr"] == 1e-4
    assert groups["vision_no_decay"]["weight_decay"] == 0.0 and groups["vision"]["weight_decay"] == 0.1
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay = [names[id(p)] for p in groups["vision_no_decay"]["params"]]
    assert any("layer_norm" in n for n in no_decay) and any(n.endswith("bias") for n in no_decay)
    assert all(p.ndim >= 2 for p in groups["vision"]["params"])
    grouped = sum(len(g["params"]) for g in groups.values())
    assert grouped == sum(1 for p in model.parameters() if p.requires_grad)


def test_warmup_then_cosine(tmp_path):
    model = tiny_model()
    cfg = config(tmp_path, max_steps=100, warmup_fraction=0.1, min_lr_ratio=0.1, lr_projector=1.0,
                 decoder="frozen")
    apply_recipe(model, cfg)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg)
    lrs = []
    for _ in range(100):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)  # 10 warmup steps, linear
    assert all(a < b for a, b in zip(lrs[:9], lrs[1:10]))
    assert lrs[55] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 45 / 90)))
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:])) and lrs[-1] > 0.1


def test_nothing_to_train_is_a_clear_error(tmp_path):
    model = tiny_model()
    cfg = config(tmp_path, projector="frozen", decoder="frozen")
    apply_recipe(model, cfg)
    with pytest.raises(ValueError, match="nothing to train"):
        build_optimizer(model, cfg)


def test_bad_recipe_names():
    with pytest.raises(ValueError, match="decoder='qlora4'"):
        TrainConfig(decoder="qlora4")


# -- training -----------------------------------------------------------------------------------


def test_tiny_model_overfits_a_fixed_batch(tmp_path, processor):
    model = tiny_model()
    vision_before = model.vision.embeddings.patch_embedding.weight.detach().clone()
    batch = [{"images": [Image.new("RGB", (64, 64), rgb)],  # distinct questions: memorisable from the text
              "texts": [{"user": f"Image {i}: what colour?", "assistant": name}]}
             for i, (name, rgb) in enumerate(COLOURS.items())]
    cfg = config(tmp_path, vision="full", decoder="full", lr_vision=1e-2, lr_decoder=1e-2, lr_projector=1e-2,
                 max_steps=25, batch_size=4, weight_decay=0.0, min_lr_ratio=1.0)
    trainer = Trainer(model, processor, batch, cfg)  # 4 rows, batch 4: the same batch every step
    losses = [trainer.train_step()["loss"] for _ in range(cfg.max_steps)]
    assert losses[0] > 9  # ~ln(49152) = 10.8 for a random model
    assert losses[-1] < 0.05 * losses[0], losses[::4]
    assert not torch.equal(model.vision.embeddings.patch_embedding.weight, vision_before)  # gradients reach the ViT


def test_gradient_accumulation_equals_one_big_batch(tmp_path, processor, rows):
    results = []
    for batch_size, accum in ((4, 1), (2, 2)):
        model = tiny_model()
        cfg = config(tmp_path / f"{batch_size}", batch_size=batch_size, grad_accum_steps=accum, decoder="full",
                     max_grad_norm=None)
        trainer = Trainer(model, processor, rows[:8], cfg)
        record = trainer.train_step()
        results.append((record["loss"], {n: p.detach().clone() for n, p in model.named_parameters()}))
    (loss_a, params_a), (loss_b, params_b) = results
    assert loss_a == pytest.approx(loss_b, rel=1e-5)
    for name in params_a:
        torch.testing.assert_close(params_a[name], params_b[name], atol=1e-6, rtol=1e-5, msg=name)


def test_neftune_noise_touches_only_text_and_has_the_right_scale():
    torch.manual_seed(0)
    embeds = torch.zeros(2, 5, 8)
    text = torch.tensor([[1, 1, 0, 1, 0], [1, 1, 1, 1, 1]], dtype=torch.float32)
    noisy = neftune_noise(embeds, text, alpha=5.0)
    assert (noisy[text == 0] == 0).all()
    bound = torch.tensor([5 / math.sqrt(3 * 8), 5 / math.sqrt(5 * 8)])
    for i in range(2):
        values = noisy[i][text[i] == 1]
        assert values.abs().max() <= bound[i] and values.abs().max() > 0.5 * bound[i]


def test_train_writes_curve_history_and_checkpoint(tmp_path, processor, rows):
    calls = []
    cfg = config(tmp_path, max_steps=4, eval_every=2, decoder="lora")
    history = train(tiny_model(), processor, rows, cfg, eval_fn=lambda model, step: calls.append(step) or {"m": 1.0})
    assert calls == [2, 4] and [e["step"] for e in history["eval"]] == [2, 4]
    assert [r["step"] for r in history["train"]] == [1, 2, 3, 4]
    run = tmp_path / "run"
    assert (run / "loss_curve.png").stat().st_size > 1000
    assert json.loads((run / "history.json").read_text())["train"][-1]["step"] == 4
    assert latest_checkpoint(run).name == "checkpoint-000004"
    fig = plot_loss_curve(history)
    assert len(fig.axes[0].lines) == 2 and len(fig.axes) == 3  # loss + smoothed, lr twin, eval panel


# -- checkpoints and resume ---------------------------------------------------------------------


class Crash(Exception):
    pass


@pytest.mark.parametrize("recipe", [
    dict(vision="full", decoder="lora", lora_dropout=0.1, neftune_alpha=5.0, precision="fp32"),
    dict(decoder="qlora", precision="bf16"),  # NF4 base, bf16 autocast
    # the demo's path: also frozen embeddings in bf16, batches grouped by length (their order is in the checkpoint)
    dict(decoder="qlora", precision="bf16", frozen_dtype="compute", group_by_length=2, adam_betas=(0.9, 0.95)),
])
def test_interrupted_and_resumed_run_gives_the_same_losses(tmp_path, processor, rows, recipe):
    """Tolerance 0: every per-step loss and the final weights are bit-identical, LoRA dropout and NEFTune noise
    included (their RNG state is in the checkpoint), across an epoch boundary (16 rows / 3 per batch). Holds in
    bf16 autocast and over a 4-bit base too: same kernels, same inputs, same order on the same machine."""
    common = dict(max_steps=5, save_every=2, batch_size=3, warmup_fraction=0.3, lr_lora=1e-2, **recipe)
    full = Trainer(tiny_model(), processor, rows, config(tmp_path / "a", **common))
    uninterrupted = [r["loss"] for r in full.fit()["train"]]

    def crash_at_step_3(model, step):
        if step == 3:
            raise Crash
        return {}

    first = Trainer(tiny_model(), processor, rows, config(tmp_path / "b", eval_every=1, **common),
                    eval_fn=crash_at_step_3)
    with pytest.raises(Crash):
        first.fit()
    assert latest_checkpoint(tmp_path / "b" / "run").name == "checkpoint-000002"
    second = Trainer(tiny_model(), processor, rows, config(tmp_path / "b", **common))
    assert second.resume() and second.step == 2
    resumed = [r["loss"] for r in second.fit()["train"]]
    assert resumed == uninterrupted
    for (name, a), b in zip(full.model.named_parameters(), second.model.parameters()):
        assert torch.equal(a, b), name


def test_resume_refuses_a_different_base_model(tmp_path, processor, rows):
    cfg = config(tmp_path, max_steps=2, decoder="lora")
    Trainer(tiny_model(seed=0), processor, rows, cfg).fit()
    other = Trainer(tiny_model(seed=1), processor, rows, cfg)
    with pytest.raises(ValueError, match="frozen weights differ"):
        other.resume()


def test_resume_refuses_a_different_recipe(tmp_path, processor, rows):
    Trainer(tiny_model(), processor, rows, config(tmp_path, max_steps=2, decoder="lora")).fit()
    other = Trainer(tiny_model(), processor, rows, config(tmp_path, max_steps=2, decoder="full"))
    with pytest.raises(ValueError, match="same recipe"):
        other.resume()


def small_training_state():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    return model, optimizer, scheduler


def test_failure_mid_write_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    model, optimizer, scheduler = small_training_state()
    first = save_checkpoint(tmp_path, 1, model, optimizer, scheduler, {"marker": "one"})
    saved = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        model.weight.add_(1.0)

    def failing_save(obj, path, *a, **kw):  # the optimiser file fails half-way (disk full, kill, ...)
        open(path, "wb").write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError):
        save_checkpoint(tmp_path, 2, model, optimizer, scheduler, {"marker": "two"})
    monkeypatch.undo()
    assert latest_checkpoint(tmp_path) == first
    state = load_checkpoint(first, model, optimizer, scheduler)
    assert state["marker"] == "one" and state["step"] == 1
    assert torch.equal(model.weight, saved["weight"])


def test_kill_mid_write_leaves_the_previous_checkpoint_intact(tmp_path):
    """A real process death (os._exit, no cleanup) in the middle of writing checkpoint 2."""
    script = textwrap.dedent(f"""
        import os, torch
        from vlm_course import training
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 4)
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
        training.save_checkpoint({str(tmp_path)!r}, 1, model, optimizer, scheduler, {{"marker": "one"}})
        real_save = torch.save
        def dying_save(obj, path, *a, **kw):
            real_save(obj, path, *a, **kw)
            os._exit(9)  # killed after the first file of checkpoint 2
        torch.save = dying_save
        with torch.no_grad():
            model.weight.add_(1.0)
        training.save_checkpoint({str(tmp_path)!r}, 2, model, optimizer, scheduler, {{"marker": "two"}})
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 9, result.stderr
    leftovers = [p.name for p in tmp_path.iterdir()]
    assert any(name.startswith(".tmp-checkpoint-000002") for name in leftovers)  # the half-written folder
    assert latest_checkpoint(tmp_path).name == "checkpoint-000001"
    model, optimizer, scheduler = small_training_state()
    assert load_checkpoint(latest_checkpoint(tmp_path), model, optimizer, scheduler)["marker"] == "one"
    save_checkpoint(tmp_path, 3, model, optimizer, scheduler, {})  # the next save cleans up
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-000003"]


# -- merging ------------------------------------------------------------------------------------


@pytest.mark.parametrize("decoder, vision, use_dora", [("lora", "lora", False), ("qlora", "frozen", False),
                                                      ("lora", "frozen", True)])
def test_merge_lora_gives_plain_linears_with_the_same_outputs(tmp_path, processor, rows, decoder, vision, use_dora):
    model = tiny_model()
    cfg = config(tmp_path, decoder=decoder, use_dora=use_dora, vision=vision, lr_lora=1e-2, max_steps=2)
    trainer = Trainer(model, processor, rows, cfg)
    trainer.train_step()  # moves B (and DoRA magnitudes) away from their identity initialisation
    model.eval()
    batch = trainer.collator(rows[:3])
    with torch.no_grad():
        before = model(**batch).logits
        merge_lora(model)
        after = model(**batch).logits
    assert not any(isinstance(m, (LoraLayer, bnb.nn.Linear4bit)) for m in model.modules())
    assert all(type(m.self_attn.q_proj) is torch.nn.Linear for m in model.decoder.layers)
    torch.testing.assert_close(after, before, atol=1e-4, rtol=1e-4)
    untrained = tiny_model()
    untrained.config.image_token_id = processor.image_token_id
    assert not torch.allclose(before, untrained(**batch).logits, atol=1e-3)  # the adapters did change things


# -- CLI ----------------------------------------------------------------------------------------


def test_train_main_runs_and_resumes(tmp_path):
    out = tmp_path / "cli"
    argv = ["--profile", "tiny", "--subsets", "shapes", "--max-per-subset", "8", "--batch-size", "2",
            "--eval-rows", "4", "--precision", "fp32", "--output", str(out), "--no-save-model"]
    assert training.train_main(argv + ["--max-steps", "2"]) == 0
    assert latest_checkpoint(out).name == "checkpoint-000002"
    assert training.train_main(argv + ["--max-steps", "3", "--resume"]) == 0
    history = json.loads((out / "history.json").read_text())
    assert [r["step"] for r in history["train"]] == [1, 2, 3]
    assert "eval_loss" in history["eval"][-1]

"""The instructor demo's interactive panel: untrained vs trained answers, and where the answer looked.

    load_demo_checkpoint(folder)   the model `make demo` trained (ViT + projector + LoRA over the 4-bit base)
    image_attention(...)           how much the answer's first token attends to each image patch
    compare_answers(...)           one figure: the image, both answers, the attention overlay
    demo_panel(...)                ipywidgets: pick or upload an image, ask, see both models side by side

Attention weights are not returned by `scaled_dot_product_attention`, so `image_attention` recomputes them
for one query with forward hooks on each decoder layer's attention: softmax(q k^T / sqrt(d)) for the last
prompt position (the one that predicts the first answer token), averaged over heads and layers, read at
the image-token positions, and laid out on the pixel-shuffled grid (one token per r x r block of patches).
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import fields
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .decoder import apply_rope, repeat_kv
from .processing import open_image, to_rgb
from .vlm import VisionLanguageModel, answer

# ----------------------------------------------------------------------------------------------
# Loading the demo's models


def _recipe_from_json(path: Path):
    from .demo import DemoRecipe, Stage

    raw = json.loads(path.read_text())
    known = {f.name for f in fields(DemoRecipe)}
    raw = {k: v for k, v in raw.items() if k in known}
    raw["stages"] = tuple(Stage(**s) for s in raw.get("stages", ()))
    for key in ("subsets", "lora_targets"):
        if key in raw:
            raw[key] = tuple(raw[key])
    return DemoRecipe(**raw)


def load_demo_checkpoint(folder="runs/demo/checkpoint", profile: str = "smol"):
    """(trained model, processor) from the checkpoint `make demo` wrote; the 4-bit base is rebuilt offline."""
    from safetensors.torch import load_file

    from .demo import build_model

    folder = Path(folder)
    weights = folder / "trainable.safetensors"
    if not weights.exists():
        raise FileNotFoundError(f"no demo checkpoint in {folder}: run `make demo` first (about 30 min on 2 CPU cores)")
    recipe = _recipe_from_json(folder / "recipe.json")
    model, processor = build_model(profile, recipe)
    state = load_file(weights)
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if k.startswith("projector.") or "lora_" in k]
    if result.unexpected_keys or missing:
        raise ValueError(f"{folder} does not match the {profile!r} demo model: unexpected {result.unexpected_keys[:4]}, "
                         f"missing {missing[:4]}; was it written by another version of the demo? run `make demo` again")
    return model.eval(), processor


def load_untrained(profile: str = "smol", checkpoint="runs/demo/checkpoint"):
    """The same architecture before training (random projector, fresh LoRA): the 'before' model."""
    from .demo import DemoRecipe, build_model

    recipe_file = Path(checkpoint) / "recipe.json"
    recipe = _recipe_from_json(recipe_file) if recipe_file.exists() else DemoRecipe()
    torch.manual_seed(recipe.seed)
    model, processor = build_model(profile, recipe)
    return model.eval(), processor


# ----------------------------------------------------------------------------------------------
# Where the answer looked


@torch.no_grad()
def image_attention(model: VisionLanguageModel, processor, image, question: str) -> np.ndarray:
    """Attention of the first answer token's query to each image token: a (side, side) array summing to
    the share of attention that went to the image (the rest went to text tokens)."""
    batch = processor(image, question)
    captured: list[torch.Tensor] = []

    def hook(attn, args, _output):
        x, cos, sin = args[0], args[1], args[2]
        b, t, _ = x.shape
        q = attn.q_proj(x[:, -1:]).view(b, 1, attn.num_heads, attn.head_dim).transpose(1, 2)
        k = attn.k_proj(x).view(b, t, attn.num_kv_heads, attn.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos[:, -1:], sin[:, -1:]), apply_rope(k, cos, sin)
        k = repeat_kv(k, attn.num_heads // attn.num_kv_heads)
        scores = (q.float() @ k.float().transpose(-1, -2)) / math.sqrt(attn.head_dim)  # (B, heads, 1, T)
        captured.append(scores.softmax(-1).mean(dim=1)[0, 0])  # average over heads -> (T,)

    handles = [layer.self_attn.register_forward_hook(hook) for layer in model.decoder.layers]
    try:
        device = next(model.parameters()).device
        model(batch["input_ids"].to(device), batch["pixel_values"].to(device), batch["attention_mask"].to(device))
    finally:
        for h in handles:
            h.remove()
    weights = torch.stack(captured).mean(0)  # average over layers
    is_image = batch["input_ids"][0] == processor.image_token_id
    image_weights = weights[is_image.to(weights.device)].cpu().numpy()
    per_block = model.config.projector.tokens_per_block  # a block's tokens sit side by side: add them up
    image_weights = image_weights.reshape(-1, per_block).sum(-1)
    side = math.isqrt(len(image_weights))
    return image_weights.reshape(side, side)


def overlay(image: Image.Image, attention: np.ndarray, size: int = 256) -> np.ndarray:
    """The attention grid stretched over the image (nearest: each cell is one block of patches)."""
    base = np.asarray(to_rgb(open_image(image)).resize((size, size)), dtype=np.float32) / 255
    span = max(float(attention.max() - attention.min()), 1e-12)  # contrast: least- to most-attended block
    heat = np.asarray(Image.fromarray(((attention - attention.min()) / span * 255).astype(np.uint8))
                      .resize((size, size), Image.Resampling.NEAREST), dtype=np.float32) / 255
    red = np.stack([np.ones_like(heat), np.zeros_like(heat), np.zeros_like(heat)], -1)
    return base * (1 - 0.6 * heat[..., None]) + red * 0.6 * heat[..., None]


def compare_answers(image, question: str, before, after, max_new_tokens: int = 8):
    """A figure: the image, the untrained and trained answers, and where the trained answer looked.

    `before` and `after` are (model, processor) pairs."""
    import matplotlib.pyplot as plt

    image = to_rgb(open_image(image))
    answers = [answer(m, p, image, question, max_new_tokens=max_new_tokens) for m, p in (before, after)]
    attention = image_attention(*after, image, question)
    fig, axes = plt.subplots(1, 2, figsize=(7, 3.6))
    axes[0].imshow(image.resize((256, 256), Image.Resampling.NEAREST))
    axes[0].set_title(question if len(question) < 40 else question[:37] + "...", fontsize=9)
    axes[1].imshow(overlay(image, attention))
    axes[1].set_title(f"where it looked ({attention.sum():.0%} of attention on the image)", fontsize=9)
    for ax in axes:
        ax.axis("off")
    fig.text(0.5, 0.02, f"untrained: {answers[0]!r}     trained: {answers[1]!r}", ha="center", fontsize=11)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    return fig, answers


# ----------------------------------------------------------------------------------------------
# The widget


def example_images() -> dict[str, Image.Image]:
    """Asset pictures plus held-out mini-cauldron images (never seen in training)."""
    from .weights import assets_dir

    images = {f"assets/{p.name}": Image.open(p).convert("RGB") for p in sorted((assets_dir() / "images").glob("*.png"))}
    try:
        from .data.cauldron import load_mini_cauldron

        for row in load_mini_cauldron("test", subsets=["shapes", "count", "position", "spatial"], max_per_subset=3):
            images[f"held-out {row['source']}: {row['texts'][0]['user'][:40]}"] = row["images"][0]
    except Exception as err:  # the panel still works with the asset pictures
        print(f"(mini-cauldron images unavailable: {err})")
    return images


def demo_panel(before, after, questions=("What colour is the circle?", "In which part of the image is the circle?",
                                          "How many shapes are there?", "Is the red shape left of the blue one?")):
    """ipywidgets: pick an image (or upload one), ask, compare. Falls back to one static figure without widgets."""
    images = example_images()
    try:
        import ipywidgets as widgets
        from IPython.display import display
    except ImportError:
        name = next(iter(images))
        return compare_answers(images[name], questions[0], before, after)[0]
    import matplotlib.pyplot as plt

    picker = widgets.Dropdown(options=list(images), description="image", layout=widgets.Layout(width="70%"))
    upload = widgets.FileUpload(accept="image/*", multiple=False, description="or upload")
    question = widgets.Combobox(value=questions[0], options=list(questions), description="question",
                                layout=widgets.Layout(width="70%"))
    ask = widgets.Button(description="Ask both models", button_style="primary")
    out = widgets.Output()

    def chosen_image():
        if upload.value:
            item = upload.value[0] if isinstance(upload.value, (list, tuple)) else next(iter(upload.value.values()))
            return Image.open(io.BytesIO(bytes(item["content"])))
        return images[picker.value]

    def on_ask(_=None):
        with out:
            out.clear_output(wait=True)
            try:
                fig, _ = compare_answers(chosen_image(), question.value, before, after)
                display(fig)
                plt.close(fig)  # displayed once, inside the panel
            except ValueError as err:  # e.g. an unreadable upload: say what is wrong
                print(f"could not answer: {err}")

    ask.on_click(on_ask)
    display(widgets.VBox([picker, upload, question, ask, out]))
    on_ask()

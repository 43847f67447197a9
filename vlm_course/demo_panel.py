"""The instructor demo's interactive panel: untrained vs trained answers, and where the answer looked.

    load_demo_checkpoint(folder)   the model `make demo` trained (ViT + projector + LoRA over the 4-bit base)
    image_attention(...)           how much the answer's first token attends to each image patch
    compare_answers(...)           one figure: the image, both answers, the attention overlay
    demo_panel(...)                ipywidgets: pick or upload an image, ask, see both models side by side
    scene_panel(before, after)     ipywidgets: the room composes a scene (up to four objects), asks, both answer

Attention weights are not returned by `scaled_dot_product_attention`, so `image_attention` recomputes them
for one query with forward hooks on each decoder layer's attention: softmax(q k^T / sqrt(d)) for the last
prompt position (the one that predicts the first answer token), averaged over heads and layers, read at
the image-token positions, and laid out on the pixel-shuffled grid (one token per r x r block of patches).
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .decoder import apply_rope, repeat_kv
from .processing import open_image, to_rgb
from .vlm import VisionLanguageModel, answer

# ----------------------------------------------------------------------------------------------
# Loading the demo's models


def load_demo_checkpoint(folder="runs/demo/checkpoint", profile: str = "smol"):
    """(trained model, processor) from the checkpoint `make demo` wrote; the 4-bit base is rebuilt offline.
    (`vlm_course.demo.load_checkpoint`, which the demo itself uses to measure what it saved.)"""
    from .demo import load_checkpoint

    return load_checkpoint(folder, profile)


def load_untrained(profile: str = "smol", checkpoint="runs/demo/checkpoint"):
    """The same architecture before training (random projector, fresh LoRA): the 'before' model."""
    from .demo import DemoRecipe, build_model, recipe_from_json

    recipe_file = Path(checkpoint) / "recipe.json"
    recipe = recipe_from_json(recipe_file) if recipe_file.exists() else DemoRecipe()
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
    blocks = model.config.block_grid_size**2
    image_weights = image_weights[:blocks * per_block].reshape(blocks, per_block).sum(-1)  # count tokens have no place
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


# ----------------------------------------------------------------------------------------------
# The scene composer: the room picks the objects, both models answer about the picture drawn from them


def png_bytes(image, size: int | None = None) -> bytes:
    """PNG bytes of a PIL image or of an (H, W, 3) float array in [0, 1] (an overlay), optionally resized."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray((np.clip(image, 0, 1) * 255).round().astype(np.uint8))
    if size is not None and image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.NEAREST)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def ask_scene(before, after, objects, question: str, seed: int = 0, max_new_tokens: int = 8) -> dict:
    """Draw the scene, ask both models, and measure where each answer looked.

    `before` and `after` are (model, processor) pairs; `objects` as for scene_composer.validate_scene. Bad input
    raises scene_composer.SceneError (a ValueError) before any model runs. Returns {"image", "shapes",
    "question", "answers": {"untrained", "trained"}, "attention": {...: (side, side) array}, "truth" (or None)}."""
    from .scene_composer import compose_scene, right_answer, validate_question, validate_scene

    scene = validate_scene(objects)
    question = validate_question(question)
    image, shapes = compose_scene(scene, seed)
    answers, attention = {}, {}
    for name, (model, processor) in (("untrained", before), ("trained", after)):
        answers[name] = answer(model, processor, image, question, max_new_tokens=max_new_tokens)
        attention[name] = image_attention(model, processor, image, question)
    return {"image": image, "shapes": shapes, "question": question, "answers": answers, "attention": attention,
            "truth": right_answer(scene, question)}


class SceneComposer:
    """The widget: object rows (shape, colour, cell), the drawn picture, a question, both models' answers.

    Every message (too many objects, two in one cell, an empty question, a model error) appears in the widget's
    message line; nothing raises into the notebook. `objects()`, `add_object()`, `remove_object(i)` and `ask()`
    are what the buttons call, so tests drive the panel without a browser."""

    IMAGE_PX = 192

    def __init__(self, before, after, seed: int = 0, initial=(("circle", "red", "top left"),
                                                               ("square", "blue", "center"))):
        import ipywidgets as widgets

        from . import scene_composer as sc

        self._widgets, self._sc = widgets, sc
        self.blank = png_bytes(Image.new("RGB", (1, 1), (238, 238, 238)), self.IMAGE_PX)  # no picture (yet)
        self.before, self.after, self.seed = before, after, seed
        self.rows: list = []
        self.rows_box = widgets.VBox()
        self.add_button = widgets.Button(description="add an object", icon="plus")
        self.add_button.add_class("vlm-composer-add")
        self.add_button.on_click(lambda _: self.add_object())
        self.picture = widgets.Image(format="png", width=self.IMAGE_PX, height=self.IMAGE_PX)
        self.scene_text = widgets.HTML(layout=widgets.Layout(width=f"{self.IMAGE_PX + 40}px"))
        self.scene_text.add_class("vlm-composer-scene")
        self.question = widgets.Combobox(placeholder="type a question, or pick one", description="question",
                                         ensure_option=False, layout=widgets.Layout(width="520px"))
        self.question.add_class("vlm-composer-question")
        self.ask_button = widgets.Button(description="Ask both models", button_style="primary")
        self.ask_button.add_class("vlm-composer-ask")
        self.ask_button.on_click(lambda _: self.ask())
        self.message = widgets.HTML()
        self.message.add_class("vlm-composer-message")
        self.columns = {}
        for name in ("untrained", "trained"):
            overlay_image = widgets.Image(format="png", width=self.IMAGE_PX, height=self.IMAGE_PX)
            text = widgets.HTML(f"<b>{name}</b>: press <i>Ask both models</i>")
            text.add_class(f"vlm-answer-{name}")
            self.columns[name] = (overlay_image, text)
        self.truth = widgets.HTML()
        self.truth.add_class("vlm-composer-truth")
        for spec in initial:
            self.add_object(*spec, refresh=False)
        self.refresh()
        self.question.value = next(iter(self.question.options), "")
        picture_column = widgets.VBox([widgets.HTML("<b>the picture</b> (64 px, as in training)"),
                                       self.picture, self.scene_text],
                                      layout=widgets.Layout(width=f"{self.IMAGE_PX + 40}px"))
        answer_columns = [widgets.VBox([widgets.HTML(f"<b>{name}</b>: where it looked"), image, text],
                                       layout=widgets.Layout(width=f"{self.IMAGE_PX + 40}px"))
                          for name, (image, text) in self.columns.items()]
        self.widget = widgets.VBox([
            widgets.HTML("<h3>Compose a scene</h3>up to four objects, one per cell of the 3 x 3 grid"),
            self.rows_box, self.add_button,
            widgets.HBox([picture_column] + answer_columns),
            self.question, widgets.HBox([self.ask_button, self.truth]), self.message,
        ])
        self.widget.add_class("vlm-composer")

    # the notebook shows the widget when the composer is a cell's last expression
    def _repr_mimebundle_(self, **kwargs):
        return self.widget._repr_mimebundle_(**kwargs)

    def add_object(self, shape=None, colour=None, position=None, refresh: bool = True):
        """A new object row; by default a shape, colour and cell not used yet (a fifth row is allowed so the
        message can say why it is one too many)."""
        widgets, sc = self._widgets, self._sc
        used = self.objects_raw()

        def unused(options, taken):
            return next((o for o in options if o not in taken), options[0])

        shape = shape or unused(sc.SHAPES, {o[0] for o in used})
        colour = colour or unused(sc.COLOURS, {o[1] for o in used})
        position = position or unused(("center",) + sc.POSITIONS, {o[2] for o in used})
        pickers = [widgets.Dropdown(options=options, value=value, layout=widgets.Layout(width=width))
                   for options, value, width in ((sc.SHAPES, shape, "120px"), (sc.COLOURS, colour, "110px"),
                                                 (sc.POSITIONS, position, "140px"))]
        remove = widgets.Button(description="remove", icon="trash", layout=widgets.Layout(width="100px"))
        row = widgets.HBox(pickers + [remove])
        row.add_class("vlm-composer-object")
        for picker in pickers:
            picker.observe(lambda _change: self.refresh(), names="value")
        remove.on_click(lambda _: self.remove_object(self.rows.index(row)))
        self.rows.append(row)
        self.rows_box.children = tuple(self.rows)
        if refresh:
            self.refresh()

    def remove_object(self, index: int):
        del self.rows[index]
        self.rows_box.children = tuple(self.rows)
        self.refresh()

    def objects_raw(self) -> list[tuple[str, str, str]]:
        return [tuple(picker.value for picker in row.children[:3]) for row in self.rows]

    def objects(self):
        """The scene as validated SceneObjects (raises SceneError)."""
        return self._sc.validate_scene(self.objects_raw())

    def _say(self, text: str, error: bool = False):
        import html

        colour = "#b00020" if error else "#1b5e20"
        self.message.value = f"<span style='color:{colour}'>{html.escape(text)}</span>" if text else ""

    def _clear_answers(self):
        for name, (image, text) in self.columns.items():
            image.value = self.blank
            text.value = f"<b>{name}</b>: press <i>Ask both models</i>"
        self.truth.value = ""

    def refresh(self):
        """Redraw the picture and the suggested questions after any change; say what is wrong, if anything."""
        import html

        self._clear_answers()
        try:
            scene = self.objects()
        except self._sc.SceneError as err:
            self.picture.value = self.blank
            self.scene_text.value = ""
            self._say(str(err), error=True)
            return
        image, _ = self._sc.compose_scene(scene, self.seed)
        self.picture.value = png_bytes(image, self.IMAGE_PX)
        self.scene_text.value = html.escape(self._sc.describe(scene))
        self.question.options = tuple(self._sc.suggested_questions(scene))
        self._say("")

    def ask(self) -> dict | None:
        """Both models answer the question about the drawn picture; a message instead for bad input."""
        import html

        self._clear_answers()
        self.ask_button.disabled = True
        self._say("asking both models ...")
        try:
            result = ask_scene(self.before, self.after, self.objects_raw(), self.question.value, self.seed)
        except ValueError as err:  # SceneError and the models' own input checks: say what to change
            self._say(str(err), error=True)
            return None
        except Exception as err:  # the room never sees a traceback; the message names the error
            self._say(f"could not answer ({type(err).__name__}: {err})", error=True)
            return None
        finally:
            self.ask_button.disabled = False
        truth = result["truth"]
        for name, (image, text) in self.columns.items():
            reply, weights = result["answers"][name], result["attention"][name]
            image.value = png_bytes(overlay(result["image"], weights, self.IMAGE_PX))
            mark = "" if truth is None else (" ✓" if reply == truth else " ✗")
            text.value = (f"<b>{name}</b>: <span class='vlm-answer-text'>{html.escape(reply) or '(nothing)'}</span>"
                          f"{mark}<br><small>{weights.sum():.0%} of attention on the image</small>")
        self.truth.value = "" if truth is None else f"right answer: <b>{html.escape(truth)}</b>"
        self._say(f"asked: {result['question']}")
        return result


def scene_panel(before, after, seed: int = 0) -> SceneComposer:
    """The scene composer for the room; the notebook displays it (it is the cell's last expression)."""
    return SceneComposer(before, after, seed)

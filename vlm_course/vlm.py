"""The vision-language model: a ViT, a projector and a decoder, glued at the image-token positions.

    pixel_values (N, 3, H, W) -> VisionEncoder -> (N, P, Dv) -> ModalityProjector -> (N, P / r^2, Dt)
    input_ids (B, T) with <image> placeholders -> token embeddings (B, T, Dt)
    splice: the i-th block of placeholders gets the i-th image's projected features
    -> Decoder -> logits (B, T, V); loss on the answer tokens only

The decoder's vocabulary stays as pretrained: the <image> id (appended by the tokenizer) is never looked
up in the embedding table (its positions are overwritten), and the LM head never predicts it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from . import weight_files
from .config import DecoderConfig, Profile, ProjectorConfig, VisionConfig, VLMConfig, get_profile
from .decoder import LLAMA_PREFIXES, Decoder, decoder_config_from_hf, llama_name_map
from .processing import IGNORE_INDEX
from .projector import ModalityProjector
from .vision import SIGLIP_PREFIXES, VisionEncoder, siglip_name_map, vision_config_from_hf

CONFIG_NAME, WEIGHTS_NAME = "config.json", "model.safetensors"


@dataclass
class VLMOutput:
    logits: torch.Tensor
    loss: torch.Tensor | None = None


def splice_image_features(
    token_embeds: torch.Tensor, input_ids: torch.Tensor, image_features: torch.Tensor, image_token_id: int
) -> torch.Tensor:
    """Write image features (N, P, D), in order, over the positions where input_ids == image_token_id."""
    is_image = input_ids == image_token_id
    num_slots, num_features = int(is_image.sum()), image_features.shape[0] * image_features.shape[1]
    if num_slots != num_features:
        raise ValueError(
            f"the text has {num_slots} image tokens but the {image_features.shape[0]} images give {num_features} "
            f"features ({image_features.shape[1]} each): every image needs exactly one block of image tokens "
            "(build inputs with the processor)"
        )
    # masked_scatter fills the True positions in row-major order: sample 0's images first, then sample 1's.
    features = image_features.reshape(-1, image_features.shape[-1]).to(token_embeds.dtype)
    return token_embeds.masked_scatter(is_image.unsqueeze(-1), features)


def answer_only_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy: position t predicts token t + 1; -100 labels (prompt, image, padding) are skipped.

    The labels are shifted left (the last position gets -100), not the logits: slicing logits[:, :-1] would
    copy a (B, T, vocab) tensor, ~100 MB for SmolLM2 at batch 8 x 64, forward and backward.
    """
    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX)


class VisionLanguageModel(nn.Module):
    def __init__(self, config: VLMConfig):
        super().__init__()
        self.config = config
        self.vision = VisionEncoder(config.vision)
        self.projector = ModalityProjector(config.projector, config.vision.hidden_size, config.decoder.hidden_size)
        self.decoder = Decoder(config.decoder)

    @property
    def image_token_id(self) -> int:
        if self.config.image_token_id is None:
            raise ValueError("config.image_token_id is unset: build a VLMProcessor with this config first")
        return self.config.image_token_id

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) -> (N, tokens_per_image, decoder width)."""
        return self.projector(self.vision(pixel_values))

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None) -> torch.Tensor:
        is_image = input_ids == self.image_token_id
        # The <image> id may lie outside the embedding table: look up a harmless id there instead.
        token_embeds = self.decoder.embed_tokens(input_ids.masked_fill(is_image, 0))
        if pixel_values is None or pixel_values.shape[0] == 0:
            if is_image.any():
                raise ValueError(f"the text has {int(is_image.sum())} image tokens but no images were given")
            return token_embeds
        return splice_image_features(token_embeds, input_ids, self.encode_images(pixel_values), self.image_token_id)

    def forward(self, input_ids, pixel_values=None, attention_mask=None, labels=None) -> VLMOutput:
        embeds = self.embed(input_ids, pixel_values)
        logits = self.decoder(inputs_embeds=embeds, attention_mask=attention_mask).logits
        loss = answer_only_loss(logits, labels) if labels is not None else None
        return VLMOutput(logits=logits, loss=loss)

    @torch.no_grad()
    def generate(self, input_ids, pixel_values=None, attention_mask=None, max_new_tokens: int = 32, **kwargs):
        """New tokens (B, <= max_new_tokens) for a left-padded batch; options as `decoder.generate`."""
        kwargs.setdefault("eos_token_id", self.config.decoder.eos_token_id)
        embeds = self.embed(input_ids, pixel_values)
        return self.decoder.generate(inputs_embeds=embeds, attention_mask=attention_mask,
                                     max_new_tokens=max_new_tokens, **kwargs)

    # -- building -----------------------------------------------------------------------------

    @classmethod
    def from_profile(cls, profile: str | Profile | None = None, load_weights: bool = True) -> "VisionLanguageModel":
        """A model per profile: pretrained vision/decoder weights where the profile names them."""
        profile = profile if isinstance(profile, Profile) else get_profile(profile)
        config = profile.config
        if load_weights and profile.vision_weights:
            vision = VisionEncoder.from_siglip(profile.vision_weights)
            config.vision = vision.cfg
        if load_weights and profile.decoder_weights:
            decoder = Decoder.from_llama(profile.decoder_weights)
            config.decoder = decoder.cfg
        model = cls(config)
        if load_weights and profile.vision_weights:
            model.vision = vision
        if load_weights and profile.decoder_weights:
            model.decoder = decoder
        return model

    @classmethod
    def from_idefics3(cls, path) -> "VisionLanguageModel":
        """Load a SmolVLM / Idefics3 checkpoint (one image tile, no splitting) through our name maps.

        The three parts map one to one: the SigLIP tower, the connector (Idefics3's pixel shuffle + one bias-free
        linear: our `ModalityProjector` with kind="linear"), and the Llama text model.
        """
        folder = weight_files.resolve(path)
        hf = weight_files.read_config(folder)
        if hf.get("model_type") not in ("idefics3", "smolvlm"):
            raise ValueError(f"{folder} is a {hf.get('model_type')!r} checkpoint, not Idefics3/SmolVLM")
        config = VLMConfig(
            vision=vision_config_from_hf(hf),
            projector=ProjectorConfig(shuffle_factor=hf.get("scale_factor", 2), kind="linear", bias=False),
            decoder=decoder_config_from_hf(hf),
            image_token_id=hf.get("image_token_id"),
            tokenizer=str(folder),
        )
        model = cls(config)
        parts = {  # our prefix: (name map, the checkpoint prefixes it may sit under)
            "vision.": (siglip_name_map(config.vision.num_layers), SIGLIP_PREFIXES),
            "decoder.": (llama_name_map(config.decoder.num_layers), LLAMA_PREFIXES),
            "projector.": ({"proj.weight": "connector.modality_projection.proj.weight"}, ("model.", "")),
        }
        tensors = {}
        for ours, (names, prefixes) in parts.items():
            part = weight_files.read_tensors(folder, names, prefixes, torch.float32)
            tensors.update({ours + k: v for k, v in part.items()})
        if not config.decoder.tie_word_embeddings:
            lm_head = weight_files.read_tensors(folder, {"w": "lm_head.weight"}, ("",), torch.float32)
            tensors["decoder.lm_head.weight"] = lm_head["w"]
        weight_files.load_mapped(model, tensors)
        return model.eval()

    # -- saving -------------------------------------------------------------------------------

    def save_pretrained(self, folder, trainable_only: bool = False) -> Path:
        """Write config.json + model.safetensors atomically: a temporary folder renamed into place.

        A save killed half-way leaves a `.<name>-*` temporary folder and, at worst (killed between the two
        renames), the previous model in `.<name>-old`: `recover_interrupted_save` puts that back and removes
        the temporaries; it runs first here, and `python -m vlm_course train` runs it when it starts.
        """
        folder = Path(folder)
        folder.parent.mkdir(parents=True, exist_ok=True)
        recover_interrupted_save(folder)
        state = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        if self.config.decoder.tie_word_embeddings:
            state.pop("decoder.lm_head.weight", None)  # the same tensor as the embeddings
        if trainable_only:
            trainable = {n for n, p in self.named_parameters() if p.requires_grad}
            state = {k: v for k, v in state.items() if k in trainable}
        tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}-"))
        try:
            self.config.save(tmp / CONFIG_NAME)
            save_file(state, tmp / WEIGHTS_NAME,
                      metadata={"format": "pt", "library": "vlm_course", DIGEST_KEY: tensors_digest(state)})
            if folder.exists():
                old = folder.with_name(f".{folder.name}-old")
                shutil.rmtree(old, ignore_errors=True)
                os.replace(folder, old)
                os.replace(tmp, folder)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return folder

    @classmethod
    def from_pretrained(cls, folder, dtype: torch.dtype = torch.float32) -> "VisionLanguageModel":
        folder = Path(folder)
        if not (folder / CONFIG_NAME).exists() or not (folder / WEIGHTS_NAME).exists():
            old = folder.with_name(f".{folder.name}-old")
            hint = (f"; a save was interrupted and the previous model is in {old}: saving again, or "
                    "`python -m vlm_course train --resume`, puts it back" if (old / WEIGHTS_NAME).exists() else "")
            raise FileNotFoundError(
                f"{folder} is not a saved VisionLanguageModel (needs {CONFIG_NAME} and {WEIGHTS_NAME}); "
                f"save one with model.save_pretrained(folder){hint}"
            )
        config = read_config_file(folder / CONFIG_NAME)
        state = read_weights(folder / WEIGHTS_NAME)
        check_config_against_weights(config, state, folder)
        model = cls(config)
        result = model.load_state_dict(state, strict=False)
        missing = [k for k in result.missing_keys if k != "decoder.lm_head.weight"]
        if missing or result.unexpected_keys:
            raise ValueError(
                f"{folder} does not match its config: missing {missing[:5]}, unexpected {result.unexpected_keys[:5]}"
            )
        return model.to(dtype).eval()

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in {id(p): p for p in self.parameters()}.values())


def _type_ok(value, annotation: str) -> bool:
    """Does a JSON value fit a dataclass field annotation (the plain types configs use)?"""
    for option in (a.strip() for a in annotation.split("|")):
        if option == "None" and value is None:
            return True
        if option == "bool" and isinstance(value, bool):
            return True
        if option == "int" and isinstance(value, int) and not isinstance(value, bool):
            return True
        if option == "float" and isinstance(value, (int, float)) and not isinstance(value, bool):
            return True
        if option == "str" and isinstance(value, str):
            return True
        if option.startswith("tuple[") and isinstance(value, (list, tuple)):
            inner = option[len("tuple["):-1].split(",")[0].strip()
            return all(_type_ok(v, inner) for v in value)
    return False


# Keys added to the configs after models were first saved, with defaults that do what the course did before
# them: a config.json without them was written by an earlier version and loads as it did. Any other missing key
# is an error (its default may differ from the saved model). Add a key here when adding a config field.
CONFIG_KEYS_ADDED_LATER = {"image_layout", "projector.tokens_per_block", "projector.count_labels"}


def config_problems(data, cls=VLMConfig, where: str = "") -> list[str]:
    """Every missing key, unknown key and wrongly typed value of a config dict, checked against the dataclasses."""
    import dataclasses

    if not isinstance(data, dict):
        return [f"{where or 'the file'} should be a JSON object, got {type(data).__name__}"]
    problems = []
    fields = {f.name: f for f in dataclasses.fields(cls)}
    sections = {"vision": VisionConfig, "projector": ProjectorConfig, "decoder": DecoderConfig}
    for name in sorted(set(data) - set(fields)):
        problems.append(f"unknown key {where}{name!r}")
    for name, f in fields.items():
        if name not in data:
            if f"{where}{name}" in CONFIG_KEYS_ADDED_LATER:
                continue
            problems.append(f"missing {'section' if not where and name in sections else 'key'} {where}{name!r}")
        elif not where and name in sections:
            problems += config_problems(data[name], sections[name], f"{name}.")
        elif not _type_ok(data[name], str(f.type)):
            problems.append(f"{where}{name} should be {f.type}, got {data[name]!r}")
    return problems


def read_config_file(path) -> VLMConfig:
    """A saved config.json, checked: truncated JSON, missing sections or keys, unknown keys and wrong types are
    named, with the file, instead of falling back to defaults that differ from the saved model."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}): cut short or edited by hand? Restore it, or save the "
                         "model again (model.save_pretrained writes it)") from err
    problems = config_problems(data)
    if problems:
        shown = "; ".join(problems[:6]) + (f"; and {len(problems) - 6} more" if len(problems) > 6 else "")
        raise ValueError(f"{path} is not a valid vlm_course VLMConfig: {shown}. Fix these entries (a config.json "
                         "written by save_pretrained has every key), or restore the file saved with the weights")
    try:
        return VLMConfig.from_dict(data)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path}: {err}") from err


def check_config_against_weights(config: VLMConfig, state: dict, folder) -> None:
    """The config must describe these weights: same shapes, and an LM head saved exactly when it is not tied."""
    with torch.device("meta"):  # shapes only: no memory, no random init
        expected = {k: tuple(v.shape) for k, v in VisionLanguageModel(config).state_dict().items()}
    wrong = [f"{k}: config {expected[k]}, weights {tuple(v.shape)}" for k, v in state.items()
             if k in expected and expected[k] != tuple(v.shape)]
    if wrong:
        raise ValueError(f"{folder / CONFIG_NAME} does not belong to {folder / WEIGHTS_NAME} ({len(wrong)} shape "
                         f"mismatches, e.g. {wrong[0]}): keep the config.json that was saved with the weights")
    has_head = "decoder.lm_head.weight" in state
    if not config.decoder.tie_word_embeddings and not has_head:
        raise ValueError(f"{folder / CONFIG_NAME} says decoder.tie_word_embeddings is false, but {WEIGHTS_NAME} has "
                         "no decoder.lm_head.weight: the model was saved with its LM head tied to the embeddings "
                         "(the head would be random). Set tie_word_embeddings back to true")
    if config.decoder.tie_word_embeddings and has_head and "decoder.embed_tokens.weight" in state and not torch.equal(
            state["decoder.lm_head.weight"], state["decoder.embed_tokens.weight"]):
        raise ValueError(f"{folder / CONFIG_NAME} says decoder.tie_word_embeddings is true, but {WEIGHTS_NAME} holds "
                         "an LM head of its own: the model was saved untied. Set tie_word_embeddings back to false")


DIGEST_KEY = "vlm_course.sha256"  # safetensors metadata: sha256 over every tensor's name, dtype, shape and bytes


def tensors_digest(state: dict[str, torch.Tensor]) -> str:
    """sha256 of a state dict (names in sorted order, with dtype, shape and raw bytes): stored in the file's
    header when saving, recomputed when loading, so flipped bytes inside the tensors are caught. It costs one
    hashing pass over the weights (measured in docs/reliability.md)."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}|{tensor.dtype}|{tuple(state[name].shape)}|".encode())
        digest.update(tensor.view(torch.uint8).numpy().data if tensor.numel() else b"")
    return digest.hexdigest()


def read_weights(path, what_to_do: str | None = None) -> dict[str, torch.Tensor]:
    """load_file, with an error that names the file and says what to do when it is empty, cut short, foreign, or
    its tensors no longer match the checksum recorded when it was saved."""
    path = Path(path)
    size = path.stat().st_size
    fix = what_to_do or ("Save the model again (model.save_pretrained, or `python -m vlm_course train` writes "
                         "<output>/model), or copy the file again from where it came from")
    try:
        state = load_file(path)
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
    except Exception as err:  # safetensors raises its own types (SafetensorError) and OSError for bad files
        what = "is empty (0 bytes)" if size == 0 else f"is not a readable safetensors file ({size} bytes: {err})"
        raise ValueError(
            f"{path} {what}: it was probably cut short by a crash or a full disk, or copied partially. {fix}"
        ) from err
    if DIGEST_KEY in metadata and tensors_digest(state) != metadata[DIGEST_KEY]:
        raise ValueError(f"{path} is corrupt: its tensors differ from the checksum recorded when it was saved (bytes "
                         f"changed on disk or in a copy). {fix}")
    return state


def _is_save_temporary(path: Path) -> bool:
    """A folder save_pretrained makes: only config.json / model.safetensors (or nothing) inside."""
    return path.is_dir() and not path.is_symlink() and all(
        p.name in (CONFIG_NAME, WEIGHTS_NAME) and p.is_file() for p in path.iterdir())


def recover_interrupted_save(folder) -> list[Path]:
    """Undo what a killed save_pretrained(folder) left behind; returns the folders removed.

    If the save died between its two renames, `folder` is missing and `.<name>-old` holds the previous complete
    model: it is put back. Then every `.<name>-*` temporary folder (holding nothing but config.json and
    model.safetensors) is removed.
    """
    folder = Path(folder)
    parent = folder.parent
    if not parent.is_dir():
        return []
    old = parent / f".{folder.name}-old"
    if not folder.exists() and (old / CONFIG_NAME).is_file() and (old / WEIGHTS_NAME).is_file():
        os.replace(old, folder)
    removed = []
    for stale in parent.glob(f".{folder.name}-*"):
        if _is_save_temporary(stale):
            shutil.rmtree(stale, ignore_errors=True)
            removed.append(stale)
    return removed


@torch.no_grad()
def answer(model: VisionLanguageModel, processor, images, questions, max_new_tokens: int = 24, **kwargs) -> list[str]:
    """Answer a batch of questions (one image or list of images each); greedy unless temperature > 0."""
    single = isinstance(questions, str)
    batch = processor(images, questions)
    device = next(model.parameters()).device
    new_tokens = model.generate(
        batch["input_ids"].to(device), batch["pixel_values"].to(device), batch["attention_mask"].to(device),
        max_new_tokens=max_new_tokens, eos_token_id=processor.eos_token_id, pad_token_id=processor.pad_token_id,
        **kwargs,
    )
    answers = processor.batch_decode(new_tokens)
    return answers[0] if single else answers

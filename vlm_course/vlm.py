"""The vision-language model: a ViT, a projector and a decoder, glued at the image-token positions.

    pixel_values (N, 3, H, W) -> VisionEncoder -> (N, P, Dv) -> ModalityProjector -> (N, P / r^2, Dt)
    input_ids (B, T) with <image> placeholders -> token embeddings (B, T, Dt)
    splice: the i-th block of placeholders gets the i-th image's projected features
    -> Decoder -> logits (B, T, V); loss on the answer tokens only

The decoder's vocabulary stays as pretrained: the <image> id (appended by the tokenizer) is never looked
up in the embedding table (its positions are overwritten), and the LM head never predicts it. Only Idefics3's
layout (image_layout="idefics3") needs rows for new tokens, its wrappers: `resize_vocabulary` adds them.

Why one file past 500 lines: the model and the two checkpoint formats it reads and writes (the course's own, and
Idefics3/SmolVLM's with its name map in both directions) are kept together, as nanoVLM keeps its model and loaders.
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

from . import connectors, weight_files  # noqa: F401  (importing connectors registers linear, mlp, perceiver)
from .config import (
    DecoderConfig,
    FusionConfig,
    HighResConfig,
    Profile,
    ProjectorConfig,
    VisionConfig,
    VLMConfig,
    get_profile,
)
from .decoder import LLAMA_PREFIXES, Decoder, decoder_config_from_hf, generate, llama_name_map
from .dual_vision import DualProjector, DualVisionEncoder
from .fusion import splice_image_features  # noqa: F401  (registers the fusion kinds; splice is the autoregressive one)
from .processing import IGNORE_INDEX, VLMProcessor
from .registry import build_connector, build_decoder, build_fusion, build_vision
from .vision import SIGLIP_PREFIXES, VisionEncoder, siglip_name_map, vision_config_from_hf

CONFIG_NAME, WEIGHTS_NAME = "config.json", "model.safetensors"


@dataclass
class VLMOutput:
    logits: torch.Tensor
    loss: torch.Tensor | None = None


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
        # Each part is built by the kind its config names (vlm_course.registry): "siglip", "linear", "llama" and
        # "autoregressive" by default, today's model. The fusion comes last, so the others draw the same random
        # initialisation as before it existed.
        self.vision = build_vision(config.vision)
        self.projector = build_connector(config.projector, config.vision.hidden_size, config.decoder.hidden_size)
        self.decoder = build_decoder(config.decoder)
        self.fusion = build_fusion(config.fusion, config.decoder)
        if config.high_res is not None:  # Vary-toy's second, high-resolution branch: vlm_course/dual_vision.py
            self.vision, self.projector = DualVisionEncoder.from_config(config), DualProjector.from_config(config)

    @property
    def image_token_id(self) -> int:
        if self.config.image_token_id is None:
            raise ValueError("config.image_token_id is unset: build a VLMProcessor with this config first")
        return self.config.image_token_id

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) -> (N, tokens_per_image, decoder width)."""
        return self.projector(self.vision(pixel_values))

    def token_embeddings(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The decoder's embeddings of the text tokens; <image> positions get a placeholder (row 0) that the fusion
        overwrites."""
        is_image = input_ids == self.image_token_id
        # The <image> id may lie outside the embedding table: look up a harmless id there instead.
        ids = input_ids.masked_fill(is_image, 0)
        rows = self.decoder.embed_tokens.num_embeddings
        if ids.numel() and int(ids.max()) >= rows:
            raise ValueError(
                f"token id {int(ids.max())} is outside the decoder's embedding table ({rows} rows): the tokenizer has "
                "tokens the decoder cannot read (image_layout='idefics3' adds <fake_token_around_image>); grow the "
                "table with model.resize_vocabulary(len(processor.tokenizer)) before training")
        return self.decoder.embed_tokens(ids)

    def prepare(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None):
        """(input embeddings, the decoder to run them through), as the fusion decides: fully autoregressive, the
        image features spliced over the <image> tokens and the decoder itself; cross-attention, the text with one
        marker per image and the decoder with gated blocks reading the images (vlm_course/fusion.py)."""
        return self.fusion.prepare(self, input_ids, pixel_values)

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None) -> torch.Tensor:
        """The decoder's input embeddings (fully autoregressive: with the image features spliced in)."""
        return self.prepare(input_ids, pixel_values)[0]

    def forward(self, input_ids, pixel_values=None, attention_mask=None, labels=None) -> VLMOutput:
        embeds, decoder = self.prepare(input_ids, pixel_values)
        logits = decoder(inputs_embeds=embeds, attention_mask=attention_mask).logits
        loss = answer_only_loss(logits, labels) if labels is not None else None
        return VLMOutput(logits=logits, loss=loss)

    @torch.no_grad()
    def generate(self, input_ids, pixel_values=None, attention_mask=None, max_new_tokens: int = 32, **kwargs):
        """New tokens (B, <= max_new_tokens) for a left-padded batch; options as `decoder.generate`."""
        kwargs.setdefault("eos_token_id", self.config.decoder.eos_token_id)
        embeds, decoder = self.prepare(input_ids, pixel_values)
        return generate(decoder, inputs_embeds=embeds, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                        **kwargs)

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

    def resize_vocabulary(self, num_tokens: int) -> "VisionLanguageModel":
        """Grow the decoder's embedding table (and an untied LM head) to `num_tokens` rows, for tokens a tokenizer
        added (image_layout="idefics3" adds <fake_token_around_image> and <end_of_utterance>). The new rows start as
        the mean of the old ones, as transformers' resize_token_embeddings does, and train with the table (if it
        trains: a frozen table keeps them as they are, the same in our model and in an Idefics3 save)."""
        decoder = self.decoder
        old = decoder.embed_tokens.weight
        if num_tokens < old.shape[0]:
            raise ValueError(f"resize_vocabulary only grows the table: it has {old.shape[0]} rows, asked for {num_tokens}")
        if num_tokens == old.shape[0]:
            return self
        tied = self.config.decoder.tie_word_embeddings
        with torch.no_grad():
            extra = old.mean(0, keepdim=True).expand(num_tokens - old.shape[0], -1)
            embed = nn.Embedding(num_tokens, old.shape[1], device=old.device, dtype=old.dtype)
            embed.weight.copy_(torch.cat([old, extra]))
            head = nn.Linear(old.shape[1], num_tokens, bias=False, device=old.device, dtype=old.dtype)
            if tied:
                head.weight = embed.weight
            else:
                w = decoder.lm_head.weight
                head.weight.copy_(torch.cat([w, w.mean(0, keepdim=True).expand(num_tokens - w.shape[0], -1)]))
        embed.weight.requires_grad_(old.requires_grad)
        decoder.embed_tokens, decoder.lm_head = embed, head
        self.config.decoder.vocab_size = decoder.cfg.vocab_size = num_tokens
        return self

    @classmethod
    def from_idefics3(cls, path) -> "VisionLanguageModel":
        """Load a SmolVLM / Idefics3 checkpoint through our name maps.

        The three parts map one to one: the SigLIP tower, the connector (Idefics3's pixel shuffle + one bias-free
        linear: our `ModalityProjector` with kind="linear"), and the Llama text model. The prompt layout is
        Idefics3's (image_layout="idefics3"). The saved image processor (preprocessor_config.json, or the
        "image_processor" of processor_config.json as transformers 5 writes it) gives the pixel normalisation and
        the image splitting: with do_image_splitting the course's processor cuts each image into tiles of the
        encoder's size plus a global view and writes the <row_i_col_j> layout (`vlm_course.image_splitting`); the
        model reads every view as an image, tiles and global view in the prompt's order, as
        Idefics3ForConditionalGeneration does. No image processor saved: one view per image.
        `save_idefics3` writes the same names (`idefics3_name_map`).
        """
        folder = weight_files.resolve(path)
        hf = weight_files.read_config(folder)
        if hf.get("model_type") not in ("idefics3", "smolvlm"):
            raise ValueError(f"{folder} is a {hf.get('model_type')!r} checkpoint, not Idefics3/SmolVLM")
        vision = vision_config_from_hf(hf)
        pre = read_idefics3_image_processor(folder)
        if pre:  # the normalisation constants travel with the checkpoint
            vision.image_mean = tuple(pre.get("image_mean", vision.image_mean))
            vision.image_std = tuple(pre.get("image_std", vision.image_std))
        splitting, longest_edge = idefics3_splitting(pre, vision.image_size, folder)
        config = VLMConfig(
            vision=vision,
            projector=ProjectorConfig(shuffle_factor=hf.get("scale_factor", 2), kind="linear", bias=False),
            decoder=decoder_config_from_hf(hf),
            image_token_id=hf.get("image_token_id"),
            tokenizer=str(folder),
            image_layout="idefics3",
            image_splitting=splitting,
            split_longest_edge=longest_edge,
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

    def idefics3_problems(self, processor: VLMProcessor | None = None) -> list[str]:
        """What in this model Idefics3 (transformers' Idefics3ForConditionalGeneration) cannot express, each with
        what to do; empty when `save_idefics3` can write it."""
        cfg, problems = self.config, []
        if cfg.projector.tokens_per_block != 1:
            problems.append(f"{cfg.projector.tokens_per_block} tokens per pixel-shuffled block (projector."
                            "tokens_per_block): Idefics3's connector writes one token per block; train with "
                            "tokens_per_block=1")
        if cfg.projector.count_labels:
            problems.append(f"count tokens after the blocks (projector.count_labels, {len(cfg.projector.count_labels)} "
                            "labels): Idefics3 has no counter; train with count_labels=()")
        if cfg.projector.kind != "linear":
            problems.append(f"a {cfg.projector.kind!r} projector: Idefics3's connector is one linear layer; train with "
                            "kind='linear'")
        if cfg.projector.bias:
            problems.append("a projector bias: Idefics3's connector linear has none; train with "
                            "ProjectorConfig(bias=False)")
        if cfg.image_layout != "idefics3":
            what = {"grid": "block-place words in the prompt (image_layout='grid')",
                    "plain": "a bare run of <image> tokens (image_layout='plain')"}.get(cfg.image_layout,
                                                                                        repr(cfg.image_layout))
            problems.append(f"{what}: transformers' Idefics3Processor wraps each image as <fake_token_around_image>"
                            "<global-img><image>...<fake_token_around_image>, so the model would read prompts it was "
                            "not trained on; train with image_layout='idefics3'")
        fusion = getattr(cfg.fusion, "kind", "autoregressive")
        if fusion != "autoregressive":
            problems.append(f"fusion kind {fusion!r}: Idefics3 reads the image tokens in the decoder's input sequence "
                            "only and has no place for gated cross-attention blocks; train with "
                            "fusion.kind='autoregressive'")
        if cfg.high_res is not None:
            problems.append("a second, high-resolution vision branch (config.high_res): Idefics3 has one vision tower "
                            "and one connector; train a single-branch model (high_res=None), or use image splitting "
                            "(image_splitting=True) for detail, which Idefics3 has")
        mapped = set(idefics3_name_map(cfg))
        lora = [k for k in self.state_dict() if "lora_" in k]
        explained = ("fusion.", "vision.", "projector.") if cfg.high_res is not None else ("fusion.",)
        other = [k for k in self.state_dict() if k not in mapped and "lora_" not in k and not k.startswith(explained)
                 and not (k == "decoder.lm_head.weight" and cfg.decoder.tie_word_embeddings)]
        if lora:
            problems.append(f"LoRA adapters ({len(lora)} tensors, e.g. {lora[0]}): merge them into the weights first "
                            "(vlm_course.deploy.merge_lora_adapters(model))")
        if other:
            problems.append(f"tensors Idefics3 has no place for ({len(other)}, e.g. {other[0]}; 4-bit layers?): "
                            "dequantise and merge first (vlm_course.deploy.merge_lora_adapters(model))")
        if processor is not None and len(processor.tokenizer) > cfg.decoder.vocab_size:
            problems.append(f"the tokenizer has {len(processor.tokenizer)} tokens but the decoder's table "
                            f"{cfg.decoder.vocab_size} rows: transformers embeds every id, so grow the table with "
                            "model.resize_vocabulary(len(processor.tokenizer)) (and train with it)")
        return problems

    def save_idefics3(self, folder, processor: VLMProcessor | None = None) -> Path:
        """Write a transformers Idefics3 (SmolVLM-architecture) checkpoint: the reverse of `from_idefics3`.

        The folder holds config.json, generation_config.json, model.safetensors with transformers' names
        (`idefics3_name_map`), the tokenizer, and the processor (processor_config.json, which holds the image
        processor, and chat_template.jinja), so `Idefics3ForConditionalGeneration.from_pretrained(folder)` and
        `AutoProcessor.from_pretrained(folder)` load it with no remote code, and the processor's chat template
        writes the course's ChatML prompt with the processor's system prompt.

        The prompt layout. Idefics3 puts an unsplit image in the text as <fake_token_around_image><global-img>
        <image> x N <fake_token_around_image>; the course's default layouts ("plain", "grid") do not. We do not map
        one onto the other: the wrappers are extra positions (they shift every later position's RoPE angle and are
        attended to), so no choice of weights makes a model trained without them answer the same with them.
        Instead the course's processor builds Idefics3's layout itself (VLMConfig.image_layout="idefics3", which
        `from_idefics3` also sets); a model is trained and evaluated with that layout, and its prompts are then
        the same ids transformers' processor builds (<fake_token_around_image> and <global-img> are single special
        tokens, as in SmolVLM's tokenizer; `resize_vocabulary` gives them rows). The image processor is set to one tile (no splitting, so no
        <row_i_col_j> tokens) at the encoder's size, bicubic, with the course's normalisation: square pictures of
        any size give our pixel values exactly; a non-square one is resized twice there (longest edge, then
        squashed to a square) and once here, so its pixels differ slightly (~0.006 on average on the [-1, 1]
        scale). With image splitting on (VLMConfig.image_splitting) the image processor splits as the course's
        processor does, at the same longest edge and tile size with the same bicubic PIL calls, so every tile and the
        global view get our pixel values exactly. Models in another layout are refused, as are features
        Idefics3 cannot express (two tokens per block, count tokens, a projector bias or MLP, unmerged LoRA or
        4-bit layers): `idefics3_problems` names each and what to do.

        processor: the course processor whose tokenizer and system prompt go with the model (default: one built
        from the model's config). Its tokenizer must fit the decoder's table (`resize_vocabulary`).
        """
        from transformers import GenerationConfig, Idefics3Config, Idefics3ImageProcessor, Idefics3Processor

        processor = processor or VLMProcessor.from_config(self.config)
        problems = self.idefics3_problems(processor)
        if problems:
            raise ValueError("this model cannot be saved as Idefics3, which cannot express: "
                             + "; ".join(f"({i + 1}) {p}" for i, p in enumerate(problems)))
        cfg, tokenizer = self.config, processor.tokenizer
        vision, dec = cfg.vision, cfg.decoder
        eos = processor.eos_token_id
        hf_config = Idefics3Config(
            vision_config=dict(hidden_size=vision.hidden_size, intermediate_size=vision.intermediate_size,
                               num_hidden_layers=vision.num_layers, num_attention_heads=vision.num_heads,
                               num_channels=vision.num_channels, image_size=vision.image_size,
                               patch_size=vision.patch_size, hidden_act="gelu_pytorch_tanh",
                               layer_norm_eps=vision.layer_norm_eps),
            # "VLlama3ForCausalLM" as in SmolVLM's own config.json: llama.cpp's converter picks its text model by it
            text_config=dict(model_type="llama", architectures=["VLlama3ForCausalLM"], vocab_size=dec.vocab_size, hidden_size=dec.hidden_size,
                             intermediate_size=dec.intermediate_size, num_hidden_layers=dec.num_layers,
                             num_attention_heads=dec.num_heads, num_key_value_heads=dec.num_kv_heads,
                             head_dim=dec.head_dim, rms_norm_eps=dec.rms_norm_eps,
                             max_position_embeddings=dec.max_position_embeddings,
                             rope_parameters={"rope_type": "default", "rope_theta": dec.rope_theta},
                             hidden_act="silu", attention_bias=False, mlp_bias=False,
                             tie_word_embeddings=dec.tie_word_embeddings, bos_token_id=dec.bos_token_id,
                             eos_token_id=eos, pad_token_id=processor.pad_token_id),
            scale_factor=cfg.projector.shuffle_factor, image_token_id=processor.image_token_id,
            tie_word_embeddings=dec.tie_word_embeddings, pad_token_id=processor.pad_token_id,
            architectures=["Idefics3ForConditionalGeneration"],
        )
        names = idefics3_name_map(cfg)
        state = self.state_dict()
        tensors = {names[k]: state[k].detach().to(torch.float32).contiguous().clone() for k in names}
        longest_edge = cfg.image_longest_edge if cfg.image_splitting else vision.image_size
        image_processor = Idefics3ImageProcessor(  # resample 3: bicubic
            do_convert_rgb=True, do_resize=True, size={"longest_edge": longest_edge},
            max_image_size={"longest_edge": vision.image_size}, do_image_splitting=cfg.image_splitting, resample=3,
            do_rescale=True, rescale_factor=1 / 255, do_normalize=True, image_mean=list(vision.image_mean),
            image_std=list(vision.image_std), do_pad=True)
        hf_processor = Idefics3Processor(image_processor, tokenizer, image_seq_len=cfg.image_tokens_per_image,
                                         chat_template=chatml_template(processor.system_prompt))
        folder = Path(folder)
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}-idefics3-"))
        try:
            hf_config.save_pretrained(tmp)
            GenerationConfig(bos_token_id=dec.bos_token_id, eos_token_id=eos, pad_token_id=processor.pad_token_id
                             ).save_pretrained(tmp)
            save_file(tensors, tmp / WEIGHTS_NAME, metadata={"format": "pt"})
            hf_processor.save_pretrained(tmp)
            if folder.exists():  # replace an earlier save, never a folder holding anything else
                written = {p.name for p in tmp.iterdir()}
                others = sorted(p.name for p in folder.iterdir() if p.name not in written) if folder.is_dir() else [""]
                if others:
                    raise FileExistsError(f"{folder} exists and holds other things ({others[:3]}): save_idefics3 "
                                          "replaces only an earlier Idefics3 save; pick a new or empty folder")
                shutil.rmtree(folder)
            os.replace(tmp, folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return folder

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


def idefics3_name_map(config: VLMConfig) -> dict[str, str]:
    """Our state-dict name -> transformers' Idefics3ForConditionalGeneration name, for every tensor save_idefics3
    writes (from_idefics3 reads the same names). Inside each part the names are the part's own map; the model
    adds where each part sits, as nanoVLM's conversion to Idefics3 spells it out:

        vision.<siglip name>            -> model.vision_model.<siglip name>
        projector.proj.weight           -> model.connector.modality_projection.proj.weight
        decoder.<llama name>            -> model.text_model.<llama name>
        decoder.lm_head.weight          -> lm_head.weight          (untied heads only: a tied head is the embeddings)
    """
    names = {f"vision.{ours}": f"model.vision_model.{theirs}"
             for ours, theirs in siglip_name_map(config.vision.num_layers).items()}
    names["projector.proj.weight"] = "model.connector.modality_projection.proj.weight"
    names.update({f"decoder.{ours}": f"model.text_model.{theirs}"
                  for ours, theirs in llama_name_map(config.decoder.num_layers).items()})
    if not config.decoder.tie_word_embeddings:
        names["decoder.lm_head.weight"] = "lm_head.weight"
    return names


def read_idefics3_image_processor(folder: Path) -> dict:
    """The image processor's settings saved with an Idefics3 checkpoint: preprocessor_config.json (SmolVLM's
    checkpoints, transformers 4), else processor_config.json's "image_processor" (transformers 5); {} if neither."""
    if (folder / "preprocessor_config.json").exists():
        return json.loads((folder / "preprocessor_config.json").read_text())
    if (folder / "processor_config.json").exists():
        return json.loads((folder / "processor_config.json").read_text()).get("image_processor", {})
    return {}


def idefics3_splitting(image_processor: dict, tile_size: int, folder=None) -> tuple[bool, int | None]:
    """(image_splitting, split_longest_edge) for VLMConfig from a saved Idefics3 image processor: transformers'
    defaults when a key is missing (do_image_splitting True, size 4 x 364); an empty dict (none saved) means no
    splitting. The tiles must be the encoder's size: the course reads every view at vision.image_size."""
    if not image_processor or not image_processor.get("do_image_splitting", True):
        return False, None
    tile = image_processor.get("max_image_size", {}).get("longest_edge", 364)
    if tile != tile_size:
        raise ValueError(f"the image processor saved with {folder or 'the checkpoint'} splits images into {tile} px "
                         f"tiles but the vision encoder reads {tile_size} px: the course reads each tile at the "
                         "encoder's size; set max_image_size to it (or do_image_splitting to false) in the saved "
                         "processor config")
    return True, image_processor.get("size", {}).get("longest_edge", 4 * 364)


def chatml_template(system_prompt: str | None) -> str:
    """The course's ChatML prompt as a transformers chat template (for the saved processor): the system turn
    (the processor's prompt unless the messages bring their own), each turn as <|im_start|>role\\n...<|im_end|>\\n,
    an image part written as <image> (the processor expands it), and <|im_start|>assistant\\n to generate."""
    system = "" if system_prompt is None else (
        "{%- if messages[0]['role'] != 'system' -%}"
        "{{ '<|im_start|>system\\n' + " + json.dumps(system_prompt) + " + '<|im_end|>\\n' }}{%- endif -%}")
    return (system
            + "{%- for message in messages -%}{{ '<|im_start|>' + message['role'] + '\\n' }}"
            "{%- if message['content'] is string -%}{{ message['content'] }}{%- else -%}"
            "{%- for part in message['content'] -%}{%- if part['type'] == 'image' -%}{{ '<image>' }}"
            "{%- elif part['type'] == 'text' -%}{{ part['text'] }}{%- endif -%}{%- endfor -%}{%- endif -%}"
            "{{ '<|im_end|>\\n' }}{%- endfor -%}"
            "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}")


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
CONFIG_KEYS_ADDED_LATER = {"image_layout", "projector.tokens_per_block", "projector.count_labels", "high_res",
                           # the parts' kinds (vlm_course.registry) and the perceiver's and fusion's settings
                           "vision.kind", "decoder.kind", "projector.num_queries", "projector.resampler_layers",
                           "projector.resampler_heads", "fusion"}
CONFIG_KEYS_ADDED_LATER |= {"image_splitting", "split_longest_edge"}  # image splitting
CONFIG_KEYS_ADDED_LATER |= {"projector.counter_hidden_size"}  # neighbourhood classifiers in the counter


def config_problems(data, cls=VLMConfig, where: str = "") -> list[str]:
    """Every missing key, unknown key and wrongly typed value of a config dict, checked against the dataclasses."""
    import dataclasses

    if not isinstance(data, dict):
        return [f"{where or 'the file'} should be a JSON object, got {type(data).__name__}"]
    problems = []
    fields = {f.name: f for f in dataclasses.fields(cls)}
    sections = {"vision": VisionConfig, "projector": ProjectorConfig, "decoder": DecoderConfig,
                "fusion": FusionConfig}
    for name in sorted(set(data) - set(fields)):
        problems.append(f"unknown key {where}{name!r}")
    for name, f in fields.items():
        if name not in data:
            if f"{where}{name}" in CONFIG_KEYS_ADDED_LATER:
                continue
            problems.append(f"missing {'section' if not where and name in sections else 'key'} {where}{name!r}")
        elif not where and name in sections:
            problems += config_problems(data[name], sections[name], f"{name}.")
        elif f"{where}{name}" in ("high_res", "high_res.vision") and isinstance(data[name], dict):
            problems += config_problems(data[name], HighResConfig if name == "high_res" else VisionConfig, f"{where}{name}.")
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

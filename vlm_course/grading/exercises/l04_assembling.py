"""Lesson 04, assembling the VLM: splice_image_features, make_labels, answer_loss.

References: vlm_course.vlm.splice_image_features and answer_only_loss; make_labels reproduces the labels of
vlm_course.processing.VLMProcessor.encode_conversation from the token ids alone (tests/test_grading_l03_l04.py
checks that they agree). Mutants are the mistakes learners actually make; tests/test_grading.py proves each one
fails.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from PIL import Image

from ...processing import IGNORE_INDEX
from ...vlm import answer_only_loss
from ...vlm import splice_image_features as _splice
from ..core import Case, Exercise, Mutant
from ..inputs import randn
from ..registry import register

LESSON = "04"

# ----------------------------------------------------------------------------------------------
# splice_image_features(token_embeds, input_ids, image_features, image_token_id)


def splice_image_features(token_embeds, input_ids, image_features, image_token_id):
    return _splice(token_embeds, input_ids, image_features, image_token_id)


def _splice_with(mask_fn=lambda m: m, features_fn=lambda f: f):
    def splice(token_embeds, input_ids, image_features, image_token_id):
        is_image = mask_fn(input_ids == image_token_id)
        features = features_fn(image_features).reshape(-1, image_features.shape[-1]).to(token_embeds.dtype)
        return token_embeds.masked_scatter(is_image.unsqueeze(-1), features)
    return splice


splice_interleaved_images = _splice_with(features_fn=lambda f: f.transpose(0, 1))
splice_reversed_images = _splice_with(features_fn=lambda f: f.flip(0))
splice_token_before = _splice_with(mask_fn=lambda m: m.roll(-1, dims=1))
splice_token_after = _splice_with(mask_fn=lambda m: m.roll(1, dims=1))



def splice_added(token_embeds, input_ids, image_features, image_token_id):
    """The features added to the <image> tokens' embeddings instead of replacing them."""
    scattered = torch.zeros_like(token_embeds).masked_scatter(
        (input_ids == image_token_id).unsqueeze(-1), image_features.reshape(-1, image_features.shape[-1]).to(token_embeds.dtype))
    return token_embeds + scattered


def splice_into_zeros(token_embeds, input_ids, image_features, image_token_id):
    """Started from zeros instead of the text embeddings."""
    return _splice(torch.zeros_like(token_embeds), input_ids, image_features, image_token_id)


IMAGE_ID = 99


def _splice_case(length, blocks, tokens_per_image, dim, seed, images=None, dtype=torch.float32):
    """blocks: per row, the start positions of its image blocks. `images` overrides the number of images given."""
    def inputs():
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(3, 60, (len(blocks), length), generator=g)
        for row, starts in enumerate(blocks):
            for start in starts:
                ids[row, start:start + tokens_per_image] = IMAGE_ID
        count = sum(len(starts) for starts in blocks) if images is None else images
        return (randn(len(blocks), length, dim, seed=seed + 1, dtype=dtype), ids,
                randn(count, tokens_per_image, dim, seed=seed + 2, dtype=dtype), IMAGE_ID)
    return inputs


register(Exercise(
    name="splice_image_features", lesson=LESSON, reference=splice_image_features,
    description="write each image's projected features over its block of <image> tokens",
    cases=[
        Case("batch 2, one image of 4 tokens each, blocks at different positions", _splice_case(9, [[1], [4]], 4, 6, 201)),
        Case("batch 3 with 2, 0 and 1 images per sample (3 tokens each)",
             _splice_case(12, [[0, 6], [], [2]], 3, 5, 202)),
        Case("batch 2, two images in each sample, 2 tokens each", _splice_case(10, [[2, 6], [0, 8]], 2, 4, 203)),
        Case("float64, batch 2, one image of 5 tokens each", _splice_case(8, [[3], [0]], 5, 3, 204, dtype=torch.float64)),
        Case("3 blocks of image tokens but only 2 images: must raise ValueError",
             _splice_case(12, [[0, 6], [2]], 3, 5, 205, images=2), raises=ValueError),
    ],
    mutants=[
        Mutant("token_before", splice_token_before,
               "each image starts one position too early: it overwrote the text token before its block and left "
               "the last <image> token unreplaced - write exactly where input_ids == image_token_id"),
        Mutant("token_after", splice_token_after,
               "each image starts one position too late: it overwrote the text token after its block - write "
               "exactly where input_ids == image_token_id"),
        Mutant("interleaved_images", splice_interleaved_images,
               "the images' tokens are interleaved (token 0 of every image, then token 1, ...) - keep each image's "
               "tokens together: image_features.reshape(-1, D) in (image, token) order"),
        Mutant("reversed_images", splice_reversed_images,
               "the images are in the wrong order across the batch: the i-th block of <image> tokens (reading sample "
               "0 first, left to right) gets the i-th image"),
        Mutant("added", splice_added,
               "the image features were added to the <image> tokens' embeddings - replace them: the embedding of the "
               "<image> id means nothing"),
        Mutant("into_zeros", splice_into_zeros,
               "the text positions lost their embeddings - start from token_embeds.clone(), not from zeros"),
    ],
))

# ----------------------------------------------------------------------------------------------
# make_labels(input_ids, header_ids, end_id): answer tokens + their closing <|im_end|>, -100 elsewhere


def make_labels(input_ids: torch.Tensor, header_ids: list[int], end_id: int) -> torch.Tensor:
    """Reference: for every assistant turn (after `header_ids`), train its tokens up to and including `end_id`."""
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    h = len(header_ids)
    for row, ids in enumerate(input_ids.tolist()):
        t = 0
        while t + h <= len(ids):
            if ids[t:t + h] != list(header_ids):
                t += 1
                continue
            start = end = t + h  # the answer starts right after the header
            while end < len(ids) and ids[end] != end_id:
                end += 1
            end = min(end + 1, len(ids))  # include the closing <|im_end|>: the model must learn to stop
            labels[row, start:end] = input_ids[row, start:end]
            t = end
    return labels


def _labels_variant(input_ids, header_ids, end_id, *, keep_end=True, keep_header=False, turns=None):
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    h = len(header_ids)
    for row, ids in enumerate(input_ids.tolist()):
        t, done = 0, 0
        while t + h <= len(ids) and (turns is None or done < turns):
            if ids[t:t + h] != list(header_ids):
                t += 1
                continue
            start = end = t + h
            while end < len(ids) and ids[end] != end_id:
                end += 1
            stop = min(end + 1, len(ids)) if keep_end else end
            first = t if keep_header else start
            labels[row, first:stop] = input_ids[row, first:stop]
            t, done = stop, done + 1
    return labels


def labels_keep_prompt(input_ids, header_ids, end_id):
    return input_ids.clone()


def labels_drop_end(input_ids, header_ids, end_id):
    return _labels_variant(input_ids, header_ids, end_id, keep_end=False)


def labels_include_header(input_ids, header_ids, end_id):
    return _labels_variant(input_ids, header_ids, end_id, keep_header=True)


def labels_first_turn_only(input_ids, header_ids, end_id):
    return _labels_variant(input_ids, header_ids, end_id, turns=1)


def labels_until_row_end(input_ids, header_ids, end_id):
    """From the first header to the end of the row: later turns' prompts and the padding are trained too."""
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    h = len(header_ids)
    for row, ids in enumerate(input_ids.tolist()):
        start = next((t + h for t in range(len(ids) - h + 1) if ids[t:t + h] == list(header_ids)), None)
        if start is not None:
            labels[row, start:] = input_ids[row, start:]
    return labels


def labels_zero_not_ignore(input_ids, header_ids, end_id):
    labels = make_labels(input_ids, header_ids, end_id)
    return labels.masked_fill(labels == IGNORE_INDEX, 0)


def labels_pre_shifted(input_ids, header_ids, end_id):
    labels = make_labels(input_ids, header_ids, end_id)
    return torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], IGNORE_INDEX)], dim=1)


@functools.lru_cache(maxsize=1)
def _processor():
    from ...config import get_profile
    from ...processing import VLMProcessor

    return VLMProcessor.from_config(get_profile("tiny").config)


def header_and_end() -> tuple[list[int], int]:
    """The token ids of "<|im_start|>assistant\\n" and of <|im_end|> in the SmolLM2 tokenizer."""
    processor = _processor()
    return processor.text_ids("<|im_start|>assistant\n"), processor.eos_token_id


@functools.lru_cache(maxsize=None)
def _encoded(kind: str) -> torch.Tensor:
    processor = _processor()
    red, blue = Image.new("RGB", (64, 64), "red"), Image.new("RGB", (64, 64), "blue")
    if kind == "single":
        return processor([red, blue], ["What colour is this?", "Colour?"], ["Red.", "It is a blue square."])["input_ids"]
    if kind == "multi_turn":
        turns = [{"user": "What colour is the square?", "assistant": "Blue."},
                 {"user": "And how many squares are there?", "assistant": "There is one square."}]
        return processor.encode_conversation(turns, [blue])["input_ids"][None]
    if kind == "mixed":
        one = processor.encode_conversation([{"user": "Describe the picture.", "assistant": "A red square."}], [red])
        two = processor.encode_conversation([{"user": "Hi", "assistant": "Hello!"}, {"user": "Compare.", "assistant":
                                             "The first is red, the second blue."}], [red, blue])
        three = processor.encode_conversation([{"user": "Is it red?", "assistant": "Yes"}], [])
        return processor.pad([one, two, three])["input_ids"]
    if kind == "prompt":
        return processor([red], ["What colour is this?"])["input_ids"]
    raise ValueError(kind)


def _labels_case(kind):
    def inputs():
        header, end = header_and_end()
        return _encoded(kind).clone(), header, end
    return inputs


register(Exercise(
    name="make_labels", lesson=LESSON, reference=make_labels,
    description="answer-only labels: the assistant's tokens and their <|im_end|>, -100 elsewhere",
    cases=[
        Case("batch 2, one image and one question-answer each, right-padded", _labels_case("single")),
        Case("a two-turn conversation about one image: both answers are trained", _labels_case("multi_turn")),
        Case("batch 3: one image, two images and two turns, no image; right-padded", _labels_case("mixed")),
        Case("a generation prompt (no answer yet): nothing to train", _labels_case("prompt")),
    ],
    mutants=[
        Mutant("keep_prompt", labels_keep_prompt,
               "the labels keep the prompt (system, question, image tokens): only the assistant's answers are "
               "trained - set every other position to -100 (IGNORE_INDEX)"),
        Mutant("drop_end", labels_drop_end,
               "the closing <|im_end|> of each answer is not trained: include it, or the model never learns to stop"),
        Mutant("include_header", labels_include_header,
               "the '<|im_start|>assistant\\n' header is trained too: the answer starts right after it"),
        Mutant("first_turn_only", labels_first_turn_only,
               "only the first assistant turn is trained: a conversation can have several answers, train them all"),
        Mutant("pre_shifted", labels_pre_shifted,
               "the labels are shifted by one: keep label t = input_ids[t]; the loss does the shift "
               "(logits at t predict token t + 1), so shifting here too shifts twice"),
        Mutant("until_row_end", labels_until_row_end,
               "everything after the first header is trained, up to the end of the row - stop each answer at (and "
               "including) its end_id: later questions and the padding are not the model's to learn"),
        Mutant("zero_not_ignore", labels_zero_not_ignore,
               "untrained positions hold 0, a real token id - fill them with IGNORE_INDEX (-100), which "
               "F.cross_entropy skips"),
    ],
))

# ----------------------------------------------------------------------------------------------
# answer_loss(logits, labels): next-token cross-entropy over the labelled positions


def answer_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return answer_only_loss(logits, labels)


def _flat_ce(logits, labels, **kwargs):
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), **kwargs)


def loss_unshifted(logits, labels):
    return _flat_ce(logits, labels)


def loss_shifted_wrong_way(logits, labels):
    return _flat_ce(logits[:, 1:], labels[:, :-1])


def loss_mean_over_all_positions(logits, labels):
    shifted = labels[:, 1:]
    return _flat_ce(logits[:, :-1], shifted, reduction="sum") / shifted.numel()


def loss_sum(logits, labels):
    return _flat_ce(logits[:, :-1], labels[:, 1:], reduction="sum")


def loss_mean_of_sample_means(logits, labels):
    per_row = [_flat_ce(logits[i:i + 1, :-1], labels[i:i + 1, 1:]) for i in range(logits.shape[0])]
    return torch.stack(per_row).mean()


def loss_softmax_first(logits, labels):
    return _flat_ce(logits[:, :-1].softmax(-1), labels[:, 1:], ignore_index=IGNORE_INDEX)


def loss_nll_on_logits(logits, labels):
    return F.nll_loss(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1),
                      ignore_index=IGNORE_INDEX)


def _loss_case(batch, length, vocab, answers, seed):
    """answers: per row, the (start, end) of its labelled span."""
    def inputs():
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, vocab, (batch, length), generator=g)
        labels = torch.full_like(ids, IGNORE_INDEX)
        for row, (start, end) in enumerate(answers):
            labels[row, start:end] = ids[row, start:end]
        return randn(batch, length, vocab, seed=seed + 1, scale=2.0), labels
    return inputs


register(Exercise(
    name="answer_loss", lesson=LESSON, reference=answer_loss,
    description="cross-entropy of each position's prediction of the next token, on labelled tokens only",
    cases=[
        Case("batch 2, 8 positions, vocabulary 11, answers of 3 and 5 tokens",
             _loss_case(2, 8, 11, [(5, 8), (3, 8)], 211)),
        Case("batch 3, 10 positions, vocabulary 7, answers in the middle (then padding)",
             _loss_case(3, 10, 7, [(4, 6), (2, 9), (6, 10)], 212)),
        Case("batch 1, 6 positions, vocabulary 13, a 1-token answer", _loss_case(1, 6, 13, [(4, 5)], 213)),
    ],
    mutants=[
        Mutant("unshifted", loss_unshifted,
               "no shift: the logits at position t predict token t + 1, so compare logits[:, :-1] with labels[:, 1:]"),
        Mutant("shifted_wrong_way", loss_shifted_wrong_way,
               "shifted the wrong way: the logits at position t predict token t + 1 - logits[:, :-1] vs labels[:, 1:]"),
        Mutant("mean_over_all_positions", loss_mean_over_all_positions,
               "the loss is averaged over every position, including the -100 ones - average over labelled tokens "
               "only (F.cross_entropy(..., ignore_index=-100) does it)"),
        Mutant("sum", loss_sum, "a sum, not a mean: average over the labelled tokens, so the loss does not grow "
                                "with the batch size or answer length"),
        Mutant("mean_of_sample_means", loss_mean_of_sample_means,
               "averaged per sample, then over the batch - average over all labelled tokens of the batch at once "
               "(one F.cross_entropy over the flattened batch), as vlm_course and transformers do"),
        Mutant("softmax_first", loss_softmax_first,
               "the logits went through a softmax first - F.cross_entropy takes raw logits (it applies log_softmax "
               "itself)"),
        Mutant("nll_on_logits", loss_nll_on_logits,
               "F.nll_loss on raw logits - it expects log-probabilities: use F.cross_entropy on the logits (or "
               "log_softmax first)"),
    ],
))

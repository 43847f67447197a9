"""The collator: the_cauldron rows -> one padded training batch, without ever cutting an answer.

    rows [{"images": [...], "texts": [{"user", "assistant"}, ...]}, ...]
      -> processor.encode_conversation per row   (answer-only labels on EVERY assistant turn + its <|im_end|>)
      -> too long?  "drop": skip the row         "shorten_prompt": drop the earliest turns, then shorten the
                                                 last user message (never the image block, never the last answer)
      -> processor.pad(..., "right")              input_ids, attention_mask, labels, pixel_values

Why never cut an answer: a sequence truncated in the middle of its answer teaches the model that answers
stop in mid-sentence (and, without its <|im_end|>, never to stop at all). Every skipped or shortened
sample is counted, so a run can report how much of the data it actually saw.
"""

from __future__ import annotations

import copy
import dataclasses

TRUNCATION_POLICIES = ("drop", "shorten_prompt")
ELLIPSIS = "..."


class AllSamplesDroppedError(ValueError):
    """Every row of a batch was longer than max_length."""


class VLMCollator:
    """Turn a list of cauldron rows into a right-padded batch with answer-only labels.

    Counters (since creation, or since `reset_counts()`): `seen`, `kept`, `dropped` (rows skipped as
    too long), `shortened` (rows that needed the prompt shortened), `turns_dropped` (earliest turns
    removed) and `prompts_cut` (last user messages shortened). `summary()` gives them as one line.
    """

    def __init__(self, processor, max_length: int | None = None, truncation: str = "drop"):
        if truncation not in TRUNCATION_POLICIES:
            raise ValueError(f"truncation must be one of {TRUNCATION_POLICIES}, got {truncation!r}")
        limit = processor.config.max_length
        max_length = limit if max_length is None else max_length
        if max_length > limit:
            raise ValueError(
                f"max_length={max_length} is over the processor's limit config.max_length={limit}: "
                "raise VLMConfig.max_length (within the decoder's context) or pass a smaller max_length"
            )
        self.processor = processor
        self.max_length = max_length
        self.truncation = truncation
        # A twin of the processor without a length limit: we measure each sample and decide what to do
        # ourselves, instead of parsing the processor's error message.
        self._measure = copy.copy(processor)
        self._measure.config = dataclasses.replace(processor.config, max_length=10**9)
        self.reset_counts()

    def reset_counts(self) -> None:
        self.seen = self.kept = self.dropped = self.shortened = self.turns_dropped = self.prompts_cut = 0

    def summary(self) -> str:
        line = f"collator: kept {self.kept} of {self.seen} samples (max_length {self.max_length})"
        if self.dropped:
            line += f"; dropped {self.dropped} over-long"
        if self.shortened:
            line += (f"; shortened {self.shortened} ({self.turns_dropped} earliest turns removed, "
                     f"{self.prompts_cut} user messages cut)")
        return line

    # -- one row ----------------------------------------------------------------------------------

    def encode(self, row: dict) -> dict | None:
        """Encode one row within max_length, or None when the policy drops it. Updates the counters."""
        images, turns = list(row.get("images") or []), list(row.get("texts") or [])
        self.seen += 1
        sample = self._measure.encode_conversation(turns, images)
        if len(sample["input_ids"]) <= self.max_length:
            self.kept += 1
            return sample
        if self.truncation == "shorten_prompt":
            sample = self._shorten(turns, images)
            if sample is not None:
                self.kept += 1
                self.shortened += 1
                return sample
        self.dropped += 1
        return None

    def _shorten(self, turns: list[dict], images: list) -> dict | None:
        """Drop the earliest turns, then cut the last user message; None when even that does not fit."""
        dropped_turns = 0
        while len(turns) > 1:
            turns, dropped_turns = turns[1:], dropped_turns + 1  # the images move to the new first turn
            sample = self._measure.encode_conversation(turns, images)
            if len(sample["input_ids"]) <= self.max_length:
                self.turns_dropped += dropped_turns
                return sample
        last = turns[0]
        excess = len(self._measure.encode_conversation(turns, images)["input_ids"]) - self.max_length
        user_ids = self.processor.text_ids(last["user"])
        # Keep the END of the user message: questions and answer options usually come last. The ellipsis
        # costs a token or two, hence the small margin; retry once if the tokenizer merges differently.
        for margin in (len(self.processor.text_ids(ELLIPSIS)) + 1, 8):
            keep = len(user_ids) - excess - margin
            if keep <= 0:
                return None
            text = ELLIPSIS + self.processor.tokenizer.decode(user_ids[-keep:])
            sample = self._measure.encode_conversation([dict(last, user=text)], images)
            if len(sample["input_ids"]) <= self.max_length:
                self.turns_dropped += dropped_turns
                self.prompts_cut += 1
                return sample
        return None

    # -- a batch ----------------------------------------------------------------------------------

    def __call__(self, rows: list[dict]) -> dict:
        samples = [s for s in (self.encode(row) for row in rows) if s is not None]
        if not samples:
            raise AllSamplesDroppedError(
                f"all {len(rows)} samples of this batch are longer than max_length={self.max_length} tokens "
                f"(truncation={self.truncation!r}). Fix: raise max_length (VLMConfig.max_length), use "
                "truncation='shorten_prompt', or filter the long rows out of the data"
            )
        return self.processor.pad(samples, padding_side="right")

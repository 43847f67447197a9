"""Count tokens: the image side's tallies, the prompt's count labels, and the config rules around them."""

import numpy as np
import pytest
import torch
from PIL import Image

from vlm_course.config import DecoderConfig, ProjectorConfig, VisionConfig, VLMConfig
from vlm_course.counting import MAX_COUNT, CountTokens, block_words, count_labels
from vlm_course.data import synthetic
from vlm_course.projector import ModalityProjector

WIDTH = 8


def word_table():
    """A toy tokenizer and embedding table: every word the counter uses gets its own random row."""
    colours, shapes = block_words()
    words = colours + shapes + [str(n) for n in range(MAX_COUNT + 1)]
    embed = torch.nn.Embedding(len(words), WIDTH)
    torch.nn.init.normal_(embed.weight, generator=torch.Generator().manual_seed(0))
    return embed, {w: i for i, w in enumerate(words)}


def counter_with_words():
    embed, ids = word_table()
    counter = CountTokens(count_labels(), WIDTH)
    counter.set_words(embed, ids.__getitem__)
    return counter, embed, ids


def scene_tokens(embed, ids, blocks, noise=0.0, seed=0):
    """Block tokens as a fitted projector writes them: each block's colour word then shape word (+ noise)."""
    words = []
    for obj in blocks:
        words += [f" {obj[1]}", f" {obj[0]}"] if obj else [" no", " object"]
    tokens = embed(torch.tensor([ids[w] for w in words])).detach()
    return (tokens + noise * torch.randn(tokens.shape, generator=torch.Generator().manual_seed(seed))).unsqueeze(0)


def true_counts(blocks):
    objects = [b for b in blocks if b]
    return [sum(s == label[:-1] for s, _ in objects) for label in count_labels()[:len(synthetic.SHAPES)]] + \
           [sum(c == label for _, c in objects) for label in synthetic.COLOURS] + [len(objects)]


def test_labels_name_each_shape_each_colour_and_all_objects():
    assert count_labels() == ("circles", "squares", "triangles", "diamonds", "red", "green", "blue", "yellow",
                              "purple", "orange", "objects")


@pytest.mark.parametrize("seed", range(5))
def test_tallies_are_the_scene_counts(seed):
    """Random 3 x 3 scenes, tokens near their words: every tally equals the true count. A counter that reads the
    shape from the colour token (or the other way round), or counts empty blocks, fails here."""
    counter, embed, ids = counter_with_words()
    rng = np.random.default_rng(seed)
    blocks = [None] * 9
    for k in rng.choice(9, size=int(rng.integers(0, 6)), replace=False):
        blocks[k] = (str(rng.choice(synthetic.SHAPES)), str(rng.choice(synthetic.COLOURS)))
    tokens = scene_tokens(embed, ids, blocks, noise=0.05, seed=seed)
    assert counter.tallies(tokens)[0].tolist() == true_counts(blocks)


def test_count_tokens_are_the_digit_embeddings():
    counter, embed, ids = counter_with_words()
    blocks = [("circle", "red"), ("circle", "blue"), None, ("square", "red"), None, None, None, None, None]
    out = counter(scene_tokens(embed, ids, blocks))
    assert out.shape == (1, len(count_labels()), WIDTH)
    circles, red, objects = out[0, 0], out[0, count_labels().index("red")], out[0, -1]
    assert torch.equal(circles, embed.weight[ids["2"]]) and torch.equal(red, embed.weight[ids["2"]])
    assert torch.equal(objects, embed.weight[ids["3"]])
    assert torch.equal(out[0, count_labels().index("diamonds")], embed.weight[ids["0"]])


def test_another_scene_gives_other_counts():
    """The tallies come from the tokens, not from the labels: two scenes, two sets of counts."""
    counter, embed, ids = counter_with_words()
    one = [("diamond", "green")] + [None] * 8
    four = [("diamond", "green")] * 4 + [None] * 5
    assert counter.tallies(scene_tokens(embed, ids, one))[0, -1] == 1
    assert counter.tallies(scene_tokens(embed, ids, four))[0, -1] == 4


def test_unknown_labels_and_one_token_blocks_are_refused():
    with pytest.raises(ValueError, match="not among what the counter can count"):
        CountTokens(("circles", "hexagons"), WIDTH)
    with pytest.raises(ValueError, match="tokens_per_block=2"):
        ProjectorConfig(tokens_per_block=1, count_labels=("objects",))


def small_config(**projector):
    return VLMConfig(vision=VisionConfig(image_size=72, patch_size=8, hidden_size=16, intermediate_size=32,
                                         num_layers=1, num_heads=2),
                     projector=ProjectorConfig(shuffle_factor=3, tokens_per_block=2, **projector),
                     decoder=DecoderConfig(hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2,
                                           num_kv_heads=1), image_layout="grid", max_length=256)


def test_projector_appends_one_token_per_label():
    config = small_config(count_labels=count_labels())
    assert config.image_tokens_per_image == 18 + 11
    projector = ModalityProjector(config.projector, 16, 16)
    patches = torch.randn(2, 81, 16)
    out = projector(patches)
    assert out.shape == (2, 29, 16)
    assert torch.equal(out[:, :18], projector.block_tokens(patches))  # the blocks first, unchanged
    assert torch.equal(out[:, 18:], projector.counter(out[:, :18]))  # then their tallies
    assert "counter.digit_words" in projector.state_dict()  # saved with the projector, so checkpoints carry it


def test_prompt_writes_each_label_before_its_count_token():
    from vlm_course.processing import VLMProcessor

    config = small_config(count_labels=count_labels())
    processor = VLMProcessor.from_config(config, system_prompt=None)
    ids = processor.encode_prompt("How many circles are there?", [Image.new("RGB", (64, 64))])["input_ids"]
    assert int((ids == processor.image_token_id).sum()) == config.image_tokens_per_image
    text = processor.tokenizer.decode(ids)
    assert "bottom right<image><image>" + "".join(f" {label}<image>" for label in count_labels()) + "\n" in text


def test_configs_saved_before_count_tokens_still_load():
    from vlm_course.vlm import config_problems

    data = small_config().to_dict()
    del data["projector"]["count_labels"]
    assert config_problems(data) == []
    assert VLMConfig.from_dict(data).projector.count_labels == ()
    round_trip = VLMConfig.from_dict(small_config(count_labels=count_labels()).to_dict())
    assert round_trip.projector.count_labels == count_labels()

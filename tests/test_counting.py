"""Count tokens: the image side's tallies, the prompt's count labels, and the config rules around them."""

import numpy as np
import pytest
import torch
from PIL import Image

from vlm_course.config import DecoderConfig, ProjectorConfig, VisionConfig, VLMConfig
from vlm_course.counting import (
    MAX_COUNT,
    CountTokens,
    NeighbourhoodClassifier,
    count_labels,
    fit_count_heads,
    neighbourhoods,
)
from vlm_course.data import synthetic
from vlm_course.projector import ModalityProjector

WIDTH = 8
BLOCK = 1 + len(synthetic.COLOURS) + 1 + len(synthetic.SHAPES)  # a toy block vector: colour one-hot, shape one-hot


def digit_table():
    """A toy tokenizer and embedding table holding the ten digits."""
    embed = torch.nn.Embedding(MAX_COUNT + 1, WIDTH)
    torch.nn.init.normal_(embed.weight, generator=torch.Generator().manual_seed(0))
    return embed, {str(n): n for n in range(MAX_COUNT + 1)}


def block_vectors(blocks, noise=0.0, seed=0):
    """Toy block vectors: the one-hot of the block's colour class then of its shape class (class 0: no object)."""
    rows = []
    for obj in blocks:
        colour = 0 if obj is None else 1 + synthetic.COLOURS.index(obj[1])
        shape = 0 if obj is None else 1 + synthetic.SHAPES.index(obj[0])
        row = torch.zeros(BLOCK)
        row[colour] = row[1 + len(synthetic.COLOURS) + shape] = 1.0
        rows.append(row)
    x = torch.stack(rows)
    return (x + noise * torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))).unsqueeze(0)


def reading_counter():
    """A counter whose heads read the toy one-hots (confidently: the logit of the right class is 20 above)."""
    embed, ids = digit_table()
    counter = CountTokens(count_labels(), BLOCK, WIDTH)
    counter.set_words(embed, ids.__getitem__)
    with torch.no_grad():
        colours = 1 + len(synthetic.COLOURS)
        counter.colour_head.weight.copy_(20 * torch.eye(BLOCK)[:colours])  # reads the colour one-hot
        counter.shape_head.weight.copy_(20 * torch.eye(BLOCK)[colours:])  # reads the shape one-hot
        counter.colour_head.bias.zero_()
        counter.shape_head.bias.zero_()
    return counter, embed


def random_blocks(rng, most=6):
    blocks = [None] * 9
    for k in rng.choice(9, size=int(rng.integers(0, most)), replace=False):
        blocks[k] = (str(rng.choice(synthetic.SHAPES)), str(rng.choice(synthetic.COLOURS)))
    return blocks


def true_counts(blocks):
    objects = [b for b in blocks if b]
    return [sum(s == label[:-1] for s, _ in objects) for label in count_labels()[:len(synthetic.SHAPES)]] + \
           [sum(c == label for _, c in objects) for label in synthetic.COLOURS] + [len(objects)]


def test_labels_name_each_shape_each_colour_and_all_objects():
    assert count_labels() == ("circles", "squares", "triangles", "diamonds", "red", "green", "blue", "yellow",
                              "purple", "orange", "objects")


@pytest.mark.parametrize("seed", range(5))
def test_tallies_are_the_scene_counts(seed):
    """Random 3 x 3 scenes read by confident heads: every tally equals the true count. A counter that reads the
    shape from the colour head (or the other way round), or counts empty blocks as objects, fails here."""
    counter, _ = reading_counter()
    blocks = random_blocks(np.random.default_rng(seed))
    assert counter.tallies(block_vectors(blocks, noise=0.05, seed=seed))[0].tolist() == true_counts(blocks)


def test_tallies_add_probabilities_so_a_shared_object_counts_once():
    """Two blocks each 50/50 between "red" and "no object" hold one expected red object: the tally is 1. Counting
    each block's most likely class would give 0 or 2 (a tie broken either way)."""
    counter, _ = reading_counter()
    half = block_vectors([("circle", "red")])[0, 0] * 0.5 + block_vectors([None])[0, 0] * 0.5
    blocks = torch.stack([half, half] + [block_vectors([None])[0, 0]] * 7).unsqueeze(0)
    tallies = counter.tallies(blocks)[0]
    assert tallies[count_labels().index("red")] == 1 and tallies[-1] == 1
    assert torch.allclose(counter.expected_counts(blocks)[0, -1], torch.tensor(1.0), atol=1e-3)


def test_count_tokens_are_the_digit_embeddings():
    counter, embed = reading_counter()
    blocks = [("circle", "red"), ("circle", "blue"), None, ("square", "red"), None, None, None, None, None]
    out = counter(block_vectors(blocks))
    assert out.shape == (1, len(count_labels()), WIDTH)
    circles, red, objects = out[0, 0], out[0, count_labels().index("red")], out[0, -1]
    assert torch.equal(circles, embed.weight[2]) and torch.equal(red, embed.weight[2])
    assert torch.equal(objects, embed.weight[3])
    assert torch.equal(out[0, count_labels().index("diamonds")], embed.weight[0])


def test_another_scene_gives_other_counts():
    """The tallies come from the blocks, not from the labels: two scenes, two sets of counts."""
    counter, _ = reading_counter()
    one = [("diamond", "green")] + [None] * 8
    four = [("diamond", "green")] * 4 + [None] * 5
    assert counter.tallies(block_vectors(one))[0, -1] == 1
    assert counter.tallies(block_vectors(four))[0, -1] == 4


def draw_toy_scenes(rng, n, mix):
    """n random toy scenes: block vectors (a random linear view of the one-hots, as a ViT's features are not
    one-hot, scaled and shifted so standardisation matters) and each block's (colour, shape) class."""
    scenes = [random_blocks(rng) for _ in range(n)]
    x = torch.cat([block_vectors(b, noise=0.1, seed=i) for i, b in enumerate(scenes)]) @ mix * 3 + 5
    labels = [[(0, 0) if o is None else (1 + synthetic.COLOURS.index(o[1]), 1 + synthetic.SHAPES.index(o[0]))
               for o in b] for b in scenes]
    return scenes, x, torch.tensor(labels)


@pytest.mark.parametrize("hidden", [0, 16])
def test_fitted_heads_count_unseen_scenes(hidden):
    """Both kinds of classifier (linear on the block; a hidden layer over the block and its neighbours), fitted on
    noisy block vectors, count unseen scenes exactly. Heads left unfitted, a linear fit that forgets to fold the
    standardisation back, or a neighbourhood classifier that forgets to keep its statistics count wrong. The fit
    must be confident, not only right: the tally adds probabilities over nine blocks, so 0.05 of doubt in each
    empty block adds up to a wrong count (300 steps with weight decay leave that much here: 47 of 50 scenes right)."""
    rng = np.random.default_rng(0)
    mix = torch.randn(BLOCK, 24, generator=torch.Generator().manual_seed(1))
    _, x, labels = draw_toy_scenes(rng, 400, mix)
    torch.manual_seed(0)
    counter = CountTokens(count_labels(), 24, WIDTH, classifier_hidden=hidden)
    accuracy = fit_count_heads(counter, x, labels[..., 0], labels[..., 1], steps=600, lr=3e-2 if not hidden else 3e-3,
                               weight_decay=0.0)
    assert accuracy["colour"] > 0.99 and accuracy["shape"] > 0.99
    scenes, x, _ = draw_toy_scenes(rng, 50, mix)
    tallies = counter.tallies(x)
    assert all(t == true_counts(b) for t, b in zip(tallies.tolist(), scenes))


def test_neighbourhoods_gather_each_block_and_its_four_neighbours():
    """Block k of a 3 x 3 grid holds the number k + 1: its neighbourhood is (itself, above, below, left, right),
    0 beyond the edge. Swapping rows and columns, or wrapping around the edge, gives other numbers."""
    grid = torch.arange(1.0, 10.0).reshape(1, 9, 1)
    out = neighbourhoods(grid)[0]
    assert out.shape == (9, 5)
    assert out[0].tolist() == [1, 0, 4, 0, 2]  # top left: nothing above or left of it
    assert out[4].tolist() == [5, 2, 8, 4, 6]  # centre: all four
    assert out[5].tolist() == [6, 3, 9, 5, 0]  # middle right: nothing right of it (no wrap to the next row)
    assert out[8].tolist() == [9, 6, 0, 8, 0]
    with pytest.raises(ValueError, match="square grid"):
        neighbourhoods(torch.zeros(1, 8, 1))


def test_a_neighbourhood_classifier_reads_what_a_block_alone_cannot():
    """A rule only the neighbours tell: each block's label is the colour class of the block on its left (none for the
    left column). The neighbourhood classifier learns it; a linear classifier of the block alone stays near the
    frequency of the most common class. This is the count scenes' case of an object that reaches into the next
    block: whose centre it is, the block alone does not say."""
    rng = np.random.default_rng(1)
    mix = torch.randn(BLOCK, 24, generator=torch.Generator().manual_seed(2))
    _, x, labels = draw_toy_scenes(rng, 400, mix)
    colour = labels[..., 0].reshape(-1, 3, 3)
    left = torch.cat([torch.zeros_like(colour[..., :1]), colour[..., :-1]], dim=-1).reshape(-1, 9)
    fits = {}
    for hidden in (0, 32):
        torch.manual_seed(0)
        counter = CountTokens(count_labels(), 24, WIDTH, classifier_hidden=hidden)
        fits[hidden] = fit_count_heads(counter, x, left, left.clamp(max=len(synthetic.SHAPES)), steps=400,
                                       lr=3e-2 if not hidden else 3e-3, weight_decay=0.0)["colour"]
    most_common = float(torch.bincount(left.flatten()).max()) / left.numel()  # ~0.8: most left neighbours are empty
    assert fits[32] > 0.97
    assert fits[0] < most_common + 0.05


def test_neighbourhood_classifiers_are_saved_with_their_statistics():
    """The standardisation lives in the classifier (set by the fit) and in its state dict, so a checkpoint reloads
    the same counts; a config with a negative hidden width is refused."""
    config = small_config(count_labels=count_labels(), counter_hidden_size=8)
    projector = ModalityProjector(config.projector, 16, 16)
    assert isinstance(projector.counter.colour_head, NeighbourhoodClassifier)
    state = projector.state_dict()
    assert {"counter.colour_head.mean", "counter.colour_head.std", "counter.shape_head.hidden.weight"} <= set(state)
    assert VLMConfig.from_dict(config.to_dict()).projector.counter_hidden_size == 8
    with pytest.raises(ValueError, match="counter_hidden_size"):
        ProjectorConfig(counter_hidden_size=-1)


def test_unknown_labels_and_mismatched_labels_are_refused():
    with pytest.raises(ValueError, match="not among what the counter can count"):
        CountTokens(("circles", "hexagons"), BLOCK, WIDTH)
    counter = CountTokens(count_labels(), BLOCK, WIDTH)
    with pytest.raises(ValueError, match="one each"):
        fit_count_heads(counter, torch.zeros(2, 9, BLOCK), torch.zeros(2, 8), torch.zeros(2, 9))


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
    assert torch.equal(out[:, 18:], projector.counter(projector.blocks(patches)))  # then the blocks' tallies
    state = projector.state_dict()  # saved with the projector, so checkpoints carry the fitted counter
    assert "counter.digit_words" in state and "counter.colour_head.weight" in state


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
    del data["projector"]["count_labels"], data["projector"]["counter_hidden_size"]
    assert config_problems(data) == []
    assert VLMConfig.from_dict(data).projector.count_labels == ()
    assert VLMConfig.from_dict(data).projector.counter_hidden_size == 0  # linear classifiers, as saved then
    round_trip = VLMConfig.from_dict(small_config(count_labels=count_labels()).to_dict())
    assert round_trip.projector.count_labels == count_labels()

"""How should the image side count? Four read-outs of the same frozen ViT, scored on fresh count scenes.

    .venv/bin/python docs/demo_experiments/counter_readouts.py CHECKPOINT [TRAIN_SCENES] [TEST_SCENES]

CHECKPOINT is a demo checkpoint (its ViT and least-squares projector are read; assets/demo_checkpoint). On
TEST_SCENES fresh count questions (seed [4242, 3], never the mini-cauldron's), it prints how often each tally is the
right answer:

  ceiling        the true objects, one per block (the larger where two centres share one): what a perfect
                 3 x 3 block classifier could reach
  nearest word   each block's two projector tokens named by their nearest colour / shape word, then counted
  blocks argmax  two logistic classifiers on the 3 x 3 block vectors (`counting.fit_count_heads`, the demo's
                 counter), each block's most likely class counted
  blocks sum     the same classifiers, probabilities added over the blocks and rounded (what `CountTokens` does
                 with linear heads)
  neighbourhood  classifiers with one hidden layer (128) over each block and its four neighbours, probabilities
                 summed (`counting.NeighbourhoodClassifier`, the demo's counter since section 15)
  patches ...    the same two read-outs on the 9 x 9 patch grid (is an object's centre in this patch?)

The classifiers are fitted on TRAIN_SCENES fresh scenes, half drawn as the demo's words stage draws them and half
crowded like the count subset (`demo.count_targets`). 1 thread; about 10 minutes for the defaults on an idle core.
"""
import sys

import numpy as np
import torch

from vlm_course import demo
from vlm_course.counting import CountTokens, count_labels, fit_count_heads
from vlm_course.data import synthetic
from vlm_course.demo_panel import load_demo_checkpoint
from vlm_course.pretrain_blocks import SCENE_SIZE, block_labels, block_objects, random_scene

torch.set_num_threads(1)
folder = sys.argv[1]
train_scenes = int(sys.argv[2]) if len(sys.argv) > 2 else 6000
test_scenes = int(sys.argv[3]) if len(sys.argv) > 3 else 400
model, processor = load_demo_checkpoint(folder)
labels = count_labels()


def tally_of(objects, label):
    if label == "objects":
        return len(objects)
    if label in synthetic.COLOURS:
        return sum(s.colour == label for s in objects)
    return sum(s.shape == label[:-1] for s in objects)


rng = np.random.default_rng([4242, 3])
tests = []
for i in range(test_scenes):
    answer = 1 + i % synthetic.MAX_COUNT
    shapes, question = synthetic.count_scene(rng, SCENE_SIZE, answer)
    tests.append((synthetic.render(rng, SCENE_SIZE, shapes), shapes, demo.count_label_of(question), answer))
with torch.no_grad():
    patches = torch.cat([model.vision(processor.preprocess_images([t[0] for t in tests[i:i + 100]]))
                         for i in range(0, len(tests), 100)])
    tokens = model.projector.block_tokens(patches)
results = {"ceiling": np.mean([tally_of([o for o in block_objects(s, 3) if o], lab) == a for _, s, lab, a in tests])}

# nearest word: the projector's tokens against the decoder's embeddings of the words the words stage fits them to
colours = [f" {c}" for c in synthetic.COLOURS] + [" no"]
shapes_ = [f" {s}" for s in synthetic.SHAPES] + [" object"]
embed = model.decoder.embed_tokens
table = [embed(torch.tensor([processor.text_ids(w)[0] for w in words])).float() for words in (colours, shapes_)]
nearest = [((tokens[:, k::2].float().unsqueeze(2) - table[k]) ** 2).sum(-1).argmin(-1) for k in (0, 1)]
right = 0
for (_, _, lab, answer), colour, shape in zip(tests, *nearest):
    if lab == "objects":
        n = int((colour != len(synthetic.COLOURS)).sum())
    elif lab in synthetic.COLOURS:
        n = int((colour == synthetic.COLOURS.index(lab)).sum())
    else:
        n = int((shape == synthetic.SHAPES.index(lab[:-1])).sum())
    right += n == answer
results["nearest word"] = right / len(tests)


def score(counter, vectors, mode):
    with torch.no_grad():
        if mode == "sum":
            tallies = counter.tallies(vectors)
        else:
            colour = counter.colour_head(vectors).argmax(-1)
            shape = counter.shape_head(vectors).argmax(-1)
            per_class = [torch.nn.functional.one_hot(best, head.out_features).float().sum(1)
                         for best, head in ((colour, counter.colour_head), (shape, counter.shape_head))]
            tallies = (per_class[0] @ counter.colour_select.T + per_class[1] @ counter.shape_select.T).long()
    return float(np.mean([row[labels.index(lab)] == a for row, (_, _, lab, a) in zip(tallies.tolist(), tests)]))


blocks = demo.count_targets(model, processor, train_scenes, seed=0)
counter = CountTokens(labels, blocks["blocks"].shape[-1], 8)
fit_count_heads(counter, blocks["blocks"], blocks["colour"], blocks["shape"])
test_blocks = model.projector.blocks(patches)
results["blocks argmax"], results["blocks sum"] = score(counter, test_blocks, "argmax"), score(counter, test_blocks, "sum")
torch.manual_seed(0)
neighbourhood = CountTokens(labels, blocks["blocks"].shape[-1], 8, classifier_hidden=128)
for layer in neighbourhood.modules():  # the projector's initialisation (ModalityProjector.reset_parameters)
    if isinstance(layer, torch.nn.Linear):
        torch.nn.init.normal_(layer.weight, std=0.02)
        torch.nn.init.zeros_(layer.bias)
fit_count_heads(neighbourhood, blocks["blocks"], blocks["colour"], blocks["shape"])
results["neighbourhood"] = score(neighbourhood, test_blocks, "sum")

# the 9 x 9 patch grid: the same classifiers, one per patch (labels: whose centre lies in the patch)
rng = np.random.default_rng([0, 13])
images, colour_labels, shape_labels = [], [], []
for i in range(train_scenes):
    s = synthetic.count_scene(rng, SCENE_SIZE, 1 + i // 2 % synthetic.MAX_COUNT)[0] if i % 2 else random_scene(rng)
    images.append(synthetic.render(rng, SCENE_SIZE, s))
    c, k = block_labels(s, 9)
    colour_labels.append(torch.from_numpy(c))
    shape_labels.append(torch.from_numpy(k))
with torch.no_grad():
    train_patches = torch.cat([model.vision(processor.preprocess_images(images[i:i + 250])).half()
                               for i in range(0, len(images), 250)])
patch_counter = CountTokens(labels, train_patches.shape[-1], 8)
fit_count_heads(patch_counter, train_patches, torch.stack(colour_labels), torch.stack(shape_labels))
results["patches argmax"], results["patches sum"] = score(patch_counter, patches, "argmax"), score(patch_counter, patches, "sum")
print(f"{folder}: {train_scenes} fitting scenes, {test_scenes} fresh count questions; tally right:")
for name, value in results.items():
    print(f"  {name:15s} {value:.3f}")

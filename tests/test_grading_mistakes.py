"""Plausible mistakes, written the way a learner writes them in the notebook, each caught with its own hint.

tests/test_grading.py's meta-test proves that every catalogued mutant fails with its hint. The mutants are
written once, one way; a learner writes the same mistake another way (another API, another order of float
operations, a helper of their own). These tests feed such learner code, defined in a namespace as a
notebook would (`exec` of the cell's source, with the learner's helpers beside it), and assert the hint
that names the mistake.
"""

from __future__ import annotations

import textwrap

import pytest

from vlm_course.grading import check, get_exercise, grade

PRELUDE = """
import math
import torch
import torch.nn as nn
import torch.nn.functional as F
from vlm_course.evaluation import normalize_answer
"""

# The correct helper a learner has written earlier in lesson 01 (it passes its own check).
LEARNER_SDPA = """
def scaled_dot_product_attention(q, k, v):
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    return scores.softmax(dim=-1) @ v
"""


def learner(source: str, *helpers: str) -> dict:
    """The namespace of a notebook whose cells are `helpers` then `source`."""
    namespace: dict = {}
    for cell in (PRELUDE, *helpers, source):
        exec(textwrap.dedent(cell), namespace)  # noqa: S102 - test code written here, as a notebook cell
    return namespace


def failure(name: str, namespace: dict) -> str:
    report = grade(get_exercise(name), namespace[name])
    assert report.status == "failed", f"this mistake passes the checks of {name}"
    return report.message


# ----------------------------------------------------------------------------------------------
# Lesson 06: vqa_accuracy that normalises the prediction but not the gold answers


VQA_GOLD_RAW = """
def vqa_accuracy(prediction, answers):
    if isinstance(answers, str):
        answers = [answers]
    pred = normalize_answer(prediction)
    if len(answers) == 1:
        return float(pred == answers[0])
    accs = []
    for i in range(len(answers)):
        others = answers[:i] + answers[i + 1:]
        accs.append(min(1, sum(a == pred for a in others) / 3))
    return sum(accs) / len(accs)
"""

VQA_PREDICTION_RAW = """
def vqa_accuracy(prediction, answers):
    gold = [normalize_answer(a) for a in ([answers] if isinstance(answers, str) else answers)]
    if len(gold) == 1:
        return 1.0 if prediction == gold[0] else 0.0
    total = 0.0
    for i in range(len(gold)):
        matches = [a for j, a in enumerate(gold) if j != i and a == prediction]
        total += min(1.0, len(matches) / 3)
    return total / len(gold)
"""


def test_vqa_accuracy_that_forgets_the_gold_answers_is_told_so():
    message = failure("vqa_accuracy", learner(VQA_GOLD_RAW))
    assert "the gold answers were not normalised" in message


def test_vqa_accuracy_that_forgets_the_prediction_is_told_so():
    message = failure("vqa_accuracy", learner(VQA_PREDICTION_RAW))
    assert "the prediction was not normalised" in message


# ----------------------------------------------------------------------------------------------
# Lesson 03: causal masks written with F.scaled_dot_product_attention


GQA_SDPA = """
def grouped_query_attention(q, k, v):
    n_rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(n_rep, dim=1), v.repeat_interleave(n_rep, dim=1)
    tq, tk = q.shape[2], k.shape[2]
    allowed = torch.ones(tq, tk, dtype=torch.bool).tril(diagonal={diagonal})
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
"""

GQA_IS_CAUSAL = """
def grouped_query_attention(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
"""


def test_causal_mask_one_too_strict_with_sdpa_gets_the_mask_hint():
    """SDPA writes zeros for a query that may see no key, where a hand-written softmax gives NaN: the same
    mistake, recognised as such."""
    message = failure("grouped_query_attention", learner(GQA_SDPA.format(diagonal="tk - tq - 1")))
    assert "also hides each token from itself" in message


def test_causal_mask_one_too_lax_with_sdpa_gets_the_mask_hint():
    message = failure("grouped_query_attention", learner(GQA_SDPA.format(diagonal="tk - tq + 1")))
    assert "each query also sees the next token" in message


def test_is_causal_on_top_of_a_cache_gets_the_offset_hint():
    """is_causal=True aligns the mask top-left: with a cache (Tq < Tk) the queries lose the cached keys."""
    message = failure("grouped_query_attention", learner(GQA_IS_CAUSAL))
    assert "the mask ignores the cache" in message


# ----------------------------------------------------------------------------------------------
# Lesson 01: the head split done with a plain reshape, with a correct scaled_dot_product_attention beside it


MHA_RESHAPE = """
def multi_head_attention(x, attn):
    b, n, d = x.shape
    h = attn.num_heads
    q = attn.q_proj(x).reshape(b, h, n, d // h)
    k = attn.k_proj(x).reshape(b, h, n, d // h)
    v = attn.v_proj(x).reshape(b, h, n, d // h)
    out = {attention}(q, k, v)
    return attn.out_proj(out{merge})
"""


@pytest.mark.parametrize("attention", ["scaled_dot_product_attention", "F.scaled_dot_product_attention"])
@pytest.mark.parametrize("merge", [".reshape(b, n, d)", ".transpose(1, 2).reshape(b, n, d)"])
def test_mha_split_by_reshape_gets_the_head_split_hint(attention, merge):
    message = failure("multi_head_attention", learner(MHA_RESHAPE.format(attention=attention, merge=merge),
                                                       LEARNER_SDPA))
    assert "heads split with a plain reshape" in message
    assert "scaled_dot_product_attention" not in message


def test_mha_check_cell_prints_the_head_split_hint(capsys):
    namespace = learner(MHA_RESHAPE.format(attention="scaled_dot_product_attention", merge=".reshape(b, n, d)"),
                        LEARNER_SDPA)
    check("multi_head_attention", namespace["multi_head_attention"])
    line = capsys.readouterr().out
    assert line.startswith("❌ multi_head_attention: heads split with a plain reshape"), line


MHA_RIGHT = """
def multi_head_attention(x, attn):
    b, n, d = x.shape
    h = attn.num_heads
    split = lambda t: t.view(b, n, h, d // h).transpose(1, 2)
    out = scaled_dot_product_attention(split(attn.q_proj(x)), split(attn.k_proj(x)), split(attn.v_proj(x)))
    return attn.out_proj(out.transpose(1, 2).reshape(b, n, d))
"""

SDPA_SOFTMAX_DIM_MINUS_2_TRANSPOSED = """
def scaled_dot_product_attention(q, k, v):
    scores = k @ q.transpose(-2, -1) / math.sqrt(q.shape[-1])
    return scores.softmax(dim=0).transpose(-2, -1) @ v
"""


def test_mha_names_the_learners_failing_helper():
    """A correct multi_head_attention over a broken helper: the message points at the helper, with its own
    check's message."""
    message = failure("multi_head_attention", learner(MHA_RIGHT, SDPA_SOFTMAX_DIM_MINUS_2_TRANSPOSED))
    assert "your scaled_dot_product_attention does not pass its own check yet" in message


MHA_NO_MERGE_PROJECTION_OFFSET = """
def multi_head_attention(x, attn):
    b, n, d = x.shape
    h = attn.num_heads
    split = lambda t: t.view(b, n, h, d // h).transpose(1, 2)
    out = scaled_dot_product_attention(split(attn.q_proj(x)), split(attn.k_proj(x)), split(attn.v_proj(x)))
    return attn.out_proj(out.transpose(1, 2).reshape(b, n, d)) + x
"""


def test_mha_unknown_mistake_does_not_blame_a_passing_helper():
    message = failure("multi_head_attention", learner(MHA_NO_MERGE_PROJECTION_OFFSET, LEARNER_SDPA))
    assert "right shape, wrong values" in message
    assert "scaled_dot_product_attention" not in message


# ----------------------------------------------------------------------------------------------
# End-to-end graded tests explain their failure with the hint of the piece that causes it


def _graded_test_module(name: str):
    import importlib
    import sys
    from pathlib import Path

    folder = str(Path(__file__).resolve().parent.parent / "exercises_tests")
    if folder not in sys.path:
        sys.path.insert(0, folder)
    return importlib.import_module(name)


def test_end_to_end_failure_names_the_mistake_of_the_piece():
    """vqa_accuracy that forgets the gold answers fails the lesson 06 end-to-end test with its hint first."""
    from vlm_course.grading.exercises import l06_evaluation as l06

    namespace = learner(VQA_GOLD_RAW)
    namespace.update(normalize_answer=l06.normalize_answer, mmstar_match=l06.mmstar_match,
                     levenshtein=l06.levenshtein, anls=l06.anls)
    graded = _graded_test_module("test_06_evaluation")
    with pytest.raises(AssertionError) as raised:
        graded.test_evaluation_scores_a_small_run_like_the_library(namespace)
    first, *rest = str(raised.value).splitlines()
    assert first.startswith("❌ vqa_accuracy: the gold answers were not normalised"), first
    assert rest[-1].startswith("(end to end: vqa_accuracy averaged over")


def test_end_to_end_failure_with_passing_pieces_says_so():
    graded = _graded_test_module("grading_helpers")
    from vlm_course.grading.exercises import l06_evaluation as l06

    message = graded.explain({"vqa_accuracy": l06.vqa_accuracy}, ("vqa_accuracy",), "scores differ")
    assert "each pass their own check" in message and message.endswith("(end to end: scores differ)")


def test_every_exercise_keeps_a_catalogue_of_mistakes():
    """The catalogue of mutants (vlm_course/grading/exercises/, proven by tests/test_grading.py's meta-test):
    at least five plausible wrong implementations per exercise, each caught with its own hint."""
    from vlm_course.grading import all_exercises

    thin = {ex.name: len(ex.mutants) for ex in all_exercises() if len(ex.mutants) < 5}
    assert not thin, f"exercises with fewer than five catalogued mistakes: {thin}"


# ----------------------------------------------------------------------------------------------
# The same mistake written another way gets the same hint


@pytest.mark.parametrize(("name", "source", "fragment"), [
    ("patchify", """
def patchify(images, patch_size):
    b, c, h, w = images.shape
    if h % patch_size or w % patch_size:
        raise ValueError("not a multiple of the patch size")
    x = images.unfold(2, patch_size, patch_size).unfold(3, patch_size, patch_size)  # (B, C, rows, cols, p, p)
    return x.permute(0, 3, 2, 1, 4, 5).reshape(b, -1, c * patch_size * patch_size)
""", "column-major order"),
    ("patchify", """
def patchify(images, patch_size):
    b, c, h, w = images.shape
    if h % patch_size or w % patch_size:
        raise ValueError("not a multiple of the patch size")
    return F.unfold(images, patch_size, stride=patch_size)
""", "F.unfold returns (B, C*p*p, N)"),
    ("rms_norm", """
def rms_norm(x, weight, eps=1e-5):
    rms = x.norm(dim=-1, keepdim=True) / math.sqrt(x.shape[-1])
    return weight * (x / (rms + eps))
""", "eps was added after the square root"),
    ("answer_loss", """
def answer_loss(logits, labels):
    logp = F.log_softmax(logits.float(), dim=-1)
    return F.nll_loss(logp.flatten(0, 1), labels.flatten(), ignore_index=-100)
""", "no shift"),
    ("swiglu", """
def swiglu(x, mlp):
    g = mlp.gate_proj(x)
    return mlp.down_proj(g * torch.sigmoid(g))
""", "up_proj is missing"),
    ("grouped_query_attention", """
def grouped_query_attention(q, k, v):
    n_rep = q.shape[1] // k.shape[1]
    k, v = k.repeat(1, n_rep, 1, 1), v.repeat(1, n_rep, 1, 1)
    tq, tk = q.shape[2], k.shape[2]
    mask = torch.ones(tq, tk, dtype=torch.bool).tril(diagonal=tk - tq)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
""", "repeated as a tile"),
    ("sampling_probs", """
def sampling_probs(logits, temperature=1.0, top_k=None, top_p=None):
    if temperature <= 0:
        return F.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_k:
        kth = probs.topk(top_k, dim=-1).values[:, -1:]
        probs = torch.where(probs < kth, torch.zeros_like(probs), probs)
    if top_p is not None and top_p < 1.0:
        p, order = probs.sort(dim=-1, descending=True)
        drop = (p.cumsum(-1) - p) >= top_p
        probs = probs.masked_fill(drop.scatter(-1, order, drop), 0.0)
    return probs
""", "not renormalised"),
])
def test_same_mistake_other_api_same_hint(name, source, fragment):
    assert fragment in failure(name, learner(source))

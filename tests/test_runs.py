"""Runs that meet runs: overwriting a folder, resuming the wrong run or a finished one, and bad input found before
training (each a one-line error, exit code 2)."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
import run_distill
import torch
from helpers import run_and_capture, run_recipe_process, tiny_run_args, tiny_vit

ROOT = Path(__file__).resolve().parents[1]


def case_sections(stderr: str) -> list[str]:
    """stderr of tests/scripts/recipe_cases.py cut into one section per case."""
    return re.split(r"^=== case \d+\n", stderr, flags=re.MULTILINE)[1:]


def error_lines(section: str) -> list[str]:
    return [line for line in section.splitlines() if line.startswith("error:")]


@pytest.mark.slow
def test_overwrite_clears_the_old_run_and_resume_refuses_other_or_finished_runs(saved_models, imagefolder, tmp_path):
    run = tmp_path / "run"
    wide = tmp_path / "wide_student"
    tiny_vit(num_labels=3, hidden=48).config.save_pretrained(wide)
    common = ("--eval_strategy", "no", "--profile_images", "0", "--evaluate_teacher", "false")
    first = tiny_run_args(saved_models, imagefolder, run, *common)  # lr 1e-3, seed 0, 4 steps, saves at 2 and 4
    second = tiny_run_args(saved_models, imagefolder, run, *common, "--max_steps", "3", "--learning_rate", "5e-3",
                           "--seed", "1")  # 24 images at batch 4: step 3 is mid-epoch
    resume = ["--resume_from_checkpoint", "true"]
    checkpoint = f"{run}/checkpoint-5"
    different = "belongs to a run configured differently (checkpoint → now: "
    remedy = "; resume with the checkpoint's settings, or start a new run with --overwrite_output_dir true or another --output_dir"
    cases = [
        (first, 0, None),
        ([*second, "--overwrite_output_dir", "true"], 0, None),
        # Growing the run, with options that only change logging and loading: it continues to step 5 (mid-epoch).
        ([*second, "--max_steps", "5", "--logging_steps", "1", "--dataloader_num_workers", "1", *resume], 0, None),
        # The first run's settings against the second run's checkpoint.
        ([*first, "--max_steps", "6", *resume], 2,
         f"error: resume_from_checkpoint: '{checkpoint}' {different}learning_rate 0.005 → 0.001; seed 1 → 0){remedy}"),
        ([*second, "--max_steps", "6", "--student", str(wide / "config.json"), *resume], 2,
         f"error: resume_from_checkpoint: '{checkpoint}' {different}student config hidden_size 32 → 48; student config "
         f"intermediate_size 64 → 96; student config pooler_output_size 32 → 48){remedy}"),
        ([*second, "--max_steps", "4", *resume], 2,
         f"error: max_steps: 4 is not above step 5 of the checkpoint resumed from ('{checkpoint}'); pass a length above 5 "
         "steps to continue the run (it was set to 5)"),
        ([*second, "--max_steps", "-1", "--num_train_epochs", "0.25", *resume], 2,
         f"error: num_train_epochs: 0.25 epochs are 2 steps, which is not above step 5 of the checkpoint resumed from "
         f"('{checkpoint}'); pass a length above 5 steps to continue the run (it was set to 5)"),
        ([*second, "--max_steps", "5", *resume], 2,
         f"error: resume_from_checkpoint: this run is finished at step 5 ('{checkpoint}'); raise --max_steps to train it "
         "further, or start a new run with --overwrite_output_dir true or another --output_dir"),
        ([*second, *resume, "--overwrite_output_dir", "true"], 2,
         f"error: overwrite_output_dir: true would delete the checkpoint resumed from ('{checkpoint}'); drop "
         "--overwrite_output_dir to continue that run, or drop --resume_from_checkpoint to start over"),
    ]

    def run_cases(selected) -> list[str]:
        """The cases in one recipe process (as a job runs them): each case's stderr section, checked."""
        (tmp_path / "cases.json").write_text(json.dumps([argv for argv, _, _ in selected]))
        result = run_recipe_process([str(tmp_path / "cases.json")], check=False,
                                    script=ROOT / "tests" / "scripts" / "recipe_cases.py")
        assert "Traceback" not in result.stderr, result.stderr[-3000:]
        sections = case_sections(result.stderr)
        assert len(sections) == len(selected), result.stderr[-3000:]
        for index, (section, (_, code, message)) in enumerate(zip(sections, selected)):
            assert section.rstrip().endswith(f"=== exit {index} {code}"), section[-2000:]
            if message:
                assert error_lines(section) == [message], section[-2000:]
        return sections

    sections = run_cases(cases[:3])
    assert "overwrite_output_dir: removed the previous run from" in sections[1]
    # Overwriting removed the first run: every checkpoint left is the second run's (the first's checkpoint-4 would
    # otherwise have been resumed by the third case), which then grew to step 5.
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3", "checkpoint-4", "checkpoint-5"]
    for folder in [run, *run.glob("checkpoint-*")]:  # the record travels with each checkpoint
        training = json.loads((folder / "run_config.json").read_text())["training"]
        assert (training["learning_rate"], training["seed"]) == (5e-3, 1), folder
    assert json.loads((run / "checkpoint-2" / "trainer_state.json").read_text())["max_steps"] == 3
    results = json.loads((run / "results.json").read_text())
    assert (results["global_steps"], results["max_steps"]) == (5, 5)

    record, student = (run / "run_config.json").read_bytes(), (run / "model.safetensors").read_bytes()
    run_cases(cases[3:])
    # The refused resumes changed nothing: not the record, not the finished run's final student, no new checkpoint.
    assert (run / "run_config.json").read_bytes() == record
    assert (run / "model.safetensors").read_bytes() == student
    assert len(list(run.glob("checkpoint-*"))) == 4


def test_which_fields_change_a_run():
    """Options that change the trained weights are compared on resume; logging, output, loading and length are not."""
    from hf_spectralkd import SpectralDistillationConfig
    from hf_spectralkd.training.run_record import record_differences

    def record(dataset="x", **options):
        values = {"output_dir": "a", "use_cpu": True, "report_to": [], "student_layers": [0, 2], "teacher_layers": [0, 3],
                  **options}
        return {"training": SpectralDistillationConfig(**values).to_dict(), "data": {"dataset": dataset}}

    base = record()
    for neutral in ({"output_dir": "b"}, {"logging_steps": 7}, {"dataloader_num_workers": 3}, {"max_steps": 99},
                    {"num_train_epochs": 9.0}, {"save_steps": 3}, {"eval_strategy": "steps", "eval_steps": 5},
                    {"per_device_eval_batch_size": 64}, {"teacher_check_images": 0}):
        assert record_differences(base, record(**neutral)) == [], neutral
    for changed, expected in (
        ({"alpha": 0.5}, "alpha 0.9 → 0.5"), ({"beta": 0.0}, "beta 0.2 → 0.0"), ({"seed": 3}, "seed 42 → 3"),
        ({"learning_rate": 1e-3}, "learning_rate 5e-05 → 0.001"), ({"per_device_train_batch_size": 16}, "per_device_train_batch_size 8 → 16"),
        ({"student_layers": [1, 2]}, "student_layers [0, 2] → [1, 2]"), ({"teacher_layers": [0, 1]}, "teacher_layers [0, 3] → [0, 1]"),
        ({"distillation_type": "hard"}, "distillation_type 'soft' → 'hard'"), ({"dataset": "y"}, "dataset 'x' → 'y'"),
        ({"gradient_accumulation_steps": 2}, "gradient_accumulation_steps 1 → 2"),
    ):
        assert record_differences(base, record(**changed)) == [expected], changed


# ------------------------------------------------------------------------------------------------
# Bad input found before training: one line, exit code 2
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bad_data(tmp_path_factory, parquet_dataset, imagefolder):
    import pyarrow.parquet as pq

    root = tmp_path_factory.mktemp("bad_data")
    shard = Path(parquet_dataset) / "train" / "train-00000.parquet"
    for name in ("empty", "truncated", "mixed"):
        shutil.copytree(parquet_dataset, root / name)
    table = pq.read_table(shard)
    pq.write_table(table.slice(0, 0), root / "empty" / "train" / "train-00002.parquet")  # a shard with no rows
    cut = root / "truncated" / "train" / "train-00001.parquet"
    os.truncate(cut, cut.stat().st_size // 2)  # an interrupted copy
    pq.write_table(table.rename_columns(["image", "label"]), root / "mixed" / "train" / "train-00001.parquet")
    (root / "duplicate.yaml").write_text("alpha: 0.5\nbeta: 0.1\nalpha: 0.7\n")
    tiny_vit(num_labels=5).save_pretrained(root / "student5")
    return root


#: (case id, how to change the tiny working command, the exact error line after "error: ")
BAD_RUN_INPUTS = [
    ("gradient_accumulation_0", lambda a, p: a + ["--gradient_accumulation_steps", "0"],
     "gradient_accumulation_steps must be a positive integer, got 0"),
    ("train_batch_0", lambda a, p: a + ["--per_device_train_batch_size", "0"],
     "per_device_train_batch_size must be a positive integer, got 0"),
    ("eval_batch_0", lambda a, p: a + ["--per_device_eval_batch_size", "0"],
     "per_device_eval_batch_size must be a positive integer, got 0"),
    ("workers_negative", lambda a, p: a + ["--dataloader_num_workers", "-1"],
     "dataloader_num_workers must be a number of DataLoader worker processes >= 0 (0 loads in the training process), got -1"),
    ("max_train_samples_0", lambda a, p: a + ["--max_train_samples", "0"],
     "max_train_samples: expected a positive number of images (or leave it unset), got 0"),
    ("max_eval_samples_0", lambda a, p: a + ["--max_eval_samples", "0"],
     "max_eval_samples: expected a positive number of images (or leave it unset), got 0"),
    ("max_steps_0", lambda a, p: a + ["--max_steps", "0"],
     "max_steps must be a positive number of optimizer steps, or -1 to train for --num_train_epochs; got 0 (a run of 0 "
     "steps would save an untrained student)"),
    ("epochs_0", lambda a, p: a + ["--max_steps", "-1", "--num_train_epochs", "0"],
     "num_train_epochs must be a positive number of epochs, got 0.0 (or pass --max_steps N to train N optimizer steps)"),
    ("image_size_not_patches", lambda a, p: a + ["--image_size", "30"],
     "image_size: 30 does not divide into the student's 8-pixel patches (it is built for 32×32 images); leave "
     "--image_size unset to use 32, or give a student built for 30 (image_size in its config)"),
    ("image_size_not_the_students", lambda a, p: a + ["--image_size", "48"],
     "image_size: 48 differs from the 32×32 images the student is built for (its position embeddings have that grid); "
     "leave --image_size unset to use 32, or give a student built for 48 (image_size in its config)"),
    ("duplicate_layer_pair", lambda a, p: a + ["--student_layers", "0", "2", "0", "--teacher_layers", "0", "3", "0"],
     "student_layers/teacher_layers: the pair student 0 ↔ teacher 0 is given 2 times (positions [0, 2]); give each "
     "pair once"),
    ("duplicate_yaml_key", lambda a, p: [str(p / "duplicate.yaml"), *a],
     "config: '{root}/duplicate.yaml' sets 'alpha' twice (lines 1 and 3); keep one"),
    ("empty_parquet_shard", lambda a, p: a + ["--dataset", str(p / "empty"), "--image_column", "img", "--label_column", "target"],
     "dataset: parquet file '{root}/empty/train/train-00002.parquet' of split 'train' holds no rows; remove it, or copy "
     "it again if it should hold images"),
    ("truncated_parquet_shard", lambda a, p: a + ["--dataset", str(p / "truncated"), "--image_column", "img",
                                                   "--label_column", "target"],
     "dataset: '{root}/truncated/train/train-00001.parquet' is damaged (not a readable parquet file: Parquet magic bytes "
     "not found in footer. Either the file is corrupted or this is not a parquet file): copy or download it again"),
    ("mixed_parquet_schemas", lambda a, p: a + ["--dataset", str(p / "mixed"), "--image_column", "img", "--label_column", "target"],
     "dataset: the parquet files of split 'train' have different columns: '{root}/mixed/train/train-00000.parquet' has "
     "[img: struct<bytes: binary, path: string>, target: int64] but '{root}/mixed/train/train-00001.parquet' has "
     "[image: struct<bytes: binary, path: string>, label: int64]; give every file of a split the same columns"),
    ("evaluate_only_class_count", lambda a, p: ["--do_train", "false", "--student", str(p / "student5"),
                                                *a[a.index("--dataset"):a.index("--dataset") + 2], "--output_dir",
                                                str(p / "evaluated"), "--use_cpu", "true", "--report_to", "none"],
     "student: the student predicts 5 classes but dataset '{dataset}' has 3; evaluate it on the data set it was trained "
     "for (or a --student trained on these 3 classes)"),
]


@pytest.mark.parametrize("case,change,message", BAD_RUN_INPUTS, ids=[c[0] for c in BAD_RUN_INPUTS])
def test_bad_run_input_is_one_line_and_exit_code_2(case, change, message, bad_data, saved_models, imagefolder, tmp_path,
                                                   capsys):
    argv = change(tiny_run_args(saved_models, imagefolder, tmp_path / "out"), bad_data)
    code, err = run_and_capture(run_distill.main, argv, capsys)
    assert code == 2, err[-3000:]
    assert error_lines(err) == ["error: " + message.format(root=bad_data, dataset=imagefolder)], err[-3000:]
    assert "Traceback" not in err
    assert not (tmp_path / "out" / "checkpoint-2").exists()


def test_nonfinite_loss_names_the_last_checkpoint_only_when_there_is_one(tmp_path):
    from types import SimpleNamespace

    from hf_spectralkd import NonFiniteLossError
    from hf_spectralkd.training.nonfinite import NonFiniteWatch

    watch = NonFiniteWatch(("loss_ce", "loss_kd", "loss_fft"))
    watch.update(torch.tensor([0.5, float("nan"), 0.1]), step=3)
    one_process = SimpleNamespace(num_processes=1)
    start = "non-finite loss at step 3: loss_kd=nan. Training stopped before the optimizer step; "
    with pytest.raises(NonFiniteLossError) as error:
        watch.check(one_process, 3, str(tmp_path))
    assert str(error.value) == (f"{start}no checkpoint was written before it (nothing in {tmp_path} to resume from). "
                                "Lower the learning rate or check the inputs, and start again.")
    (tmp_path / "checkpoint-2").mkdir()
    with pytest.raises(NonFiniteLossError) as error:
        watch.check(one_process, 3, str(tmp_path))
    assert str(error.value) == (f"{start}the last checkpoint, checkpoint-2 in {tmp_path}, is intact. Lower the learning "
                                "rate, check the inputs, or resume from it.")


def test_image_links_to_nothing_are_counted_as_skipped(imagefolder, tmp_path, caplog):
    from hf_spectralkd.data import (
        DataArguments,
        ImageClassificationCollator,
        open_image_datasets,
        prepare_image_datasets,
    )

    folder = tmp_path / "images"
    shutil.copytree(imagefolder, folder)
    (folder / "train" / "b" / "moved.png").symlink_to(tmp_path / "elsewhere" / "moved.png")  # its target was moved
    (folder / "validation" / "c" / "gone.png").symlink_to(tmp_path / "gone.png")
    (folder / "train" / "a" / "alias.png").symlink_to(folder / "train" / "c" / "0.png")  # a sound link is an image
    with caplog.at_level("WARNING"):
        data = prepare_image_datasets(open_image_datasets(DataArguments(dataset=str(folder))), 32)
    assert len(data.train) == 3 * 8 + 2 and len(data.eval) == 3 * 3 + 1
    for split in (data.train, data.eval):
        batch = ImageClassificationCollator()([split[i] for i in range(len(split))])
        assert batch["num_skipped"] == 1 and batch["num_images"] == len(split)
    assert "1 image file(s) of split 'train' are links to nothing readable" in caplog.text

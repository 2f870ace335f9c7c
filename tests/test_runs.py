"""Runs that meet runs: overwriting a folder, resuming the wrong run or a finished one, and bad input found before
training (each a one-line error, exit code 2)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from helpers import run_recipe_process, tiny_run_args, tiny_vit

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

"""Compiled runs: each region one graph for every family, a compiled run equal to an eager one, saved and resumed."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import SyntheticImageDataset, tiny_cait, tiny_swin, tiny_vit

from hf_spectralkd import SpectralDistillationConfig, SpectralDistillationTrainer
from hf_spectralkd.errors import ConfigurationError
from hf_spectralkd.teacher import run_teacher
from hf_spectralkd.training.compilation import CompiledStep, student_objective

LOSS = dict(alpha=0.5, beta=1.0, temperature=2.0, feature_loss="fft", distillation_type="soft", label_smoothing=0.1)


def _explain(function, *args):
    torch._dynamo.reset()
    return torch._dynamo.explain(function)(*args)


@pytest.mark.parametrize("build", [tiny_vit, tiny_swin, tiny_cait], ids=["vit", "swin", "timm_wrapper"])
def test_each_region_is_one_graph(build):
    # Fresh models: their first forward is traced inside the region, where transformers would install its
    # output hooks (6 graphs for ViT, 9 for Swin when the whole step was one function).
    student, teacher = build().train(), build(seed=1)
    teacher.eval().requires_grad_(False)
    CompiledStep(SpectralDistillationConfig(output_dir="unused", teacher_compile=True), True).prepare(student, teacher)
    pixels, labels, layers = torch.randn(2, 3, 32, 32), torch.tensor([0, 3]), [0, 1]
    teacher_region = _explain(run_teacher, teacher, pixels, layers, None, torch.tensor([4, 3, 2, 1, 0]))
    assert (teacher_region.graph_count, teacher_region.graph_break_count) == (1, 0), teacher_region.break_reasons
    teacher_logits, teacher_maps = run_teacher(teacher, pixels, layers)
    student_region = _explain(student_objective, student, pixels, labels, teacher_logits, teacher_maps, layers, LOSS)
    assert (student_region.graph_count, student_region.graph_break_count) == (1, 0), student_region.break_reasons


def test_teacher_compile_modes_and_the_bool_spelling():
    config = SpectralDistillationConfig
    assert config(output_dir="o", teacher_compile=True).teacher_compile == "default"
    assert config(output_dir="o", teacher_compile="false").teacher_compile is None
    assert config(output_dir="o", teacher_compile="max-autotune-no-cudagraphs").teacher_compile == "max-autotune-no-cudagraphs"
    with pytest.raises(ConfigurationError, match="teacher_compile must be one of default, reduce-overhead, max-autotune"):
        config(output_dir="o", teacher_compile="fast")
    with pytest.raises(ConfigurationError, match="torch_compile_mode must be one of"):
        config(output_dir="o", torch_compile_mode="turbo")


def test_teacher_compile_in_a_config_file_and_on_the_command_line(tmp_path):
    from hf_spectralkd.recipe.arguments import load_recipe, parse_arguments

    recipe = tmp_path / "run.yaml"
    recipe.write_text(f"teacher: t\nstudent: s\noutput_dir: {tmp_path}\nteacher_compile: true\n")
    assert load_recipe(str(recipe))[2].teacher_compile == "default"  # the former switch's spelling
    common = ["--teacher", "t", "--student", "s", "--output_dir", str(tmp_path)]
    assert parse_arguments([*common, "--teacher_compile"])[2].teacher_compile == "default"
    assert parse_arguments([*common, "--teacher_compile", "reduce-overhead", "--torch_compile_mode", "max-autotune"])[2] \
        .teacher_compile == "reduce-overhead"
    with pytest.raises(ConfigurationError, match="teacher_compile must be one of .*got 'fast'"):
        parse_arguments([*common, "--teacher_compile", "fast"])


def _run(output_dir, compile_: bool, resume=None, max_steps=3):
    # aot_eager: the same graphs without inductor's C++ code generation, which took 192 s for this 3-step run
    # on 2 CPU cores (aot_eager 7 s); losses agreed to 1e-7 between the two backends.
    extra = dict(torch_compile=True, torch_compile_backend="aot_eager", teacher_compile="default") if compile_ else {}
    args = SpectralDistillationConfig(
        output_dir=str(output_dir), use_cpu=True, report_to=[], student_layers=[0, 2], teacher_layers=[0, 2],
        teacher_check_images=0, max_steps=max_steps, per_device_train_batch_size=4, save_steps=2, logging_steps=1,
        disable_tqdm=True, seed=0, **extra)
    trainer = SpectralDistillationTrainer(model=tiny_vit(), teacher_model=tiny_vit(seed=1), args=args,
                                          train_dataset=SyntheticImageDataset(16))
    trainer.train(resume_from_checkpoint=resume)
    return trainer, [round(log["loss"], 5) for log in trainer.state.log_history if "loss" in log]


@pytest.mark.slow
def test_compiled_run_trains_as_eager_checkpoints_resumes_and_reloads(tmp_path):
    from transformers import AutoModelForImageClassification

    _, eager = _run(tmp_path / "eager", compile_=False)
    trainer, compiled = _run(tmp_path / "compiled", compile_=True)
    assert compiled == eager and len(compiled) == 3
    assert trainer._compiled.student is not student_objective and trainer._compiled.teacher is not run_teacher
    folder = tmp_path / "compiled" / "checkpoint-3"
    names = json.loads((folder / "checkpoint_manifest.json").read_text())["files"]
    assert "model.safetensors" in names
    from safetensors import safe_open

    with safe_open(folder / "model.safetensors", "pt") as weights:
        assert not [key for key in weights.keys() if "_orig_mod" in key]
    reloaded = AutoModelForImageClassification.from_pretrained(folder).eval()
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(reloaded(pixel_values=pixels).logits, trainer.model.eval()(pixel_values=pixels).logits)
    card = (folder / "README.md").read_text()
    assert "| compilation | torch.compile: student (forward, taps and loss; mode default), teacher" in card
    assert "| compilation | none (eager) |" in (tmp_path / "eager" / "checkpoint-3" / "README.md").read_text()
    # resumed from checkpoint-2 (compiled again): step 3 as in the uninterrupted run
    (tmp_path / "compiled" / "checkpoint-3").rename(tmp_path / "step3")
    resumed, losses = _run(tmp_path / "compiled", compile_=True, resume=True)
    assert resumed.state.global_step == 3 and losses[-1] == compiled[-1]

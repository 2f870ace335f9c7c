"""Model cards for distilled students, and pushing a finished run to the Hub.

The card is written beside the weights on every save (``README.md``) and pushed with them. Its
metadata is built with ``huggingface_hub.ModelCardData`` so the Hub indexes it: library, pipeline
tag, tags, dataset, base model (a pretrained student's initialisation), the teacher and a
``model-index`` with top-1/top-5.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Optional

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from .features import unwrap_model
from .models import count_parameters

logger = logging.getLogger(__name__)

PROFILE_PLOT = "spectral_profiles.png"
CARD_TAGS = ["knowledge-distillation", "spectralkd", "vision-transformer", "image-classification"]
CITATION = """@article{tian2024spectralkd,
  title   = {SpectralKD: Understanding and Optimizing Vision Transformer Distillation through Spectral Analysis},
  author  = {Tian, Huiyuan and Xu, Bonan and Li, Shijian and Pan, Gang},
  journal = {arXiv preprint arXiv:2412.19055},
  year    = {2024}
}"""


def _is_hub_id(value: Optional[str]) -> bool:
    return bool(value) and "/" in value and not os.path.exists(value) and not value.startswith(("/", ".", "~"))


def _latest_eval(log_history: list[dict[str, Any]]) -> dict[str, float]:
    for entry in reversed(log_history):
        if "eval_top1" in entry:
            return entry
    return {}


def _best_eval(log_history: list[dict[str, Any]]) -> Optional[float]:
    values = [entry["eval_top1"] for entry in log_history if "eval_top1" in entry]
    return max(values) if values else None


def _percent(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{100 * value:.2f} %"


def build_model_card(
    *,
    model,
    args,
    layer_map: list,
    log_history: list[dict[str, Any]],
    teacher_source: Optional[str] = None,
    teacher_revision: Optional[str] = None,
    teacher_parameters: Optional[int] = None,
    teacher_accuracy: Optional[float] = None,
    student_source: Optional[str] = None,
    student_kind: Optional[str] = None,
    dataset: Optional[str] = None,
    dataset_split: Optional[str] = None,
    model_id: Optional[str] = None,
    has_profile_plot: bool = False,
) -> ModelCard:
    """A ``ModelCard`` describing a SpectralKD-distilled student (see module docstring)."""
    model = unwrap_model(model)
    num_params = count_parameters(model)
    latest = _latest_eval(log_history)
    top1, top5 = latest.get("eval_top1"), latest.get("eval_top5")
    distilled = teacher_source is not None
    model_name = model_id or Path(str(args.output_dir)).name
    hub_dataset = dataset if _is_hub_id(dataset) else None

    eval_results = []
    if top1 is not None:
        common = dict(task_type="image-classification", dataset_type=hub_dataset or (dataset or "custom"),
                      dataset_name=dataset or "custom", dataset_split=dataset_split or "validation")
        eval_results.append(EvalResult(metric_type="accuracy", metric_name="Top-1 accuracy", metric_value=float(top1), **common))
        if top5 is not None:
            eval_results.append(EvalResult(metric_type="top_5_accuracy", metric_name="Top-5 accuracy", metric_value=float(top5), **common))

    data = ModelCardData(
        library_name="transformers",
        pipeline_tag="image-classification",
        tags=list(CARD_TAGS),
        datasets=[hub_dataset] if hub_dataset else None,
        base_model=student_source if student_kind == "pretrained" and _is_hub_id(student_source) else None,
        metrics=["accuracy"],
        model_name=model_name,
        eval_results=eval_results or None,
        teacher_model=teacher_source if distilled else None,
        teacher_revision=teacher_revision if distilled else None,
    )

    pairs = "\n".join(
        f"| {p.student} | {p.teacher} | {'×'.join(map(str, p.student_shape))} | {'×'.join(map(str, p.teacher_shape))} |"
        for p in layer_map
    )
    steps = log_history[-1].get("step") if log_history else None
    epoch = next((e["epoch"] for e in reversed(log_history) if "epoch" in e), None)
    global_batch = args.per_device_train_batch_size * args.world_size * args.gradient_accumulation_steps
    lines = [f"# {model_name}", ""]
    if distilled:
        lines += [
            f"A `{type(model).__name__}` image classifier ({num_params:,} parameters) distilled from "
            f"[`{teacher_source}`]({'https://huggingface.co/' + teacher_source if _is_hub_id(teacher_source) else teacher_source}) "
            "with **SpectralKD** (Tian et al., [arXiv:2412.19055](https://arxiv.org/abs/2412.19055)) using hf_spectralkd.",
            "",
            "## Teacher",
            "",
            f"- Model: `{teacher_source}`" + (f" at revision `{teacher_revision}`" if teacher_revision else ""),
            f"- Parameters: {teacher_parameters:,}" if teacher_parameters else "- Parameters: n/a",
            f"- Top-1 on the evaluation split: {_percent(teacher_accuracy)}",
            "",
        ]
    else:
        lines += [f"A `{type(model).__name__}` image classifier ({num_params:,} parameters) trained without a teacher.", ""]
    lines += [
        "## Student",
        "",
        f"- Architecture: `{type(model).__name__}` (`{getattr(model.config, 'model_type', '?')}`), {num_params:,} parameters",
        f"- Initialisation: {'pretrained `' + str(student_source) + '`' if student_kind == 'pretrained' else 'random (trained from scratch)'}",
        f"- Classes: {getattr(model.config, 'num_labels', '?')}",
        "",
        "## Training",
        "",
        "Objective (SpectralKD eqs. 14-15, with one effective feature weight β):",
        "",
        "$$L = (1-\\alpha)\\,\\mathrm{CE}_{\\varepsilon}(z_s, y) + \\alpha\\,T^2\\,\\mathrm{KL}(p_t^{T} \\,\\|\\, p_s^{T}) "
        "+ \\beta\\,\\frac{1}{P}\\sum_{j=1}^{P} \\mathrm{MSE}\\big(\\mathcal{F}(\\mathrm{pool}(F_s^j)), \\mathcal{F}(\\mathrm{pool}(F_t^j))\\big)$$",
        "",
        "with 𝓕 the ortho-normalised 2-D real FFT over the patch grid and pool the parameter-free channel pooling of the wider map.",
        "",
        "| Hyperparameter | Value |",
        "|---|---|",
        f"| distillation type | {args.distillation_type} |",
        f"| α (logit KD weight) | {args.alpha} |",
        f"| β (feature weight) | {args.beta} |",
        f"| feature loss | {args.feature_loss} |",
        f"| temperature T | {args.temperature} |",
        f"| label smoothing ε | {args.label_smoothing} |",
        f"| epochs / optimizer steps | {epoch if epoch is not None else args.num_train_epochs} / {steps if steps is not None else 'n/a'} |",
        f"| batch size (global) | {global_batch} ({args.per_device_train_batch_size} per device) |",
        f"| learning rate | {args.learning_rate} ({args.lr_schedule if args.lr_schedule == 'deit' else getattr(args.lr_scheduler_type, 'value', args.lr_scheduler_type)} schedule) |",
        f"| weight decay | {args.weight_decay} |",
        f"| dataset | {dataset or 'n/a'} |",
        "",
    ]
    if layer_map:
        lines += ["Layer map (0-based blocks; Swin: stages):", "", "| student | teacher | student C×H×W | teacher C×H×W |",
                  "|---|---|---|---|", pairs, ""]
    lines += [
        "## Results",
        "",
        f"- Top-1: {_percent(top1)} (best during training: {_percent(_best_eval(log_history))})",
        f"- Top-5: {_percent(top5)}",
        "",
    ]
    if has_profile_plot:
        lines += ["## Spectral profiles", "", f"![teacher vs student spectral intensity per layer]({PROFILE_PLOT})", ""]
    repo = model_id or "path/to/this/model"
    lines += [
        "## How to use",
        "",
        "```python",
        "from transformers import pipeline",
        f'classifier = pipeline("image-classification", model="{repo}")',
        'print(classifier("image.jpg"))',
        "```",
        "",
        "## Citation",
        "",
        "```bibtex",
        CITATION,
        "```",
        "",
    ]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines))


def write_model_card(trainer, output_dir: str) -> Path:
    """Write ``README.md`` for the trainer's student into ``output_dir`` and return its path."""
    teacher_info = getattr(trainer, "teacher_info", None)
    student_info = getattr(trainer, "student_info", None)
    teacher = getattr(trainer, "teacher", None)
    teacher_source = teacher_info.source if teacher_info else (
        getattr(getattr(unwrap_model(teacher), "config", None), "_name_or_path", None) or "custom teacher" if teacher is not None else None
    )
    card = build_model_card(
        model=trainer.model,
        args=trainer.args,
        layer_map=getattr(trainer, "layer_map", []),
        log_history=trainer.state.log_history,
        teacher_source=teacher_source,
        teacher_revision=teacher_info.revision if teacher_info else None,
        teacher_parameters=count_parameters(unwrap_model(teacher)) if teacher is not None else None,
        teacher_accuracy=getattr(trainer, "teacher_accuracy", None),
        student_source=student_info.source if student_info else None,
        student_kind=student_info.kind if student_info else None,
        dataset=getattr(trainer, "dataset_name", None),
        dataset_split=getattr(trainer, "dataset_split", None),
        model_id=trainer.args.hub_model_id,
        has_profile_plot=(Path(output_dir) / PROFILE_PLOT).exists(),
    )
    path = Path(output_dir) / "README.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    card.save(str(path))
    return path


#: What `hf-spectralkd push` never uploads: checkpoints (optimizer states), staging folders, TensorBoard events.
PUSH_IGNORE = ["checkpoint-*", "checkpoint-*/**", ".checkpoint-staging/**", "runs/**", "_*", "*.tmp"]
STUDENT_FILES = ("config.json", "model.safetensors")


def hf_api():
    """The Hub client (one place to patch in tests); tokens come from the caller or ``HF_TOKEN``."""
    from transformers.utils.hub import hf_api as transformers_hf_api

    return transformers_hf_api()


def push_run(
    output_dir: str,
    repo_id: str,
    *,
    private: Optional[bool] = None,
    token: Optional[str] = None,
    revision: Optional[str] = None,
    commit_message: str = "Upload SpectralKD-distilled student",
):
    """Push a finished run folder (student, processor, card, plots, results) to ``repo_id``.

    Only the student is in a run folder's top level; checkpoints and TensorBoard events are skipped.
    The card's usage snippet is pointed at ``repo_id`` before upload.
    """
    folder = Path(output_dir)
    missing = [name for name in STUDENT_FILES if not (folder / name).exists()]
    if missing:
        raise ValueError(
            f"output_dir: '{output_dir}' is not a finished run (missing {', '.join(missing)}); pass the folder "
            "run_distill.py wrote the final student to"
        )
    readme = folder / "README.md"
    if readme.exists():
        card = ModelCard.load(str(readme))
        card.text = card.text.replace("path/to/this/model", repo_id)
        card.data.model_name = repo_id.split("/")[-1]
        card.save(str(readme))
    api = hf_api()
    repo = api.create_repo(repo_id, token=token, private=private, exist_ok=True)
    return api.upload_folder(
        repo_id=getattr(repo, "repo_id", repo_id),
        folder_path=str(folder),
        commit_message=commit_message,
        token=token,
        revision=revision,
        ignore_patterns=PUSH_IGNORE,
    )

"""Model cards for distilled students, and pushing a finished run to the Hub.

The card is rendered from the run's :class:`~hf_spectralkd.io.run_summary.RunSummary` with
huggingface_hub's ``ModelCard.from_template`` and the template ``templates/model_card.md``. It is
written beside the weights on every save (``README.md``) and pushed with them. Its metadata
(``ModelCardData``) lets the Hub index it: library, pipeline tag, tags, license, dataset, base
model (a pretrained student's initialisation), the teacher and a ``model-index`` with top-1/top-5.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Optional

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from ..errors import ConfigurationError
from ..students import CUSTOM_CODE_MODEL_TYPES
from .integrity import check_model_folder
from .run_summary import RunSummary

logger = logging.getLogger(__name__)

PROFILE_PLOT = "spectral_profiles.png"
CARD_TEMPLATE = Path(__file__).parents[1] / "templates" / "model_card.md"
CARD_TAGS = ["knowledge-distillation", "spectralkd", "vision-transformer", "image-classification"]
REPO_PLACEHOLDER = "path/to/this/model"


def _is_hub_id(name: Optional[str]) -> bool:
    # RunSummary names are public already: a local folder appears by its name, which has no "/".
    return bool(name) and "/" in name and not name.startswith("demo:")


def _percent(value: Optional[float], interval: Optional[list[float]] = None) -> str:
    """``73.20 %``, with its bootstrap interval when there is one: ``73.20 % (95 % CI 72.81–73.59 %)``."""
    if value is None:
        return "n/a"
    return f"{100 * value:.2f} %" + (f" (95 % CI {100 * interval[0]:.2f}–{100 * interval[1]:.2f} %)" if interval else "")


def _card_data(summary: RunSummary, model_name: str) -> ModelCardData:
    eval_results = []
    if summary.student_accuracy is not None:
        dataset = summary.dataset or "custom"
        common = dict(task_type="image-classification", dataset_type=dataset,
                      dataset_name=dataset, dataset_split=summary.eval_split or "validation")
        eval_results.append(EvalResult(metric_type="accuracy", metric_name="Top-1 accuracy",
                                       metric_value=float(summary.student_accuracy), **common))
        if summary.student_top5 is not None:
            eval_results.append(EvalResult(metric_type="top_5_accuracy", metric_name="Top-5 accuracy",
                                           metric_value=float(summary.student_top5), **common))
    return ModelCardData(
        library_name="transformers",
        pipeline_tag="image-classification",
        license=summary.license,
        tags=list(CARD_TAGS),
        datasets=[summary.dataset] if _is_hub_id(summary.dataset) else None,
        base_model=summary.student if summary.student_kind == "pretrained" and _is_hub_id(summary.student) else None,
        metrics=["accuracy"],
        model_name=model_name,
        eval_results=eval_results or None,
        teacher_model=summary.teacher,
        teacher_revision=summary.teacher_revision,
    )


def build_model_card(
    summary: RunSummary, *, model_name: str, model_id: Optional[str] = None, has_profile_plot: bool = False
) -> ModelCard:
    """The card of a distilled (or teacher-less) student, rendered from ``summary``."""
    teacher = summary.teacher
    teacher_link = f"[`{teacher}`](https://huggingface.co/{teacher})" if _is_hub_id(teacher) else f"`{teacher}`"
    return ModelCard.from_template(
        _card_data(summary, model_id or model_name),
        template_path=str(CARD_TEMPLATE),
        s=summary,
        model_name=model_id or model_name,
        teacher_link=teacher_link,
        student_parameters=f"{summary.student_parameters:,}",
        teacher_parameters=f"{summary.teacher_parameters:,}" if summary.teacher_parameters else "n/a",
        teacher_top1=_percent(summary.teacher_accuracy),
        student_top1=_percent(summary.student_accuracy, summary.student_top1_ci),
        student_top5=_percent(summary.student_top5, summary.student_top5_ci),
        best_top1=_percent(summary.best_student_accuracy),
        epochs=f"{summary.epochs:.4g}" if summary.epochs is not None else summary.num_train_epochs,
        steps=summary.global_steps if summary.global_steps is not None else "n/a",
        eval_split=f"the `{summary.eval_split}` split of `{summary.dataset}`" if summary.eval_split else "no split",
        has_profile_plot=has_profile_plot,
        profile_plot=PROFILE_PLOT,
        custom_code=summary.student_model_type in CUSTOM_CODE_MODEL_TYPES,
        repo=model_id or REPO_PLACEHOLDER,
    )


def write_model_card(
    summary: RunSummary, output_dir: str, model_id: Optional[str] = None, model_name: Optional[str] = None
) -> Path:
    """Write ``README.md`` for the student in ``output_dir`` and return its path.

    ``model_name`` (the card's title when there is no ``model_id``) defaults to the folder's name.
    """
    folder = Path(output_dir)
    card = build_model_card(summary, model_name=model_name or folder.resolve().name, model_id=model_id,
                            has_profile_plot=(folder / PROFILE_PLOT).exists())
    folder.mkdir(parents=True, exist_ok=True)
    card.save(str(folder / "README.md"))
    return folder / "README.md"


#: What `hf-spectralkd push` never uploads: checkpoints (optimizer states), staging folders, TensorBoard events.
PUSH_IGNORE = ["checkpoint-*", "checkpoint-*/**", ".checkpoint-staging/**", "runs/**", "_*", "*.tmp", ".hf_spectralkd.lock",
               "run_config.json"]
STUDENT_FILES = ("config.json", "model.safetensors")


def move_token_to_environment(args) -> None:
    """Move ``args.hub_token`` into ``HF_TOKEN``, where huggingface_hub reads it, and clear it from ``args``.

    The arguments are serialised into every checkpoint (``training_args.bin``), ``run_config.json`` and the logs,
    and pushed with the model; the environment is not. Done once, by the trainer that owns the run.
    """
    if getattr(args, "hub_token", None):
        os.environ["HF_TOKEN"] = args.hub_token
        args.hub_token = None


def hf_api():
    """The Hub client (one place to patch in tests); tokens come from the caller or ``HF_TOKEN``."""
    from transformers.utils.hub import hf_api as transformers_hf_api

    return transformers_hf_api()


def require_online_hub(argument: str, instead: str) -> None:
    """Refuse, before any work, an upload while ``HF_HUB_OFFLINE=1`` is set: huggingface_hub would otherwise stop
    it deep inside (``OfflineModeIsEnabled``, a long traceback) after models and data were loaded.

    ``instead``: what the user can do rather than go online.
    """
    from huggingface_hub import constants

    if constants.is_offline_mode():
        raise ConfigurationError(f"{argument}: uploading needs the Hub, but HF_HUB_OFFLINE=1 is set; unset it, or {instead}")


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
        raise ConfigurationError(
            f"output_dir: '{output_dir}' is not a finished run (missing {', '.join(missing)}); pass the folder "
            "run_distill.py wrote the final student to"
        )
    check_model_folder(folder, "output_dir")  # never upload a truncated student
    require_online_hub("push", "run `hf-spectralkd push` where the Hub can be reached")
    readme = folder / "README.md"
    if readme.exists():
        card = ModelCard.load(str(readme))
        card.text = card.text.replace(REPO_PLACEHOLDER, repo_id)
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

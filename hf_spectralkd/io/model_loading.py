"""Loading teachers and students: Hub ids, local folders, config files and built-in architectures.

Everything goes through ``AutoModelForImageClassification`` so a distilled student is a plain
transformers model. Weights load as safetensors where the checkpoint has them; ``trust_remote_code``
stays off unless the caller sets it; tokens come from the environment (``HF_TOKEN``) or the caller
and are never logged.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from huggingface_hub.errors import StrictDataclassError
from safetensors import SafetensorError
from transformers import (
    AutoConfig,
    AutoModelForImageClassification,
    PretrainedConfig,
    PreTrainedModel,
    SwinConfig,
    TimmWrapperConfig,
    ViTConfig,
)

from ..errors import ConfigurationError
from ..labels import match_head_to_labels
from ..students.presets import deit_geometry, deit_tiny_lift, deit_tiny_widelast, demo_widelast, timm_vit_init_
from .integrity import COPY_AGAIN, WEIGHT_FILES, damaged, first_line, loading_problems, model_folder_problems, read_json

logger = logging.getLogger(__name__)



def _deit(hidden: int, heads: int) -> Callable[[], PretrainedConfig]:
    # ViT with layer_norm_eps=1e-6 is timm's DeiT: 197 tokens, and timm's deit_tiny_patch16_224 weights
    # map onto it 1:1 with equal logits (HF's DeiT class adds a distillation token: 198).
    return lambda: ViTConfig(**deit_geometry(hidden, heads))


def _swin(embed_dim: int, depths: list[int], heads: list[int]) -> Callable[[], PretrainedConfig]:
    return lambda: SwinConfig(
        image_size=224, patch_size=4, embed_dim=embed_dim, depths=depths, num_heads=heads, window_size=7,
        drop_path_rate=0.0,
    )


def _demo_vit(hidden: int, layers: int, heads: int) -> Callable[[], PretrainedConfig]:
    # 28×28 digits in 7×7 patches: a 4×4 token grid, small enough to train in a minute on 2 CPU cores.
    return lambda: ViTConfig(
        image_size=28, patch_size=7, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=2 * hidden, layer_norm_eps=1e-6, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )


def _demo_cnn() -> PretrainedConfig:
    # timm's test_resnet (a ResNet of 0.37 M parameters) through the TimmWrapper, configured for the 28×28 digits
    # and their normalisation (so the teacher is neither resized to 224 px nor re-normalised): taps (stem and 4
    # stages) on 14, 7, 4, 2 and 1 px grids, against the demo ViT's 4×4, compared across grids by the feature loss.
    # Not regnety_002: a training step of it (batch 64, 28 px) measured 0.66 s on 2 cores against 0.07 s here.
    digits = {"input_size": [3, 28, 28], "mean": [0.1307] * 3, "std": [0.3081] * 3}
    return TimmWrapperConfig(architecture="test_resnet", model_args={"pretrained_cfg_overlay": digits})


#: Architectures that can be built from scratch by name (random weights), as the paper trains students.
ARCHITECTURE_PRESETS: dict[str, Callable[[], PretrainedConfig]] = {
    "deit_tiny_patch16_224": _deit(192, 3),
    "deit_small_patch16_224": _deit(384, 6),
    "deit_base_patch16_224": _deit(768, 12),
    "swin_tiny_patch4_window7_224": _swin(96, [2, 2, 6, 2], [3, 6, 12, 24]),
    "swin_small_patch4_window7_224": _swin(96, [2, 2, 18, 2], [3, 6, 12, 24]),
    "cait_s24_224": lambda: TimmWrapperConfig(architecture="cait_s24_224"),
    "demo_vit_teacher": _demo_vit(64, 6, 4),
    "demo_vit_student": _demo_vit(32, 4, 2),
    "demo_cnn_teacher": _demo_cnn,
    # Students that fix the encoding mismatch (hf_spectralkd/students): the last tap has the teacher's width.
    "deit_tiny_lift384": deit_tiny_lift(384),
    "deit_tiny_widelast384": deit_tiny_widelast(384),
    "deit_tiny_uniform219": _deit(219, 3),  # UniformWide: the parameter-matched control of WideLast
    "demo_widelast_student": demo_widelast,
}

#: Presets whose reference initialisation differs from what their transformers class does (applied
#: once after construction; Lift and WideLast initialise themselves in their ``_init_weights``).
PRESET_INITIALIZERS: dict[str, Callable[[PreTrainedModel], Any]] = {
    "deit_tiny_uniform219": timm_vit_init_,
}


@dataclass
class LoadedModel:
    """A model with where it came from (recorded in results.json and the model card)."""

    model: PreTrainedModel
    source: str  # what the user passed
    kind: str  # "pretrained" (weights loaded) or "scratch" (built from a config, random weights)
    revision: Optional[str] = None  # resolved commit sha for Hub models, when known


class ModelLoadError(ConfigurationError):
    """A model id/path that cannot be loaded; the message names the argument and the value."""


def _is_local(path: str) -> bool:
    return os.path.exists(os.path.expanduser(path))


def _has_weights(folder: Path) -> bool:
    return any((folder / name).exists() for name in WEIGHT_FILES)


def _label_kwargs(id2label: Optional[dict[int, str]]) -> dict[str, Any]:
    if not id2label:
        return {}
    id2label = {int(k): str(v) for k, v in id2label.items()}
    return {"num_labels": len(id2label), "id2label": id2label, "label2id": {v: k for k, v in id2label.items()}}


def _apply_labels(config: PretrainedConfig, id2label: Optional[dict[int, str]]) -> PretrainedConfig:
    for key, value in _label_kwargs(id2label).items():
        if key != "num_labels":
            setattr(config, key, value)
    if id2label:
        config.num_labels = len(id2label)
    return config


def resolve_hub_revision(
    repo_id: str, revision: Optional[str] = None, token: Optional[str] = None, cache_dir: Optional[str] = None
) -> Optional[str]:
    """The commit sha that ``revision`` (a branch, tag or sha; default the main branch) of a Hub model points to.

    huggingface_hub's ``resolve_revision`` asks the Hub and falls back to the local cache's refs when the
    Hub cannot be reached (offline runs record the commit they loaded). ``None`` when neither knows.
    """
    from huggingface_hub import resolve_revision

    try:
        return resolve_revision(repo_id, revision=revision, token=token, cache_dir=cache_dir).resolved
    except Exception:  # noqa: BLE001 - the revision is a record, never a reason to fail
        return None


def _friendly_load_error(argument: str, value: str, error: Exception) -> ModelLoadError:
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    if isinstance(error, StrictDataclassError) and len(lines) > 1:
        # A config field that fails validation: the first line only names the validator; the last holds the cause.
        lines = [lines[-1].split(": ", 1)[-1] if lines[-1].startswith(("ValueError", "TypeError")) else lines[-1]]
    reason = (lines[0] if lines else type(error).__name__).rstrip(".")
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    hint = (
        "It is not a local folder; as a Hub id it is not in the local cache and HF_HUB_OFFLINE is set."
        if offline and not _is_local(value)
        else "Expected a local folder saved with save_pretrained, a config.json, a built-in architecture "
        f"({', '.join(ARCHITECTURE_PRESETS)}) or a Hub model id (set HF_TOKEN for gated or private models)."
    )
    return ModelLoadError(f"{argument}: cannot load '{value}': {reason}. {hint}")


def load_model(
    name_or_path: str,
    *,
    argument: str = "model",
    from_scratch: bool = False,
    id2label: Optional[dict[int, str]] = None,
    revision: Optional[str] = None,
    token: Optional[str] = None,
    trust_remote_code: bool = False,
    cache_dir: Optional[str] = None,
    **model_kwargs: Any,
) -> LoadedModel:
    """Load an image classifier from a Hub id, a local folder, a ``config.json`` or a preset name.

    Args:
        name_or_path: Hub id (``facebook/deit-tiny-patch16-224``), local folder, path to a config
            JSON, or a key of :data:`ARCHITECTURE_PRESETS` (built with random weights).
        argument: the user-facing argument name, used in error messages (``--teacher``).
        from_scratch: build from the config only, with random weights, even if weights exist.
        id2label: class names (the data's); when given, the model gets these classes. A pretrained head
            keeps its rows for the classes it knows, matched by name and put in this order; others get new
            rows, named in a warning (:func:`~hf_spectralkd.labels.match_head_to_labels`).
        revision, token, trust_remote_code, cache_dir: for Hub ids. ``revision`` is resolved to its commit
            once (recorded in ``LoadedModel.revision``) and config and weights load from that commit.

    Raises:
        ModelLoadError (a ``ValueError``) naming ``argument`` and the value when nothing loads;
        DamagedFileError when a local config or weights file is truncated, corrupt or does not match
        its ``config.json`` (checked before loading, from the files' headers).
    """
    if not isinstance(name_or_path, str) or not name_or_path.strip():
        raise ModelLoadError(f"{argument}: expected a model id, folder, config file or architecture name, got {name_or_path!r}")
    path = Path(os.path.expanduser(name_or_path))
    resolved = None
    if not path.exists() and name_or_path not in ARCHITECTURE_PRESETS:
        resolved = resolve_hub_revision(name_or_path, revision, token, cache_dir)
    hub_kwargs = {"revision": resolved or revision, "token": token, "trust_remote_code": trust_remote_code,
                  "cache_dir": cache_dir}
    try:
        if name_or_path in ARCHITECTURE_PRESETS and not path.exists():
            config = _apply_labels(ARCHITECTURE_PRESETS[name_or_path](), id2label)
            model = AutoModelForImageClassification.from_config(config, **model_kwargs)
            if name_or_path in PRESET_INITIALIZERS:
                PRESET_INITIALIZERS[name_or_path](model)
            return LoadedModel(model, name_or_path, "scratch")
        if path.is_file():
            if path.suffix != ".json":
                raise ModelLoadError(f"{argument}: '{name_or_path}' is a file but not a config JSON")
            config_dict, problem = read_json(path)
            if problem or not isinstance(config_dict, dict):
                raise damaged(argument, name_or_path, [problem or f"{path.name} does not hold a JSON object"],
                              "fix or replace the file")
            if "model_type" not in config_dict:
                raise ModelLoadError(f"{argument}: '{name_or_path}' has no model_type (expected a config.json written by "
                                     "save_pretrained)")
            config = AutoConfig.for_model(**config_dict)
            model = AutoModelForImageClassification.from_config(_apply_labels(config, id2label), **model_kwargs)
            return LoadedModel(model, name_or_path, "scratch")
        if path.is_dir() and not (path / "config.json").exists():
            raise ModelLoadError(f"{argument}: folder '{name_or_path}' has no config.json (expected a save_pretrained folder)")
        if path.is_dir():  # before transformers reads it: a truncated file there ends in a Rust traceback
            problems = model_folder_problems(path, with_weights=not from_scratch)
            if problems:
                raise damaged(argument, name_or_path, problems)
        if from_scratch or (path.is_dir() and not _has_weights(path)):
            config = AutoConfig.from_pretrained(name_or_path, **hub_kwargs)
            model = AutoModelForImageClassification.from_config(_apply_labels(config, id2label), **model_kwargs)
            return LoadedModel(model, name_or_path, "scratch")
        local = path.is_dir()
        # Loaded with its own head and classes; the data's classes are matched to them by name below
        # (passing id2label here would rename the rows without moving them).
        loaded = AutoModelForImageClassification.from_pretrained(
            name_or_path,
            **hub_kwargs,
            ignore_mismatched_sizes=local,  # a local folder's mismatches are reported below
            output_loading_info=local,
            **model_kwargs,
        )
        model, info = loaded if local else (loaded, None)
        problems = loading_problems(info, model) if info is not None else []
        if problems:
            raise damaged(argument, name_or_path, problems, "save the model again with save_pretrained, or copy it again")
        if id2label:
            match_head_to_labels(model, id2label, argument)
    except ConfigurationError:
        raise
    except (OSError, ValueError, KeyError, json.JSONDecodeError, StrictDataclassError) as error:
        raise _friendly_load_error(argument, name_or_path, error) from error
    except SafetensorError as error:  # a Hub download cut short in the cache (local folders are checked above)
        raise damaged(argument, name_or_path, [first_line(error)],
                      f"{COPY_AGAIN} (delete it from the Hugging Face cache first)") from error
    return LoadedModel(model, name_or_path, "pretrained", revision=resolved or revision)


def ensure_deepspeed_distributed(args) -> None:
    """Initialise DeepSpeed's process group before models are built under a ZeRO-3 config.

    While ZeRO-3 ``TrainingArguments`` exist, transformers builds every model through
    ``deepspeed.zero.Init``, which reads the world size from DeepSpeed's communication backend; if
    that is not initialised yet it assumes one process and rejects the batch-size arithmetic.
    Call after the arguments are parsed and before any model is loaded (every rank must load).
    """
    plugin = getattr(getattr(args, "distributed_state", None), "deepspeed_plugin", None)
    config = getattr(args, "hf_deepspeed_config", None)
    stage = getattr(plugin, "zero_stage", None) or (config.get_value("zero_optimization.stage") if config is not None else None)
    if stage != 3:
        return
    import deepspeed

    deepspeed.init_distributed()


def model_license(name_or_path: str, revision: Optional[str] = None, token: Optional[str] = None) -> Optional[str]:
    """The ``license`` of a model's card (``README.md`` metadata), or ``None`` if it has no card or says none.

    Local folders are read directly; Hub ids through huggingface_hub (the cached card when offline).
    """
    from huggingface_hub import ModelCard, hf_hub_download

    try:
        path = Path(os.path.expanduser(name_or_path))
        if path.exists():
            readme = path / "README.md" if path.is_dir() else path.parent / "README.md"
            if not readme.is_file():
                return None
            card = ModelCard.load(str(readme))
        elif name_or_path in ARCHITECTURE_PRESETS:
            return None
        else:
            card = ModelCard.load(hf_hub_download(name_or_path, "README.md", revision=revision, token=token))
    except Exception:  # noqa: BLE001 - the license is a default for the card, never a reason to fail
        return None
    value = getattr(card.data, "license", None)
    return str(value) if value else None

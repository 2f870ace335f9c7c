"""The recipe's options: :class:`ModelArguments`, the data and training arguments, their parser, :func:`load_recipe`.

A YAML file given first (or with ``--config``) supplies the options' defaults; options on the
command line override it. Every option of ``SpectralDistillationConfig`` (``--alpha``, ``--beta``,
``--temperature``, ``--student_layers``, ...) and of ``transformers.TrainingArguments`` is accepted.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from dataclasses import dataclass, field
from typing import Any, Optional

from transformers import HfArgumentParser

from ..config import SpectralDistillationConfig
from ..data import KNOWN_TRAIN_SIZES, DataArguments, steps_for_epochs
from ..errors import ConfigurationError
from ..io.model_loading import ARCHITECTURE_PRESETS
from .command_parser import CommandParser
from .config_files import check_config_values, read_config_file, split_config_argument


@dataclass
class ModelArguments:
    """Which teacher distils which student, and what the run records."""

    teacher: Optional[str] = field(
        default=None,
        metadata={
            "help": "Teacher: Hub id (e.g. timm/cait_s24_224.fb_dist_in1k, facebook/deit-base-patch16-224) or local "
            "folder saved with save_pretrained. Not needed with --distillation_type none --beta 0."
        },
    )
    student: Optional[str] = field(
        default=None,
        metadata={
            "help": "Student: a built-in architecture trained from scratch (" + ", ".join(ARCHITECTURE_PRESETS) + "), "
            "a config.json, a local folder or a Hub id."
        },
    )
    student_from_scratch: bool = field(
        default=False,
        metadata={"help": "Build the student from the config of --student with random weights (as the paper does)."},
    )
    student_revision: Optional[str] = field(default=None, metadata={"help": "Branch, tag or commit of a Hub student."})
    train_teacher_if_missing: bool = field(
        default=False,
        metadata={
            "help": "Offline demo: if --teacher is a local folder that does not exist, first train a teacher there "
            "from --teacher_architecture on the same data."
        },
    )
    teacher_architecture: str = field(
        default="demo_vit_teacher",
        metadata={"help": "Architecture (built-in name or config.json) of a teacher trained by --train_teacher_if_missing."},
    )
    teacher_num_train_epochs: float = field(default=15.0, metadata={"help": "Epochs of that teacher training."})
    teacher_learning_rate: float = field(default=2e-3, metadata={"help": "Peak learning rate of that teacher training."})
    evaluate_teacher: bool = field(
        default=True, metadata={"help": "Evaluate the teacher on the eval split and record its accuracy in results.json."}
    )
    results_file: Optional[str] = field(
        default=None, metadata={"help": "Where to write results.json (default: <output_dir>/results.json)."}
    )
    license: Optional[str] = field(
        default=None,
        metadata={"help": "License in the student's model card metadata (default: the teacher's, when its card names one)."},
    )
    profile_images: int = field(
        default=64,
        metadata={
            "help": "Evaluation images on which the final teacher and student spectral profiles are compared "
            "(spectral_profiles.json/.png, shown in the model card). 0 disables."
        },
    )
    spectral_dynamics_steps: int = field(
        default=0,
        metadata={
            "help": "Record the student's spectral profile on a fixed evaluation batch every N steps (and at each "
            "evaluation): logged to the --report_to trackers and spectral_dynamics.jsonl. 0 disables."
        },
    )


ARGUMENT_CLASSES = (ModelArguments, DataArguments, SpectralDistillationConfig)


class _RecipeParser(HfArgumentParser, CommandParser):
    """argparse prints its whole usage (hundreds of options) before an error: give the one line instead.

    Each option is registered in snake_case only (``--help`` lists one spelling); the kebab-case aliases
    transformers adds (``--output-dir``) are still accepted, with :class:`CommandParser`'s one deprecation warning.

    Help texts are plain text in the dataclasses' metadata, but argparse formats them with ``%`` (the
    defaults formatter appends ``%(default)s``): a lone ``%`` ("above 1 %") made ``--help`` crash.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        for action in self._actions:
            if action.help:  # transformers' own texts are escaped already ("~20%%"): "%%" and "%(" stay
                action.help = re.sub(r"%%|%\(|%", lambda m: m.group() if len(m.group()) == 2 else "%%", action.help)

    def error(self, message: str):
        # The message quotes the user's value, which a YAML file can make multi-line: keep one line.
        message = message.replace("\r", "\\r").replace("\n", "\\n")
        raise ConfigurationError(f"{message}; see --help")


def _normalise_aliases(values: dict[str, Any]) -> dict[str, Any]:
    """Older spellings: ``teacher_layers: auto`` is ``layer_map: auto``; layer lists as ``"0,1,18"``."""
    values = dict(values)
    for key in ("student_layers", "teacher_layers"):
        value = values.get(key)
        if isinstance(value, str):
            if value.strip().lower() == "auto" and key == "teacher_layers":
                values.pop(key)
                values["layer_map"] = "auto"
            else:
                values[key] = [part for part in value.replace(",", " ").split() if part]
    return values


def _normalise_argv(argv: list[str]) -> tuple[list[str], set[str]]:
    """The same aliases on the command line: ``--teacher_layers auto``, ``--student_layers 0,1,6``.

    Returns the arguments and the layer lists cleared with an empty value or ``none`` (``--student_layers ""``),
    which become empty rather than keeping a config file's lists.
    """
    out: list[str] = []
    cleared: set[str] = set()
    index = 0
    while index < len(argv):
        token = argv[index]
        flag = token.split("=", 1)[0].replace("-", "_")
        if flag in ("__student_layers", "__teacher_layers"):
            values = [token.split("=", 1)[1]] if "=" in token else []
            index += 1
            while "=" not in token and index < len(argv) and not argv[index].startswith("--"):
                values.append(argv[index])
                index += 1
            parts = [part for value in values for part in value.replace(",", " ").split() if part]
            if flag == "__teacher_layers" and [p.lower() for p in parts] == ["auto"]:
                out += ["--layer_map", "auto"]
            elif not parts or [p.lower() for p in parts] == ["none"]:
                cleared.add(flag[2:])
            else:
                out += [token.split("=", 1)[0], *parts]
            continue
        out.append(token)
        index += 1
    return out, cleared


def _did_you_mean(name: str, known: list[str]) -> str:
    match = difflib.get_close_matches(name, known, n=1)
    return f" (did you mean {match[0]} for {name}?)" if match else ""


def _key_name(key: Any) -> str:
    """A config key as a message shows it: as written, or quoted when it is not plain text (``1``, ``'a\\nb'``)."""
    return key if isinstance(key, str) and key.isprintable() and key else repr(key)


def parse_arguments(
    argv: list[str], overrides: Optional[dict[str, Any]] = None
) -> tuple[ModelArguments, DataArguments, SpectralDistillationConfig]:
    """Parse ``[CONFIG.yaml] [options]``: the config file's values become the parser's defaults.

    ``overrides`` (Python values) replace the config file's, and the command line replaces both.
    """
    parser = _RecipeParser(ARGUMENT_CLASSES)
    known_dests = {action.dest for action in parser._actions}
    config_path, argv = split_config_argument(argv)
    sources = [(f"config: '{config_path}'", _normalise_aliases(read_config_file(config_path)))] if config_path else []
    if overrides:
        sources.append(("load_recipe", _normalise_aliases(overrides)))
    for where, values in sources:
        unknown = [key for key in values if key not in known_dests]
        if unknown:
            names = [_key_name(key) for key in unknown]  # YAML keys can be numbers, null, multi-line text
            hint = _did_you_mean(names[0], sorted(known_dests))
            where_text = f" in {where.split(': ', 1)[1]}" if ": " in where else ""
            raise ConfigurationError(f"{where.split(':')[0]}: unknown option(s) {', '.join(names)}{where_text}{hint}; "
                                     "see --help")
        check_config_values(values, ARGUMENT_CLASSES, config_path if where.startswith("config") else where)
        parser.set_defaults(**values)
    argv, cleared = _normalise_argv(argv)
    parser.set_defaults(**{name: None for name in cleared})
    try:
        *parsed, unknown = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    except ConfigurationError:
        raise
    except (ValueError, TypeError) as error:  # raised while building the dataclasses: the user's values
        raise ConfigurationError(str(error).strip().splitlines()[0]) from error
    if unknown:
        options = [option for action in parser._actions for option in action.option_strings]
        flags = [u for u in unknown if u.startswith("--")] or unknown
        hint = "; ".join(h.strip(" ()") for h in (_did_you_mean(f, options) for f in flags) if h)
        raise ConfigurationError(f"unknown option(s) {' '.join(unknown)}" + (f" ({hint})" if hint else "") + "; see --help")
    return tuple(parsed)


def streamed_max_steps(args: SpectralDistillationConfig, train_size: Optional[int], repeats: int = 1) -> int:
    """Optimizer steps of ``--num_train_epochs`` over a streamed split of ``train_size`` images (a stream has
    no length), an epoch counted as the reference does with ``repeats`` augmented copies of each image."""
    if not train_size:
        raise ConfigurationError(
            "max_steps: a streamed dataset of unknown size needs --max_steps, or --train_samples to derive it "
            "from --num_train_epochs"
        )
    return steps_for_epochs(train_size, args.num_train_epochs, args.per_device_train_batch_size, args.world_size,
                            args.gradient_accumulation_steps, repeats)


def load_recipe(
    config: str, **overrides: Any
) -> tuple[ModelArguments, DataArguments, SpectralDistillationConfig]:
    """A recipe config (a file, or a shipped config's name such as ``deit_tiny_from_cait_s24``) as the recipe's three
    argument objects, exactly as ``run_distill.py CONFIG`` would use them, for the Python API.

    ``overrides`` set any option of the three (``output_dir="runs/x"``, ``per_device_train_batch_size=128``).
    For a streamed dataset of known size (ImageNet, or ``train_samples``), ``max_steps`` is derived from the
    epochs as the recipe does.
    """
    model_args, data_args, args = parse_arguments([config], overrides)
    if data_args.streaming and args.max_steps <= 0:
        size = data_args.train_samples or KNOWN_TRAIN_SIZES.get(data_args.dataset)
        if size:
            args = dataclasses.replace(args, max_steps=streamed_max_steps(args, size, data_args.repeated_augmentation))
    return model_args, data_args, args



"""Shared plumbing of the command-line entry points: config files, clean errors, output folders."""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import yaml

logger = logging.getLogger(__name__)

#: Exit codes: 2 = the input is wrong (fix the command), 1 = the run failed (see the message).
EXIT_USAGE, EXIT_FAILURE = 2, 1


class UsageError(ValueError):
    """Bad input detected before any work starts; printed as one line, exit code 2."""


def _yaml_value_to_args(key: str, value: Any) -> list[str]:
    if value is None:
        return []
    flag = f"--{key}"
    if isinstance(value, bool):
        return [flag, "true" if value else "false"]
    if isinstance(value, dict):
        return [flag, json.dumps(value)]
    if isinstance(value, (list, tuple)):
        return [flag, *[str(v) for v in value]] if value else []
    return [flag, str(value)]


def read_config_file(path: str, _seen: Optional[tuple[str, ...]] = None) -> dict[str, Any]:
    """Load a YAML (or JSON) mapping of option → value, following ``base: other.yaml`` chains.

    A ``base`` file (relative to the including file) is read first and the including file's keys
    override it, so a variant of a recipe is its base plus the lines that differ.
    """
    file = Path(path)
    seen = _seen or ()
    if str(file.resolve()) in seen:
        raise UsageError(f"config: '{path}' includes itself through 'base:'")
    if not file.is_file():
        raise UsageError(f"config: file '{path}' does not exist")
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as error:
        raise UsageError(f"config: '{path}' is not valid YAML: {str(error).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise UsageError(f"config: '{path}' must hold a mapping of option: value, got {type(data).__name__}")
    base = data.pop("base", None)
    if base is None:
        return data
    merged = read_config_file(str(file.parent / base), seen + (str(file.resolve()),))
    merged.update(data)
    return merged


def config_file_to_argv(path: str) -> list[str]:
    """Turn a config file into command-line arguments.

    Lists become repeated values (``--student_layers 0 1 6``), booleans ``true``/``false`` and
    mappings JSON strings, so that options given after them on the command line override them.
    """
    argv: list[str] = []
    for key, value in read_config_file(path).items():
        argv.extend(_yaml_value_to_args(str(key), value))
    return argv


def expand_config_argument(argv: Sequence[str]) -> list[str]:
    """``[CONFIG.yaml] [--config CONFIG.yaml] [overrides...]`` → a flat argument list, config first."""
    argv = list(argv)
    config_path: Optional[str] = None
    if argv and argv[0].endswith((".yaml", ".yml", ".json")) and not argv[0].startswith("-"):
        config_path = argv.pop(0)
    if "--config" in argv:
        index = argv.index("--config")
        if index + 1 >= len(argv):
            raise UsageError("config: --config needs a file path")
        if config_path is not None:
            raise UsageError("config: give the config file either first or with --config, not both")
        config_path = argv[index + 1]
        del argv[index : index + 2]
    return (config_file_to_argv(config_path) if config_path else []) + argv


def check_output_dir(output_dir: str, overwrite: bool, resume: Any, argument: str = "output_dir") -> None:
    """Refuse an unwritable folder, or one holding another run unless overwriting or resuming."""
    path = Path(output_dir)
    probe_dir = path
    while not probe_dir.exists() and probe_dir.parent != probe_dir:
        probe_dir = probe_dir.parent
    if probe_dir.exists() and not probe_dir.is_dir():
        raise UsageError(f"{argument}: '{output_dir}' is inside a file ('{probe_dir}'), not a folder")
    if not os.access(probe_dir, os.W_OK | os.X_OK):
        raise UsageError(f"{argument}: '{output_dir}' is not writable (no write permission on '{probe_dir}')")
    if path.is_dir() and not overwrite and not resume:
        previous = sorted(p.name for p in path.iterdir() if p.name.startswith("checkpoint-") or p.name == "trainer_state.json")
        if previous:
            raise UsageError(
                f"{argument}: '{output_dir}' already holds a run ({', '.join(previous[:3])}); pass "
                "--resume_from_checkpoint true to continue it, --overwrite_output_dir true to start over, or choose "
                "another --output_dir"
            )


def exit_on_error(main: Callable[..., int]) -> Callable[..., int]:
    """Run ``main`` and turn expected failures into one line on stderr and an exit code.

    Input errors (``ValueError``, ``TypeError``, missing files, permissions) exit with 2; a failed run
    (non-finite loss) with 1. Other exceptions keep their traceback: they are bugs. Set
    ``HF_SPECTRALKD_DEBUG=1`` to see the traceback of the expected ones too.
    """
    from ..trainer import NonFiniteLossError

    @functools.wraps(main)
    def wrapper(*args: Any, **kwargs: Any) -> int:
        if os.environ.get("HF_SPECTRALKD_DEBUG", "0") not in ("0", ""):
            return main(*args, **kwargs)
        try:
            return main(*args, **kwargs)
        except NonFiniteLossError as error:
            print(f"error: {error}", file=sys.stderr)
            return EXIT_FAILURE
        except (ValueError, TypeError, FileNotFoundError, PermissionError) as error:
            print(f"error: {error}", file=sys.stderr)
            return EXIT_USAGE
        except KeyboardInterrupt:
            print("interrupted: checkpoints written so far are complete; resume with --resume_from_checkpoint true", file=sys.stderr)
            return 130

    return wrapper

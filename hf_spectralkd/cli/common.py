"""Shared plumbing of the command-line entry points: config files, clean errors, output folders."""

from __future__ import annotations

import functools
import logging
import os
import sys
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import yaml

from ..errors import ConfigurationError, RunFailedError

logger = logging.getLogger(__name__)

#: Exit codes: 2 = the input is wrong (fix the command), 1 = the run failed (see the message),
#: 130 = interrupted (Ctrl-C), as shells report it.
EXIT_USAGE, EXIT_FAILURE, EXIT_INTERRUPTED = 2, 1, 130
CONFIG_SUFFIXES = (".yaml", ".yml", ".json")


def read_config_file(path: str, _seen: tuple[str, ...] = ()) -> dict[str, Any]:
    """Load a YAML (or JSON) mapping of option → value, following ``base: other.yaml`` chains.

    A ``base`` file (relative to the including file) is read first and the including file's keys
    override it, so a variant of a recipe is its base plus the lines that differ.
    """
    file = Path(path)
    if str(file.resolve()) in _seen:
        raise ConfigurationError(f"config: '{path}' includes itself through 'base:'")
    if not file.is_file():
        raise ConfigurationError(f"config: file '{path}' does not exist")
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as error:
        raise ConfigurationError(f"config: '{path}' is not valid YAML: {str(error).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigurationError(f"config: '{path}' must hold a mapping of option: value, got {type(data).__name__}")
    base = data.pop("base", None)
    if base is None:
        return data
    merged = read_config_file(str(file.parent / base), _seen + (str(file.resolve()),))
    merged.update(data)
    return merged


def split_config_argument(argv: Sequence[str]) -> tuple[Optional[str], list[str]]:
    """``[CONFIG.yaml] [--config CONFIG.yaml] [options...]`` → ``(config path or None, options)``."""
    argv = list(argv)
    config_path: Optional[str] = None
    if argv and argv[0].endswith(CONFIG_SUFFIXES) and not argv[0].startswith("-"):
        config_path = argv.pop(0)
    if "--config" in argv:
        index = argv.index("--config")
        if index + 1 >= len(argv):
            raise ConfigurationError("config: --config needs a file path")
        if config_path is not None:
            raise ConfigurationError("config: give the config file either first or with --config, not both")
        config_path = argv[index + 1]
        del argv[index : index + 2]
    return config_path, argv


def check_output_dir(output_dir: str, overwrite: bool, resume: Any, argument: str = "output_dir") -> None:
    """Refuse an unwritable folder, or one holding another run unless overwriting or resuming."""
    path = Path(output_dir)
    probe_dir = path
    while not probe_dir.exists() and probe_dir.parent != probe_dir:
        probe_dir = probe_dir.parent
    if probe_dir.exists() and not probe_dir.is_dir():
        raise ConfigurationError(f"{argument}: '{output_dir}' is inside a file ('{probe_dir}'), not a folder")
    if not os.access(probe_dir, os.W_OK | os.X_OK):
        raise ConfigurationError(f"{argument}: '{output_dir}' is not writable (no write permission on '{probe_dir}')")
    if path.is_dir() and not overwrite and not resume:
        previous = sorted(p.name for p in path.iterdir() if p.name.startswith("checkpoint-") or p.name == "trainer_state.json")
        if previous:
            raise ConfigurationError(
                f"{argument}: '{output_dir}' already holds a run ({', '.join(previous[:3])}); pass "
                "--resume_from_checkpoint true to continue it, --overwrite_output_dir true to start over, or choose "
                "another --output_dir"
            )


def exit_on_error(main: Callable[..., int]) -> Callable[..., int]:
    """Run ``main`` and turn the library's reported failures into one line on stderr and an exit code.

    :class:`~hf_spectralkd.errors.ConfigurationError` (bad input) exits with 2,
    :class:`~hf_spectralkd.errors.RunFailedError` (a non-finite loss, a checkpoint that could not be
    written) with 1, Ctrl-C with 130. Any other exception is a bug and keeps its traceback. Set
    ``HF_SPECTRALKD_DEBUG=1`` to see the traceback of the reported ones too.
    """

    @functools.wraps(main)
    def wrapper(*args: Any, **kwargs: Any) -> int:
        if os.environ.get("HF_SPECTRALKD_DEBUG", "0") not in ("0", ""):
            return main(*args, **kwargs)
        try:
            return main(*args, **kwargs)
        except ConfigurationError as error:
            print(f"error: {error}", file=sys.stderr)
            return EXIT_USAGE
        except RunFailedError as error:
            print(f"error: {error}", file=sys.stderr)
            return EXIT_FAILURE
        except KeyboardInterrupt:
            print("interrupted: checkpoints written so far are complete; resume with --resume_from_checkpoint true",
                  file=sys.stderr)
            return EXIT_INTERRUPTED

    return wrapper

"""One option spelling for every ``hf-spectralkd`` subcommand: snake_case, as ``distill`` spells it.

``distill`` takes the options of ``TrainingArguments`` and ``SpectralDistillationConfig`` under their
field names (``--output_dir``, ``--image_column``), which is what Hugging Face's example scripts and
the library's error messages use. The other subcommands spelt theirs with dashes until 0.1
(``--output-dir``); those spellings are still accepted for one release: the first use of any of them in
a command logs one deprecation warning that names the new spelling of each.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Optional, Sequence

logger = logging.getLogger("hf_spectralkd.cli")


def snake_case(option: str) -> str:
    """``--num-images`` → ``--num_images``; short options and positionals are returned unchanged."""
    return "--" + option[2:].replace("-", "_") if option.startswith("--") else option


class CommandParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose long options are snake_case, with kebab-case accepted as a deprecated alias.

    Options may be declared in either spelling, or both (transformers' ``HfArgumentParser`` declares
    ``--output_dir`` and ``--output-dir``); only the snake_case one is registered, so ``--help`` and
    argparse's own messages show it. Before parsing, a kebab-case spelling of a registered option
    (``--num-images 8`` or ``--num-images=8``) is rewritten to it and reported once.
    """

    def add_argument(self, *names: str, **kwargs):
        return super().add_argument(*dict.fromkeys(snake_case(name) for name in names), **kwargs)

    def parse_known_args(self, args: Optional[Sequence[str]] = None, namespace=None):
        rewritten, deprecated = self.canonical_arguments(sys.argv[1:] if args is None else list(args))
        if deprecated:
            logger.warning(
                "option spelling %s is deprecated and will be removed in the next release: use %s",
                ", ".join(deprecated), ", ".join(snake_case(name) for name in deprecated),
            )
        return super().parse_known_args(rewritten, namespace)

    def canonical_arguments(self, args: list[str]) -> tuple[list[str], list[str]]:
        """``args`` with this parser's kebab-case options in snake_case, and the distinct kebab spellings seen.

        Arguments after a bare ``--`` and options this parser does not know (a subcommand's, or the
        recipe options ``ablate`` passes on) are left as they are.
        """
        out: list[str] = []
        deprecated: list[str] = []
        for position, argument in enumerate(args):
            if argument == "--":
                out.extend(args[position:])
                break
            name, equals, value = argument.partition("=")
            canonical = snake_case(name)
            if (name.startswith("--") and canonical != name and canonical in self._option_string_actions
                    and name not in self._option_string_actions):
                argument = canonical + equals + value
                if name not in deprecated:
                    deprecated.append(name)
            out.append(argument)
        return out, deprecated


class OneLineHelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps each subcommand's purpose on one line of ``hf-spectralkd --help`` (a wide help column)."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=32, width=160)
        # argparse sizes the name column before it indents the subcommands by two more characters, so the
        # longest name ("select-layers") would be pushed onto a line of its own: reserve the column up front.
        self._action_max_length = len("    select-layers")

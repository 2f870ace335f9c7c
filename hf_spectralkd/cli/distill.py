"""``hf-spectralkd distill CONFIG [options]`` (and ``recipes/run_distill.py``): the recipe as a command.

The recipe itself is :mod:`hf_spectralkd.recipe` (options, parser, the run); this adds the command-line
plumbing: one-line errors and exit codes, and the process group torn down after a run that finished.
"""

from __future__ import annotations

import sys
from typing import Optional

from ..recipe import ARGUMENT_CLASSES, parse_arguments  # noqa: F401 - the recipe's parser, for the command's users
from ..recipe.arguments import _RecipeParser  # noqa: F401
from ..recipe.run import run
from .common import close_process_group, exit_on_error


@exit_on_error
def main(argv: Optional[list[str]] = None) -> int:
    code = run(sys.argv[1:] if argv is None else argv)
    close_process_group()
    return code


if __name__ == "__main__":
    sys.exit(main())

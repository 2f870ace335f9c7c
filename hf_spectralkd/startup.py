"""What every entry point needs before its long imports (stdlib only): Ctrl-C while starting is one line."""

from __future__ import annotations

import contextlib
import os
import sys

#: Exit code of a command interrupted with Ctrl-C, as shells report it (128 + SIGINT).
EXIT_INTERRUPTED = 130


def started_as_command() -> bool:
    """Whether this process is one of the project's commands: ``hf-spectralkd``, ``run_distill.py``, or
    ``python -m hf_spectralkd…`` (while ``-m`` imports the package, ``sys.argv[0]`` is ``"-m"``)."""
    program = sys.argv[0] if sys.argv else ""
    name = os.path.basename(program)
    return program == "-m" or name.startswith("hf-spectralkd") or name == "run_distill.py"


@contextlib.contextmanager
def interruptible_start():
    """Ctrl-C while a command imports its libraries: one line and exit code 130, no traceback.

    Importing torch and transformers takes 7-10 s (measured with ``python -X importtime`` on the
    development machine), long enough to be interrupted; the traceback then runs through dozens of
    frames of import machinery. In any other program (a notebook, a script that imports the
    package) the ``KeyboardInterrupt`` is raised as usual.
    """
    try:
        yield
    except KeyboardInterrupt:
        if not started_as_command():
            raise
        print("interrupted while starting; nothing was written", file=sys.stderr)
        raise SystemExit(EXIT_INTERRUPTED) from None

"""Shared plumbing of the command-line entry points: config files, clean errors, output folders."""

from __future__ import annotations

import functools
import logging
import os
import sys
from typing import Any, Callable

from ..errors import ConfigurationError, RunFailedError
from ..recipe.config_files import (  # noqa: F401 - the commands' config plumbing, re-exported
    CONFIG_SUFFIXES,
    SHIPPED_CONFIGS_DIR,
    check_config_values,
    config_target,
    read_config_file,
    resolve_config,
    shipped_configs,
    split_config_argument,
)
from ..startup import EXIT_INTERRUPTED, interruptible_start, started_as_command  # noqa: F401

logger = logging.getLogger(__name__)

#: Exit codes: 2 = the input is wrong (fix the command), 1 = the run failed (see the message),
#: 130 = interrupted (Ctrl-C), as shells report it.
EXIT_USAGE, EXIT_FAILURE = 2, 1
#: The reader of our output went away (``hf-spectralkd configs | head``): 128 + SIGPIPE, as shells report a
#: tool that SIGPIPE stopped.
EXIT_BROKEN_PIPE = 141


def close_process_group() -> None:
    """Tear the default process group down at the end of a run that finished on every process.

    Without it gloo's worker threads can outlive the interpreter and abort the process as it exits
    ("terminate called without an active exception", SIGABRT): seen once in the test suite, a
    2-process CPU run that had saved everything and then exited with code 1 (35 reruns did not
    repeat it; a race at exit). Only called on a normal return: after an error the other ranks may
    still be inside a collective, and tearing the group down would hang them.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def exit_on_error(main: Callable[..., int]) -> Callable[..., int]:
    """Run ``main`` and turn the library's reported failures into one line on stderr and an exit code.

    :class:`~hf_spectralkd.errors.ConfigurationError` (bad input) exits with 2,
    :class:`~hf_spectralkd.errors.RunFailedError` (a non-finite loss, a checkpoint that could not be
    written) with 1, Ctrl-C with 130, a closed output pipe (``| head``) quietly with 141. Any other exception is a bug and keeps its traceback. Set
    ``HF_SPECTRALKD_DEBUG=1`` to see the traceback of the reported ones too.
    """

    @functools.wraps(main)
    def wrapper(*args: Any, **kwargs: Any) -> int:
        if os.environ.get("HF_SPECTRALKD_DEBUG", "0") not in ("0", ""):
            return main(*args, **kwargs)
        try:
            code = main(*args, **kwargs)
            sys.stdout.flush()  # output still buffered for a pipe fails here, not at exit where it cannot be caught
            return code
        except BrokenPipeError:
            # Stop quietly as Unix tools do; stdout goes to devnull so that the interpreter's own flush at
            # exit does not print "Exception ignored ... BrokenPipeError" again.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return EXIT_BROKEN_PIPE
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

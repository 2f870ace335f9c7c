"""The library's exceptions: what the command line turns into one line and an exit code.

* :class:`ConfigurationError` (a ``ValueError``): the input is wrong (an argument, a file, a model
  or dataset that cannot be used). Raised before any training step; exit code 2.
  :class:`DamagedFileError` is the case of a file that exists but is truncated or corrupt.
* :class:`RunFailedError` (a ``RuntimeError``): a correct run could not go on (a non-finite loss, a
  checkpoint that could not be written, too many undecodable images). Exit code 1; what was saved
  before is intact.

Everything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class ConfigurationError(ValueError):
    """Bad input, detected before training; the message names the argument and what was expected."""


class RunFailedError(RuntimeError):
    """A run stopped on a failure it reports in one line (exit code 1)."""


class NonFiniteLossError(RunFailedError):
    """A loss component became NaN or infinite; raised before the optimizer step."""


class TooManyBadImagesError(RunFailedError):
    """More images of a split failed to decode than ``max_skipped_fraction`` allows."""


class WriteFailedError(RunFailedError):
    """A file of the run could not be written (a full disk, a read-only or lost mount, a quota)."""


class CheckpointSaveError(WriteFailedError):
    """A checkpoint could not be written (full disk, lost mount); earlier checkpoints are complete."""


class OutputDirLockedError(ConfigurationError):
    """Another live run holds ``output_dir``."""


class DamagedFileError(ConfigurationError):
    """A saved model, checkpoint or file is truncated, corrupt or incomplete (a partial copy or download).

    The message reads ``<argument>: '<path>' is damaged (<what>): <what to do>``.
    """

"""hf_spectralkd: SpectralKD distillation of Vision Transformers on Hugging Face Transformers.

Public API::

    from hf_spectralkd import SpectralDistillationTrainer, SpectralDistillationConfig
    from hf_spectralkd import distillation_objective, spectral_alignment_loss, distillation_loss
    from hf_spectralkd import load_recipe      # a shipped recipe config as arguments
    from hf_spectralkd import load_model       # a teacher or student by Hub id, folder, config or preset

Importing the package registers the Lift and WideLast students (``hf_spectralkd.students``) with
transformers' ``AutoConfig`` and ``AutoModelForImageClassification``.
"""

from .startup import interruptible_start  # stdlib only: in place before the long imports

with interruptible_start():
    from . import students  # noqa: F401  (registers the students with the Auto classes)
    from .config import SpectralDistillationConfig
    from .errors import (
        CheckpointSaveError,
        ConfigurationError,
        DamagedFileError,
        NonFiniteLossError,
        RunFailedError,
        TooManyBadImagesError,
    )
    from .io.model_loading import load_model
    from .losses import LossComponents, distillation_loss, distillation_objective, spectral_alignment_loss
    from .recipe import load_recipe
    from .training import SpectralDistillationTrainer

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("hf_spectralkd")
except PackageNotFoundError:  # a source tree that was not installed
    __version__ = "0+unknown"

__all__ = [
    "CheckpointSaveError",
    "ConfigurationError",
    "DamagedFileError",
    "LossComponents",
    "NonFiniteLossError",
    "RunFailedError",
    "SpectralDistillationConfig",
    "SpectralDistillationTrainer",
    "TooManyBadImagesError",
    "distillation_loss",
    "distillation_objective",
    "load_model",
    "load_recipe",
    "spectral_alignment_loss",
    "__version__",
]

"""hf_spectralkd: SpectralKD distillation of Vision Transformers on Hugging Face Transformers.

Public API::

    from hf_spectralkd import SpectralDistillationTrainer, SpectralDistillationConfig
    from hf_spectralkd import distillation_objective, spectral_alignment_loss, distillation_loss
"""

from .config import SpectralDistillationConfig
from .errors import CheckpointSaveError, ConfigurationError, NonFiniteLossError, RunFailedError, TooManyBadImagesError
from .losses import LossComponents, distillation_loss, distillation_objective, spectral_alignment_loss
from .trainer import SpectralDistillationTrainer

__version__ = "0.1.0"

__all__ = [
    "CheckpointSaveError",
    "ConfigurationError",
    "LossComponents",
    "NonFiniteLossError",
    "RunFailedError",
    "SpectralDistillationConfig",
    "SpectralDistillationTrainer",
    "TooManyBadImagesError",
    "distillation_loss",
    "distillation_objective",
    "spectral_alignment_loss",
    "__version__",
]

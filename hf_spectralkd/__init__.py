"""hf_spectralkd: SpectralKD distillation of Vision Transformers on Hugging Face Transformers.

Public API::

    from hf_spectralkd import SpectralDistillationTrainer, SpectralDistillationConfig
    from hf_spectralkd import spectral_alignment_loss, distillation_loss
"""

from .config import SpectralDistillationConfig
from .losses import distillation_loss, spectral_alignment_loss
from .trainer import NonFiniteLossError, SpectralDistillationTrainer

__version__ = "0.1.0"

__all__ = [
    "NonFiniteLossError",
    "SpectralDistillationConfig",
    "SpectralDistillationTrainer",
    "distillation_loss",
    "spectral_alignment_loss",
    "__version__",
]

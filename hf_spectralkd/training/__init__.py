"""Training: :class:`SpectralDistillationTrainer` and the parts it owns (one small class per concern)."""

from .trainer import SpectralDistillationTrainer

__all__ = ["SpectralDistillationTrainer"]

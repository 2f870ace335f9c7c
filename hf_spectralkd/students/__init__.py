"""Students that fix the encoding mismatch (arXiv 2511.15572), as ordinary transformers models.

* Lift (:class:`LiftViTForImageClassification`, ``model_type="lift_vit"``)
* WideLast (:class:`WideLastViTForImageClassification`, ``model_type="widelast_vit"``)
* UniformWide is a plain ``ViTForImageClassification`` at width 219 (a preset in
  :data:`hf_spectralkd.io.model_loading.ARCHITECTURE_PRESETS`), so it needs nothing here but its init.

Importing this package (``import hf_spectralkd`` does) registers both configs with ``AutoConfig`` and
both models with ``AutoModelForImageClassification``, and marks them for ``save_pretrained`` to write
``auto_map`` and copy ``configuration_spectralkd_students.py`` / ``modeling_spectralkd_students.py``
next to the weights. A saved student therefore loads

* with ``import hf_spectralkd`` first: through the registered (installed) classes, or
* anywhere with ``trust_remote_code=True``: through the copied files, without hf_spectralkd.
"""

from __future__ import annotations

from transformers import AutoConfig, AutoModelForImageClassification

from .configuration_spectralkd_students import LiftViTConfig, WideLastViTConfig
from .modeling_spectralkd_students import (
    LiftImageClassifierOutput,
    LiftViTForImageClassification,
    SpectralKDStudentPreTrainedModel,
    WideLastViTForImageClassification,
)
from .presets import timm_vit_init_

#: model_type → (config class, model class) of the students defined here.
STUDENT_CLASSES = {
    LiftViTConfig.model_type: (LiftViTConfig, LiftViTForImageClassification),
    WideLastViTConfig.model_type: (WideLastViTConfig, WideLastViTForImageClassification),
}

#: Student model types whose saved folders carry their own modeling code (auto_map).
CUSTOM_CODE_MODEL_TYPES = tuple(STUDENT_CLASSES)


def register_students() -> None:
    """Register the student configs and models with the Auto classes (idempotent)."""
    for model_type, (config_class, model_class) in STUDENT_CLASSES.items():
        AutoConfig.register(model_type, config_class, exist_ok=True)
        AutoModelForImageClassification.register(config_class, model_class, exist_ok=True)
        # save_pretrained then writes auto_map and copies the two code files into the folder.
        config_class.register_for_auto_class("AutoConfig")
        model_class.register_for_auto_class("AutoModelForImageClassification")


register_students()

__all__ = [
    "CUSTOM_CODE_MODEL_TYPES",
    "LiftImageClassifierOutput",
    "LiftViTConfig",
    "LiftViTForImageClassification",
    "STUDENT_CLASSES",
    "SpectralKDStudentPreTrainedModel",
    "WideLastViTConfig",
    "WideLastViTForImageClassification",
    "register_students",
    "timm_vit_init_",
]

"""Configurations of the two students that fix the encoding mismatch: Lift and WideLast.

Both are ViTs at a narrow width ``hidden_size`` (C) that end at a wider width (C_t or C_w, the
teacher's), so the last feature map can be distilled from a wide teacher without pooling:

* :class:`LiftViTConfig` (``model_type="lift_vit"``): every block at width C; the patch tokens of the
  last block are lifted token-wise to ``lift_size`` channels and classified after average pooling.
* :class:`WideLastViTConfig` (``model_type="widelast_vit"``): blocks ``0 … L-2`` at width C, then one
  block at ``wide_hidden_size`` channels.

This file is copied next to saved weights so that ``trust_remote_code=True`` can load a student
without hf_spectralkd installed: it imports only transformers and huggingface_hub, and reports bad
values with a plain ``ValueError``.
"""

from huggingface_hub.dataclasses import strict
from transformers import ViTConfig


def _check_positive(config, *names: str) -> None:
    for name in names:
        value = getattr(config, name)
        if value is None or value <= 0:
            raise ValueError(f"{name}: must be a positive integer, got {value!r}; expected e.g. 384")


@strict
class LiftViTConfig(ViTConfig):
    r"""A ViT whose last block's patch tokens are lifted to ``lift_size`` channels (Lift).

    All ViT fields keep their meaning (``hidden_size`` = C, ``num_hidden_layers`` = L, …). The head
    is ``Linear(lift_size → num_labels)`` on the average of the lifted patch tokens; the model has
    no final norm and no CLS head.

    Args:
        lift_size: C_t, channels of the lifted tokens (the teacher's width: 384 for CaiT-S24).
        lift_layer_norm_eps: eps of the LayerNorm after the lift (PyTorch's default 1e-5, as in the
            reference; the blocks use ``layer_norm_eps``).
        cls_token_init_std: std of the normal init of the CLS token (timm's DeiT: 1e-6).
    """

    model_type = "lift_vit"

    lift_size: int = 384
    lift_layer_norm_eps: float = 1e-5
    cls_token_init_std: float = 1e-6

    def validate_architecture(self):
        """Part of ``@strict`` validation: sizes that the modules below can be built from."""
        _check_positive(self, "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "lift_size")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"num_attention_heads: {self.num_attention_heads} does not divide hidden_size {self.hidden_size}; "
                "expected a divisor (head width = hidden_size / num_attention_heads)"
            )


@strict
class WideLastViTConfig(ViTConfig):
    r"""A ViT whose last block runs at ``wide_hidden_size`` channels (WideLast).

    Blocks ``0 … num_hidden_layers-2`` are ordinary ViT blocks at ``hidden_size``; then every token
    (CLS included) goes through ``Linear(hidden_size → wide_hidden_size, no bias)`` and
    ``LayerNorm(wide_hidden_size)``, and block ``num_hidden_layers-1`` runs at the wide width, followed
    by the final norm and the CLS head at that width.

    Args:
        wide_hidden_size: C_w, width of the last block (the teacher's: 384 for CaiT-S24).
        wide_num_attention_heads: heads of the last block; default ``wide_hidden_size // 64``
            (64-channel heads, as DeiT).
        wide_intermediate_size: MLP width of the last block; default keeps the MLP ratio of the
            narrow blocks (``wide_hidden_size · intermediate_size / hidden_size``).
        cls_token_init_std: std of the truncated-normal init of the CLS token (the reference: 0.02).
    """

    model_type = "widelast_vit"

    wide_hidden_size: int = 384
    wide_num_attention_heads: int | None = None
    wide_intermediate_size: int | None = None
    cls_token_init_std: float = 0.02

    def __post_init__(self, **kwargs):
        if self.wide_num_attention_heads is None and isinstance(self.wide_hidden_size, int):
            self.wide_num_attention_heads = max(1, self.wide_hidden_size // 64)
        if self.wide_intermediate_size is None and self.hidden_size:
            self.wide_intermediate_size = self.wide_hidden_size * self.intermediate_size // self.hidden_size
        super().__post_init__(**kwargs)

    def validate_architecture(self):
        """Part of ``@strict`` validation: sizes that the modules below can be built from."""
        _check_positive(
            self, "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "wide_hidden_size",
            "wide_num_attention_heads", "wide_intermediate_size",
        )
        for width, heads, name in ((self.hidden_size, self.num_attention_heads, "num_attention_heads"),
                                   (self.wide_hidden_size, self.wide_num_attention_heads, "wide_num_attention_heads")):
            if width % heads:
                raise ValueError(
                    f"{name}: {heads} does not divide the block width {width}; expected a divisor "
                    "(head width = block width / heads)"
                )


__all__ = ["LiftViTConfig", "WideLastViTConfig"]

"""Built-in configurations of the encoding-mismatch students and the init of UniformWide.

The names are registered in :data:`hf_spectralkd.io.model_loading.ARCHITECTURE_PRESETS`, so ``--student``
accepts them. All use DeiT-Tiny's geometry (224 px, 16 px patches, 12 blocks at width 192 with 3
heads, MLP ratio 4, pre-LN eps 1e-6, no dropout) unless their name says otherwise.

=========================  ===================================================  ===========
name                       architecture                                          parameters
=========================  ===================================================  ===========
``deit_tiny_lift384``      Lift: last block's patch tokens lifted 192 → 384        5,983,528
``deit_tiny_widelast384``  WideLast: blocks 0-10 at 192, block 11 at 384 (6 h.)    7,313,896
``deit_tiny_uniform219``   UniformWide: a plain ViT at width 219, 3 heads          7,372,759
``demo_widelast_student``  the offline demo's WideLast: 28 px, patch 7, 4 blocks,   67,370
                           blocks 0-2 at 32 (2 heads), block 3 at 64 (4 heads)
=========================  ===================================================  ===========

Parameter counts are for 1000 classes (the demo: 10).
"""

from __future__ import annotations

import logging
from typing import Callable

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.models.vit.modeling_vit import ViTEmbeddings

from .configuration_spectralkd_students import LiftViTConfig, WideLastViTConfig

logger = logging.getLogger(__name__)

def deit_geometry(hidden: int, heads: int) -> dict:
    """timm's DeiT at 224 px as ViT config fields: 16-pixel patches, 12 blocks, MLP ratio 4, eps 1e-6, no dropout."""
    return dict(image_size=224, patch_size=16, hidden_size=hidden, num_hidden_layers=12, num_attention_heads=heads,
                intermediate_size=4 * hidden, layer_norm_eps=1e-6, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


_DEIT_TINY = deit_geometry(192, 3)


def deit_tiny_lift(lift_size: int) -> Callable[[], PretrainedConfig]:
    return lambda: LiftViTConfig(**_DEIT_TINY, lift_size=lift_size)


def deit_tiny_widelast(wide_hidden_size: int) -> Callable[[], PretrainedConfig]:
    # 64-channel heads in the wide block (384 → 6 heads) and DeiT's MLP ratio 4 (1536).
    return lambda: WideLastViTConfig(**_DEIT_TINY, wide_hidden_size=wide_hidden_size)


def demo_widelast() -> PretrainedConfig:
    # The demo student's geometry (28×28 digits, 7×7 patches, width 32, MLP ratio 2, 16-channel heads)
    # with its last block widened to the demo teacher's width 64.
    return WideLastViTConfig(
        image_size=28, patch_size=7, hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
        layer_norm_eps=1e-6, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        wide_hidden_size=64, wide_num_attention_heads=4, wide_intermediate_size=128,
    )


@torch.no_grad()
def timm_vit_init_(model: PreTrainedModel, std: float = 0.02, cls_token_std: float = 1e-6) -> PreTrainedModel:
    """Re-initialise a ``ViTForImageClassification`` in place as timm initialises its ViTs (the
    reference's UniformWide is a timm DeiT at width 219).

    transformers' ViT init draws Linear and convolution weights from N(0, std) and the CLS token from
    a truncated N(0, std); timm draws Linear weights from a truncated N(0, std), keeps PyTorch's
    fan-in uniform init for the patch convolution and starts the CLS token near zero (std 1e-6).
    Biases 0, LayerNorm 1/0 and a truncated N(0, std) position embedding are common to both.
    Under DeepSpeed ZeRO-3 the parameters are partitioned at construction and the model keeps
    transformers' init (logged).
    """
    from transformers.integrations import is_deepspeed_zero3_enabled

    if is_deepspeed_zero3_enabled():
        logger.warning("%s keeps transformers' ViT init under DeepSpeed ZeRO-3 (parameters are partitioned)",
                       type(model).__name__)
        return model
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Conv2d):
            module.reset_parameters()
        elif isinstance(module, ViTEmbeddings):
            nn.init.trunc_normal_(module.position_embeddings, std=std)
            nn.init.trunc_normal_(module.cls_token, std=cls_token_std)
    return model

"""Lift and WideLast: ViT students whose last feature map has the teacher's width.

Feature-map distillation of a narrow ViT from a wide one works poorly when the wide teacher's
tokens spread their energy over most channels and the student cannot reproduce that with fewer
channels (the "encoding mismatch" of arXiv 2511.15572). The two students here give the student's
last feature map the teacher's width C_t at a small cost in parameters:

* :class:`LiftViTForImageClassification`: a ViT at width C; the patch tokens of the last block are
  lifted token-wise, ``Z = LayerNorm(W·f)`` with ``W: C → C_t`` (no bias), averaged over tokens and
  classified by ``Linear(C_t → K)``. The lift stays on the inference path. There is no final norm
  and no CLS head: a module that never receives a gradient would make DDP without
  ``find_unused_parameters`` fail, so they are not created.
* :class:`WideLastViTForImageClassification`: blocks ``0 … L-2`` at width C; every token (CLS
  included) is projected ``C → C_w`` (no bias) and normalised, block ``L-1`` runs at width C_w,
  then the final norm and the CLS head at C_w.

Both are built from transformers' own ViT modules (``ViTEmbeddings``, ``ViTLayer``), so attention
backends (eager, SDPA, …) and gradient checkpointing behave as in ``ViTForImageClassification``.

Outputs (``output_hidden_states=True``): ``hidden_states[0]`` is the embedding output and
``hidden_states[k + 1]`` the output of block k, all tokens, before any final norm (``B×(1+N)×C``;
WideLast's last entry is ``B×(1+N)×C_w``). Lift also returns ``lifted_tokens``: the lifted patch
tokens ``B×N×C_t`` (CLS removed), the map that is distilled.

This file and ``configuration_spectralkd_students.py`` are copied next to saved weights, so that
``AutoModelForImageClassification.from_pretrained(folder, trust_remote_code=True)`` works without
hf_spectralkd: they import only torch and transformers.
"""

import math
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel, ViTConfig
from transformers import initialization as init
from transformers.modeling_outputs import ImageClassifierOutput
from transformers.models.vit.modeling_vit import ViTEmbeddings, ViTLayer

from .configuration_spectralkd_students import LiftViTConfig, WideLastViTConfig


@dataclass
class LiftImageClassifierOutput(ImageClassifierOutput):
    """``ImageClassifierOutput`` plus ``lifted_tokens`` (``B×N×C_t``, with ``output_hidden_states``)."""

    lifted_tokens: torch.Tensor | None = None


class ViTTrunk(nn.Module):
    """Patch/CLS/position embeddings and ``num_layers`` ViT blocks at the config's width."""

    def __init__(self, config: ViTConfig, num_layers: int):
        super().__init__()
        self.embeddings = ViTEmbeddings(config)
        self.layers = nn.ModuleList([ViTLayer(config) for _ in range(num_layers)])

    def forward(
        self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool | None, hidden_states: list | None
    ) -> torch.Tensor:
        """``B×3×H×W`` → ``B×(1+N)×C``; appends the embedding and every block output to ``hidden_states``."""
        # ViTModel casts too: callers may pass float32 pixels to a bf16 model.
        pixel_values = pixel_values.to(self.embeddings.patch_embeddings.projection.weight.dtype)
        tokens = self.embeddings(pixel_values, interpolate_pos_encoding=bool(interpolate_pos_encoding))
        if hidden_states is not None:
            hidden_states.append(tokens)
        for layer in self.layers:
            tokens = layer(tokens)  # no attention mask: every token sees every token
            if hidden_states is not None:
                hidden_states.append(tokens)
        return tokens


class SpectralKDStudentPreTrainedModel(PreTrainedModel):
    """Shared ``PreTrainedModel`` settings and the reference initialisation of both students."""

    base_model_prefix = "vit"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _no_split_modules = ["ViTEmbeddings", "ViTLayer"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    def _run_trunk(self, pixel_values, output_hidden_states, interpolate_pos_encoding):
        """The blocks at width C: ``(tokens B×(1+N)×C, hidden-state list or None)``; shared by both students."""
        if pixel_values is None:
            raise ValueError("pixel_values: missing; expected a B×3×H×W tensor")
        output_hidden_states = self.config.output_hidden_states if output_hidden_states is None else output_hidden_states
        hidden_states = [] if output_hidden_states else None
        return self.vit(pixel_values, interpolate_pos_encoding, hidden_states), hidden_states

    @torch.no_grad()
    def _init_weights(self, module):
        """timm's ViT init, as the reference students use: trunc-normal(0.02) Linear weights, zero biases,
        LayerNorm 1/0, trunc-normal(0.02) position embeddings, the CLS token at the config's std, and
        PyTorch's default (fan-in uniform) for the patch-embedding convolution."""
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            init.trunc_normal_(module.weight, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, nn.Conv2d):
            init.kaiming_uniform_(module.weight, a=math.sqrt(5))
            if module.bias is not None:
                fan_in = module.weight[0].numel()
                init.uniform_(module.bias, -1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in))
        elif isinstance(module, ViTEmbeddings):
            init.trunc_normal_(module.position_embeddings, std=std)
            init.trunc_normal_(module.cls_token, std=self.config.cls_token_init_std)


def _classifier(in_features: int, num_labels: int) -> nn.Module:
    return nn.Linear(in_features, num_labels) if num_labels > 0 else nn.Identity()


class LiftViTForImageClassification(SpectralKDStudentPreTrainedModel):
    """ViT at width C whose last block's patch tokens are lifted to C_t and average-pooled (Lift).

    Parameters at DeiT-Tiny geometry (224 px, patch 16, 12 blocks at 192, 3 heads) with C_t = 384
    and 1000 classes: 5,983,528.
    """

    config: LiftViTConfig

    def __init__(self, config: LiftViTConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.vit = ViTTrunk(config, config.num_hidden_layers)
        self.lift = nn.Linear(config.hidden_size, config.lift_size, bias=False)
        self.lift_norm = nn.LayerNorm(config.lift_size, eps=config.lift_layer_norm_eps)
        self.classifier = _classifier(config.lift_size, config.num_labels)
        self.post_init()

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        interpolate_pos_encoding: bool | None = None,
        return_dict: bool | None = None,
    ) -> LiftImageClassifierOutput | tuple:
        """``pixel_values`` ``B×3×H×W`` → logits ``B×K``; see the module docstring for the hidden states."""
        tokens, hidden_states = self._run_trunk(pixel_values, output_hidden_states, interpolate_pos_encoding)
        # The CLS token took part in attention in every block but is not lifted: only the N patch
        # tokens form the feature map and the pooled representation.
        lifted = self.lift_norm(self.lift(tokens[:, 1:, :]))  # B×N×C_t
        logits = self.classifier(lifted.mean(dim=1))
        loss = self.loss_function(labels, logits, self.config) if labels is not None else None
        output = LiftImageClassifierOutput(
            loss=loss, logits=logits,
            hidden_states=tuple(hidden_states) if hidden_states is not None else None,
            lifted_tokens=lifted if hidden_states is not None else None,
        )
        return output.to_tuple() if return_dict is False else output


class WideLastViTForImageClassification(SpectralKDStudentPreTrainedModel):
    """ViT whose blocks ``0 … L-2`` run at width C and whose last block runs at C_w (WideLast).

    Parameters at DeiT-Tiny geometry with C_w = 384 (6 heads, MLP 1536) and 1000 classes: 7,313,896.
    """

    config: WideLastViTConfig

    def __init__(self, config: WideLastViTConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.vit = ViTTrunk(config, config.num_hidden_layers - 1)
        wide = config.wide_hidden_size
        self.widen = nn.Linear(config.hidden_size, wide, bias=False)
        self.widen_norm = nn.LayerNorm(wide, eps=config.layer_norm_eps)
        wide_config = ViTConfig(
            hidden_size=wide, num_attention_heads=config.wide_num_attention_heads,
            intermediate_size=config.wide_intermediate_size, hidden_act=config.hidden_act,
            hidden_dropout_prob=config.hidden_dropout_prob, attention_probs_dropout_prob=config.attention_probs_dropout_prob,
            layer_norm_eps=config.layer_norm_eps, qkv_bias=config.qkv_bias,
        )
        self.wide_layer = ViTLayer(wide_config)
        # ViTAttention reads only `_attn_implementation` from its config at run time (its sizes are
        # fixed at construction). Pointing it at the model's config makes the wide block follow the
        # attention backend chosen for the model (from_pretrained, set_attn_implementation).
        self.wide_layer.attention.config = config
        self.layernorm = nn.LayerNorm(wide, eps=config.layer_norm_eps)
        self.classifier = _classifier(wide, config.num_labels)
        self.post_init()

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        interpolate_pos_encoding: bool | None = None,
        return_dict: bool | None = None,
    ) -> ImageClassifierOutput | tuple:
        """``pixel_values`` ``B×3×H×W`` → logits ``B×K``; see the module docstring for the hidden states."""
        tokens, hidden_states = self._run_trunk(pixel_values, output_hidden_states, interpolate_pos_encoding)
        tokens = self.wide_layer(self.widen_norm(self.widen(tokens)))  # B×(1+N)×C_w, CLS widened too
        if hidden_states is not None:
            hidden_states.append(tokens)
        logits = self.classifier(self.layernorm(tokens)[:, 0])
        loss = self.loss_function(labels, logits, self.config) if labels is not None else None
        output = ImageClassifierOutput(
            loss=loss, logits=logits, hidden_states=tuple(hidden_states) if hidden_states is not None else None
        )
        return output.to_tuple() if return_dict is False else output


__all__ = [
    "LiftImageClassifierOutput",
    "LiftViTForImageClassification",
    "SpectralKDStudentPreTrainedModel",
    "WideLastViTForImageClassification",
]

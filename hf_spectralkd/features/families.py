"""Which transformers image-classification families can be tapped, with the few facts each one needs.

Every family of ``MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES`` (transformers 5.23) was built from a
tiny config and its ``hidden_states`` read (tests/test_features.py checks each supported one against a
hand-written reading). Token-sequence families share :class:`~.tokens.TokenAdapter`; the facts are its
class-token count and the config attribute of extra prefix tokens. Map-shaped families share
:class:`~.maps.MapAdapter`; the facts are where the stage outputs are and whether they start with the
stem. Families left out are in :data:`UNSUPPORTED` with the reason, which the "unsupported model"
message prints.
"""

from __future__ import annotations

from .maps import MapAdapter
from .tokens import TokenAdapter

TOKEN_FAMILIES = (
    TokenAdapter("vit", "ViT"),
    TokenAdapter("deit", "DeiT", class_tokens=2),  # CLS and the distillation token
    TokenAdapter("beit", "BEiT"),
    TokenAdapter("data2vec-vision", "Data2Vec-Vision"),
    TokenAdapter("dinov2", "DINOv2"),
    TokenAdapter("dinov2_with_registers", "DINOv2 with registers", register_attribute="num_register_tokens"),
    TokenAdapter("ijepa", "I-JEPA", class_tokens=0),
    TokenAdapter("vit_msn", "ViT-MSN"),
    TokenAdapter("clip", "CLIP (vision tower)"),
    TokenAdapter("metaclip_2", "MetaCLIP 2 (vision tower)"),
    TokenAdapter("siglip", "SigLIP (vision tower)", class_tokens=0),
    # Stage i's output is already subsampled to stage i+1's grid (LeViT's stages end with their subsampling).
    TokenAdapter("levit", "LeViT", class_tokens=0, square_grids=True),
)

_SWIN_KIN = dict(source="reshaped_hidden_states")
MAP_FAMILIES = (
    MapAdapter("swin", "Swin", before_downsampling=True, **_SWIN_KIN),
    # transformers 5.23's SwinV2, Donut-Swin and FocalNet forwards drop output_hidden_states_before_downsampling:
    # their stage i is the output after its patch merging (the last stage has none).
    MapAdapter("swinv2", "SwinV2", **_SWIN_KIN),
    MapAdapter("donut-swin", "Donut-Swin", **_SWIN_KIN),
    MapAdapter("focalnet", "FocalNet", **_SWIN_KIN),
    MapAdapter("hiera", "Hiera", channels_last=True, **_SWIN_KIN),
    MapAdapter("convnext", "ConvNeXt"),
    MapAdapter("convnextv2", "ConvNeXt V2"),
    MapAdapter("resnet", "ResNet"),
    MapAdapter("regnet", "RegNet"),
    MapAdapter("bit", "BiT"),
    MapAdapter("hgnet_v2", "HGNet-V2"),
    MapAdapter("textnet", "TextNet"),
    MapAdapter("pp_lcnet", "PP-LCNet"),
    MapAdapter("efficientnet", "EfficientNet", unit="block"),
    MapAdapter("mobilenet_v2", "MobileNetV2", offset=0, unit="block"),
    MapAdapter("mobilevit", "MobileViT", offset=0),
    MapAdapter("mobilevitv2", "MobileViTV2", offset=0),
    MapAdapter("cvt", "CvT", offset=0),
    MapAdapter("poolformer", "PoolFormer", offset=0),
    MapAdapter("pvt_v2", "PVTv2", offset=0),
    MapAdapter("segformer", "SegFormer", offset=0),
)

#: model_type → why its block outputs cannot be tapped (one line, for the "unsupported model" message).
UNSUPPORTED = {
    "dinat": "it needs the natten library, which this environment lacks, so its taps cannot be built or tested",
    "imagegpt": "its input is colour-cluster token ids, not pixel values, and its tokens are pixels, not patches",
    "perceiver": "its blocks update a latent array that has no spatial layout",
    "shieldgemma2": "it is a Gemma 3 vision-language classifier whose hidden states are the language model's",
    "siglip2": "it takes pre-patchified variable-size inputs (pixel_values B×N×3p² with spatial_shapes), not images",
    "pvt": "its hidden states are every block of every stage without their grid, a CLS token in the last stage only "
           "and a final-norm copy at the end",
    "swiftformer": "its hidden states interleave stage outputs with downsampling-layer outputs",
    "mobilenet_v1": "its hidden states are every convolution (depthwise and pointwise apart), not block outputs",
}

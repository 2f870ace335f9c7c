"""Class names: which output of one model is which class of another model, or of the data.

Labels meet in two places, and both use :func:`match_labels`:

* a teacher's logits are put in the student's class order
  (:func:`hf_spectralkd.teacher.teacher_label_order`);
* a pretrained student's classifier head is put in the data's class order
  (:func:`match_head_to_labels`, called by :func:`hf_spectralkd.io.model_loading.load_model`): its rows are
  permuted, classes the data adds get new rows (named in a warning), classes the data lacks are
  dropped. Overwriting ``id2label`` alone would relabel every class of a pretrained head.

Names are compared as keys. ImageNet synset ids (``n01440764``) on both sides are compared as
synsets. Synsets on one side only are read as timm's ImageNet descriptions (``tench, Tinca tinca``,
what transformers' checkpoints and the Hub's ImageNet use), unless the other side is that very list
in ImageNet's order, which is then read as its synsets. Otherwise names are compared case- and
space-insensitively. Names that repeat (ImageNet's descriptions name two classes "crane":
n02012849 the bird, n03126707 the machine) cannot decide a match: when the orders differ and
a name repeats, the match is refused with the repeated names. Default names (``0``, ``LABEL_0``, …)
say nothing about the classes: :func:`class_names` gives ``None`` for them.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Optional, Sequence

import torch
from torch import nn

from .errors import ConfigurationError
from .utils import unwrap_model

logger = logging.getLogger(__name__)

_DEFAULT_NAME = re.compile(r"^(label_)?\d+$", re.IGNORECASE)
_SYNSET = re.compile(r"^n\d{8}$")
_SHOWN = 5  # names listed in a message before "…"


def class_names(model_or_id2label: Any) -> Optional[list[str]]:
    """Class names in output order (a model's ``config.id2label``, or an ``id2label`` dict), or ``None``
    when there are none or only default names."""
    if isinstance(model_or_id2label, dict):
        id2label = model_or_id2label
    else:
        id2label = getattr(getattr(unwrap_model(model_or_id2label), "config", None), "id2label", None) or {}
    if not id2label:
        return None
    names = [str(id2label[key]) for key in sorted(id2label, key=int)]
    return None if all(_DEFAULT_NAME.match(name.strip()) for name in names) else names


def _canonical(name: str) -> str:
    return " ".join(name.replace("_", " ").split()).casefold()


@lru_cache(maxsize=1)
def _imagenet() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """ImageNet-1k's synsets and their descriptions, in ImageNet's class order (shipped with timm)."""
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    indices = range(info.num_classes())
    return tuple(info.index_to_label_name(i) for i in indices), tuple(info.index_to_description(i) for i in indices)


def _is_synsets(names: Sequence[str]) -> bool:
    return all(_SYNSET.match(name) for name in names)


def _keys(names: Sequence[str], other: Sequence[str]) -> list[str]:
    """The keys ``names`` are compared by, against ``other`` (see the module docstring)."""
    if _is_synsets(names) == _is_synsets(other):
        return list(names) if _is_synsets(names) else [_canonical(name) for name in names]
    synsets, descriptions = _imagenet()
    if _is_synsets(other):
        # Names against synsets: ImageNet's own description list (in its order) is those synsets.
        canonical = [_canonical(name) for name in names]
        return list(synsets) if canonical == [_canonical(d) for d in descriptions] else canonical
    if [_canonical(name) for name in other] == [_canonical(d) for d in descriptions]:
        return list(names)  # the other side becomes synsets too
    lookup = dict(zip(synsets, descriptions))
    return [_canonical(lookup.get(name, name)) for name in names]


@dataclass(frozen=True)
class LabelMatch:
    """For each target class, the index of the source output carrying it (``None``: the source lacks it)."""

    source_index: list[Optional[int]]
    target_names: list[str]
    source_names: list[str]

    @property
    def is_identity(self) -> bool:
        return len(self.source_index) == len(self.source_names) and self.source_index == list(range(len(self.source_names)))

    @property
    def missing(self) -> list[str]:
        """Target classes the source lacks."""
        return [name for name, index in zip(self.target_names, self.source_index) if index is None]

    @property
    def unused(self) -> list[str]:
        """Source classes the target lacks."""
        used = set(self.source_index)
        return [name for index, name in enumerate(self.source_names) if index not in used]


def match_labels(target: Sequence[str], source: Sequence[str], target_name: str, source_name: str) -> LabelMatch:
    """Which output of ``source`` is each class of ``target`` (lists of class names in output order).

    ``target_name``/``source_name`` (``"student"``, ``"teacher"``, ``"data"``) name the sides in messages.

    Raises:
        ConfigurationError: the orders differ and a name repeats on either side, naming the repeated names.
    """
    target, source = list(target), list(source)
    target_keys, source_keys = _keys(target, source), _keys(source, target)
    if target_keys == source_keys:
        return LabelMatch(list(range(len(source))), target, source)
    repeats = []
    for side, names, keys in ((target_name, target, target_keys), (source_name, source, source_keys)):
        repeated = [key for key, count in Counter(keys).items() if count > 1]
        repeats += [f"the {side}'s '{key}' ({', '.join(n for n, k in zip(names, keys) if k == key)})"
                    for key in repeated[:_SHOWN]]
    if repeats:
        raise ConfigurationError(
            f"class names repeat: {'; '.join(repeats)}; classes cannot be matched by name between the {target_name} "
            f"and the {source_name} when a name stands for several classes. Give every class a distinct name on both "
            "sides (for ImageNet, synset ids such as n01440764)"
        )
    position = {key: index for index, key in enumerate(source_keys)}
    return LabelMatch([position.get(key) for key in target_keys], target, source)


def shown(names: Sequence[str]) -> str:
    """A few names for a message: ``'a', 'b', … (12 in all)``."""
    text = ", ".join(repr(name) for name in names[:_SHOWN])
    return text + (f", … ({len(names)} in all)" if len(names) > _SHOWN else "")


# ------------------------------------------------------------------------------------------------
# A classifier head in the data's class order
# ------------------------------------------------------------------------------------------------
def match_head_to_labels(model: nn.Module, id2label: dict[int, str], argument: str = "student") -> nn.Module:
    """Give ``model`` the classes of ``id2label`` (the data's), keeping what its head knows of each.

    Rows of the classifier head follow their class by name (:func:`match_labels`); classes the head
    lacks get new rows (truncated normal, ``initializer_range``), named in a warning; classes the data
    lacks are dropped. When either side has only default names, the head is kept row for row if the
    counts agree (nothing says the order differs; warned), else replaced. ``config.id2label``/``label2id`` become the
    data's. Modifies ``model`` in place and returns it.

    Raises:
        ConfigurationError: names that repeat (see :func:`match_labels`), or rows to move and no head found.
    """
    names = [str(id2label[key]) for key in sorted(id2label, key=int)]
    config = unwrap_model(model).config
    current = class_names(model)
    old_count = config.num_labels
    if current is None or class_names(id2label) is None:
        if old_count == len(names):
            logger.warning(
                "%s: %s classes have only default names (0, 1, … or LABEL_0, …): its %d head rows are taken to be "
                "the data's classes in the data's order (%s)", argument, "its" if current is None else "the data's",
                old_count, shown(names),
            )
            rows: list[Optional[int]] = list(range(old_count))
        else:
            logger.info("%s: a new classifier head for the data's %d classes (it had %d)", argument, len(names), old_count)
            rows = [None] * len(names)
    else:
        match = match_labels(names, current, "data", argument)
        rows = match.source_index
        if match.missing:
            logger.warning(
                "%s: %d of the data's %d classes are not among its classes: %s; their head rows are new (randomly "
                "initialised) and learn from the data alone", argument, len(match.missing), len(names), shown(match.missing),
            )
        if match.unused:
            logger.info("%s: %d of its classes are not in the data and leave its head: %s", argument, len(match.unused),
                        shown(match.unused))
        if not match.is_identity and not match.missing and not match.unused:
            logger.info("%s: the data lists its classes in another order: the head's rows are reordered by name", argument)
    if rows != list(range(old_count)):
        _rebuild_heads(model, old_count, rows, argument, getattr(config, "initializer_range", 0.02))
    config.id2label = dict(enumerate(names))
    config.label2id = {name: index for index, name in enumerate(names)}
    _set_num_labels(model, len(names))
    return model


_HEAD_NAME = re.compile(r"(classifier|head|head_dist|fc)$")


def _classifier_heads(model: nn.Module, num_labels: int) -> list[tuple[nn.Module, str, nn.Linear]]:
    """``(parent, attribute, layer)`` of every linear layer named like a classifier with ``num_labels`` outputs
    (HF ``classifier``, DeiT's ``cls_classifier``/``distillation_classifier``, timm's ``head``/``head_dist``/``head.fc``)."""
    found = []
    for parent in unwrap_model(model).modules():
        for attribute, child in parent.named_children():
            if isinstance(child, nn.Linear) and _HEAD_NAME.search(attribute) and _out_features(child) == num_labels:
                found.append((parent, attribute, child))
    return found


def _out_features(layer: nn.Linear) -> int:
    return int(getattr(layer.weight, "ds_shape", layer.weight.shape)[0])  # ZeRO-3 keeps the full shape in ds_shape


def _gathered(layer: nn.Module):
    """The layer's full parameters, also when DeepSpeed ZeRO-3 partitions them."""
    if any(hasattr(p, "ds_id") for p in layer.parameters()):
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(layer.parameters()), modifier_rank=None)
    return contextlib.nullcontext()


def _rebuild_heads(model: nn.Module, old_count: int, rows: list[Optional[int]], argument: str, std: float) -> None:
    heads = _classifier_heads(model, old_count)
    if not heads:
        raise ConfigurationError(
            f"{argument}: its classes must be matched to the data's, but no classifier layer with {old_count} outputs "
            "was found; save the model with the data's id2label (rows in the data's order) first"
        )
    kept = [index for index, row in enumerate(rows) if row is not None]
    sources = [rows[index] for index in kept]
    for parent, attribute, layer in heads:
        with _gathered(layer):
            weight = layer.weight.detach()
            new = nn.Linear(layer.in_features, len(rows), bias=layer.bias is not None, device=weight.device,
                            dtype=weight.dtype)
            with torch.no_grad():
                # Seeded: every process of a distributed run builds the same new rows.
                generator = torch.Generator(device=weight.device).manual_seed(len(rows))
                nn.init.trunc_normal_(new.weight, std=std, generator=generator)
                new.weight[kept] = weight[sources]
                if layer.bias is not None:
                    new.bias.zero_()
                    new.bias[kept] = layer.bias.detach()[sources]
        new.weight.requires_grad_(layer.weight.requires_grad)
        setattr(parent, attribute, new)


def _set_num_labels(model: nn.Module, count: int) -> None:
    model = unwrap_model(model)
    if hasattr(model, "num_labels"):
        model.num_labels = count
    timm_model = getattr(model, "timm_model", None)
    if timm_model is not None and hasattr(timm_model, "num_classes"):
        timm_model.num_classes = count

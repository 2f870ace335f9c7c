"""Small helpers about model objects that every module needs."""

from __future__ import annotations

from torch import nn


def unwrap_model(model: nn.Module) -> nn.Module:
    """Strip DDP / DeepSpeed / ``torch.compile`` wrappers (compiled twice too) to reach the transformers model.

    Not accelerate's ``extract_model_from_parallel``: that imports DeepSpeed on every call when it
    is installed, and this runs in every training step (the feature taps ask for the model family).
    """
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        if hasattr(model, "_orig_mod"):  # torch.compile
            model = model._orig_mod
        elif hasattr(model, "_torchdynamo_orig_callable"):
            # torch.compile of an already compiled module returns its forward compiled, a function
            # (torch 2.14): the module is the bound method's owner.
            model = getattr(model._torchdynamo_orig_callable, "__self__", model)
        elif hasattr(model, "module") and isinstance(model.module, nn.Module):  # DDP, DeepSpeed engine
            model = model.module
    return model


def num_parameters(model: nn.Module) -> int:
    """Number of parameters, also under DeepSpeed ZeRO-3 (where each process holds only a shard).

    ``PreTrainedModel.num_parameters()`` counts ``numel()``, which ZeRO-3 empties on every process;
    DeepSpeed keeps the full size in ``ds_numel``.
    """
    return sum(int(getattr(p, "ds_numel", p.numel())) for p in unwrap_model(model).parameters())

"""Value checks of the run's options: each bad value is one ``ConfigurationError`` line that names the
option, what was expected and what was given (the recipe prints it and exits 2)."""

from __future__ import annotations

import math
from typing import Any, Optional, Union, get_args

from .errors import ConfigurationError

#: torch.compile modes a run accepts, for the student (--torch_compile_mode) and the teacher (--teacher_compile).
#: Those with CUDA graphs (reduce-overhead, max-autotune) need a CUDA device to capture them; elsewhere torch
#: compiles without them.
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def parse_layer_list(value: Any, argument: str) -> Union[list[int], str, None]:
    """Normalise a layer list given as ints, strings, ``"0,1,18"`` or ``"auto"``.

    Returns a list of ints, the string ``"auto"`` or ``None``; raises ``ConfigurationError`` naming ``argument``.
    """
    if value is None:
        return None
    if isinstance(value, str):
        value = [value]
    items: list[str] = []
    for item in value:
        if isinstance(item, str):
            items.extend(part for part in item.replace(",", " ").split() if part)
        else:
            items.append(item)
    if len(items) == 1 and isinstance(items[0], str) and items[0].lower() in ("auto", "none"):
        return "auto" if items[0].lower() == "auto" else None
    layers = []
    for item in items:
        if isinstance(item, bool):
            item = str(item)
        try:
            layer = int(item)
        except (TypeError, ValueError):
            raise ConfigurationError(
                f"{argument}: expected 0-based block indices (e.g. 0 1 18 19) or 'auto', got {value!r}"
            ) from None
        if isinstance(item, float) and item != layer:
            raise ConfigurationError(f"{argument}: block indices must be integers, got {item!r}")
        if layer < 0:
            raise ConfigurationError(f"{argument}: block indices are 0-based and must be >= 0, got {layer}")
        layers.append(layer)
    return layers


def check_number(name: str, value: Any, low: float, high: float = math.inf, low_open: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigurationError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    if math.isnan(value) or math.isinf(value):
        raise ConfigurationError(f"{name} must be a finite number, got {value}")
    below = value <= low if low_open else value < low
    if below or value > high:
        bracket = "(" if low_open else "["
        upper = "inf)" if math.isinf(high) else f"{high}]"
        raise ConfigurationError(f"{name} must be in {bracket}{low}, {upper}, got {value}")


def check_count(name: str, value: Any, minimum: int, expected: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigurationError(f"{name} must be {expected}, got {value!r}")


def check_choice(name: str, value: Any, choices: Any) -> None:
    allowed = get_args(choices)
    if value not in allowed:
        raise ConfigurationError(f"{name} must be one of {allowed}, got {value!r}")


def compile_mode(value: Any, argument: str, aliases: bool = False) -> Optional[str]:
    """A torch.compile mode of :data:`COMPILE_MODES` or ``None``. With ``aliases`` (``--teacher_compile``, a bool
    before it took a mode), ``True``/``"true"`` mean ``"default"`` and ``False``/``"false"`` mean off."""
    if aliases and isinstance(value, (bool, str)) and str(value).lower() in ("true", "false"):
        return "default" if str(value).lower() == "true" else None
    if value is None or value in COMPILE_MODES:
        return value
    also = " (or true/false)" if aliases else ""
    raise ConfigurationError(f"{argument} must be one of {', '.join(COMPILE_MODES)}{also}, got {value!r}")

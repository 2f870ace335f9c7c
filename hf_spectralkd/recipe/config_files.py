"""Recipe config files: YAML/JSON mappings of option → value, ``base:`` chains, shipped configs by name."""

from __future__ import annotations

import dataclasses
import enum
import types
import typing
from pathlib import Path
from typing import Any, Optional, Sequence

import yaml

from ..config import FORMER_SWITCHES
from ..errors import ConfigurationError

CONFIG_SUFFIXES = (".yaml", ".yml", ".json")


class _DuplicateKeyError(Exception):
    def __init__(self, key: Any, first_line: int, second_line: int):
        super().__init__(key)
        self.key, self.first_line, self.second_line = key, first_line, second_line


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a mapping holding a key twice (PyYAML keeps the last one without a word:
    a second ``alpha:`` further down a config silently overrides the first)."""

    def construct_mapping(self, node, deep=False):
        first: dict[Any, int] = {}
        for key_node, _ in node.value:
            key, line = self.construct_object(key_node, deep=True), key_node.start_mark.line + 1
            try:
                if key in first:
                    raise _DuplicateKeyError(key, first[key], line)
                first[key] = line
            except TypeError:  # an unhashable key: construct_mapping below reports it
                continue
        return super().construct_mapping(node, deep)


def read_config_file(path: str, _chain: tuple[str, ...] = ()) -> dict[str, Any]:
    """Load a YAML (or JSON) mapping of option → value, following ``base: other.yaml`` chains.

    A ``base`` file (relative to the including file) is read first and the including file's keys
    override it, so a variant of a recipe is its base plus the lines that differ. Every failure (a
    missing, unreadable, non-UTF-8 or invalid file, a ``base:`` chain that loops) is a one-line
    :class:`~hf_spectralkd.errors.ConfigurationError` naming the file.
    """
    file = Path(path)
    resolved = str(file.resolve())
    if resolved in _chain:
        loop = " → ".join(Path(p).name for p in (*_chain[_chain.index(resolved):], resolved))
        raise ConfigurationError(f"config: '{path}' includes itself through 'base:' ({loop}); remove the loop")
    if not file.exists():
        raise ConfigurationError(f"config: file '{path}' does not exist")
    if not file.is_file():
        raise ConfigurationError(f"config: '{path}' is not a file")
    try:
        raw = file.read_bytes()
    except OSError as error:
        raise ConfigurationError(f"config: cannot read '{path}' ({error.strerror or error})") from None
    try:
        text = raw.decode("utf-8-sig")  # a byte-order mark, as some Windows editors write, is fine
    except UnicodeDecodeError as error:
        raise ConfigurationError(
            f"config: '{path}' is not UTF-8 text (byte 0x{raw[error.start]:02x} at offset {error.start}); save it as UTF-8"
        ) from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader) or {}
    except yaml.YAMLError as error:
        raise ConfigurationError(f"config: '{path}' is not valid YAML: {str(error).splitlines()[0]}") from None
    except _DuplicateKeyError as error:
        raise ConfigurationError(
            f"config: '{path}' sets {error.key!r} twice (lines {error.first_line} and {error.second_line}); keep one"
        ) from None
    if not isinstance(data, dict):
        raise ConfigurationError(f"config: '{path}' must hold a mapping of option: value, got {type(data).__name__}")
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str) or not base.strip():
        raise ConfigurationError(f"config: 'base' in '{path}' must be the path of another config file, got {base!r}")
    merged = read_config_file(str(file.parent / base), _chain + (resolved,))
    merged.update(data)
    return merged


def _accepts(hint: Any, value: Any) -> bool:
    """Whether a YAML value (None, bool, int, float, str, list, dict) can stand for a field typed ``hint``."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_accepts(arg, value) for arg in args)
    if origin is typing.Literal:
        return value in args
    if hint is type(None):
        return value is None
    if origin in (list, tuple) or hint in (list, tuple):
        return isinstance(value, list) and (not args or all(_accepts(args[0], item) for item in value))
    if origin is dict or hint is dict:
        return isinstance(value, dict)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return value in [member.value for member in hint]
    return isinstance(hint, type) and isinstance(value, hint)  # other classes cannot come from YAML


def _describe(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(dict.fromkeys(_describe(arg) for arg in args if arg is not type(None)))
    if origin is typing.Literal or (isinstance(hint, type) and issubclass(hint, enum.Enum)):
        choices = args if origin is typing.Literal else [member.value for member in hint]
        return "one of " + ", ".join(repr(choice) for choice in choices)
    if origin in (list, tuple) or hint in (list, tuple):
        return f"a list of {_describe(args[0])} values" if args else "a list"
    names = {bool: "true or false", int: "an integer", float: "a number", str: "text", dict: "a mapping"}
    return names.get(origin or hint, getattr(hint, "__name__", str(hint)))


def check_config_values(values: dict[str, Any], classes: Sequence[type], config_path: str) -> None:
    """Refuse a config value whose YAML type cannot stand for its option (``max_steps: [1]``).

    A text value is left to the parser, which converts and checks it as it does on the command line;
    any other value would reach the arguments' dataclasses unconverted and fail there with an
    unrelated message (``'list' object has no attribute 'endswith'``), or not at all.
    """
    fields = {}
    for cls in classes:
        hints = typing.get_type_hints(cls)
        fields.update({f.name: (hints[f.name], f.default) for f in dataclasses.fields(cls) if f.init})
    for key, value in values.items():
        if key not in fields or isinstance(value, str):
            continue
        hint, default = fields[key]
        if (value is None and default is None) or _accepts(hint, value) or (key in FORMER_SWITCHES and isinstance(value, bool)):
            continue
        shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
        raise ConfigurationError(f"config: {key} must be {_describe(hint)}, got {shown} in '{config_path}'")


#: The recipe configs shipped inside the package (``recipes/configs`` in a clone links here).
SHIPPED_CONFIGS_DIR = Path(__file__).resolve().parents[1] / "configs"


def shipped_configs() -> dict[str, Path]:
    """Name → path of every config shipped with the package (``deit_tiny_from_cait_s24``, ``demo``, …)."""
    return {path.stem: path for path in sorted(SHIPPED_CONFIGS_DIR.glob("*.yaml"))}


def config_target(path: Path) -> str:
    """The paper target a shipped config states in its ``# target:`` line."""
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("# target:"):
            return line.removeprefix("# target:").strip()
    return ""


def resolve_config(value: str) -> str:
    """A config given as a path, or by the name of a shipped config (with or without ``.yaml``)."""
    if Path(value).expanduser().exists():
        return value
    configs = shipped_configs()
    name = Path(value).name.removesuffix(".yaml") if "/" not in value else None
    if name in configs:
        return str(configs[name])
    if value.endswith(CONFIG_SUFFIXES):
        return value  # a missing file: read_config_file names it
    raise ConfigurationError(
        f"config: '{value}' is neither a config file nor a shipped config ({', '.join(configs)}); "
        "`hf-spectralkd configs` lists them"
    )


def _looks_like_config(value: str) -> bool:
    # The recipe takes no positional argument but its config: anything else there is a config that
    # does not exist, which resolve_config names as such (rather than as an unknown option).
    return not value.startswith("-")


def split_config_argument(argv: Sequence[str]) -> tuple[Optional[str], list[str]]:
    """``[CONFIG] [--config CONFIG] [options...]`` → ``(config path or None, options)``.

    ``CONFIG`` is a YAML/JSON file or the name of a shipped config (see :func:`shipped_configs`).
    """
    argv = list(argv)
    config_path: Optional[str] = None
    if argv and _looks_like_config(argv[0]):
        config_path = resolve_config(argv.pop(0))
    if "--config" in argv:
        index = argv.index("--config")
        if index + 1 >= len(argv):
            raise ConfigurationError("config: --config needs a file path")
        if config_path is not None:
            raise ConfigurationError("config: give the config file either first or with --config, not both")
        config_path = resolve_config(argv[index + 1])
        del argv[index : index + 2]
    return config_path, argv

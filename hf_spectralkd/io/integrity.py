"""Whether a saved model folder is intact, checked before anything loads it.

An interrupted copy or download leaves a weights file cut short. safetensors then stops with a Rust
exception (``incomplete metadata, file not fully covered``), torch with a C++ one about a zip
archive, and transformers silently re-initialises every tensor a file lacks: none of them names the
file or says what to do. These checks read headers only (a few kilobytes per file), so they run
before every load of a teacher, a student, a checkpoint or a finished run:

* :func:`model_folder_problems`: ``config.json`` parses, and every weights file transformers would
  read (``model.safetensors``, each shard named by the index, or the ``pytorch_model.bin`` variants)
  exists and its header describes exactly the bytes the file holds.
* :func:`saved_model_problems`: the same for a folder that must hold weights (a checkpoint, a
  finished run), whose absence is then a problem too.
* :func:`loading_problems`: after ``from_pretrained(..., output_loading_info=True)``, tensors that
  the weights lack or hold in another shape than ``config.json`` asks for.
* :func:`damaged`: the one-line :class:`~hf_spectralkd.errors.DamagedFileError` for a list of them.

Problems are short phrases that start with the file's name (``model.safetensors is truncated:
...``), so a caller can list several, for one folder or for many checkpoints.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any, Iterable, Optional, Union

from ..errors import DamagedFileError

CONFIG_FILE = "config.json"
SAFE_WEIGHTS, SAFE_INDEX = "model.safetensors", "model.safetensors.index.json"
TORCH_WEIGHTS, TORCH_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"
WEIGHT_FILES = (SAFE_WEIGHTS, SAFE_INDEX, TORCH_WEIGHTS, TORCH_INDEX)
#: What to do about a damaged model folder (a teacher, a student, a finished run).
COPY_AGAIN = "copy or download it again"
#: safetensors itself refuses headers above 100 MB: a larger length means the file does not start
#: with a header at all (another format, or zeros written by a failed copy).
_MAX_HEADER_BYTES = 100_000_000

PathLike = Union[str, Path]


def damaged(argument: str, path: PathLike, problems: Iterable[str], remedy: str = COPY_AGAIN) -> DamagedFileError:
    """``<argument>: '<path>' is damaged (<problem>; <problem>): <remedy>`` as an exception to raise."""
    return DamagedFileError(f"{argument}: '{path}' is damaged ({'; '.join(problems)}): {remedy}")


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (its type name if it has none), cut to its first
    sentence when long: torch follows its reason with a paragraph of advice on the same line."""
    text = str(error).strip()
    line = text.splitlines()[0] if text else type(error).__name__
    return line.split(". ", 1)[0] if len(line) > 120 else line


def read_json(path: Path, name: Optional[str] = None) -> tuple[Any, Optional[str]]:
    """``(value, None)`` for a readable JSON file, ``(None, problem)`` otherwise."""
    name = name or path.name
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None, f"{name} is missing"
    except OSError as error:
        return None, f"{name} cannot be read ({error.strerror or error})"
    if not raw.strip():
        return None, f"{name} is empty"
    try:
        return json.loads(raw.decode("utf-8")), None
    except UnicodeDecodeError:
        return None, f"{name} is not UTF-8 text"
    except json.JSONDecodeError as error:
        return None, f"{name} is not valid JSON ({error.msg} at line {error.lineno} column {error.colno})"


def config_problems(folder: Path) -> list[str]:
    """``config.json`` of a ``save_pretrained`` folder: present, JSON, an object."""
    config, problem = read_json(folder / CONFIG_FILE)
    if problem:
        return [problem]
    if not isinstance(config, dict):
        return [f"{CONFIG_FILE} holds a JSON {type(config).__name__}, not an object"]
    return []


def safetensors_problem(path: Path, name: Optional[str] = None) -> tuple[set[str], Optional[str]]:
    """Check a safetensors file against its own header: ``(tensor names, None)`` or ``(set(), problem)``.

    The format is an 8-byte little-endian header length, a JSON header giving each tensor's byte
    range, then the data; a complete file ends exactly where the last range does.
    """
    name = name or path.name
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                return set(), f"{name} is truncated: {size:,} bytes, shorter than a safetensors header"
            length = int.from_bytes(prefix, "little")
            if length > _MAX_HEADER_BYTES:
                return set(), f"{name} is not a safetensors file (it does not start with a header length)"
            if 8 + length > size:
                return set(), f"{name} is truncated: {size:,} bytes, shorter than its own {8 + length:,}-byte header"
            raw = handle.read(length)
    except FileNotFoundError:
        return set(), f"{name} is missing"
    except OSError as error:
        return set(), f"{name} cannot be read ({error.strerror or error})"
    try:
        header = json.loads(raw.decode("utf-8"))
    except ValueError:  # not UTF-8, or not JSON
        return set(), f"{name} has a damaged header (not JSON)"
    if not isinstance(header, dict):
        return set(), f"{name} has a damaged header (not a JSON object)"
    end = 0
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) and o >= 0 for o in offsets)):
            return set(), f"{name} has a damaged header (tensor {key!r} has no valid byte range)"
        end = max(end, offsets[1])
    expected = 8 + length + end
    if size < expected:
        return set(), f"{name} is truncated: header says {expected:,} bytes, file has {size:,}"
    if size > expected:
        return set(), f"{name} has {size - expected:,} bytes its header does not describe (header says {expected:,} bytes, file has {size:,})"
    try:  # what remains (dtypes against byte ranges, overlaps) is checked by safetensors itself
        from safetensors import safe_open

        with safe_open(str(path), framework="pt"):
            pass
    except Exception as error:  # noqa: BLE001 - SafetensorError and friends: any failure is damage
        return set(), f"{name} is not a valid safetensors file ({first_line(error)})"
    return {key for key in header if key != "__metadata__"}, None


def torch_file_problem(path: Path, name: Optional[str] = None) -> Optional[str]:
    """Load a ``torch.save`` file the way transformers does (``weights_only``); the problem, if any.

    Files in the zip format are memory-mapped, so only their structure is read: a truncated file has
    lost its zip directory (it sits at the end) and fails here; corrupt bytes inside a tensor are
    what a checkpoint's checksum manifest is for.
    """
    import torch
    from transformers.trainer_pt_utils import safe_globals

    name = name or path.name
    if not path.is_file():
        return f"{name} is missing"
    with open(path, "rb") as handle:
        starts_as_zip = handle.read(4) == b"PK\x03\x04"
    is_zip = zipfile.is_zipfile(path)
    if starts_as_zip and not is_zip:  # torch.save writes zip archives, whose directory is at the very end
        return f"{name} is truncated (the end of its zip archive is missing)"
    try:
        with safe_globals():  # the numpy types of rng_state.pth, allowed as the Trainer allows them
            torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
    except Exception as error:  # noqa: BLE001 - torch reports damage as RuntimeError, EOFError, UnpicklingError, ...
        return f"{name} cannot be loaded ({first_line(error)})"
    return None


def _sharded_problems(folder: Path, index_name: str) -> list[str]:
    index, problem = read_json(folder / index_name)
    if problem:
        return [problem]
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        return [f"{index_name} has no valid weight_map"]
    by_shard: dict[str, list[str]] = {}
    for tensor, shard in weight_map.items():
        by_shard.setdefault(shard, []).append(tensor)
    problems = []
    for shard, tensors in sorted(by_shard.items()):
        if not (folder / shard).is_file():
            problems.append(f"{shard} is missing (a shard named by {index_name})")
        elif index_name == SAFE_INDEX:
            names, problem = safetensors_problem(folder / shard, shard)
            absent = [t for t in tensors if t not in names]
            if problem:
                problems.append(problem)
            elif absent:
                problems.append(f"{shard} lacks {len(absent)} tensor(s) that {index_name} puts there, e.g. {absent[0]}")
        else:
            problem = torch_file_problem(folder / shard, shard)
            if problem:
                problems.append(problem)
    return problems


def weights_problems(folder: Path) -> list[str]:
    """The weights transformers would read from ``folder``, in its order of preference; ``[]`` if none."""
    if (folder / SAFE_WEIGHTS).exists():
        return [p for p in [safetensors_problem(folder / SAFE_WEIGHTS)[1]] if p]
    if (folder / SAFE_INDEX).exists():
        return _sharded_problems(folder, SAFE_INDEX)
    if (folder / TORCH_WEIGHTS).exists():
        return [p for p in [torch_file_problem(folder / TORCH_WEIGHTS)] if p]
    if (folder / TORCH_INDEX).exists():
        return _sharded_problems(folder, TORCH_INDEX)
    return []


def has_weights(folder: Path) -> bool:
    return any((folder / name).exists() for name in WEIGHT_FILES)


def model_folder_problems(folder: PathLike, with_weights: bool = True) -> list[str]:
    """Everything wrong with a ``save_pretrained`` folder that can be seen without building the model."""
    folder = Path(folder)
    return config_problems(folder) + (weights_problems(folder) if with_weights else [])


def saved_model_problems(folder: PathLike) -> list[str]:
    """:func:`model_folder_problems` of a folder that must hold weights (a checkpoint, a finished run's student).

    A loader may build a model from a folder with ``config.json`` alone; a saved model without its
    weights is what a save cut short by a full disk leaves.
    """
    folder = Path(folder)
    return model_folder_problems(folder) + ([] if has_weights(folder) else [f"{SAFE_WEIGHTS} is missing"])


def check_model_folder(folder: PathLike, argument: str, with_weights: bool = True, remedy: str = COPY_AGAIN) -> None:
    """Raise :class:`~hf_spectralkd.errors.DamagedFileError` naming ``argument`` if ``folder`` is damaged."""
    problems = model_folder_problems(folder, with_weights)
    if problems:
        raise damaged(argument, folder, problems, remedy)


def _shape(size) -> str:
    return "×".join(str(n) for n in size) or "a scalar"


def loading_problems(info: dict, model) -> list[str]:
    """Tensors that ``from_pretrained`` did not fill from the file (``output_loading_info``).

    transformers re-initialises a tensor the file lacks, or (with ``ignore_mismatched_sizes``)
    holds in another shape, and only logs it: a weights file that does not belong to its
    ``config.json`` would train or teach from random values. Extra tensors in the file (a backbone's
    pooler) are ignored, as transformers does.
    """
    problems = []
    mismatched = sorted(info.get("mismatched_keys", ()))
    if mismatched:
        key, saved, wanted = mismatched[0]
        problems.append(f"{len(mismatched)} tensor(s) of the weights do not have the shapes {CONFIG_FILE} asks for, e.g. "
                        f"{key} is {_shape(saved)} in the file and {_shape(wanted)} in the config")
    missing = sorted(info.get("missing_keys", ()))
    if missing:
        problems.append(f"the weights lack {len(missing)} tensor(s) that {CONFIG_FILE} asks for, e.g. {missing[0]}")
    problems += [f"the weights do not load ({first_line(Exception(message))})" for message in info.get("error_msgs", ())[:1]]
    return problems

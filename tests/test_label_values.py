"""Wrong labels are refused when a split is opened, naming the rows and values; classes without
training images are a warning. The loader is called directly where it is the unit; the recipe runs in a real
process for what a job sees."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest
from helpers import class_image, encoded, run_recipe_process, tiny_run_args

from hf_spectralkd.data import DataArguments, open_image_datasets
from hf_spectralkd.errors import ConfigurationError

ROOT = Path(__file__).resolve().parents[1]
TEN_CLASSES = [f"c{i}" for i in range(10)]


def saved_dataset(root: Path, train_labels, eval_labels=(0, 1), class_names=None) -> str:
    """A parquet dataset (train, validation) of tiny images with these labels (a ClassLabel when ``class_names``)."""
    import datasets

    rng = np.random.default_rng(0)
    for split, labels in (("train", list(train_labels)), ("validation", list(eval_labels))):
        images = [{"bytes": encoded(class_image(i % 3, rng), "PNG"), "path": None} for i in range(len(labels))]
        ds = datasets.Dataset.from_dict({"image": images, "label": labels}).cast_column("image", datasets.Image())
        if class_names:  # a cast keeps out-of-range ids, as a parquet file written by other tools can hold them
            ds = ds.cast_column("label", datasets.ClassLabel(names=class_names))
        (root / split).mkdir(parents=True)
        ds.to_parquet(str(root / split / f"{split}-00000.parquet"))
    return str(root)


def image_tree(root: Path, files: list[str], empty_dirs: tuple[str, ...] = ()) -> str:
    """An image folder holding ``files`` (paths relative to ``root``) and the empty folders ``empty_dirs``."""
    rng = np.random.default_rng(0)
    for index, name in enumerate(files):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        class_image(index % 3, rng).save(root / name)
    for name in empty_dirs:
        (root / name).mkdir(parents=True, exist_ok=True)
    return str(root)


TWO_CLASSES_VALIDATION = ["validation/a/0.png", "validation/b/0.png"]
#: case → (builder of the dataset, what the one-line error says)
BAD_LABELS = {
    "classlabel_999": (lambda r: saved_dataset(r, [0, 1, 999, 2], class_names=TEN_CLASSES),
                       "label_column: 'label' of split 'train' has 1 label(s) outside the 10 classes 0..9 of its "
                       "ClassLabel: row 2: 999"),
    "unlabelled_minus_1": (lambda r: saved_dataset(r, [0, -1, 1, -1], class_names=TEN_CLASSES),
                           "outside the 10 classes 0..9 of its ClassLabel: row 1: -1, row 3: -1 (-1 marks an unlabelled "
                           "image in datasets"),
    "negative_integer": (lambda r: saved_dataset(r, [0, 2, -3, 1]), "row 2: -3"),
    "stray_999_among_integers": (lambda r: saved_dataset(r, list(range(10)) * 2 + [999]),
                                 "ids up to 999 make a 1000-class student, but only 11 ids occur; stray labels? row 20: 999"),
    "none": (lambda r: saved_dataset(r, [0, None, 1, 2]), "has no label in 1 of 4 rows (row 1)"),
    "nan": (lambda r: saved_dataset(r, [0.0, 1.0, float("nan"), 2.0]), "has no label in 1 of 4 rows (row 2)"),
    "fraction": (lambda r: saved_dataset(r, [0.0, 1.5, 1.0, 2.0]), "class ids that are not whole numbers (row 1: 1.5)"),
    "text": (lambda r: saved_dataset(r, ["cat", "dog", "cat"]),
             "holds text ('cat', 'dog', ...), not class ids; encode it first, e.g. ds = ds.class_encode_column('label')"),
    "eval_label_out_of_range": (lambda r: saved_dataset(r, [0, 1, 2, 0], eval_labels=[0, 7]),
                                "label_column: 'label' of split 'validation' has 1 label(s) outside the 3 classes 0..2 "
                                "of the training split: row 1: 7"),
    "nested_imagefolder": (lambda r: image_tree(r, ["train/a/0.png", "train/a/1.png", "train/b/0.png", "train/b/extra/1.png",
                                                    *TWO_CLASSES_VALIDATION]),
                           "the imagefolder '{root}' gives no labels: 'train/b/extra/1.png' is not directly inside a "
                           "class folder of 'train'"),
    "single_class_imagefolder": (lambda r: image_tree(r, ["train/a/0.png", "train/a/1.png", "validation/a/0.png"]),
                                 "'train' has a single class folder ('a'), and datasets' imagefolder labels images only "
                                 "when there are at least two"),
}


@pytest.mark.parametrize("case", list(BAD_LABELS))
def test_wrong_labels_are_refused_when_the_split_is_opened(case, tmp_path):
    build, message = BAD_LABELS[case]
    root = tmp_path / case
    build(root)
    with pytest.raises(ConfigurationError) as error:
        open_image_datasets(DataArguments(dataset=str(root)))
    assert message.format(root=root) in str(error.value)
    assert "\n" not in str(error.value)


def test_good_integer_labels_make_their_classes(tmp_path):
    raw = open_image_datasets(DataArguments(dataset=saved_dataset(tmp_path / "d", [2, 0, 1, 1.0, 0], eval_labels=[1, 2])))
    assert raw.id2label == {0: "0", 1: "1", 2: "2"}


def test_a_class_without_training_images_is_a_warning_naming_it(tmp_path, caplog):
    root = saved_dataset(tmp_path / "classlabel", [0, 2, 0, 2], eval_labels=[1, 2], class_names=["a", "b", "c"])
    with caplog.at_level(logging.WARNING, logger="hf_spectralkd"):
        raw = open_image_datasets(DataArguments(dataset=root))
    assert raw.id2label == {0: "a", 1: "b", 2: "c"}  # still a 3-class student: the eval split has 'b'
    assert [r.getMessage() for r in caplog.records] == [
        "1 class(es) have no image in split 'train': 'b'; the student will not learn them"]

    caplog.clear()
    folder = image_tree(tmp_path / "folder", ["train/a/0.png", "train/c/0.png", *TWO_CLASSES_VALIDATION], ("train/b0",))
    with caplog.at_level(logging.WARNING, logger="hf_spectralkd"):
        raw = open_image_datasets(DataArguments(dataset=folder))
    assert sorted(raw.id2label.values()) == ["a", "b", "c"]
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2, messages
    assert "1 class(es) have no image in split 'train': 'b'" in messages[0]
    assert messages[1].startswith("class folder(s) ['b0'] of ") and "hold no image" in messages[1]


@pytest.mark.slow
def test_wrong_labels_stop_a_real_process_with_one_line(saved_models, tmp_path):
    abc = ["a", "b", "c"]  # the tiny teacher's 3 classes
    cases = {  # before: an IndexError traceback in the loss; a silent 1,000-class student; a missing column
        "unlabelled": (lambda r: saved_dataset(r, [0, 1, -1, 2, 0, 1, 2, 0], class_names=abc), [],
                       "outside the 3 classes 0..2 of its ClassLabel: row 2: -1 (-1 marks an unlabelled image"),
        "stray": (lambda r: saved_dataset(r, [0, 1, 2] * 3 + [999]), ["--distillation_type", "none", "--beta", "0"],
                  "ids up to 999 make a 1000-class student, but only 4 ids occur; stray labels? row 9: 999"),
        "nested": (BAD_LABELS["nested_imagefolder"][0], [], BAD_LABELS["nested_imagefolder"][1]),
    }
    argvs = [tiny_run_args(saved_models, build(tmp_path / name), tmp_path / f"out_{name}", *extra)
             for name, (build, extra, _) in cases.items()]
    (tmp_path / "cases.json").write_text(json.dumps(argvs))
    result = run_recipe_process([str(tmp_path / "cases.json")], check=False, script=ROOT / "tests" / "scripts" / "recipe_cases.py")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    sections = re.split(r"^=== case \d+\n", result.stderr, flags=re.MULTILINE)[1:]
    assert len(sections) == len(cases), result.stderr[-3000:]
    for index, (section, (name, (_, _, message))) in enumerate(zip(sections, cases.items())):
        errors = [line for line in section.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and message.format(root=tmp_path / name) in errors[0], section
        assert section.rstrip().endswith(f"=== exit {index} 2"), section
        assert not (tmp_path / f"out_{name}" / "checkpoint-2").exists()

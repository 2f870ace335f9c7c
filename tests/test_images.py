"""One decoder for every image, every bad image counted, analyses that stream."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import run_distill
import torch
from helpers import class_image, encoded, exif_jpeg, make_bad_image_folder, run_and_capture, tiny_run_args
from PIL import Image

from hf_spectralkd.data import DataArguments, TransformedImageDataset, build_eval_transform, decode_image, share_above


def test_exif_rotated_jpeg_decodes_upright_as_pipeline_does(tmp_path):
    import datasets
    from transformers.image_utils import load_image

    array = np.zeros((20, 40, 3), dtype=np.uint8)  # 40 wide, 20 high, bright left half
    array[:, :20] = 230
    path = tmp_path / "rotated.jpg"
    path.write_bytes(exif_jpeg(array, 6))  # orientation: rotate 90° clockwise to display

    expected = np.asarray(load_image(str(path)))  # what pipeline() sees
    assert expected.shape == (40, 20, 3)
    for value in (str(path), path.read_bytes(), {"bytes": path.read_bytes(), "path": None}, Image.open(path)):
        assert np.array_equal(np.asarray(decode_image(value)), expected)
    assert np.array_equal(np.asarray(datasets.Image(mode="RGB").decode_example({"path": str(path), "bytes": None})), expected)
    # and through the evaluation dataset: the same tensor the eval transform makes of pipeline()'s image
    raw = datasets.Dataset.from_dict({"image": [str(path)], "label": [0]}, features=datasets.Features(
        {"image": datasets.Image(), "label": datasets.Value("int64")}))
    transform = build_eval_transform(DataArguments(), 32)
    dataset = TransformedImageDataset(raw, transform, "image", "label")
    assert torch.equal(dataset[0]["pixel_values"], transform(load_image(str(path))))


def test_unusual_images_decode_and_broken_ones_do_not(tmp_path):
    make_bad_image_folder(tmp_path)
    decoded = {path.name: decode_image(str(path)) for path in (tmp_path / "train").rglob("*.*")}
    assert {name for name, image in decoded.items() if image is None} == {"truncated.jpg", "text_0.jpg"}
    assert all(image.mode == "RGB" for image in decoded.values() if image is not None)
    assert decoded["tiny.jpg"].size == (1, 1) and decoded["deep.png"].size == (64, 48)


def test_bad_images_are_skipped_and_counted_in_logs_results_and_card(tmp_path, saved_models, caplog):
    counts = make_bad_image_folder(tmp_path / "data")  # train: 9 good + 4 unusual + 2 broken; validation: 6 + 2 broken
    assert counts == {"train": 15, "train_bad": 2, "validation": 8, "validation_bad": 2}
    out = tmp_path / "out"
    # one epoch of 15 images in batches of 5: every training image is read exactly once
    args = tiny_run_args(saved_models, str(tmp_path / "data"), out, "--max_steps", "-1", "--num_train_epochs", "1",
                         "--per_device_train_batch_size", "5", "--max_skipped_fraction", "0.5", "--eval_strategy", "no",
                         "--auto_augment", "rand-m9-mstd0.5-inc1", "--reprob", "0.25", "--profile_images", "0")
    with caplog.at_level(logging.WARNING, logger="hf_spectralkd.trainer"):
        assert run_distill.main(args) == 0
    results = json.loads((out / "results.json").read_text())
    assert (results["train_images"], results["skipped_images"]) == (15, 2)
    assert (results["eval_images"], results["eval_skipped_images"]) == (6, 2)
    logged = [e for e in json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())["log_history"] if "loss" in e]
    assert logged[-1]["step"] == 2 and logged[-1]["train_images"] == 10 and "skipped_images" in logged[-1]
    card = (out / "README.md").read_text()
    assert "6 images scored, 2 more could not be decoded" in card
    assert "could not be decoded: 2 of 15 read" in card
    assert "2 of 8 evaluation images (25.0%) could not be decoded" in caplog.text


def test_too_many_undecodable_evaluation_images_stop_the_run_in_one_line(tmp_path, saved_models, capsys):
    make_bad_image_folder(tmp_path / "data")  # 2 of 8 evaluation images are broken: 25 % > 5 %
    args = tiny_run_args(saved_models, str(tmp_path / "data"), tmp_path / "out", "--max_steps", "2",
                         "--eval_strategy", "no", "--profile_images", "0")
    code, err = run_and_capture(run_distill.main, args, capsys)
    assert code == 1, err
    assert ("error: max_skipped_fraction: 2 of 8 evaluation images (25.0%) could not be decoded, above the limit "
            "of 5.0%") in err
    assert [line for line in err.splitlines() if line.startswith("error:")] == [err.strip().splitlines()[-1]]
    assert "Traceback" not in err


def test_too_many_undecodable_training_images_stop_the_run(tmp_path, saved_models, capsys):
    make_bad_image_folder(tmp_path / "data", text_files=20)  # 21 of 34 training images are broken
    args = tiny_run_args(saved_models, str(tmp_path / "data"), tmp_path / "out", "--max_steps", "8",
                         "--eval_strategy", "no", "--per_device_train_batch_size", "8")
    code, err = run_and_capture(run_distill.main, args, capsys)
    assert code == 1 and "error: max_skipped_fraction:" in err and "training images" in err
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_a_few_early_failures_do_not_stop_training_but_a_whole_split_decides():
    assert not share_above(1, 8, 0.05, whole_split=False)  # 12.5 % of a tiny sample: not yet evidence
    assert share_above(5, 8, 0.05, whole_split=False)  # most of the first batch: stop
    assert share_above(600, 10_000, 0.05, whole_split=False)  # 6 % of a large sample
    assert not share_above(400, 10_000, 0.05, whole_split=False)
    assert share_above(1, 8, 0.05, whole_split=True)  # an evaluation saw the whole split


# ------------------------------------------------------------------------------------------------
# Analyses
# ------------------------------------------------------------------------------------------------
class CountingRows:
    """A streamed split that counts the rows read from it."""

    def __init__(self, rows):
        self.rows, self.read = rows, 0

    def __iter__(self):
        for row in self.rows:
            self.read += 1
            yield row


def test_analyses_stream_hub_datasets_and_read_only_what_they_use(monkeypatch):
    from hf_spectralkd.cli import images

    rng = np.random.default_rng(0)
    rows = [{"image": {"bytes": encoded(class_image(i % 3, rng), "PNG"), "path": None}, "label": i % 3} for i in range(500)]
    rows[1]["image"] = {"bytes": b"broken", "path": None}
    opened = {}

    def open_split(args, split):
        opened.update(streaming=args.streaming, split=split)
        opened["rows"] = CountingRows(rows)
        return opened["rows"]

    monkeypatch.setattr(images, "open_split", open_split)
    loaded, used = images.load_images("someone/imagenet-like", "validation", 6, "first")
    assert opened["streaming"] and opened["split"] == "validation"
    assert len(loaded) == 6 and used[:2] == ["validation[0]", "validation[2]"]
    assert opened["rows"].read == 7  # six images and the broken one, nothing more
    images.load_images("someone/imagenet-like", "validation", 6, "balanced")
    assert opened["rows"].read == 6 * images.BALANCED_LOOKAHEAD


def test_select_layers_takes_the_options_analyze_has(parquet_dataset, saved_models, capsys):
    from hf_spectralkd.cli import main

    assert main(["select-layers", "--teacher", saved_models["teacher"], "--dataset", parquet_dataset, "--split", "train",
                 "--streaming", "--device", "cpu", "--image-column", "img", "--label-column", "target",
                 "--batch-size", "3", "--num-images", "6", "--student-depth", "3"]) == 0
    assert "teacher_layers: [" in capsys.readouterr().out
    assert main(["select-layers", "--teacher", saved_models["teacher"], "--dataset", parquet_dataset,
                 "--image-column", "pixels", "--student-depth", "3"]) == 2
    assert "image_column: column 'pixels' is not in dataset" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["-0.1", "1.5"])
def test_max_skipped_fraction_is_a_fraction(value, capsys):
    code, err = run_and_capture(run_distill.main, ["--student", "x", "--max_skipped_fraction", value], capsys)
    assert code == 2 and "max_skipped_fraction must be in [0.0, 1.0]" in err

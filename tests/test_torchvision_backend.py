"""The torchvision data backend: timm's transforms as tensor ops, images decoded where the model runs."""

from __future__ import annotations

import importlib.resources
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import run_distill
import torch
from helpers import (
    class_image,
    encoded,
    exif_jpeg,
    make_bad_image_folder,
    make_parquet_dataset,
    run_and_capture,
    streaming_args,
    tiny_cait,
    tiny_run_args,
)
from PIL import Image, ImageOps
from safetensors.torch import load_file
from timm.data import auto_augment

from hf_spectralkd.data import (
    IMAGENET_STD,
    DataArguments,
    ImageClassificationCollator,
    TorchvisionPipeline,
    TransformedImageDataset,
    build_eval_transform,
    build_mixup,
    decode_image,
    first_images,
    pixel_batch,
)
from hf_spectralkd.data import torchvision_backend as tp
from hf_spectralkd.data.torchvision_backend import batching
from hf_spectralkd.data.transforms import _posterize_keeping_zero_bits
from hf_spectralkd.errors import ConfigurationError
from hf_spectralkd.teacher import check_teacher

STD = torch.tensor(IMAGENET_STD).view(3, 1, 1)
RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR, "nearest": Image.Resampling.NEAREST}


def photograph(name: str) -> bytes:
    """A real photograph (JPEG) shipped with an installed package: Grace Hopper (matplotlib), China and a flower (scikit-learn)."""
    if name == "grace_hopper":
        import matplotlib.cbook

        return Path(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)).read_bytes()
    pytest.importorskip("sklearn")
    return (importlib.resources.files("sklearn.datasets") / "images" / f"{name}.jpg").read_bytes()


def build(pipeline: TorchvisionPipeline, images: list[bytes], seeds=None, labels=None) -> dict:
    """Prepare, collate and build a batch of encoded images on the CPU, as workers and the trainer do."""
    seeds = seeds if seeds is not None else list(range(len(images)))
    labels = labels if labels is not None else [0] * len(images)
    samples = [pipeline.prepare_sample({"bytes": data, "path": None}, label, seed)
               for data, label, seed in zip(images, labels, seeds)]
    return pixel_batch(ImageClassificationCollator()(samples), "cpu")


def in_pixel_units(difference: torch.Tensor) -> torch.Tensor:
    """A difference of normalised images in [0, 1] pixel units (times the normalisation std)."""
    return difference * STD


# ------------------------------------------------------------------------------------------------
# Evaluation transform
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size, crop_pct", [(224, 0.875), (160, 0.95)])
@pytest.mark.parametrize("name", ["grace_hopper", "china", "flower"])
def test_eval_transform_matches_timms_on_photographs(name, size, crop_pct):
    data = photograph(name)
    args = DataArguments(eval_crop_pct=crop_pct)
    ours = build(TorchvisionPipeline(args, size, train=False), [data])["pixel_values"][0]
    expected = build_eval_transform(args, size)(decode_image(data))
    assert ours.shape == expected.shape == (3, size, size)
    assert in_pixel_units(ours - expected).abs().mean() <= 1 / 255


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_oriented_jpeg_is_decoded_by_torchvision_and_turned_as_pil_turns_it(orientation, monkeypatch):
    photo = np.asarray(decode_image(photograph("grace_hopper")).resize((40, 24)))  # 40 wide, 24 high
    data = exif_jpeg(photo, orientation)
    expected = tp.pil_to_tensor(decode_image(data))
    pipeline = TorchvisionPipeline(DataArguments(), 32, train=False)
    prepared = pipeline.prepare(data, 0)
    assert prepared.encoded is not None  # left to the torchvision decoder
    monkeypatch.setattr(batching, "decode_image", lambda *_: pytest.fail("fell back to the PIL decoder"))
    upright = tp.PreparedBatch(pipeline, [prepared], [0]).decode(torch.device("cpu"))[0]
    assert torch.equal(upright, expected)
    assert prepared.size == tuple(upright.shape[1:])


# ------------------------------------------------------------------------------------------------
# Training transform
# ------------------------------------------------------------------------------------------------
def small_photo(size: int = 40) -> Image.Image:
    """A square crop of a real photograph (the face), ``size`` pixels wide."""
    return decode_image(photograph("grace_hopper")).crop((150, 80, 350, 280)).resize((size, size))


def timm_op(name: str, image: Image.Image, magnitude: float, negate: bool, interpolation: str, monkeypatch) -> torch.Tensor:
    """timm's own op on ``image``, its arguments from timm's own level functions."""
    # timm's _randomly_negate negates when random() > 0.5
    monkeypatch.setattr(auto_augment.random, "random", lambda: 1.0 if negate else 0.0)
    level = auto_augment.LEVEL_TO_ARG[name]
    arguments = level(magnitude, {"translate_pct": 0.45}) if level is not None else ()
    return tp.pil_to_tensor(auto_augment.NAME_TO_OP[name](image, *arguments, fillcolor=FILL, resample=RESAMPLE[interpolation]))


def our_op(name: str, image: Image.Image, magnitude: float, negate: bool, interpolation: str) -> torch.Tensor:
    values = torch.tensor([tp.op_values(name, magnitude, negate, image.width)], dtype=torch.float64)
    return tp.apply_op(name, tp.pil_to_tensor(image).unsqueeze(0), values, interpolation, FILL)[0]


FILL = (124, 116, 104)  # timm's fill: the ImageNet mean in 8 bits
POINT_OPS = [name for name in tp.RAND_INCREASING_OPS if name not in tp.AFFINE_OPS]
AFFINE_OPS = [name for name in tp.RAND_INCREASING_OPS if name in tp.AFFINE_OPS]


@pytest.mark.parametrize("name", POINT_OPS)
def test_each_point_op_is_timms_pillow_op_to_the_bit(name, monkeypatch):
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8))
    for image in (small_photo(), noise):
        for magnitude in (3.0, 9.0):
            for negate in (False, True):
                expected = timm_op(name, image, magnitude, negate, "bicubic", monkeypatch)
                assert torch.equal(our_op(name, image, magnitude, negate, "bicubic"), expected), (name, magnitude, negate)


@pytest.mark.parametrize("name", AFFINE_OPS)
def test_each_affine_op_has_timms_geometry(name, monkeypatch):
    image = small_photo(96)
    for magnitude in (3.0, 9.0):
        for negate in (False, True):
            differences = {}
            for interpolation in ("nearest", "bilinear", "bicubic"):
                expected = timm_op(name, image, magnitude, negate, interpolation, monkeypatch)
                differences[interpolation] = (our_op(name, image, magnitude, negate, interpolation).int() - expected.int()).abs()
            # same points sampled, same fill: nearest picks the same pixels (ties aside), bilinear is the same formula
            assert (differences["nearest"] == 0).float().mean() > 0.999, (name, magnitude, negate)
            assert differences["bilinear"].max() <= 1, (name, magnitude, negate)
            # PyTorch's cubic (a = -0.75) against Pillow's transform cubic (a = -1): under a level on average
            # (0.12-0.85 measured on this crop); a wrong angle, shear or offset moves whole edges
            assert differences["bicubic"].float().mean() < 1.0, (name, magnitude, negate)


def test_posterize_to_zero_bits_is_black_as_the_pil_backend_makes_it():
    image = small_photo()
    ours = tp.apply_op("PosterizeIncreasing", tp.pil_to_tensor(image).unsqueeze(0), torch.tensor([[0.0]]))[0]
    assert torch.equal(ours, tp.pil_to_tensor(_posterize_keeping_zero_bits(image, 0)))
    assert int(ours.max()) == 0


def timm_reference(image: Image.Image, params: tp.AugmentParams, pipeline: TorchvisionPipeline) -> torch.Tensor:
    """The PIL pipeline's operations on the same draws: crop + resize, flip, timm's ops, ToTensor, Normalize."""
    from torchvision.transforms import functional as F

    top, left, height, width = params.crop
    image = F.resized_crop(image, top, left, height, width, [pipeline.size, pipeline.size], F.InterpolationMode.BICUBIC)
    if params.flip:
        image = ImageOps.mirror(image)
    for index, values in params.ops:
        if index < 0:
            continue
        name = tp.RAND_INCREASING_OPS[index]
        if name in tp.AFFINE_OPS:
            image = image.transform(image.size, Image.Transform.AFFINE, values, Image.Resampling.BICUBIC, fillcolor=pipeline.fill)
        elif name == "PosterizeIncreasing":
            image = _posterize_keeping_zero_bits(image, int(values[0]))
        elif auto_augment.LEVEL_TO_ARG[name] is None:  # AutoContrast, Equalize, Invert
            image = auto_augment.NAME_TO_OP[name](image)
        elif name in ("SolarizeIncreasing", "SolarizeAdd"):
            image = auto_augment.NAME_TO_OP[name](image, int(values[0]))
        else:
            image = auto_augment.NAME_TO_OP[name](image, values[0])
    return F.normalize(F.to_tensor(image), pipeline.mean, pipeline.std)


@pytest.mark.parametrize("seed", range(8))
def test_training_transform_applies_timms_operations_in_timms_order(seed):
    data = photograph("grace_hopper")
    pipeline = TorchvisionPipeline(DataArguments(reprob=0.0), 64, train=True)
    ours = build(pipeline, [data], seeds=[seed])["pixel_values"][0]
    image = decode_image(data)
    expected = timm_reference(image, pipeline.draw(seed, image.height, image.width), pipeline)
    assert ours.shape == (3, 64, 64) and ours.dtype == torch.float32
    assert in_pixel_units(ours - expected).abs().mean() <= 1 / 255


def test_draws_follow_timms_distributions():
    pipeline = TorchvisionPipeline(DataArguments(), 224, train=True)
    draws = [pipeline.draw(seed, 375, 500) for seed in range(2000)]
    assert abs(np.mean([d.flip for d in draws]) - 0.5) < 0.05
    assert abs(np.mean([d.erase is not None for d in draws]) - 0.25) < 0.04
    slots = [op for d in draws for op in d.ops]
    assert len(slots) == 2 * len(draws)
    assert abs(np.mean([index >= 0 for index, _ in slots]) - 0.5) < 0.04  # each op applied with probability 0.5
    assert {index for index, _ in slots if index >= 0} == set(range(len(tp.RAND_INCREASING_OPS)))
    rotations = [values for index, values in slots if index >= 0 and tp.RAND_INCREASING_OPS[index] == "Rotate"]
    magnitudes = [abs(np.degrees(np.arcsin(v[1]))) / 3 for v in rotations]  # the matrix's sin: 30° per 10 levels
    assert all(0 <= m <= 10 + 1e-9 for m in magnitudes) and abs(np.mean(magnitudes) - 9) < 0.15
    assert 0.35 < np.mean([v[1] > 0 for v in rotations]) < 0.65  # either direction
    areas = [d.crop[2] * d.crop[3] / (375 * 500) for d in draws]
    ratios = [d.crop[3] / d.crop[2] for d in draws]
    assert min(areas) >= 0.075 and max(areas) <= 1.0 and min(ratios) > 0.74 and max(ratios) < 1.35
    boxes = [d.erase[2] * d.erase[3] / 224**2 for d in draws if d.erase is not None]
    assert min(boxes) >= 0.019 and max(boxes) <= 0.34


def test_horizontal_flip_mirrors_the_image_exactly():
    data = photograph("china")
    plain = dict(auto_augment="none", reprob=0.0)
    never = build(TorchvisionPipeline(DataArguments(hflip=0.0, **plain), 48, True), [data], seeds=[3])["pixel_values"][0]
    always = build(TorchvisionPipeline(DataArguments(hflip=1.0, **plain), 48, True), [data], seeds=[3])["pixel_values"][0]
    assert torch.equal(always, never.flip(-1))


def test_random_erasing_puts_per_pixel_noise_in_one_box():
    data = photograph("flower")
    plain = TorchvisionPipeline(DataArguments(reprob=0.0), 64, train=True)
    erasing = TorchvisionPipeline(DataArguments(reprob=1.0), 64, train=True)
    image = decode_image(data)
    seed = next(s for s in range(100) if erasing.draw(s, image.height, image.width).erase is not None)
    top, left, height, width = erasing.draw(seed, image.height, image.width).erase
    before = build(plain, [data], seeds=[seed])["pixel_values"][0]
    after = build(erasing, [data], seeds=[seed])["pixel_values"][0]
    box = torch.zeros(3, 64, 64, dtype=torch.bool)
    box[:, top : top + height, left : left + width] = True
    assert torch.equal(after[~box], before[~box])  # only the box changed
    noise = after[box]
    assert noise.unique().numel() > 0.95 * noise.numel()  # a value per pixel and channel, not one colour
    assert abs(float(noise.mean())) < 0.25 and 0.75 < float(noise.std()) < 1.25  # standard normal, normalised units


def test_augmentation_is_a_function_of_the_seed_across_processes(tmp_path):
    import datasets

    rng = np.random.default_rng(0)
    raw = datasets.Dataset.from_dict(
        {"image": [{"bytes": encoded(class_image(i % 3, rng, size=40), "JPEG"), "path": None} for i in range(8)],
         "label": [i % 3 for i in range(8)]},
        features=datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")}),
    )
    args = DataArguments()

    def batch(dataset, workers=0):
        loader = torch.utils.data.DataLoader(dataset, batch_size=8, num_workers=workers,
                                             collate_fn=ImageClassificationCollator())
        return pixel_batch(next(iter(loader)), "cpu")["pixel_values"]

    dataset = TransformedImageDataset(raw, TorchvisionPipeline(args, 32, train=True), "image", "label", seed=5)
    first = batch(dataset)
    assert torch.equal(batch(dataset), first)
    # a fresh pipeline in two worker processes (a restarted run): the same tensors
    restarted = TransformedImageDataset(raw, TorchvisionPipeline(args, 32, train=True), "image", "label", seed=5)
    assert torch.equal(batch(restarted, workers=2), first)
    # another epoch, another seed: other crops
    dataset.set_epoch(1)
    other = batch(dataset)
    assert all(not torch.equal(a, b) for a, b in zip(other, first))
    assert TorchvisionPipeline(args, 32, True).draw(1, 40, 40).crop != TorchvisionPipeline(args, 32, True).draw(2, 40, 40).crop


def test_mixup_is_applied_after_decoding():
    rng = np.random.default_rng(0)
    images = [encoded(class_image(i % 3, rng), "JPEG") for i in range(5)]
    pipeline = TorchvisionPipeline(DataArguments(), 32, train=True)
    collator = ImageClassificationCollator(build_mixup(DataArguments(mixup=0.8), 3, 0.1))
    samples = [pipeline.prepare_sample({"bytes": data, "path": None}, i % 3, i) for i, data in enumerate(images)]
    mixed = pixel_batch(collator(samples), "cpu")
    again = pixel_batch(collator(samples), "cpu")
    assert mixed["pixel_values"].shape == (4, 3, 32, 32)  # an odd batch loses its last image, as with PIL
    assert mixed["labels"].shape == (4, 3) and torch.allclose(mixed["labels"].sum(-1), torch.ones(4))
    assert torch.equal(mixed["pixel_values"], again["pixel_values"]) and torch.equal(mixed["labels"], again["labels"])


# ------------------------------------------------------------------------------------------------
# Undecodable images
# ------------------------------------------------------------------------------------------------
def bogus_huffman_table(data: bytes) -> bytes:
    """A JPEG whose header Pillow opens but whose first Huffman table no decoder accepts."""
    at = data.index(b"\xff\xc4") + 5  # marker, length, table class/id: then the 16 code counts
    return data[:at] + b"\xff" * 16 + data[at + 16 :]


def test_undecodable_files_are_skipped_and_counted_as_the_pil_backend_does():
    import datasets

    photo = decode_image(photograph("grace_hopper")).resize((64, 48))
    good = encoded(photo, "JPEG")
    files = {
        "good.jpg": good, "rotated.jpg": exif_jpeg(np.asarray(photo), 6), "gray.jpg": encoded(photo.convert("L"), "JPEG"),
        "tiny.jpg": encoded(Image.new("RGB", (1, 1), (200, 10, 10)), "JPEG"),
        "cut_but_ended.jpg": good[: len(good) // 2] + b"\xff\xd9",  # both decoders fill the missing part
        "cmyk.jpg": encoded(photo.convert("CMYK"), "JPEG"), "photo.png": encoded(photo, "PNG"),
        "palette.gif": encoded(photo.convert("P"), "GIF"),
        "truncated.jpg": good[:1500], "text.jpg": b"this is a text file, not a JPEG\n", "bogus_table.jpg": bogus_huffman_table(good),
    }
    raw = datasets.Dataset.from_dict(
        {"image": [{"bytes": data, "path": name} for name, data in files.items()], "label": list(range(len(files)))},
        features=datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")}),
    )
    args = DataArguments()
    pil = TransformedImageDataset(raw, build_eval_transform(args, 32), "image", "label")
    ours = TransformedImageDataset(raw, TorchvisionPipeline(args, 32, train=False), "image", "label")
    collate = ImageClassificationCollator()
    expected = collate([pil[i] for i in range(len(files))])
    batch = pixel_batch(collate([ours[i] for i in range(len(files))]), "cpu")
    assert batch["num_skipped"] == expected["num_skipped"] == 3 and batch["num_images"] == len(files)
    assert torch.equal(batch["labels"], expected["labels"])
    assert in_pixel_units(batch["pixel_values"] - expected["pixel_values"]).abs().mean() <= 1 / 255
    # which decoder read each: torchvision for plain JPEGs (the bogus table fails there, then in Pillow), Pillow for the rest
    prepared = {name: ours[i]["prepared"] for i, name in enumerate(files)}
    by_torchvision = {name for name, image in prepared.items() if image is not None and image.encoded is not None}
    assert by_torchvision == {"good.jpg", "rotated.jpg", "gray.jpg", "tiny.jpg", "cut_but_ended.jpg", "bogus_table.jpg"}


def test_a_batch_with_one_bad_jpeg_decodes_the_others():
    good = encoded(small_photo(), "JPEG")
    encoded_images = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for data in (good, bogus_huffman_table(good), good)]
    decoded = tp.decode_jpegs(encoded_images, torch.device("cpu"))
    assert decoded[1] is None and torch.equal(decoded[0], decoded[2]) and decoded[0].shape == (3, 40, 40)


# ------------------------------------------------------------------------------------------------
# Options, analyses and the teacher check
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("option, value", [
    ("auto_augment", "rand-m9-mstd0.5"), ("auto_augment", "rand-m9-mstd0.5-inc1-tweights"), ("auto_augment", "augmix-m5-w4"),
    ("auto_augment", "v0"), ("interpolation", "lanczos"),
])
def test_options_the_backend_cannot_honour_are_refused_in_one_line(option, value):
    with pytest.raises(ConfigurationError) as error:
        TorchvisionPipeline(DataArguments(**{option: value}), 32, train=True)
    message = str(error.value)
    assert message.startswith(f"{option}: '{value}' is not available with --data_backend torchvision; expected")
    assert "\n" not in message


def test_rand_augment_policies_are_parsed_as_timm_parses_them():
    assert tp.parse_rand_augment("rand-m9-mstd0.5-inc1") == tp.RandAugmentPolicy(9, 0.5, 10, 2, 0.5)
    assert tp.parse_rand_augment("rand-m7-n3-mstd101-p0.8-mmax12-inc1") == tp.RandAugmentPolicy(7, float("inf"), 12, 3, 0.8)
    assert tp.parse_rand_augment("none") is None and tp.parse_rand_augment(None) is None


def test_recipe_refuses_an_unknown_backend_and_an_unsupported_policy(imagefolder, saved_models, tmp_path, capsys):
    code, err = run_and_capture(run_distill.main, tiny_run_args(saved_models, imagefolder, tmp_path / "a", "--data_backend", "dali"), capsys)
    assert code == 2 and "invalid choice: 'dali'" in err
    with pytest.raises(ConfigurationError, match="^data_backend: expected one of pil, torchvision, got 'dali'$"):
        DataArguments(data_backend="dali")
    code, err = run_and_capture(run_distill.main, tiny_run_args(
        saved_models, imagefolder, tmp_path / "b", "--data_backend", "torchvision", "--auto_augment", "rand-m9-mstd0.5"), capsys)
    assert code == 2
    assert err.strip().splitlines()[-1].startswith("error: auto_augment: 'rand-m9-mstd0.5' is not available with --data_backend")


def test_first_images_and_teacher_check_decode_encoded_batches():
    import datasets

    rng = np.random.default_rng(2)
    raw = datasets.Dataset.from_dict(
        {"image": [{"bytes": encoded(class_image(i % 3, rng, size=48), "JPEG"), "path": None} for i in range(6)],
         "label": [i % 3 for i in range(6)]},
        features=datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")}),
    )
    args = DataArguments()
    pil = TransformedImageDataset(raw, build_eval_transform(args, 32), "image", "label")
    ours = TransformedImageDataset(raw, TorchvisionPipeline(args, 32, train=False), "image", "label")
    assert in_pixel_units(first_images(ours, 4) - first_images(pil, 4)).abs().mean() <= 1 / 255
    teacher = tiny_cait(num_labels=3).eval()
    assert check_teacher(teacher, ours, 6, torch.device("cpu"), 4) == check_teacher(teacher, pil, 6, torch.device("cpu"), 4)


# ------------------------------------------------------------------------------------------------
# The recipe end to end
# ------------------------------------------------------------------------------------------------
def test_recipe_on_a_jpeg_folder_decodes_in_the_training_process_and_counts_bad_images(tmp_path, saved_models):
    counts = make_bad_image_folder(tmp_path / "data", good_format="jpg")  # train: 9 good + 4 unusual + 2 broken
    out = tmp_path / "out"
    args = tiny_run_args(saved_models, str(tmp_path / "data"), out, "--data_backend", "torchvision", "--max_steps", "-1",
                         "--num_train_epochs", "1", "--per_device_train_batch_size", "5", "--max_skipped_fraction", "0.5",
                         "--eval_strategy", "no", "--auto_augment", "rand-m9-mstd0.5-inc1", "--reprob", "0.25",
                         "--profile_images", "4", "--dataloader_num_workers", "2")
    assert run_distill.main(args) == 0
    results = json.loads((out / "results.json").read_text())
    assert (results["train_images"], results["skipped_images"]) == (counts["train"], counts["train_bad"])
    assert (results["eval_images"], results["eval_skipped_images"]) == (counts["validation"] - 2, 2)
    assert results["profile_similarity"] is not None  # the profile batch came through the same pipeline
    assert json.loads((out / "trainer_state.json").read_text())["total_flos"] > 0  # the decoded batch is counted


def test_streamed_jpeg_parquet_resumes_exactly(tmp_path, saved_models):
    data = make_parquet_dataset(tmp_path / "data", image_format="JPEG")  # 24 training images: a pass is 6 steps
    options = ["--data_backend", "torchvision", "--auto_augment", "rand-m9-mstd0.5-inc1", "--reprob", "0.25",
               "--max_steps", "8", "--save_steps", "4", "--profile_images", "0"]
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    assert run_distill.main(streaming_args(saved_models, data, full, *options)) == 0
    resumed.mkdir()
    shutil.copytree(full / "checkpoint-4", resumed / "checkpoint-4")
    assert run_distill.main(streaming_args(saved_models, data, resumed, *options, "--resume_from_checkpoint", "true")) == 0
    a, b = load_file(full / "model.safetensors"), load_file(resumed / "model.safetensors")
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6)
    history = lambda folder: [e for e in json.loads((folder / "checkpoint-8" / "trainer_state.json").read_text())["log_history"]  # noqa: E731
                              if "loss" in e]
    assert history(resumed)[-1]["loss"] == pytest.approx(history(full)[-1]["loss"], rel=1e-5)

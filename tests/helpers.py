"""Builders for tiny models, datasets and recipe command lines shared by the tests (and subprocess scripts)."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def tiny_vit(num_labels: int = 5, hidden: int = 32, layers: int = 3, seed: int = 0):
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(seed)
    config = ViTConfig(image_size=32, patch_size=8, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                       intermediate_size=2 * hidden, num_labels=num_labels, layer_norm_eps=1e-6)
    return ViTForImageClassification(config)


def tiny_lift(num_labels: int = 5, hidden: int = 32, layers: int = 3, lift_size: int = 64, seed: int = 0):
    """A Lift student at test size: blocks at ``hidden``, last block's patch tokens lifted to ``lift_size``."""
    from hf_spectralkd.students import LiftViTConfig, LiftViTForImageClassification

    torch.manual_seed(seed)
    config = LiftViTConfig(image_size=32, patch_size=8, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                           intermediate_size=2 * hidden, num_labels=num_labels, layer_norm_eps=1e-6, lift_size=lift_size)
    return LiftViTForImageClassification(config)


def tiny_widelast(num_labels: int = 5, hidden: int = 32, layers: int = 3, wide: int = 64, seed: int = 0):
    """A WideLast student at test size: blocks 0 … layers-2 at ``hidden``, the last at ``wide`` (4 heads)."""
    from hf_spectralkd.students import WideLastViTConfig, WideLastViTForImageClassification

    torch.manual_seed(seed)
    config = WideLastViTConfig(image_size=32, patch_size=8, hidden_size=hidden, num_hidden_layers=layers,
                               num_attention_heads=2, intermediate_size=2 * hidden, num_labels=num_labels,
                               layer_norm_eps=1e-6, wide_hidden_size=wide, wide_num_attention_heads=4)
    return WideLastViTForImageClassification(config)


def tiny_deit(num_labels: int = 5, hidden: int = 32, layers: int = 3, seed: int = 0):
    from transformers import DeiTConfig, DeiTForImageClassification

    torch.manual_seed(seed)
    config = DeiTConfig(image_size=32, patch_size=8, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                        intermediate_size=2 * hidden, num_labels=num_labels)
    return DeiTForImageClassification(config)


def tiny_swin(num_labels: int = 5, embed_dim: int = 8, seed: int = 0):
    from transformers import SwinConfig, SwinForImageClassification

    torch.manual_seed(seed)
    config = SwinConfig(image_size=32, patch_size=2, embed_dim=embed_dim, depths=[1, 1, 1], num_heads=[1, 1, 2],
                        window_size=4, num_labels=num_labels)
    return SwinForImageClassification(config)


def tiny_cait(num_labels: int = 5, embed_dim: int = 64, depth: int = 4, seed: int = 0):
    from transformers import AutoModelForImageClassification, TimmWrapperConfig

    torch.manual_seed(seed)
    config = TimmWrapperConfig(
        architecture="cait_s24_224", num_labels=num_labels,
        model_args={"img_size": 32, "patch_size": 8, "embed_dim": embed_dim, "depth": depth, "num_heads": 4,
                    "depth_token_only": 1},
    )
    return AutoModelForImageClassification.from_config(config)


def timm_efficientvit_m0(num_labels: int = 5, seed: int = 0):
    """timm ``efficientvit_m0`` (2.3 M parameters) at its 224 px through TimmWrapper: a hierarchical timm model
    whose stride-2 stages round up (14 → 7 → 4), unlike its ``feature_info`` reductions (16, 32, 64)."""
    from transformers import AutoModelForImageClassification, TimmWrapperConfig

    torch.manual_seed(seed)
    config = TimmWrapperConfig(architecture="efficientvit_m0", num_labels=num_labels)
    return AutoModelForImageClassification.from_config(config)


def timm_regnety(num_labels: int = 5, image_size: int = 64, seed: int = 0):
    """timm ``regnety_002`` (2.8 M parameters, a CNN with 5 taps: stem and 4 stages) through TimmWrapper, configured
    for ``image_size`` px inputs (its taps are then image_size/2 … image_size/32 on a side)."""
    from transformers import AutoModelForImageClassification, TimmWrapperConfig

    torch.manual_seed(seed)
    config = TimmWrapperConfig(architecture="regnety_002", num_labels=num_labels,
                               model_args={"pretrained_cfg_overlay": {"input_size": [3, image_size, image_size]}})
    return AutoModelForImageClassification.from_config(config)


def class_image(label: int, rng: np.random.Generator, size: int = 32) -> Image.Image:
    """A learnable synthetic image: a bright square whose position encodes the class, plus noise."""
    array = rng.integers(0, 60, size=(size, size, 3), dtype=np.uint8)
    offset = 2 + 8 * label
    array[offset : offset + 8, 4:28] = 220
    return Image.fromarray(array)


def colour_image(label: int, rng: np.random.Generator, size: int = 32) -> Image.Image:
    """A synthetic image whose colour encodes the class (red, green, blue, …), plus noise: told apart even by an
    untrained ViT's features, which barely see where things are."""
    array = rng.integers(0, 90, size=(size, size, 3), dtype=np.uint8)
    array[..., label % 3] += np.uint8(120 + 40 * (label // 3))
    return Image.fromarray(array)


def make_imagefolder(root: Path, classes=("a", "b", "c"), per_class: int = 8, eval_per_class: int = 3,
                     draw=class_image) -> str:
    """``root/{train,validation}/<class>/<i>.png``, the classes' images drawn by ``draw(label, rng)``."""
    rng = np.random.default_rng(0)
    for split, count in (("train", per_class), ("validation", eval_per_class)):
        for label, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                draw(label, rng).save(folder / f"{i}.png")
    return str(root)


def make_parquet_dataset(root: Path, classes=("a", "b", "c"), per_class: int = 8, eval_per_class: int = 3, shards: int = 2,
                         image_format: str = "PNG") -> str:
    """Parquet train (``shards`` files) and validation splits; columns ``img`` (stored as ``image_format``) and ``target``."""
    import datasets

    rng = np.random.default_rng(1)
    features = datasets.Features({"img": datasets.Image(), "target": datasets.ClassLabel(names=list(classes))})
    for split, count, n_shards in (("train", per_class, shards), ("validation", eval_per_class, 1)):
        rows = {"img": [], "target": []}
        for label in range(len(classes)):
            for _ in range(count):
                rows["img"].append({"bytes": encoded(class_image(label, rng), image_format), "path": None})
                rows["target"].append(label)
        ds = datasets.Dataset.from_dict(rows, features=features).shuffle(seed=0)
        (root / split).mkdir(parents=True, exist_ok=True)
        for shard in range(n_shards):
            ds.shard(n_shards, shard).to_parquet(str(root / split / f"{split}-{shard:05d}.parquet"))
    return str(root)


class SyntheticImageDataset(torch.utils.data.Dataset):
    """``n`` learnable 32×32 images as ready tensors (no decoding), for trainer unit tests."""

    def __init__(self, n: int = 32, num_labels: int = 5, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        self.labels = torch.arange(n) % num_labels
        self.images = torch.randn(n, 3, 32, 32, generator=generator) * 0.3
        for i, label in enumerate(self.labels.tolist()):
            self.images[i, :, 6 * label : 6 * label + 6, :] += 2.0

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        return {"pixel_values": self.images[index], "labels": int(self.labels[index])}


# ------------------------------------------------------------------------------------------------
# Image files: EXIF orientation, broken and unusual files
# ------------------------------------------------------------------------------------------------
def encoded(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def exif_jpeg(array: np.ndarray, orientation: int, quality: int = 95) -> bytes:
    """``array`` (H×W×3 uint8) as a JPEG whose EXIF orientation tag is ``orientation`` (1-8)."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encoded(Image.fromarray(array), "JPEG", exif=exif, quality=quality)


def make_bad_image_folder(root: Path, text_files: int = 1, good_format: str = "png") -> dict[str, int]:
    """An imagefolder whose train and validation splits hold broken and unusual files next to good ones.

    The good images are written as ``good_format`` ("png" or "jpg"). Returns how many files each
    split holds and how many of them cannot be decoded.
    """
    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8))
    unusual = {  # decodable: they must train
        "cmyk.jpg": encoded(photo.convert("CMYK"), "JPEG"),
        "deep.png": encoded(Image.fromarray((np.arange(48 * 64).reshape(48, 64) * 20).astype(np.uint16)), "PNG"),
        "palette.gif": encoded(photo.convert("P"), "GIF"),
        "tiny.jpg": encoded(Image.new("RGB", (1, 1), (200, 10, 10)), "JPEG"),
    }
    broken = {"truncated.jpg": encoded(photo.resize((320, 240)), "JPEG")[:1500]}
    broken.update({f"text_{i}.jpg": b"this is a text file, not a JPEG\n" for i in range(text_files)})
    counts = {}
    for split, good_per_class in (("train", 3), ("validation", 2)):
        total = bad = 0
        for label, name in enumerate(("a", "b", "c")):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(good_per_class):
                class_image(label, rng).save(folder / f"good_{i}.{good_format}")
            total += good_per_class
        for index, (name, data) in enumerate({**unusual, **broken}.items()):
            if split == "validation" and name in unusual:
                continue
            (root / split / "abc"[index % 3] / name).write_bytes(data)
            total += 1
            bad += name in broken
        counts[split], counts[f"{split}_bad"] = total, bad
    return counts


# ------------------------------------------------------------------------------------------------
# The recipe on tiny models
# ------------------------------------------------------------------------------------------------
ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "run_distill.py"
RECIPE_ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
FAULTY_RECIPE = ROOT / "tests" / "scripts" / "faulty_recipe.py"


def checkpoints(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("checkpoint-"))


def assert_complete_checkpoint(folder: Path, step: int) -> None:
    """Everything resume reads is there and loads."""
    import json

    from safetensors.torch import load_file

    assert all(torch.isfinite(t).all() for t in load_file(folder / "model.safetensors").values())
    assert json.loads((folder / "trainer_state.json").read_text())["global_step"] == step
    torch.load(folder / "optimizer.pt", weights_only=True)
    torch.load(folder / "scheduler.pt", weights_only=True)


def run_with_fault(argv: list[str], fault: str, **popen) -> subprocess.Popen:
    env = {**RECIPE_ENV, "HF_SPECTRALKD_TEST_FAULT": fault}
    return subprocess.Popen([sys.executable, str(FAULTY_RECIPE), *argv], env=env, **popen)


def tiny_run_args(saved_models, dataset, output_dir, *extra):
    """A working recipe command line: tiny CaiT teacher, tiny ViT student, 4 steps on CPU.

    The random-weight teacher is near chance, so the teacher check before training is off here; tests of
    the check turn it on.
    """
    return [
        "--teacher", saved_models["teacher"], "--student", saved_models["student_config"], "--dataset", dataset,
        "--output_dir", str(output_dir), "--max_steps", "4", "--per_device_train_batch_size", "4",
        "--per_device_eval_batch_size", "8", "--learning_rate", "1e-3", "--logging_steps", "2",
        "--student_layers", "0", "2", "--teacher_layers", "0", "3", "--auto_augment", "none", "--reprob", "0",
        "--eval_strategy", "steps", "--eval_steps", "4", "--save_steps", "2", "--use_cpu", "true",
        "--report_to", "none", "--disable_tqdm", "true", "--seed", "0", "--teacher_check_images", "0", *extra,
    ]


def streaming_args(saved_models, parquet_dataset, output_dir, *extra):
    return tiny_run_args(
        saved_models, parquet_dataset, output_dir, "--image_column", "img", "--label_column", "target",
        "--streaming", "true", "--shuffle_buffer_size", "8", "--eval_strategy", "no", "--evaluate_teacher", "false", *extra,
    )


def run_and_capture(main, argv, capsys) -> tuple[int, str]:
    """Run a command's ``main(argv)`` in-process: its exit code and what it printed on stderr."""
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse rejects some input itself
        code = exit_.code
    return code, capsys.readouterr().err


def run_recipe_process(argv, check: bool = True, script=RECIPE, timeout: int = 300) -> subprocess.CompletedProcess:
    """The recipe in its own process, as a job runs it."""
    result = subprocess.run([sys.executable, str(script), *argv], env=RECIPE_ENV, capture_output=True, text=True,
                            timeout=timeout)
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


# ------------------------------------------------------------------------------------------------
# Damaged files
# ------------------------------------------------------------------------------------------------
def truncate(path, keep: float = 0.5) -> None:
    """Cut a file to a fraction of its size, as an interrupted copy leaves it."""
    path = Path(path)
    os.truncate(path, int(path.stat().st_size * keep))


def flip_byte(path, offset: int = -100) -> None:
    """Flip one bit of one byte (negative offsets count from the end: inside the tensor data)."""
    path = Path(path)
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def fake_checkpoint(folder, step: int):
    """A small ``checkpoint-N`` as the trainer writes it (weights, config, trainer state, manifest)."""
    import json

    from hf_spectralkd.checkpointing import write_manifest

    folder = Path(folder)
    tiny_vit(num_labels=3).save_pretrained(folder)
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step, "log_history": []}))
    write_manifest(str(folder))
    return folder


# Tiny configs of every transformers image-classification family the feature taps serve (see docs/taps.md):
# hidden sizes 8-32, 1-2 layers or stages; image_size=32 also where the config
# has no such field (convolutional families: the taps are then described at 32 px instead of 224). Each entry: config class name, its arguments, input side in pixels.
_VIT_LIKE = dict(image_size=32, patch_size=8, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                 intermediate_size=32)
_TOWER = dict(vision_config=_VIT_LIKE, text_config=dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                                        intermediate_size=32))
_SWIN_LIKE = dict(image_size=32, patch_size=2, embed_dim=8, depths=[1, 1], num_heads=[1, 2], window_size=4)
_SEGFORMER_LIKE = dict(num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[8, 16], patch_sizes=[7, 3],
                       strides=[4, 2], num_attention_heads=[1, 2], mlp_ratios=[2, 2])
TINY_CLASSIFIERS = {
    "vit": ("ViTConfig", _VIT_LIKE, 32),
    "deit": ("DeiTConfig", _VIT_LIKE, 32),
    "beit": ("BeitConfig", _VIT_LIKE, 32),
    "data2vec-vision": ("Data2VecVisionConfig", _VIT_LIKE, 32),
    "dinov2": ("Dinov2Config", dict(_VIT_LIKE, intermediate_size=None, mlp_ratio=2), 32),
    "dinov2_with_registers": ("Dinov2WithRegistersConfig", dict(_VIT_LIKE, intermediate_size=None, mlp_ratio=2,
                                                                num_register_tokens=3), 32),
    "ijepa": ("IJepaConfig", _VIT_LIKE, 32),
    "vit_msn": ("ViTMSNConfig", _VIT_LIKE, 32),
    "clip": ("CLIPConfig", _TOWER, 32),
    "metaclip_2": ("MetaClip2Config", _TOWER, 32),
    "siglip": ("SiglipConfig", _TOWER, 32),
    "levit": ("LevitConfig", dict(image_size=64, hidden_sizes=[16, 32], num_attention_heads=[1, 2], depths=[1, 1],
                                  key_dim=[8, 8], mlp_ratio=[2, 2], attention_ratio=[2, 2], patch_size=16,
                                  down_ops=[["Subsample", 8, 1, 4, 2, 2]]), 64),
    "swin": ("SwinConfig", _SWIN_LIKE, 32),
    "swinv2": ("Swinv2Config", _SWIN_LIKE, 32),
    "donut-swin": ("DonutSwinConfig", _SWIN_LIKE, 32),
    "focalnet": ("FocalNetConfig", dict(image_size=32, patch_size=2, embed_dim=8, depths=[1, 1], focal_levels=[2, 2],
                                        focal_windows=[3, 3]), 32),
    "hiera": ("HieraConfig", dict(image_size=[64, 64], patch_size=[3, 3], patch_stride=[2, 2], patch_padding=[1, 1],
                                  embed_dim=8, depths=[1, 1], num_heads=[1, 2], query_stride=[2, 2],
                                  masked_unit_size=[4, 4], masked_unit_attention=[True, False], num_query_pool=1), 64),
    "convnext": ("ConvNextConfig", dict(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, image_size=32), 32),
    "convnextv2": ("ConvNextV2Config", dict(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, image_size=32), 32),
    "resnet": ("ResNetConfig", dict(image_size=32, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic"), 32),
    "regnet": ("RegNetConfig", dict(image_size=32, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], groups_width=8), 32),
    "bit": ("BitConfig", dict(image_size=32, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_groups=2), 32),
    "hgnet_v2": ("HGNetV2Config", dict(image_size=32, embedding_size=16, stem_channels=[3, 8, 16], depths=[1, 1], hidden_sizes=[32, 64],
                                       stage_in_channels=[16, 32], stage_mid_channels=[8, 16],
                                       stage_out_channels=[32, 64], stage_num_blocks=[1, 1],
                                       stage_downsample=[False, True], stage_downsample_strides=[2, 2],
                                       stage_light_block=[False, True], stage_kernel_size=[3, 3],
                                       stage_numb_of_layers=[1, 1]), 32),
    "textnet": ("TextNetConfig", dict(stem_out_channels=8, conv_layer_kernel_sizes=[[[3, 3]], [[3, 3]]],
                                      conv_layer_strides=[[1], [2]], hidden_sizes=[8, 8, 16], depths=[1, 1],
                                      image_size=32), 32),
    "pp_lcnet": ("PPLCNetConfig", dict(image_size=32, block_configs=[[[3, 8, 8, 1, False]], [[3, 8, 16, 2, False]], [[3, 16, 16, 2, False]],
                                                      [[3, 16, 32, 2, False]], [[3, 32, 32, 2, False]]],
                                       stem_channels=8, class_expand=32, depths=[1] * 5), 32),
    "efficientnet": ("EfficientNetConfig", dict(image_size=32, width_coefficient=0.25, depth_coefficient=0.25,
                                                hidden_dim=320), 32),
    "mobilenet_v2": ("MobileNetV2Config", dict(image_size=32, depth_multiplier=0.25), 32),
    "mobilevit": ("MobileViTConfig", dict(image_size=32, hidden_sizes=[16, 16, 16],
                                          neck_hidden_sizes=[8, 8, 8, 8, 8, 8, 16]), 32),
    "mobilevitv2": ("MobileViTV2Config", dict(image_size=64, width_multiplier=0.25), 64),
    "cvt": ("CvtConfig", dict(image_size=32, embed_dim=[8, 8, 16], num_heads=[1, 1, 2], depth=[1, 2, 3]), 32),  # depth[i] > i (transformers 5.23 indexes drop-path rates by stage)
    "poolformer": ("PoolFormerConfig", dict(image_size=32, hidden_sizes=[8, 16], depths=[1, 1], num_encoder_blocks=2,
                                            patch_sizes=[7, 3], strides=[4, 2], padding=[2, 1]), 32),
    "pvt_v2": ("PvtV2Config", dict(_SEGFORMER_LIKE, image_size=32), 32),
    "segformer": ("SegformerConfig", dict(_SEGFORMER_LIKE, image_size=32), 32),
}


def tiny_classifier(family: str, num_labels: int = 3, seed: int = 0, image_size: int | None = None):
    """``(model, side)``: a random ``…ForImageClassification`` of ``family`` from its tiny config, and the input side.

    ``image_size`` builds it for another input side (in ``vision_config`` for the CLIP-like towers).
    """
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES

    config_name, arguments, side = TINY_CLASSIFIERS[family]
    if image_size is not None:
        side = image_size
        if "vision_config" in arguments:
            arguments = {**arguments, "vision_config": {**arguments["vision_config"], "image_size": image_size}}
        else:
            arguments = {**arguments, "image_size": image_size}
    config = getattr(transformers, config_name)(num_labels=num_labels, **arguments)
    model_class = MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES[family]
    model_class = model_class[0] if isinstance(model_class, tuple) else model_class
    torch.manual_seed(seed)
    return getattr(transformers, model_class)(config).eval(), side


def naive_bootstrap(values, n_resamples: int = 1000, confidence: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap of the mean of 1-D ``values``, one resample at a time (the reference for intervals)."""
    values = np.asarray(values, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = [values[rng.integers(0, len(values), size=len(values))].mean() for _ in range(n_resamples)]
    tail = 100 * (1 - confidence) / 2
    return float(np.percentile(means, tail)), float(np.percentile(means, 100 - tail))

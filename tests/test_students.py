"""The encoding-mismatch students (Lift, WideLast, UniformWide): sizes, forward, taps, loading, cards."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import run_distill
import torch
import torch.nn.functional as F
from helpers import class_image, tiny_lift, tiny_widelast
from PIL import Image
from transformers import AutoModelForImageClassification, ViTForImageClassification, ViTImageProcessor, pipeline

from hf_spectralkd.cli import main as cli_main
from hf_spectralkd.features import describe_taps, forward_with_features
from hf_spectralkd.io.hub import build_model_card
from hf_spectralkd.io.model_loading import ModelLoadError, load_model
from hf_spectralkd.io.run_summary import RunSummary
from hf_spectralkd.students import (
    LiftViTConfig,
    LiftViTForImageClassification,
    WideLastViTConfig,
    WideLastViTForImageClassification,
)

ROOT = Path(__file__).resolve().parents[1]
IMAGENET = {i: f"class_{i}" for i in range(1000)}


def count(model) -> int:
    return sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------------------------------------
# Sizes and initialisation at DeiT-Tiny geometry (built, never run)
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name,cls,parameters,tap_channels",
    [
        ("deit_tiny_lift384", LiftViTForImageClassification, 5_983_528, (192,) * 11 + (384,)),
        ("deit_tiny_widelast384", WideLastViTForImageClassification, 7_313_896, (192,) * 11 + (384,)),
        ("deit_tiny_uniform219", ViTForImageClassification, 7_372_759, (219,) * 12),
    ],
)
def test_presets_have_the_papers_parameter_counts_and_tap_widths(name, cls, parameters, tap_channels):
    model = load_model(name, id2label=IMAGENET).model
    assert type(model) is cls and count(model) == parameters
    taps = describe_taps(model)
    assert taps.channels == tap_channels and set(taps.grids) == {(14, 14)} and taps.image_size == (224, 224)
    if name == "deit_tiny_lift384":
        # no final norm and no CLS head: the 384-d head is the only classifier and nothing else is wider
        assert not hasattr(model, "layernorm") and model.classifier.in_features == 384
        assert count(model) == 5_717_416 - 384 - 193_000 + 192 * 384 + 2 * 384 + 385_000
    if name == "deit_tiny_widelast384":
        attention = model.wide_layer.attention
        assert (attention.num_attention_heads, attention.head_dim, model.wide_layer.mlp.fc1.out_features) == (6, 64, 1536)


def test_reference_initialisation():
    lift = load_model("deit_tiny_lift384", id2label=IMAGENET).model
    widelast = load_model("deit_tiny_widelast384", id2label=IMAGENET).model
    uniform = load_model("deit_tiny_uniform219", id2label=IMAGENET).model
    for model in (lift, widelast, uniform):
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear):
                assert abs(module.weight.std().item() - 0.02) < 0.002, name
                assert module.bias is None or not module.bias.any(), name
            elif isinstance(module, torch.nn.LayerNorm):
                assert bool((module.weight == 1).all() and (module.bias == 0).all()), name
            elif isinstance(module, torch.nn.Conv2d):  # PyTorch's default: uniform within ±1/sqrt(fan_in)
                assert module.weight.abs().max() <= 1 / math.sqrt(module.weight[0].numel()), name
    # CLS token: timm's DeiT near zero (Lift, UniformWide); the WideLast reference trunc-normal(0.02)
    assert lift.vit.embeddings.cls_token.abs().max() < 1e-5 and uniform.vit.embeddings.cls_token.abs().max() < 1e-5
    assert 0.005 < widelast.vit.embeddings.cls_token.std() < 0.05
    assert lift.lift_norm.eps == 1e-5 and lift.vit.layers[0].layernorm_before.eps == 1e-6
    assert widelast.widen_norm.eps == 1e-6 and widelast.widen.bias is None and lift.lift.bias is None


def test_bad_student_config_is_one_line_configuration_error(tmp_path):
    config = WideLastViTConfig(hidden_size=32, num_attention_heads=2, intermediate_size=64, wide_hidden_size=64).to_dict()
    config["wide_num_attention_heads"] = 5
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError) as error:
        load_model(str(tmp_path / "config.json"), argument="student")
    message = str(error.value)
    assert "\n" not in message and message.startswith("student: cannot load")
    assert "wide_num_attention_heads: 5 does not divide the block width 64" in message


# ------------------------------------------------------------------------------------------------
# Forward against a hand-written reference on the same weights
# ------------------------------------------------------------------------------------------------
def randomise(model, seed=1):
    """Every weight random (biases and norms too), so the reference must use each one correctly."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.2)
    return model.eval()


# Model and reference both run in float64 (transformers' eager attention still takes its softmax in
# float32: differences up to ~1e-8). A 1 % change of the attention scale moves the logits by ~1e-4.
EXACT = dict(rtol=1e-6, atol=1e-6)


def ref_layer_norm(x, weight, bias, eps):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * weight + bias


def ref_block(x, p, prefix, heads, eps):
    """Pre-LN ViT block: x + Attn(LN(x)), then + MLP(LN(·)) with exact GELU."""
    batch, tokens, width = x.shape
    d = width // heads
    h = ref_layer_norm(x, p[prefix + "layernorm_before.weight"], p[prefix + "layernorm_before.bias"], eps)

    def proj(name, t):
        return t @ p[f"{prefix}attention.{name}.weight"].T + p[f"{prefix}attention.{name}.bias"]

    q, k, v = (proj(n, h).reshape(batch, tokens, heads, d).permute(0, 2, 1, 3) for n in ("q_proj", "k_proj", "v_proj"))
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1)
    attended = (weights @ v).permute(0, 2, 1, 3).reshape(batch, tokens, width)
    x = x + proj("o_proj", attended)
    h = ref_layer_norm(x, p[prefix + "layernorm_after.weight"], p[prefix + "layernorm_after.bias"], eps)
    h = h @ p[prefix + "mlp.fc1.weight"].T + p[prefix + "mlp.fc1.bias"]
    h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))
    return x + h @ p[prefix + "mlp.fc2.weight"].T + p[prefix + "mlp.fc2.bias"]


def ref_embed(pixels, p, patch):
    """Patches cut by hand (row-major), each flattened as (channel, row, col) to match the conv kernel."""
    batch, channels, height, width = pixels.shape
    grid = pixels.reshape(batch, channels, height // patch, patch, width // patch, patch)
    patches = grid.permute(0, 2, 4, 1, 3, 5).reshape(batch, (height // patch) * (width // patch), -1)
    kernel = p["vit.embeddings.patch_embeddings.projection.weight"]
    tokens = patches @ kernel.reshape(kernel.shape[0], -1).T + p["vit.embeddings.patch_embeddings.projection.bias"]
    cls = p["vit.embeddings.cls_token"].expand(batch, 1, -1)
    return torch.cat([cls, tokens], dim=1) + p["vit.embeddings.position_embeddings"]


def reference_lift(model, pixels):
    """Lift by hand: blocks at C, lift of the patch tokens of the last one, LN (eps 1e-5), mean, head."""
    p, c = dict(model.state_dict()), model.config
    x = ref_embed(pixels, p, c.patch_size)
    blocks = []
    for i in range(c.num_hidden_layers):
        x = ref_block(x, p, f"vit.layers.{i}.", c.num_attention_heads, c.layer_norm_eps)
        blocks.append(x)
    lifted = ref_layer_norm(x[:, 1:] @ p["lift.weight"].T, p["lift_norm.weight"], p["lift_norm.bias"], 1e-5)
    logits = lifted.mean(1) @ p["classifier.weight"].T + p["classifier.bias"]
    return logits, blocks, lifted


def reference_widelast(model, pixels):
    """WideLast by hand: blocks 0 … L-2 at C, widen every token (no bias) + LN, one block at C_w, norm, CLS head."""
    p, c = dict(model.state_dict()), model.config
    x = ref_embed(pixels, p, c.patch_size)
    blocks = []
    for i in range(c.num_hidden_layers - 1):
        x = ref_block(x, p, f"vit.layers.{i}.", c.num_attention_heads, c.layer_norm_eps)
        blocks.append(x)
    x = ref_layer_norm(x @ p["widen.weight"].T, p["widen_norm.weight"], p["widen_norm.bias"], c.layer_norm_eps)
    x = ref_block(x, p, "wide_layer.", c.wide_num_attention_heads, c.layer_norm_eps)
    blocks.append(x)
    cls = ref_layer_norm(x, p["layernorm.weight"], p["layernorm.bias"], c.layer_norm_eps)[:, 0]
    return cls @ p["classifier.weight"].T + p["classifier.bias"], blocks


def to_grid(tokens):
    """B×N×C → B×C×H×W with token n at (n // W, n % W), written out."""
    batch, n, channels = tokens.shape
    side = int(round(n**0.5))
    out = torch.empty(batch, channels, side, side, dtype=tokens.dtype)
    for index in range(n):
        out[:, :, index // side, index % side] = tokens[:, index]
    return out


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_lift_forward_and_taps_match_reference(attn, pixel_values):
    model = randomise(tiny_lift()).double()
    model.set_attn_implementation(attn)
    pixel_values = pixel_values.double()
    with torch.no_grad():
        outputs, maps = forward_with_features(model, pixel_values, [0, 1, 2])
        logits, blocks, lifted = reference_lift(model, pixel_values)
    torch.testing.assert_close(outputs.logits, logits, **EXACT)
    assert [tuple(m.shape) for m in maps] == [(4, 32, 4, 4), (4, 32, 4, 4), (4, 64, 4, 4)]
    torch.testing.assert_close(maps[2], to_grid(lifted), **EXACT)  # the tap of the last block: lifted tokens
    for tap, block in zip(maps[:2], blocks[:2]):
        torch.testing.assert_close(tap, to_grid(block[:, 1:]), **EXACT)
    assert [tuple(h.shape) for h in outputs.hidden_states] == [(4, 17, 32)] * 4  # embedding + 3 raw block outputs


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_widelast_forward_and_taps_match_reference(attn, pixel_values):
    model = randomise(tiny_widelast()).double()
    model.set_attn_implementation(attn)
    pixel_values = pixel_values.double()
    assert model.wide_layer.attention.config._attn_implementation == attn  # the wide block follows the model
    with torch.no_grad():
        outputs, maps = forward_with_features(model, pixel_values, [0, 1, 2])
        logits, blocks = reference_widelast(model, pixel_values)
    torch.testing.assert_close(outputs.logits, logits, **EXACT)
    assert [tuple(m.shape) for m in maps] == [(4, 32, 4, 4), (4, 32, 4, 4), (4, 64, 4, 4)]
    for tap, block in zip(maps, blocks):
        torch.testing.assert_close(tap, to_grid(block[:, 1:]), **EXACT)


def reference_vit(model, pixels):
    """A plain pre-LN ViT by hand (UniformWide): blocks, final LayerNorm, CLS head."""
    p, c = dict(model.state_dict()), model.config
    x = ref_embed(pixels, p, c.patch_size)
    for i in range(c.num_hidden_layers):
        x = ref_block(x, p, f"vit.layers.{i}.", c.num_attention_heads, c.layer_norm_eps)
    cls = ref_layer_norm(x, p["vit.layernorm.weight"], p["vit.layernorm.bias"], c.layer_norm_eps)[:, 0]
    return cls @ p["classifier.weight"].T + p["classifier.bias"]


def test_uniformwide_forward_matches_reference():
    model = randomise(load_model("deit_tiny_uniform219", id2label=IMAGENET).model, seed=2).double()
    assert model.vit.layers[0].attention.head_dim == 73
    pixels = torch.randn(1, 3, 224, 224, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(model(pixel_values=pixels).logits, reference_vit(model, pixels), **EXACT)


def test_full_size_taps_have_the_stated_shapes():
    pixels = torch.randn(1, 3, 224, 224)
    for name in ("deit_tiny_lift384", "deit_tiny_widelast384"):
        model = load_model(name, id2label=IMAGENET).model.eval()
        with torch.no_grad():
            outputs, maps = forward_with_features(model, pixels, [0, 10, 11])
        assert [tuple(m.shape) for m in maps] == [(1, 192, 14, 14), (1, 192, 14, 14), (1, 384, 14, 14)]
        assert outputs.logits.shape == (1, 1000)


@pytest.mark.parametrize("build", [tiny_lift, tiny_widelast], ids=["lift", "widelast"])
def test_every_parameter_gets_a_gradient_from_the_logits(build, pixel_values):
    """What DDP without find_unused_parameters needs: no parameter is off the path to the logits."""
    model = build().train()
    F.cross_entropy(model(pixel_values=pixel_values).logits, torch.arange(4) % 5).backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


# ------------------------------------------------------------------------------------------------
# Saving and loading as transformers models
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved_students(tmp_path_factory):
    """Tiny Lift and WideLast students and the demo-sized WideLast, saved with an image processor,
    with the logits they give on fixed inputs."""
    root = tmp_path_factory.mktemp("students")
    generator = torch.Generator().manual_seed(3)
    saved = {}
    for name, model, size in (("lift", randomise(tiny_lift()), 32), ("widelast", randomise(tiny_widelast()), 32),
                              ("demo_widelast", load_model("demo_widelast_student", id2label={i: str(i) for i in range(10)}).model, 28)):
        model.eval().save_pretrained(root / name)
        ViTImageProcessor(size={"height": size, "width": size}).save_pretrained(root / name)
        pixels = torch.randn(3, 3, size, size, generator=generator)
        with torch.no_grad():
            logits = model(pixel_values=pixels).logits
        torch.save({"pixel_values": pixels, "logits": logits}, root / f"{name}_expected.pt")
        saved[name] = root / name
    return saved


@pytest.mark.parametrize("name,cls", [("lift", LiftViTForImageClassification), ("widelast", WideLastViTForImageClassification)])
def test_saved_student_carries_auto_map_and_code_and_reloads_through_auto(saved_students, name, cls):
    folder = saved_students[name]
    config = json.loads((folder / "config.json").read_text())
    model_file, config_file = "modeling_spectralkd_students", "configuration_spectralkd_students"
    assert config["auto_map"] == {
        "AutoConfig": f"{config_file}.{cls.config_class.__name__}",
        "AutoModelForImageClassification": f"{model_file}.{cls.__name__}",
    }
    for module in (model_file, config_file):
        copied = (folder / f"{module}.py").read_text()
        # the copies may import only torch, transformers, huggingface_hub and each other
        imports = {line.split()[1].split(".")[0] for line in copied.splitlines() if line.startswith(("import ", "from "))}
        assert imports <= {"torch", "transformers", "huggingface_hub", "math", "dataclasses", ""}, imports
    reloaded = AutoModelForImageClassification.from_pretrained(folder)
    assert type(reloaded) is cls  # the registered, installed class (hf_spectralkd is imported here)
    expected = torch.load(folder.parent / f"{name}_expected.pt")
    with torch.no_grad():
        assert torch.equal(reloaded(pixel_values=expected["pixel_values"]).logits, expected["logits"])


CHILD = textwrap.dedent(
    """
    import json, sys
    sys.modules["hf_spectralkd"] = None  # hf_spectralkd cannot be imported in this process
    import numpy as np, torch
    from PIL import Image
    from transformers import AutoModelForImageClassification, pipeline

    report = {}
    for name in sys.argv[2:]:
        folder = f"{sys.argv[1]}/{name}"
        try:
            AutoModelForImageClassification.from_pretrained(folder)
            report[name + "_without_trust"] = "loaded"
        except ValueError as error:
            report[name + "_without_trust"] = str(error)
        model = AutoModelForImageClassification.from_pretrained(folder, trust_remote_code=True).eval()
        expected = torch.load(f"{sys.argv[1]}/{name}_expected.pt")
        with torch.no_grad():
            report[name + "_equal"] = torch.equal(model(pixel_values=expected["pixel_values"]).logits, expected["logits"])
        report[name + "_module"] = type(model).__module__
        size = model.config.image_size
        classifier = pipeline("image-classification", model=folder, trust_remote_code=True, top_k=3)
        report[name + "_pipeline"] = classifier(Image.fromarray(np.full((size, size, 3), 128, dtype=np.uint8)))
    with open("report.json", "w") as handle:  # stdout also carries transformers' trust prompt
        json.dump(report, handle)
    """
)


def test_trust_remote_code_loads_saved_students_without_hf_spectralkd(saved_students, tmp_path):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    root = saved_students["lift"].parent
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    result = subprocess.run([sys.executable, str(script), str(root), "lift", "widelast", "demo_widelast"], env=env,
                            cwd=tmp_path, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    for name in ("lift", "widelast", "demo_widelast"):
        assert "trust_remote_code=True" in report[name + "_without_trust"]  # the error says what to do
        assert report[name + "_equal"] is True
        assert report[name + "_module"].startswith("transformers_modules.")  # the code copied next to the weights
        assert len(report[name + "_pipeline"]) == 3 and {"label", "score"} <= set(report[name + "_pipeline"][0])


def test_pipeline_on_saved_demo_widelast_student(saved_students):
    folder = saved_students["demo_widelast"]
    classifier = pipeline("image-classification", model=str(folder), top_k=10)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (28, 28, 3), dtype=np.uint8))
    scores = classifier(image)
    assert len(scores) == 10 and {s["label"] for s in scores} == {str(i) for i in range(10)}
    # the same answer as the model on the processor's pixels
    model = AutoModelForImageClassification.from_pretrained(folder).eval()
    pixels = ViTImageProcessor.from_pretrained(folder)(images=image, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        probabilities = model(pixel_values=pixels).logits.softmax(-1)[0]
    assert scores[0]["label"] == str(int(probabilities.argmax()))
    assert scores[0]["score"] == pytest.approx(float(probabilities.max()), rel=1e-5)


def test_model_card_tells_how_to_load_custom_students():
    def card(model_type):
        summary = RunSummary(student="demo_widelast_student", student_kind="scratch", student_architecture="X",
                             student_parameters=1, num_classes=10, student_model_type=model_type)
        return build_model_card(summary, model_name="student").text

    for model_type in ("lift_vit", "widelast_vit"):
        text = card(model_type).split("## How to use")[1]
        assert "trust_remote_code=True" in text and "import hf_spectralkd" in text
        assert "modeling_spectralkd_students.py" in text
    assert "trust_remote_code" not in card("vit")


# ------------------------------------------------------------------------------------------------
# Analysis and recipes
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,width", [("lift", 64), ("widelast", 64)])
def test_analyze_measures_the_last_tap_at_its_own_width(saved_students, name, width, tmp_path):
    images = tmp_path / "images"
    rng = np.random.default_rng(0)
    for i in range(6):
        (images / f"c{i % 3}").mkdir(parents=True, exist_ok=True)
        class_image(i % 3, rng).save(images / f"c{i % 3}" / f"{i}.png")
    out = tmp_path / "analysis"
    assert cli_main(["analyze", "--model", str(saved_students[name]), "--dataset", str(images), "--num-images", "6",
                     "--output-dir", str(out)]) == 0
    report = json.loads((out / "profile.json").read_text())
    assert report["layers"] == [0, 1, 2] and [len(s) for s in report["spectrum"]] == [32, 32, width]
    assert report["family"] == f"{name}_vit"
    sep = report["spectral_energy_pattern"]["50"]
    assert sep["bins"] == round(sep["fraction"] * width)  # SEP over the tapped width
    assert 1 <= report["svd_energy_rank_p99"]["99%"] <= 16  # a 4×4 grid: at most 16 tokens


STUDENT_CONFIGS = {
    "deit_tiny_lift_from_cait_s24": "deit_tiny_lift384",
    "deit_tiny_widelast_from_cait_s24": "deit_tiny_widelast384",
    "deit_tiny_uniform219_from_cait_s24": "deit_tiny_uniform219",
}


@pytest.mark.parametrize("stem,student", list(STUDENT_CONFIGS.items()))
def test_encoding_mismatch_recipes_hold_the_papers_recipe(stem, student):
    model_args, _, args = run_distill.parse_arguments([str(ROOT / "recipes" / "configs" / f"{stem}.yaml"), "--use_cpu", "true"])
    assert model_args.student == student and model_args.teacher == "timm/cait_s24_224.fb_dist_in1k"
    assert (args.student_layers, args.teacher_layers) == ([11], [23])
    assert (args.alpha, args.beta, args.temperature, args.feature_loss) == (0.9, 0.2, 1.0, "fft")
    assert (args.num_train_epochs, args.warmup_steps) == (300, 0.016667)
    # peak 2e-3 at the paper's global batch of 2048: 5e-4 at 512, scaled with the batch
    assert args.scale_lr and args.base_learning_rate == 5e-4 and 5e-4 * 2048 / 512 == 0.002
    assert args.ddp_find_unused_parameters is False


def test_demo_widelast_config_ends_at_the_widened_block():
    model_args, _, args = run_distill.parse_arguments([str(ROOT / "recipes" / "configs" / "demo_widelast.yaml")])
    student = load_model(model_args.student, id2label={i: str(i) for i in range(10)}).model
    taps = describe_taps(student)
    assert taps.channels == (32, 32, 32, 64) and args.student_layers[-1] == taps.num_layers - 1
    assert args.teacher_layers == [0, 1, 4, 5] and args.output_dir == "outputs/demo/widelast"
    assert model_args.results_file == "outputs/demo/results_widelast.json"


def test_student_classes_build_from_their_configs_alone():
    """The configs round-trip through to_dict and AutoConfig with every student field kept."""
    from transformers import AutoConfig

    for config in (LiftViTConfig(lift_size=96, hidden_size=48, num_attention_heads=3, intermediate_size=96),
                   WideLastViTConfig(wide_hidden_size=128, hidden_size=48, num_attention_heads=3, intermediate_size=96)):
        reloaded = AutoConfig.for_model(**config.to_dict())
        assert type(reloaded) is type(config) and reloaded.to_dict() == config.to_dict()
    assert WideLastViTConfig(hidden_size=192, num_attention_heads=3, intermediate_size=768).wide_intermediate_size == 1536


def test_push_uploads_the_modeling_code_with_the_weights(saved_students, monkeypatch):
    from test_hub import FakeHubApi

    from hf_spectralkd.io.hub import push_run

    fake = FakeHubApi()
    monkeypatch.setattr("hf_spectralkd.io.hub.hf_api", lambda: fake)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)  # the fake Hub is "online"
    push_run(str(saved_students["widelast"]), "someone/tiny-widelast")
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "configuration_spectralkd_students.py",
            "modeling_spectralkd_students.py"} <= set(fake.uploads[-1]["files"])

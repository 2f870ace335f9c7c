"""The hf-spectralkd command end to end on a tiny saved model and a folder of images."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import run_distill
from helpers import class_image, naive_bootstrap, tiny_cait, tiny_vit
from PIL import Image
from transformers import ViTImageProcessor

from hf_spectralkd.cli import build_parser, main
from hf_spectralkd.cli.ablate import build_parser as build_ablate_parser
from hf_spectralkd.errors import ConfigurationError
from hf_spectralkd.metrics import load_predictions
from hf_spectralkd.recipe import parse_arguments


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_models")
    processor = ViTImageProcessor(size={"height": 32, "width": 32})
    for name, model in (("teacher", tiny_cait(num_labels=3)), ("student", tiny_vit(num_labels=3))):
        model.save_pretrained(root / name)
        processor.save_pretrained(root / name)
    return root


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("plain_images")
    rng = np.random.default_rng(0)
    for i in range(10):
        folder = root / f"class_{i % 3}"
        folder.mkdir(exist_ok=True)
        class_image(i % 3, rng).save(folder / f"img_{i}.jpg")
    return root


def assert_valid_png(path: Path) -> None:
    assert path.stat().st_size > 5_000, path
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size[0] >= 300 and image.size[1] >= 200


def test_analyze_writes_profile_and_plots(model_dirs, image_folder, tmp_path, capsys):
    out = tmp_path / "teacher_analysis"
    code = main(["analyze", "--model", str(model_dirs / "teacher"), "--dataset", str(image_folder), "--num_images", "8",
                 "--batch_size", "3", "--output_dir", str(out), "--with_gradients"])
    assert code == 0
    report = json.loads((out / "profile.json").read_text())
    assert report["images_used"] == 8 and report["layers"] == [0, 1, 2, 3]
    assert len(report["intensity"]) == 4 and len(report["spectrum"][0]) == 64
    assert len(report["entropy_bits"]) == 4 and len(report["activation_magnitude"]) == 4
    assert len(report["gradient_magnitude_per_image"]) == 8
    assert set(report["svd_energy_rank_p99"]) == {"80%", "90%", "95%", "99%"}
    assert report["spectral_energy_pattern"]["50"]["bins"] >= 1
    # balanced sampling visits the three class folders round-robin
    assert [Path(i).parent.name for i in report["image_ids"][:3]] == ["class_0", "class_1", "class_2"]
    for name in ("intensity.png", "intensity_histogram.png", "spectrum_grid.png", "svd_energy.png"):
        assert_valid_png(out / name)
    printed = capsys.readouterr()
    assert "analysed 8 images" in printed.out
    # progress bars (stderr): the images read, the measures' pass and the entropy's pass
    assert all(bar in printed.err for bar in ("reading images", "spectral profile", "entropy"))


def test_analyze_shares_forward_passes_and_matches_the_library_functions(model_dirs, image_folder, tmp_path, monkeypatch):
    """One forward per batch for every measure but the entropy, whose histogram pass needs the global
    range first (2 forwards per batch instead of 5), and the same figures as the separate functions."""
    from hf_spectralkd.analysis import activation_gradient_magnitude, entropy_profile, spectral_profile
    from hf_spectralkd.analysis.measures import (
        last_layer_tokens,
        spectral_energy_pattern,
        svd_energy_ranks,
        svd_rank_summary,
    )
    from hf_spectralkd.cli import analyze as analyze_cli

    seen_batches, models = [], []
    real_load = analyze_cli.load_model

    def load_and_watch(*args, **kwargs):
        loaded = real_load(*args, **kwargs)
        models.append(loaded.model)
        loaded.model.register_forward_pre_hook(lambda module, a, kw: seen_batches.append(kw["pixel_values"]), with_kwargs=True)
        return loaded

    monkeypatch.setattr(analyze_cli, "load_model", load_and_watch)
    out = tmp_path / "shared"
    assert main(["analyze", "--model", str(model_dirs / "teacher"), "--dataset", str(image_folder), "--num_images", "8",
                 "--batch_size", "3", "--output_dir", str(out), "--with_gradients"]) == 0
    assert len(seen_batches) == 2 * 3  # 3 batches: forward+backward pass, entropy pass
    report = json.loads((out / "profile.json").read_text())

    model, batches = models[0], [b.clone() for b in seen_batches[:3]]
    model._forward_pre_hooks.clear()
    profile = spectral_profile(model, batches)
    np.testing.assert_allclose(report["intensity"], profile.intensity, rtol=1e-6)
    np.testing.assert_allclose(report["spectrum"], profile.spectrum, rtol=1e-6)
    np.testing.assert_allclose(report["entropy_bits"], entropy_profile(model, batches), rtol=1e-9)
    activation, gradient = zip(*(activation_gradient_magnitude(model, b) for b in batches))
    np.testing.assert_allclose(report["activation_magnitude_per_image"], np.concatenate(activation), rtol=1e-6)
    np.testing.assert_allclose(report["gradient_magnitude_per_image"], np.concatenate(gradient), rtol=1e-6)
    tokens = last_layer_tokens(model, batches, profile.layers[-1])
    assert report["svd_energy_rank_p99"] == svd_rank_summary(svd_energy_ranks(tokens))
    assert report["spectral_energy_pattern"] == spectral_energy_pattern(tokens)


def test_analyze_compare_overlays_two_models(model_dirs, image_folder, tmp_path, capsys):
    teacher_out, student_out = tmp_path / "t", tmp_path / "s"
    assert main(["analyze", "--model", str(model_dirs / "teacher"), "--dataset", str(image_folder), "--num_images", "6",
                 "--output_dir", str(teacher_out)]) == 0
    assert main(["analyze", "--model", str(model_dirs / "student"), "--dataset", str(image_folder), "--num_images", "6",
                 "--output_dir", str(student_out), "--compare", str(teacher_out / "profile.json")]) == 0
    report = json.loads((student_out / "profile.json").read_text())
    assert -1.0 <= report["comparison"]["pearson"] <= 1.0 and len(report["comparison"]["per_layer_distance"]) == 3
    assert_valid_png(student_out / "comparison.png")
    assert "similarity to" in capsys.readouterr().out
    assert main(["compare", str(student_out / "profile.json"), str(teacher_out / "profile.json"), "--plot", str(tmp_path / "c.png")]) == 0
    assert_valid_png(tmp_path / "c.png")


def test_analyze_reads_a_dataset_split(model_dirs, imagefolder, tmp_path):
    out = tmp_path / "ds"
    assert main(["analyze", "--model", str(model_dirs / "student"), "--dataset", imagefolder, "--split", "validation",
                 "--num_images", "5", "--output_dir", str(out)]) == 0
    report = json.loads((out / "profile.json").read_text())
    assert report["images_used"] == 5 and report["image_ids"][0].startswith("validation[")


def test_select_layers_prints_a_map_run_distill_accepts(tmp_path, capsys, model_dirs, image_folder):
    profile = {"layers": list(range(24)), "intensity": [3.0, 2.4] + [1.0] * 16 + [2.0, 2.2, 2.4, 2.6, 2.9, 3.2],
               "spectrum": [[1.0]] * 24, "num_images": 32, "family": "timm_wrapper"}
    (tmp_path / "teacher.json").write_text(json.dumps(profile))
    assert main(["select-layers", "--teacher_profile", str(tmp_path / "teacher.json"), "--student", "deit_tiny_patch16_224"]) == 0
    printed = capsys.readouterr().out
    yaml_lines = [line for line in printed.splitlines() if not line.startswith("#")]
    (tmp_path / "map.yaml").write_text("\n".join(yaml_lines) + "\nstudent: deit_tiny_patch16_224\n")
    _, _, args = run_distill.parse_arguments([str(tmp_path / "map.yaml"), "--output_dir", str(tmp_path / "o")])
    assert args.student_layers == [0, 1, 6, 7, 8, 9, 10, 11] and args.teacher_layers == [0, 1, 18, 19, 20, 21, 22, 23]
    # from the teacher itself, on images
    assert main(["select-layers", "--teacher", str(model_dirs / "teacher"), "--dataset", str(image_folder),
                 "--num_images", "4", "--student_depth", "3"]) == 0
    assert "teacher_layers: [" in capsys.readouterr().out


def test_every_cli_option_is_documented():
    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    for name, sub in subparsers.choices.items():
        for action in sub._actions:
            if action.dest == "help":
                continue
            assert action.help and len(action.help) > 10, f"{name} {action.option_strings or action.dest} lacks help"


def test_cli_errors_are_one_line(tmp_path, capsys, image_folder):
    assert main(["analyze", "--model", str(tmp_path / "missing"), "--dataset", str(image_folder)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: model: cannot load") and err.count("\n") == 1
    assert main(["push", str(tmp_path), "--repo_id", "me/x"]) == 2
    assert "is not a finished run" in capsys.readouterr().err


def test_ablate_trains_each_row_over_seeds_and_writes_a_table(saved_models, imagefolder, tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(
        f"teacher: {saved_models['teacher']}\nstudent: {saved_models['student_config']}\ndataset: {imagefolder}\n"
        "student_layers: [0, 2]\nteacher_layers: [0, 3]\nmax_steps: 2\nper_device_train_batch_size: 4\n"
        "auto_augment: none\nreprob: 0\neval_strategy: 'no'\nprofile_images: 0\nteacher_check_images: 0\n"
        "use_cpu: true\ndisable_tqdm: true\noutput_dir: unused\n"
    )
    out = tmp_path / "ablation"
    assert main(["ablate", str(config), "--seeds", "0", "1", "--rows", "no KD", "SpectralKD", "--output_dir", str(out),
                 "--learning_rate", "1e-3"]) == 0
    report = json.loads((out / "ablation.json").read_text())
    assert [r["row"] for r in report["rows"]] == ["no KD", "SpectralKD"] and report["extra_options"] == ["--learning_rate", "1e-3"]
    for row in report["rows"]:
        per_seed = [100 * run["top1"] for run in report["runs"][row["row"]]]
        assert row["seeds"] == [0, 1] and row["mean"] == pytest.approx(sum(per_seed) / 2, abs=0.01)
        assert row["std"] == pytest.approx(abs(per_seed[0] - per_seed[1]) / 2 ** 0.5, abs=0.01)
    no_kd = json.loads((out / "no_kd" / "seed1" / "results.json").read_text())
    assert (no_kd["distillation_type"], no_kd["beta"], no_kd["teacher"]) == ("none", 0.0, None)
    assert (out / "ablation.png").exists() and "| SpectralKD |" in (out / "ablation.md").read_text()
    # SpectralKD paired with no KD image by image: per-image top-1 averaged over seeds, a naive bootstrap of the difference
    per_row = {}
    for row in ("no_kd", "spectralkd"):
        hits = []
        for seed in (0, 1):
            labels, top_k = load_predictions(out / row / f"seed{seed}")
            hits.append(top_k[:, 0] == labels)
        per_row[row] = np.mean(hits, axis=0)
    difference = 100 * (per_row["spectralkd"] - per_row["no_kd"])
    (compared,) = report["comparisons"]
    low, high = naive_bootstrap(difference)
    assert (compared["row"], compared["images"]) == ("SpectralKD", 9)
    assert (compared["difference"], compared["ci_low"], compared["ci_high"]) == pytest.approx(
        (difference.mean(), low, high), abs=0.006)
    verdict = "distinguishable from noise (the interval excludes 0)" if low > 0 or high < 0 else \
        "not distinguishable from noise (the interval includes 0)"
    assert f"- SpectralKD − no KD: {difference.mean():+.2f} points ({low:+.2f} to {high:+.2f}): {verdict}." in \
        (out / "ablation.md").read_text()


def _subcommand_parsers() -> dict:
    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    # distill and ablate parse their own options (dispatched before this parser); ablate's parser is its own
    return {**{n: p for n, p in subparsers.choices.items() if n not in ("distill", "ablate")}, "ablate": build_ablate_parser()}


def test_every_subcommand_spells_its_options_in_snake_case(capsys):
    """One option style: each subcommand's --help names its long options as distill does (--output_dir)."""
    for name, sub in _subcommand_parsers().items():
        help_text = sub.format_help()
        long_options = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9_-]*", help_text))
        assert long_options, name
        assert not {o for o in long_options if "-" in o[2:]}, f"{name} --help shows kebab-case options"
    assert "--num_images" in _subcommand_parsers()["analyze"].format_help()
    assert "--max_eval_samples" in _subcommand_parsers()["evaluate"].format_help()
    # distill (HF's argument parser) lists every option in its snake_case spelling only
    with pytest.raises(SystemExit) as stop:
        main(["distill", "--help"])
    assert stop.value.code == 0
    printed = capsys.readouterr().out
    option_lines = [line.split()[0] for line in printed.splitlines() if line.startswith("  --")]
    assert len(option_lines) > 100 and all("-" not in option[2:] for option in option_lines)
    # ... and only that spelling: no kebab-case alias anywhere in the help (usage line or option list)
    assert re.findall(r"--[a-z0-9]+-[a-z0-9-]+", printed) == [] and "--output_dir OUTPUT_DIR\n" in printed


def test_a_kebab_case_option_still_works_and_warns_once(tmp_path, capsys, caplog):
    profile = {"layers": list(range(24)), "intensity": [3.0, 2.4] + [1.0] * 16 + [2.0, 2.2, 2.4, 2.6, 2.9, 3.2],
               "spectrum": [[1.0]] * 24, "num_images": 32, "family": "timm_wrapper"}
    (tmp_path / "teacher.json").write_text(json.dumps(profile))
    printed = {}
    for style, argv in (("snake", ["--teacher_profile", str(tmp_path / "teacher.json"), "--student_depth", "12"]),
                        ("kebab", ["--teacher-profile", str(tmp_path / "teacher.json"), "--student-depth=12", "--student-depth", "12"])):
        caplog.clear()
        assert main(["select-layers", *argv]) == 0
        printed[style] = capsys.readouterr().out
        warnings = [r.getMessage() for r in caplog.records if "deprecated" in r.getMessage()]
        if style == "snake":
            assert warnings == []
        else:  # one warning for the command, naming each old spelling once and its new one
            assert len(warnings) == 1, warnings
            assert warnings[0] == ("option spelling --teacher-profile, --student-depth is deprecated and will be removed "
                                   "in the next release: use --teacher_profile, --student_depth")
    assert printed["kebab"] == printed["snake"] and "teacher_layers: [" in printed["snake"]
    # evaluate: the same aliases, one warning
    caplog.clear()
    options = build_parser().parse_args(["evaluate", "m", "--dataset", "d", "--max-eval-samples", "5", "--batch-size=4"])
    assert (options.model, options.dataset, options.max_eval_samples, options.batch_size) == ("m", "d", 5, 4)
    assert [r.getMessage() for r in caplog.records if "deprecated" in r.getMessage()] == [
        "option spelling --max-eval-samples, --batch-size is deprecated and will be removed in the next release: "
        "use --max_eval_samples, --batch_size"]
    # ablate: its own options are rewritten, the recipe options it passes on are left alone
    caplog.clear()
    options, extra = build_ablate_parser().parse_known_args(["demo", "--output-dir", "x", "--learning_rate", "1e-3",
                                                             "--max-steps", "2"])
    assert options.output_dir == "x" and extra == ["--learning_rate", "1e-3", "--max-steps", "2"]
    assert [r.getMessage() for r in caplog.records if "deprecated" in r.getMessage()] == [
        "option spelling --output-dir is deprecated and will be removed in the next release: use --output_dir"]
    # distill: transformers' kebab-case aliases are not registered, but still accepted with the same one warning
    caplog.clear()
    model_args, data_args, args = parse_arguments(["--student", "deit_tiny_patch16_224", "--output-dir", str(tmp_path),
                                                   "--image-column=img", "--no-evaluate-teacher", "--student-layers", "0,1",
                                                   "--teacher_layers", "2", "3", "--use_cpu", "true"])
    assert (args.output_dir, data_args.image_column, model_args.evaluate_teacher) == (str(tmp_path), "img", False)
    assert (args.student_layers, args.teacher_layers) == ([0, 1], [2, 3])
    assert [r.getMessage() for r in caplog.records if "deprecated" in r.getMessage()] == [
        "option spelling --output-dir, --image-column, --no-evaluate-teacher, --student-layers is deprecated and will "
        "be removed in the next release: use --output_dir, --image_column, --no_evaluate_teacher, --student_layers"]


def test_top_level_help_lists_every_subcommand_with_a_one_line_purpose(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--help"])
    assert stop.value.code == 0
    lines = capsys.readouterr().out.splitlines()
    for name in ("distill", "ablate", "configs", "evaluate", "analyze", "select-layers", "compare", "push", "verify"):
        entry = [line for line in lines if line.split()[:1] == [name]]
        assert len(entry) == 1, name
        purpose = entry[0].split(None, 1)[1:]  # the purpose is on the name's own line
        assert purpose and len(purpose[0]) > 30 and purpose[0][0].isupper(), entry


def test_evaluate_matches_the_models_classes_to_the_datas_by_name(tmp_path, imagefolder, capsys):
    from hf_spectralkd.cli.evaluate_model import data_class_of_outputs

    data = {0: "a", 1: "b", 2: "c"}
    # model outputs in another order, one class the data lacks (-1: never counted right)
    assert data_class_of_outputs({0: "C", 1: "x", 2: "a", 3: "b"}, data).tolist() == [2, -1, 0, 1]
    assert data_class_of_outputs({0: "LABEL_0", 1: "LABEL_1", 2: "LABEL_2"}, data).tolist() == [0, 1, 2]
    with pytest.raises(ConfigurationError, match="model: its 2 classes have no names and the data has 3"):
        data_class_of_outputs({0: "LABEL_0", 1: "LABEL_1"}, data)
    with pytest.raises(ConfigurationError, match=r"model: none of the data's classes \('a', 'b', 'c'\) is among the model's"):
        data_class_of_outputs({0: "dog", 1: "cat"}, data)
    assert main(["evaluate", str(tmp_path / "missing"), "--dataset", imagefolder]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: model: cannot load '{tmp_path / 'missing'}' as an image classifier") and err.count("\n") == 1

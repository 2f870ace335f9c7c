#!/usr/bin/env python
"""Distillation dynamics on the offline demo (``make dynamics``): SKD Fig. 1 in miniature.

Trains two students with the same architecture, data, seed and budget from the demo config: one
with SpectralKD, one without any teacher (``--distillation_type none --beta 0``). Then profiles the
teacher and both students on the same held-out digits and reports how closely each student's
normalised ``ℓ`` curve follows the teacher's (Pearson correlation and mean distance), with an
overlay plot. The paper's claim is that the distilled student mirrors its teacher.

    python recipes/run_dynamics.py [--config recipes/configs/demo.yaml] [--output_dir outputs/dynamics]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import run_distill
from transformers import AutoModelForImageClassification

from hf_spectralkd.analysis import compare_profiles, spectral_profile
from hf_spectralkd.analysis.plots import plot_profile_comparison
from hf_spectralkd.data import first_images, load_image_datasets
from hf_spectralkd.features import describe_taps


def train_student(config: str, output_dir: Path, *overrides: str) -> dict:
    code = run_distill.main([config, "--output_dir", str(output_dir), "--overwrite_output_dir", "true",
                             "--results_file", str(output_dir / "results.json"), "--save_strategy", "no", *overrides])
    if code != 0:
        raise SystemExit(code)
    return json.loads((output_dir / "results.json").read_text())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="recipes/configs/demo.yaml", help="run_distill.py config of the SpectralKD run.")
    parser.add_argument("--output_dir", "--output-dir", default="outputs/dynamics", help="Where the two students and the report go.")
    parser.add_argument("--num_images", "--num-images", type=int, default=500, help="Held-out images the profiles are measured on.")
    options = parser.parse_args(argv)
    out = Path(options.output_dir)

    folders = {"SpectralKD": out / "spectralkd", "no KD": out / "no_kd"}
    runs = {
        "SpectralKD": train_student(options.config, folders["SpectralKD"]),
        "no KD": train_student(options.config, folders["no KD"], "--distillation_type", "none", "--beta", "0"),
    }
    model_args, data_args, args = run_distill.parse_arguments([options.config])
    teacher = AutoModelForImageClassification.from_pretrained(model_args.teacher).eval()
    data = load_image_datasets(data_args, describe_taps(teacher).image_size[0], seed=args.seed)
    pixel_values = first_images(data.eval, options.num_images)

    teacher_profile = spectral_profile(teacher, pixel_values, model_name="teacher")
    profiles, report = [teacher_profile], {"teacher": teacher_profile.to_dict(), "students": {}}
    print(f"\nteacher ℓ per layer: {[round(v, 4) for v in teacher_profile.intensity]}")
    print(f"{'student':<12} {'pearson':>8} {'distance':>9} {'top-1':>7}   ℓ per layer")
    for name, results in runs.items():
        folder = folders[name]
        student = AutoModelForImageClassification.from_pretrained(folder).eval()
        profile = spectral_profile(student, pixel_values, model_name=name)
        comparison = compare_profiles(profile, teacher_profile)
        profiles.append(profile)
        report["students"][name] = {"profile": profile.to_dict(), "comparison": comparison.to_dict(),
                                    "student_accuracy": results["student_accuracy"], "folder": str(folder)}
        print(f"{name:<12} {comparison.pearson:>8.3f} {comparison.mean_abs_distance:>9.3f} "
              f"{100 * results['student_accuracy']:>6.1f}%   {[round(v, 4) for v in profile.intensity]}")
    plot_profile_comparison(profiles, ["teacher"] + list(runs), out / "dynamics.png",
                            title="Teacher vs students: normalised spectral intensity")
    report["images"] = int(pixel_values.shape[0])
    (out / "dynamics.json").write_text(json.dumps(report, indent=2))
    print(f"wrote {out / 'dynamics.json'} and {out / 'dynamics.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

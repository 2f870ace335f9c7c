"""The ``hf-spectralkd`` command: distil, analyse models, choose layers, check and push finished runs.

    hf-spectralkd distill CONFIG [--option value ...]          (the recipe; --help lists its options)
    hf-spectralkd ablate CONFIG [--seeds 0 1 2] [--output_dir DIR]   (no KD / soft KD / SpectralKD / feature MSE)
    hf-spectralkd configs                                      (the shipped configs and their paper targets)
    hf-spectralkd evaluate MODEL --dataset ID_OR_PATH [--split validation]   (top-1/top-5 with 95 % intervals)
    hf-spectralkd analyze --model ID_OR_PATH --dataset ID_OR_PATH [--num_images 64] [--output_dir DIR]
    hf-spectralkd select-layers --teacher ID_OR_PATH --student ID_OR_ARCH --dataset ID_OR_PATH
    hf-spectralkd compare STUDENT_PROFILE.json TEACHER_PROFILE.json [--plot comparison.png]
    hf-spectralkd push OUTPUT_DIR --repo_id USER/NAME [--private]
    hf-spectralkd verify OUTPUT_DIR     (exit 0: the newest checkpoint and the final student load; 1: one is damaged)

A CONFIG is a YAML file or the name of a shipped config: ``hf-spectralkd distill deit_tiny_from_cait_s24``.
Every subcommand spells its options in snake_case, as ``distill`` does (``--output_dir``); the
kebab-case spellings of earlier versions (``--output-dir``) still work this release, with a warning.
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Optional, Sequence

from ..errors import ConfigurationError
from ..recipe.command_parser import CommandParser, OneLineHelpFormatter
from .common import exit_on_error


def _select_layers(options) -> int:
    import torch

    from ..analysis import SpectralProfile, select_layers, spectral_profile
    from ..features import describe_taps
    from ..io.model_loading import load_model
    from .images import load_images, preprocess

    teacher_grids = None
    if options.teacher_profile:
        profile = SpectralProfile.load(options.teacher_profile, argument="teacher_profile")
    else:
        if not options.teacher or not options.dataset:
            raise ConfigurationError("select-layers: give --teacher and --dataset, or --teacher_profile PROFILE.json")
        if options.batch_size <= 0:
            raise ConfigurationError(f"batch_size: must be positive, got {options.batch_size}")
        device = torch.device(options.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        loaded = load_model(options.teacher, argument="teacher", revision=options.revision, trust_remote_code=options.trust_remote_code)
        teacher_grids = describe_taps(loaded.model).grids
        images, _ = load_images(options.dataset, options.split, options.num_images, "balanced", options.image_column,
                                options.label_column, options.streaming)
        pixel_values = preprocess(images, loaded.model, options.teacher if loaded.kind == "pretrained" else None, options.revision)
        profile = spectral_profile(loaded.model.to(device).eval(), pixel_values.to(device), batch_size=options.batch_size,
                                   progress=True, model_name=options.teacher)
    student_grids = None
    if options.student_depth is not None:
        student_depth = options.student_depth
    elif options.student:
        student_taps = describe_taps(load_model(options.student, argument="student", from_scratch=True).model)
        student_depth, student_grids = student_taps.num_layers, student_taps.grids
    else:
        raise ConfigurationError("select-layers: give --student (model or architecture) or --student_depth N")
    # A run accepts pairs on equal token grids only: checked when both models are known.
    selection = select_layers(profile, student_depth, k=options.k, student_grids=student_grids, teacher_grids=teacher_grids)
    if student_grids is None or teacher_grids is None:
        print("# token grids not checked: give --teacher and --student for a map a run accepts")
    print(f"# {selection.rule}")
    print(f"# teacher ℓ per layer: [{', '.join(f'{v:.4g}' for v in profile.intensity)}]")
    print(f"student_layers: [{', '.join(map(str, selection.student_layers))}]")
    print(f"teacher_layers: [{', '.join(map(str, selection.teacher_layers))}]")
    print(f"# on the command line: {selection.as_arguments()}")
    return 0


def _configs(options) -> int:
    from .common import config_target, read_config_file, shipped_configs

    configs = shipped_configs()
    pairs = {}
    for name, path in configs.items():
        values = read_config_file(str(path))
        pairs[name] = f"{values.get('student', '?')} ← {values.get('teacher') or 'no teacher'}"
        if values.get("distillation_type") == "none" and not values.get("beta"):
            pairs[name] = f"{values.get('student', '?')} alone"
    width, pair_width = max(len(name) for name in configs), max(len(pair) for pair in pairs.values())
    print(f"{'config':<{width}}  {'student ← teacher':<{pair_width}}  target")
    for name, path in configs.items():
        print(f"{name:<{width}}  {pairs[name]:<{pair_width}}  {config_target(path)}")
    print(f"\nshipped in {configs[next(iter(configs))].parent}; run one with `hf-spectralkd distill NAME [--option value ...]`")
    return 0


def _compare(options) -> int:
    from ..analysis import SpectralProfile, compare_profiles
    from ..analysis.plots import plot_profile_comparison

    student = SpectralProfile.load(options.student_profile, argument="student_profile")
    teacher = SpectralProfile.load(options.teacher_profile, argument="teacher_profile")
    result = compare_profiles(student, teacher)
    print(f"pearson {result.pearson:.4f}  mean distance {result.mean_abs_distance:.4f}")
    print("per-layer distance: " + ", ".join(f"{d:.3f}" for d in result.per_layer_distance))
    if options.plot:
        plot_profile_comparison([teacher, student], [teacher.model_name or "teacher", student.model_name or "student"], options.plot)
        print(f"wrote {options.plot}")
    return 0


def _push(options) -> int:
    from ..io.hub import push_run

    result = push_run(options.output_dir, options.repo_id, private=options.private, revision=options.revision,
                      commit_message=options.commit_message)
    print(f"pushed {options.output_dir} to https://huggingface.co/{options.repo_id} ({getattr(result, 'commit_url', result)})")
    return 0


def _verify(options) -> int:
    """Print each checkpoint of a run (and its final student) with OK or what is damaged.

    Exit code 0 when the newest checkpoint verifies (``--resume_from_checkpoint true`` would use it
    without falling back) and the final student, if the folder holds one, loads; 1 otherwise. A
    ``checkpoint-N`` folder given itself is verified as a checkpoint (optimizer state included), not
    as a final student.
    """
    from pathlib import Path

    from tqdm.auto import tqdm

    from ..checkpointing import MANIFEST_FILE, checkpoint_folders, is_checkpoint_folder, verify_checkpoint
    from ..io.integrity import CONFIG_FILE, has_weights, saved_model_problems

    folder = Path(options.output_dir)
    if not folder.is_dir():
        what = "is a file, not a run folder" if folder.exists() else "does not exist"
        raise ConfigurationError(f"output_dir: '{folder}' {what}")
    checkpoints = [folder] if is_checkpoint_folder(folder) else checkpoint_folders(folder)
    # A save cut short may have written config.json without the weights, or the weights without it.
    has_student = folder not in checkpoints and ((folder / CONFIG_FILE).exists() or has_weights(folder))
    if not checkpoints and not has_student:
        raise ConfigurationError(f"output_dir: '{folder}' holds no checkpoint-* folder and no saved student")
    # Hashing is about 1 GB/s (bench/README.md): a run of many large checkpoints takes a while, hence the bar (stderr).
    rows = [(c.name, verify_checkpoint(c), "" if (c / MANIFEST_FILE).exists() else " (no checksum manifest: structure only)")
            for c in tqdm(checkpoints, desc="verifying checkpoints", unit="checkpoint", leave=False)]
    if has_student:
        rows.append(("final student", saved_model_problems(folder), ""))
    width = max(len(name) for name, _, _ in rows)
    for name, problems, note in rows:
        print(f"{name:<{width}}  " + (f"DAMAGED: {'; '.join(problems)}" if problems else f"OK{note}"))
    newest_ok = not checkpoints or not rows[len(checkpoints) - 1][1]
    student_ok = not has_student or not rows[-1][1]
    return 0 if newest_ok and student_ok else 1


def _version() -> str:
    from .. import __version__

    return __version__


def build_parser() -> argparse.ArgumentParser:
    from . import analyze, evaluate_model

    parser = CommandParser(prog="hf-spectralkd", description=__doc__, formatter_class=OneLineHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="Log progress details.")
    parser.add_argument("--version", action="version", version=f"hf-spectralkd {_version()}",
                        help="Print the version and exit.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    distill = commands.add_parser(
        "distill", help="Distil a student with SpectralKD: the training recipe (`hf-spectralkd distill --help` lists its options).",
        add_help=False,
    )
    ablate = commands.add_parser(
        "ablate", help="Train a config's student as no KD / soft KD / SpectralKD / feature MSE over seeds: a table and a plot.",
        add_help=False,
    )
    ablate.add_argument("ablate_arguments", nargs=argparse.REMAINDER, help="See `hf-spectralkd ablate --help`.")
    distill.add_argument("recipe_arguments", nargs=argparse.REMAINDER, help="A config file and options (see `hf-spectralkd distill --help`).")

    evaluate = commands.add_parser("evaluate", help="Score any image classifier (a student folder, a Hub id) on a data set: "
                                                    "top-1/top-5 with 95 %% intervals.")
    evaluate_model.add_arguments(evaluate)
    evaluate.set_defaults(handler=evaluate_model.run)

    analyze_parser = commands.add_parser("analyze", help="Measure a model's spectral profile, entropy, magnitudes, SVD rank and SEP on some images, with plots.")
    analyze.add_arguments(analyze_parser)
    analyze_parser.set_defaults(handler=analyze.run)

    select = commands.add_parser("select-layers", help="Propose a layer map (student ↔ teacher blocks) from the teacher's spectral profile.")
    select.add_argument("--teacher", help="Teacher: Hub id or local folder.")
    select.add_argument("--teacher_profile", help="Use this profile.json (from `analyze`) instead of running the teacher.")
    select.add_argument("--student", help="Student (model, config.json or architecture name) whose depth the map targets.")
    select.add_argument("--student_depth", type=int, default=None, help="Number of student blocks (Swin: stages), instead of --student.")
    select.add_argument("--dataset", help="Images to profile the teacher on (folder or dataset).")
    select.add_argument("--split", default="validation", help="Dataset split. Default: validation.")
    select.add_argument("--num_images", type=int, default=32, help="Images to profile the teacher on. Default: 32.")
    select.add_argument("--batch_size", type=int, default=32, help="Images per forward pass. Default: 32.")
    select.add_argument("--image_column", default="image", help="Image column of a dataset. Default: image.")
    select.add_argument("--label_column", default="label", help="Label column of a dataset. Default: label.")
    select.add_argument("--streaming", action="store_true",
                        help="Stream a local dataset too (Hub datasets are always streamed: only the images used are read).")
    select.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu).")
    select.add_argument("--k", type=int, default=None, help="At most this many pairs (default: the student's depth).")
    select.add_argument("--revision", default=None, help="Teacher revision on the Hub.")
    select.add_argument("--trust_remote_code", action="store_true", help="Allow model code from the Hub to run.")
    select.set_defaults(handler=_select_layers)

    configs = commands.add_parser("configs", help="List the shipped recipe configs with their paper targets.")
    configs.set_defaults(handler=_configs)

    compare = commands.add_parser("compare", help="Measure how closely a student's spectral profile follows its teacher's (two profile.json files).")
    compare.add_argument("student_profile", help="The student's profile.json.")
    compare.add_argument("teacher_profile", help="The teacher's profile.json.")
    compare.add_argument("--plot", default=None, help="Also write an overlay plot to this PNG path.")
    compare.set_defaults(handler=_compare)

    push = commands.add_parser("push", help="Push a finished run (student, image processor, model card, plots) to the Hub without retraining.")
    push.add_argument("output_dir", help="The run folder that run_distill.py wrote the final student to.")
    push.add_argument("--repo_id", required=True, help="Target repository, e.g. your-name/deit-tiny-spectralkd.")
    push.add_argument("--private", action="store_true", help="Create the repository as private.")
    push.add_argument("--revision", default=None, help="Branch to push to.")
    push.add_argument("--commit_message", default="Upload SpectralKD-distilled student", help="Commit message.")
    push.set_defaults(handler=_push)

    verify = commands.add_parser(
        "verify", help="Check a run's checkpoints (checksums, weights, optimizer states) and its final student before resuming.",
        description="Exit code 0 when the newest checkpoint and the final student (if any) verify, 1 otherwise.",
    )
    verify.add_argument("output_dir", help="The run folder (--output_dir of the recipe).")
    verify.set_defaults(handler=_verify)
    return parser


@exit_on_error
def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["distill"]:  # the recipe parses its own options (and configures its own logging)
        from .distill import main as distill_main

        return distill_main(argv[1:])
    if argv[:1] == ["ablate"]:  # options after the config go to every run of the recipe
        from .ablate import main as ablate_main

        return exit_on_error(ablate_main)(argv[1:])
    options = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if options.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return options.handler(options)


if __name__ == "__main__":
    sys.exit(main())

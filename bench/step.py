#!/usr/bin/env python
"""Time one SpectralKD training step at the paper's model sizes, in four modes measured in one run.

Student: DeiT-Tiny (ViT-Ti/16, 5.7 M parameters) built from its config; teacher: CaiT-S24 (47 M)
through transformers' timm wrapper; random weights, random images. Each measured iteration runs
every mode once, in a shuffled order, so slow drifts of a shared machine hit all modes alike; the
median over iterations is reported, and the ratios are also taken per iteration (paired) with
their median and interquartile range. The training modes run the Trainer's own ``training_step``.

    student        student forward + backward + AdamW step, no teacher (CE only)
    kd             + teacher forward (no_grad) and soft KD
    kd_fft         + FFT alignment on the paper's 8 layer pairs (beta 0.2)
    teacher        teacher forward alone (no_grad)

Ratios: fft_overhead = kd_fft / kd - 1; teacher_share = teacher / kd_fft;
step_vs_parts = kd_fft / (teacher + student) (1.0 means no overhead beyond the two models).
Also timed: the feature loss alone (closed-form default, rfft2 of the difference, and the naive
two-transform reference) and, with --compare-inference-mode, the teacher under no_grad vs inference_mode.

Also reported: model FLOPs per image of each mode (counted once with torch's FlopCounterMode), the
achieved FLOP/s and the model FLOP utilisation (MFU: achieved ÷ the device's dense peak at the
autocast dtype, from a table of known GPUs or --peak-tflops), and on CUDA the peak memory of each
mode. --profile writes a torch.profiler trace of a few kd_fft steps and prints its top operators.

    python bench/step.py --batch-size 8 --steps 10
    python bench/step.py --device cuda --dtype bf16 --batch-size 256 --steps 30 [--compile-teacher]
        [--teacher-dtype bf16] [--compile-student] [--fused-adamw] [--sync-every-step] [--profile trace.json]
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hf_spectralkd import SpectralDistillationConfig, SpectralDistillationTrainer  # noqa: E402
from hf_spectralkd.features import forward_with_features  # noqa: E402
from hf_spectralkd.io.model_loading import ARCHITECTURE_PRESETS  # noqa: E402
from hf_spectralkd.losses import spectral_alignment_loss  # noqa: E402

LOSS_MODES = ("fft_loss_parseval", "fft_loss_rfft2", "fft_loss_naive")
STUDENT_LAYERS = [0, 1, 6, 7, 8, 9, 10, 11]
TEACHER_LAYERS = [0, 1, 18, 19, 20, 21, 22, 23]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
#: Dense bf16/fp16 tensor-core peak (TFLOP/s) of GPUs this recipe is run on, by a substring of the device name.
PEAK_TFLOPS_BF16 = {"H200": 989.4, "H100 SXM": 989.4, "H100 80GB HBM3": 989.4, "H100 PCIe": 756.0, "H100": 756.0,
                    "A100": 312.0, "RTX 4090": 165.2, "L40S": 362.1, "A10G": 70.0}


def peak_tflops(device: torch.device, dtype: str, given: float | None) -> float | None:
    if given:
        return given
    if device.type != "cuda" or dtype == "fp32":
        return None
    name = torch.cuda.get_device_name(device)
    return next((value for key, value in PEAK_TFLOPS_BF16.items() if key in name), None)


def count_flops(run) -> int:
    """FLOPs of one call of ``run`` (matmuls, convolutions, attention) as torch's FlopCounterMode counts them."""
    from torch.utils.flop_counter import FlopCounterMode

    # Counted eagerly (Dynamo off: compiled regions run their Python): FLOPs are the models', whatever runs them.
    with torch._dynamo.config.patch(disable=True), FlopCounterMode(display=False) as counter:
        run()
    return counter.get_total_flops()


def build_models(num_labels: int, tiny: bool = False):
    """``(student, teacher, student layers, teacher layers, image size)``: the paper's DeiT-Tiny and CaiT-S24 at
    224 px, or (``tiny``, for a quick check of the script) a 3-block ViT and a 4-block CaiT at 32 px."""
    from transformers import AutoModelForImageClassification, TimmWrapperConfig, ViTConfig

    torch.manual_seed(0)
    if tiny:
        student_config = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=3,
                                   num_attention_heads=2, intermediate_size=64, layer_norm_eps=1e-6)
        teacher_config = TimmWrapperConfig(architecture="cait_s24_224", model_args={
            "img_size": 32, "patch_size": 8, "embed_dim": 64, "depth": 4, "num_heads": 4, "depth_token_only": 1})
        layers, size = ([0, 2], [0, 3]), 32
    else:
        student_config = ARCHITECTURE_PRESETS["deit_tiny_patch16_224"]()
        teacher_config = ARCHITECTURE_PRESETS["cait_s24_224"]()
        layers, size = (STUDENT_LAYERS, TEACHER_LAYERS), 224
    student_config.num_labels = teacher_config.num_labels = num_labels
    return (AutoModelForImageClassification.from_config(student_config),
            AutoModelForImageClassification.from_config(teacher_config), *layers, size)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def naive_fft_loss(student_maps, teacher_maps) -> torch.Tensor:
    """The straightforward form: pool, rfft2 both maps, stack real/imag, MSE, per pair."""
    losses = []
    for s, t in zip(student_maps, teacher_maps):
        t = torch.nn.functional.adaptive_avg_pool3d(t.float(), (s.shape[1], t.shape[2], t.shape[3]))
        fs = torch.view_as_real(torch.fft.rfft2(s.float(), norm="ortho"))
        ft = torch.view_as_real(torch.fft.rfft2(t, norm="ortho"))
        losses.append(torch.nn.functional.mse_loss(fs, ft))
    return torch.stack(losses).mean()


def paired_ratio(values: list[float], resamples: int = 2000) -> dict[str, Any]:
    """A ratio taken per iteration: its median, the median's 95 % bootstrap confidence interval (seeded) and the
    interquartile range of single iterations."""
    rng = random.Random(0)
    medians = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(resamples))
    quartiles = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
    return {
        "iterations": len(values),
        "median": round(statistics.median(values), 4),
        "median_ci95": [round(medians[int(0.025 * resamples)], 4), round(medians[int(0.975 * resamples) - 1], 4)],
        "iqr": [round(quartiles[0], 4), round(quartiles[2], 4)],
    }


def paired_summary(timings: dict[str, list[float]]) -> dict[str, dict[str, Any]]:
    """Target ratios taken per iteration (paired: a slow stretch of the machine hits both sides)."""
    return {
        "fft_overhead": paired_ratio([f / k - 1 for f, k in zip(timings["kd_fft"], timings["kd"])]),
        "step_vs_parts": paired_ratio([f / (t + s) for f, t, s in zip(timings["kd_fft"], timings["teacher"], timings["student"])]),
    }


def print_paired(summary: dict[str, dict[str, Any]]) -> None:
    for name, s in summary.items():
        low, high = s["median_ci95"]
        print(f"paired, {name} over {s['iterations']} iterations: median {s['median']:.4f} "
              f"(95 % CI of the median [{low:.4f}, {high:.4f}]; single iterations IQR [{s['iqr'][0]:.4f}, {s['iqr'][1]:.4f}])")


def profile_steps(step, device: torch.device, trace_path: str, steps: int = 3, top: int = 10) -> list[dict[str, Any]]:
    """torch.profiler over ``steps`` calls of ``step``: a Chrome trace, the top operators printed, and the ``top``
    kernels (CUDA) or operators (CPU) by self time returned as ``{"name", "self_ms", "calls"}``."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities, record_shapes=False) as prof:
        for _ in range(steps):
            step()
            synchronize(device)
    prof.export_chrome_trace(trace_path)
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    averages = prof.key_averages()  # seconds for a few steps: computed once
    print(averages.table(sort_by=sort, row_limit=15))
    print(f"trace → {trace_path}")
    attribute = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = [e for e in averages if getattr(e, attribute, 0) > 0]
    events.sort(key=lambda e: getattr(e, attribute), reverse=True)
    return [{"name": e.key[:120], "self_ms": round(getattr(e, attribute) / 1000 / steps, 3), "calls": e.count // steps}
            for e in events[:top]]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=8, help="Images per step. Default: 8.")
    parser.add_argument("--steps", type=int, default=30, help="Measured iterations (each runs all modes). Default: 30.")
    parser.add_argument("--warmup", type=int, default=2, help="Unmeasured iterations first. Default: 2.")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda.")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="Autocast precision of the forward passes.")
    parser.add_argument("--compile-teacher", nargs="?", const="default", default=None, metavar="MODE",
                        help="--teacher_compile MODE for every mode (default, reduce-overhead, max-autotune, ...).")
    parser.add_argument("--compare-inference-mode", action="store_true",
                        help="Also time the teacher forward under torch.inference_mode (vs the trainer's no_grad).")
    parser.add_argument("--raw", action="store_true", help="Also print every measured time (ms) per mode.")
    parser.add_argument("--num-labels", type=int, default=1000, help="Classes. Default: 1000.")
    parser.add_argument("--teacher-dtype", choices=sorted(DTYPES), default="fp32",
                        help="Cast the teacher's weights (bf16 halves its weight reads; autocast still applies).")
    parser.add_argument("--compile-student", nargs="?", const="default", default=None, metavar="MODE",
                        help="--torch_compile with --torch_compile_mode MODE: the student's forward, taps and loss.")
    parser.add_argument("--compile-backend", default=None, help="torch.compile backend (default inductor; aot_eager "
                        "traces the same graphs without code generation).")
    parser.add_argument("--compare-compiled", action="store_true",
                        help="Also time kd_fft_compiled (student and teacher regions compiled, --compile-backend), paired "
                        "with kd_fft in each iteration: compiled_vs_eager = kd_fft_compiled / kd_fft.")
    parser.add_argument("--modes", nargs="+", default=None, help="Time only these modes (default: all).")
    parser.add_argument("--tiny", action="store_true", help="Tiny models at 32 px (checks the script, measures nothing).")
    parser.add_argument("--json-out", default=None, help="Also append the JSON line to this file.")
    parser.add_argument("--fused-adamw", action="store_true", help="AdamW(fused=True) (one kernel for all parameters).")
    parser.add_argument("--sync-every-step", action="store_true",
                        help="Check for a non-finite loss in every step (a host-device synchronisation), as before 0.2.")
    parser.add_argument("--peak-tflops", type=float, default=None, help="Device peak for the MFU (default: known GPUs).")
    parser.add_argument("--profile", default=None, metavar="TRACE.json",
                        help="Also profile 3 kd_fft steps with torch.profiler: Chrome trace here, top operators printed.")
    options = parser.parse_args(argv)
    if options.steps < 2:
        parser.error(f"--steps: at least 2 measured iterations are needed for the paired ratios, got {options.steps}")
    device = torch.device(options.device)
    dtype = DTYPES[options.dtype]

    student, teacher, student_layers, teacher_layers, size = build_models(options.num_labels, options.tiny)
    if options.teacher_dtype != "fp32":
        teacher.to(DTYPES[options.teacher_dtype])
    compile_options = dict(torch_compile_backend=options.compile_backend, teacher_compile=options.compile_teacher)
    if options.compile_student:
        compile_options.update(torch_compile=True, torch_compile_mode=options.compile_student)
    common = dict(output_dir="/tmp/hf_spectralkd_bench", report_to=[], use_cpu=device.type == "cpu",
                  bf16=options.dtype == "bf16", fp16=options.dtype == "fp16", disable_tqdm=True,
                  nonfinite_check_interval=1 if options.sync_every_step else 0, teacher_check_images=0)
    fft = dict(student_layers=student_layers, teacher_layers=teacher_layers, beta=0.2)
    configs = {
        "student": SpectralDistillationConfig(distillation_type="none", beta=0.0, **common, **compile_options),
        "kd": SpectralDistillationConfig(beta=0.0, **common, **compile_options),
        "kd_fft": SpectralDistillationConfig(**fft, **common, **compile_options),
    }
    if options.compare_compiled:  # the same step, both regions compiled: paired with kd_fft in every iteration
        configs["kd_fft_compiled"] = SpectralDistillationConfig(
            **fft, **common, torch_compile=True, torch_compile_backend=options.compile_backend, teacher_compile="default")
    wanted = set(options.modes or ["student", "kd", "kd_fft", "teacher", *LOSS_MODES, *configs])
    trainers = {name: SpectralDistillationTrainer(model=student, teacher_model=teacher if name != "student" else None, args=args)
                for name, args in configs.items() if name in wanted or (name == "kd" and "teacher" in wanted)}
    student.to(device).train()
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4, fused=options.fused_adamw or None)
    prepared_teacher = next(t.teacher for t in trainers.values() if t.teacher is not None)
    autocast = (lambda: torch.autocast(device.type, dtype=dtype)) if dtype != torch.float32 else contextlib.nullcontext

    generator = torch.Generator().manual_seed(0)
    pixel_values = torch.randn(options.batch_size, 3, size, size, generator=generator).to(device)
    labels = torch.randint(0, options.num_labels, (options.batch_size,), generator=generator).to(device)
    batch = {"pixel_values": pixel_values, "labels": labels}

    for trainer in trainers.values():
        trainer.current_gradient_accumulation_steps = 1  # set by Trainer's loop, read by training_step

    def train_step(trainer):
        with autocast():
            trainer.training_step(trainer.model_wrapped, batch)  # the Trainer's own step: compute_loss + backward
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def teacher_forward(mode=torch.no_grad):
        with mode():
            prepared_teacher(pixel_values=pixel_values)

    with torch.no_grad():  # feature maps for the loss-only timings
        _, student_maps = forward_with_features(student, pixel_values, student_layers)
        _, teacher_maps = forward_with_features(prepared_teacher, pixel_values, teacher_layers)
    student_maps = [m.detach().requires_grad_(True) for m in student_maps]

    def loss_only(fn):
        loss = fn(student_maps, teacher_maps)
        loss.backward()

    modes = {name: (lambda trainer=trainer: train_step(trainer)) for name, trainer in trainers.items()}
    modes.update({
        "teacher": teacher_forward,
        "fft_loss_parseval": lambda: loss_only(spectral_alignment_loss),
        "fft_loss_rfft2": lambda: loss_only(lambda s, t: spectral_alignment_loss(s, t, implementation="rfft2")),
        "fft_loss_naive": lambda: loss_only(naive_fft_loss),
    })
    if options.compare_inference_mode:
        modes["teacher_inference_mode"] = lambda: teacher_forward(torch.inference_mode)
        wanted.add("teacher_inference_mode")
    modes = {name: run for name, run in modes.items() if name in wanted}
    training = tuple(name for name in ("student", "kd", "kd_fft", "kd_fft_compiled", "teacher") if name in modes)
    flops = {}
    for name in training:  # FLOPs per image; the backward of the training modes included
        flops[name] = count_flops(modes[name]) / options.batch_size
    timings = {name: [] for name in modes}
    peak_memory = {name: 0 for name in modes}
    order_rng = random.Random(0)
    for iteration in range(options.warmup + options.steps):
        # A fresh order each iteration: no mode always runs after the same one (warm caches, or a
        # freshly trimmed heap) and slow drifts of a shared machine hit every mode alike.
        for name in order_rng.sample(list(modes), len(modes)):
            run = modes[name]
            gc.collect()  # a collection inside one mode's window would be charged to that mode alone
            gc.disable()
            synchronize(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            started = time.perf_counter()
            run()
            synchronize(device)
            gc.enable()
            if iteration >= options.warmup:
                timings[name].append(time.perf_counter() - started)
                if device.type == "cuda":
                    peak_memory[name] = max(peak_memory[name], torch.cuda.max_memory_allocated(device))

    median = {name: statistics.median(values) for name, values in timings.items()}
    steps_timed = [name for name in training if name != "teacher"]
    result = {
        "device": str(device), "dtype": options.dtype, "batch_size": options.batch_size, "steps": options.steps,
        "threads": torch.get_num_threads(), "compile_teacher": options.compile_teacher,
        "compile_student": options.compile_student, "compile_backend": options.compile_backend,
        "ms": {name: round(1000 * value, 2) for name, value in median.items()},
        "images_per_s": {name: round(options.batch_size / median[name], 1) for name in training},
    }
    if {"kd", "kd_fft", "teacher", "student"} <= set(modes):
        result["fft_overhead"] = round(median["kd_fft"] / median["kd"] - 1, 4)
        result["step_vs_parts"] = round(median["kd_fft"] / (median["teacher"] + median["student"]), 4)
        result["paired"] = paired_summary(timings)
    if "teacher" in modes and steps_timed:
        result["teacher_share"] = round(median["teacher"] / median[steps_timed[-1]], 4)
    if "kd_fft_compiled" in modes and "kd_fft" in modes:
        result["compiled_vs_eager"] = paired_ratio([c / e for c, e in zip(timings["kd_fft_compiled"], timings["kd_fft"])])
    if "fft_loss_naive" in modes and "fft_loss_parseval" in modes:
        result["loss_speedup_vs_naive"] = round(median["fft_loss_naive"] / median["fft_loss_parseval"], 2)
    if options.compare_inference_mode:
        result["inference_mode_vs_no_grad"] = round(median["teacher_inference_mode"] / median["teacher"], 4)
    peak = peak_tflops(device, options.dtype, options.peak_tflops)
    result["gflop_per_image"] = {name: round(flops[name] / 1e9, 2) for name in training}
    result["achieved_tflops"] = {name: round(flops[name] * options.batch_size / median[name] / 1e12, 3) for name in training}
    result["mfu"] = {name: round(v / peak, 4) for name, v in result["achieved_tflops"].items()} if peak else None
    result["peak_tflops"] = peak
    if device.type == "cuda":
        result["device_name"] = torch.cuda.get_device_name(device)
        result["peak_memory_gib"] = {name: round(peak_memory[name] / 2**30, 2) for name in training}
    result["options"] = {k: getattr(options, k) for k in ("teacher_dtype", "compile_student", "fused_adamw", "sync_every_step")}
    print(f"{'mode':<24}{'ms/step':>10}{'images/s':>10}")
    for name in modes:
        per_second = f"{options.batch_size / median[name]:.1f}" if name in result["images_per_s"] else ""
        print(f"{name:<24}{1000 * median[name]:>10.2f}{per_second:>10}")
    if "paired" in result:
        print(f"FFT overhead (kd_fft/kd - 1): {100 * result['fft_overhead']:+.2f} %   teacher share of a step: "
              f"{100 * result['teacher_share']:.1f} %   step / (teacher + student): {result['step_vs_parts']:.3f}")
        print_paired(result["paired"])
    if "compiled_vs_eager" in result:
        print_paired({"compiled_vs_eager (kd_fft_compiled / kd_fft)": result["compiled_vs_eager"]})
    if "loss_speedup_vs_naive" in result:
        print(f"feature loss fwd+bwd: closed form {result['ms']['fft_loss_parseval']} ms, rfft2 "
              f"{result['ms']['fft_loss_rfft2']} ms, naive {result['ms']['fft_loss_naive']} ms ({result['loss_speedup_vs_naive']}x)")
    print("GFLOP per image: " + ", ".join(f"{k} {v}" for k, v in result["gflop_per_image"].items())
          + "; achieved TFLOP/s: " + ", ".join(f"{k} {v}" for k, v in result["achieved_tflops"].items())
          + (f"; MFU (of {peak} TFLOP/s): " + ", ".join(f"{k} {100 * v:.1f} %" for k, v in result["mfu"].items()) if peak else
             "; MFU: n/a (no known peak for this device; give --peak-tflops)"))
    if "peak_memory_gib" in result:
        print("peak memory (GiB): " + ", ".join(f"{k} {v}" for k, v in result["peak_memory_gib"].items()))
    if options.profile:
        result["top_kernels"] = profile_steps(modes[steps_timed[-1]], device, options.profile, steps=1 if options.tiny else 3)
    if options.raw:
        print(json.dumps({"raw_ms": {name: [round(1000 * v, 2) for v in values] for name, values in timings.items()}}))
    print(json.dumps(result))
    if options.json_out:
        with open(options.json_out, "a", encoding="utf-8") as out:
            out.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

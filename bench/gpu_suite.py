#!/usr/bin/env python
"""Every GPU figure in one command, within a time budget, as JSON lines under bench/results/.

    bash bench/gpu_suite.sh                       # CUDA: bf16, batch 256, about 8 minutes, no further input
    bash bench/gpu_suite.sh --device cpu --quick  # tiny models, a few steps: checks the script (tests/test_bench.py)

Stages, in order (each line of the output file carries its ``stage``):

1. ``device``: the device and the software versions.
2. ``step``: bench/step.py (the trainer's own training step, kd_fft with the paper's 8 layer pairs, and the
   teacher's forward) for eager, compiled student, compiled teacher and both, then the same with CUDA graphs
   (mode ``reduce-overhead``): images/s, MFU, peak memory, teacher share, and the top-10 kernels of each.
   The compiled variants run in the order that lets inductor's on-disk cache serve the later ones.
3. ``kernels``: the top-10 kernels (torch.profiler, self device time per step) of the fastest variant.
4. ``decode``: the torchvision backend's decode + augment on the device (bench/data.py) on generated
   500×375 JPEGs.
5. ``end_to_end``: training images/s of the Trainer on a locally generated parquet split (torchvision
   backend, DataLoader workers), with the fastest variant's compile options, after the warm-up steps.
6. ``fsdp2``: bench/fsdp2_case.py when it exists; otherwise a line saying it was skipped.

Each stage on CUDA runs in its own process with a timeout taken from what is left of ``--budget-s``; a stage
that no longer fits is skipped with a line saying so. ``--quick`` runs the stages in this process (faster
start) with tiny models at 32 px and the ``eager`` backend (Dynamo traces the regions; nothing is generated).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import torch

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(BENCH))

#: (variant, student mode, teacher mode), in the order that lets the later compiled variants reuse cached code.
VARIANTS = [
    ("eager", None, None),
    ("compiled_teacher", None, "default"),
    ("compiled_student", "default", None),
    ("compiled_both", "default", "default"),
    ("cudagraphs_teacher", None, "reduce-overhead"),
    ("cudagraphs_student", "reduce-overhead", None),
    ("cudagraphs_both", "reduce-overhead", "reduce-overhead"),
]


class Suite:
    """Runs the stages and writes their JSON lines; every stage's own output goes to the terminal as it comes."""

    def __init__(self, options: argparse.Namespace):
        self.options, self.started = options, time.monotonic()
        stamp = time.strftime("%Y%m%d_%H%M%S")
        self.out = Path(options.out or BENCH / "results" / f"gpu_suite_{options.device}_{stamp}.jsonl")
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.scratch = Path(tempfile.mkdtemp(prefix="gpu_suite_"))

    def left(self) -> float:
        return self.options.budget_s - (time.monotonic() - self.started)

    def write(self, stage: str, record: dict[str, Any]) -> dict[str, Any]:
        record = {"stage": stage, **record}
        with self.out.open("a", encoding="utf-8") as out:
            out.write(json.dumps(record) + "\n")
        return record

    def run(self, stage: str, script: str, argv: list[str], cap_s: float) -> Optional[dict[str, Any]]:
        """The last JSON line ``script`` prints, or ``None`` (skipped for lack of time, failed or timed out)."""
        timeout = min(cap_s, self.left() - 5)
        if timeout < 20 and not self.options.quick:
            print(f"[{stage}] skipped: {self.left():.0f} s of the budget left")
            self.write(stage, {"skipped": f"out of time ({self.left():.0f} s of the budget left)", "argv": argv})
            return None
        print(f"[{stage}] {script} {' '.join(argv)}", flush=True)
        if self.options.quick:  # in this process: no interpreter start-up per stage
            module = __import__(Path(script).stem)
            buffer = io.StringIO()
            with contextlib.redirect_stdout(buffer):
                code = module.main(argv)
            text = buffer.getvalue()
        else:
            try:
                done = subprocess.run([sys.executable, str(BENCH / script), *argv], capture_output=True, text=True,
                                      timeout=timeout, cwd=ROOT)
            except subprocess.TimeoutExpired:
                print(f"[{stage}] timed out after {timeout:.0f} s")
                self.write(stage, {"failed": f"timed out after {timeout:.0f} s", "argv": argv})
                return None
            code, text = done.returncode, done.stdout
            if code:
                print(done.stderr[-3000:])
        print(text[-4000:])
        lines = [line for line in text.splitlines() if line.startswith("{")]
        if code or not lines:
            self.write(stage, {"failed": f"exit code {code}", "argv": argv})
            return None
        return json.loads(lines[-1])


def device_record(device: str) -> dict[str, Any]:
    import transformers

    name = torch.cuda.get_device_name(0) if device == "cuda" else platform.processor() or platform.machine()
    return {"device": device, "name": name, "torch": torch.__version__, "transformers": transformers.__version__,
            "cuda": torch.version.cuda, "cpu_threads": torch.get_num_threads()}


def step_argv(options, student_mode: Optional[str], teacher_mode: Optional[str], trace: Path) -> list[str]:
    if options.quick:
        argv = ["--tiny", "--device", options.device, "--batch-size", "4", "--steps", "2", "--warmup", "0",
                "--num-labels", "10", "--compile-backend", "eager"]
    else:
        argv = ["--device", options.device, "--dtype", "bf16", "--batch-size", str(options.batch_size), "--steps",
                str(options.steps), "--warmup", "3"]
    argv += ["--modes", "kd_fft", "teacher", "--profile", str(trace)]
    argv += ["--compile-student", student_mode] if student_mode else []
    return argv + (["--compile-teacher", teacher_mode] if teacher_mode else [])


def end_to_end(argv=None) -> int:
    """Training images/s of the Trainer on a generated parquet split (run as ``gpu_suite.py --end-to-end ...``)."""
    from data import jpeg_folder_to_parquet, make_jpeg_folder
    from step import build_models
    from transformers import TrainerCallback

    from hf_spectralkd import SpectralDistillationConfig, SpectralDistillationTrainer
    from hf_spectralkd.data import DataArguments, load_image_datasets

    parser = argparse.ArgumentParser()
    for name, default in (("--device", "cuda"), ("--images", 2048), ("--batch-size", 256), ("--steps", 12),
                          ("--warmup", 4), ("--workers", 8), ("--compile-student", None), ("--compile-teacher", None)):
        parser.add_argument(name, default=default, type=type(default) if default is not None else None)
    parser.add_argument("--tiny", action="store_true")
    options = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        started = time.perf_counter()
        folder = make_jpeg_folder(Path(scratch) / "jpeg", options.images)
        parquet = jpeg_folder_to_parquet(folder, Path(scratch) / "parquet")
        generated_s = time.perf_counter() - started
        student, teacher, student_layers, teacher_layers, size = build_models(10, options.tiny)
        data = load_image_datasets(DataArguments(dataset=parquet, eval_split=None, validation_fraction=0.0,
                                                 data_backend="torchvision"), size)
        compile_options = dict(teacher_compile=options.compile_teacher,
                               torch_compile_backend="eager" if options.tiny else None)
        if options.compile_student:
            compile_options.update(torch_compile=True, torch_compile_mode=options.compile_student)
        args = SpectralDistillationConfig(
            output_dir=str(Path(scratch) / "run"), use_cpu=options.device == "cpu", bf16=options.device == "cuda",
            per_device_train_batch_size=options.batch_size, max_steps=options.warmup + options.steps, save_strategy="no",
            report_to=[], disable_tqdm=True, logging_steps=10_000, dataloader_num_workers=options.workers,
            dataloader_persistent_workers=options.workers > 0, student_layers=student_layers,
            teacher_layers=teacher_layers, teacher_check_images=0, **compile_options)
        times: list[float] = []

        class StepClock(TrainerCallback):  # the wall time of the steps after the warm-up ones (compilation)
            def on_step_end(self, args, state, control, **kwargs):
                if options.device == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter())

        trainer = SpectralDistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=data.train,
                                              data_collator=data.collator, callbacks=[StepClock()])
        trainer.train()
    timed = times[options.warmup - 1:]
    images_per_s = options.batch_size * (len(timed) - 1) / (timed[-1] - timed[0])
    result = {"images_per_s": round(images_per_s, 1), "steps_timed": len(timed) - 1, "batch_size": options.batch_size,
              "workers": options.workers, "data_backend": "torchvision", "parquet_images": options.images,
              "generate_s": round(generated_s, 1), "compile_student": options.compile_student,
              "compile_teacher": options.compile_teacher}
    print(f"end to end: {images_per_s:.1f} images/s over {len(timed) - 1} steps")
    print(json.dumps(result))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--quick", action="store_true", help="Tiny models, a few steps (checks the script).")
    parser.add_argument("--budget-s", type=float, default=470.0, help="Wall-clock budget of the whole suite. Default: 470.")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10, help="Measured iterations of bench/step.py per variant.")
    parser.add_argument("--out", default=None, help="JSON lines file (default: bench/results/gpu_suite_<device>_<time>.jsonl).")
    parser.add_argument("--end-to-end", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    options = parser.parse_args(argv)
    if options.end_to_end is not None:
        return end_to_end(options.end_to_end)
    if options.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here; run with --device cpu --quick to check the script")
    suite = Suite(options)
    print(json.dumps(suite.write("device", device_record(options.device))))
    quick = options.quick
    variants = [VARIANTS[0], VARIANTS[3]] if quick or options.device == "cpu" else VARIANTS  # no CUDA graphs on CPU
    measured = {}
    for name, student_mode, teacher_mode in variants:
        result = suite.run(f"step/{name}", "step.py", step_argv(options, student_mode, teacher_mode,
                                                                suite.scratch / f"{name}.json"), cap_s=240)
        if result is not None:
            measured[name] = (result, student_mode, teacher_mode)
            suite.write("step", {"variant": name, "student_mode": student_mode, "teacher_mode": teacher_mode,
                                 "images_per_s": result["images_per_s"].get("kd_fft"), "mfu": (result["mfu"] or {}).get("kd_fft"),
                                 "peak_memory_gib": result.get("peak_memory_gib"), "teacher_share": result.get("teacher_share"),
                                 "step": result})
    best_modes: tuple[Optional[str], Optional[str]] = (None, None)
    if measured:
        best = max(measured, key=lambda name: measured[name][0]["images_per_s"]["kd_fft"])
        result, *best_modes = measured[best]
        suite.write("kernels", {"variant": best, "top_kernels": result.get("top_kernels")})
        print(f"fastest variant: {best}, {result['images_per_s']['kd_fft']} images/s")
    decode_argv = (["--images", "16", "--batch-size", "8", "--batches", "1", "--workers", "0", "--image-size", "32"]
                   if quick else ["--images", "1024", "--batch-size", str(options.batch_size), "--batches", "4",
                                  "--workers", "0", "8"])
    decoded = suite.run("decode", "data.py", ["--backend", "torchvision", "--device", options.device, "--stages", *decode_argv],
                        cap_s=120)
    if decoded is not None:
        suite.write("decode", {"image_size_source": [500, 375], **decoded})
    e2e_argv = ["--device", options.device] + (["--tiny", "--images", "16", "--batch-size", "4", "--steps", "2",
                                                "--warmup", "1", "--workers", "0"] if quick else [])
    for flag, mode in zip(("--compile-student", "--compile-teacher"), best_modes):
        e2e_argv += [flag, mode] if mode else []
    if quick:
        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer):
            end_to_end(e2e_argv)
        lines = [line for line in buffer.getvalue().splitlines() if line.startswith("{")]
        suite.write("end_to_end", json.loads(lines[-1]))
    else:
        e2e = suite.run("end_to_end", "gpu_suite.py", ["--end-to-end", *e2e_argv], cap_s=180)
        if e2e is not None:
            suite.write("end_to_end", e2e)
    if options.device != "cuda":  # transformers' Trainer runs FSDP on accelerators only; the case exits 2 without one
        print("[fsdp2] skipped: FSDP2 training runs on CUDA devices only")
        suite.write("fsdp2", {"skipped": "FSDP2 training runs on CUDA devices only"})
    elif (BENCH / "fsdp2_case.py").exists():
        fsdp2 = suite.run("fsdp2", "fsdp2_case.py", [], cap_s=150)
        if fsdp2 is not None:
            suite.write("fsdp2", fsdp2)
    else:
        print("[fsdp2] skipped: bench/fsdp2_case.py is not present")
        suite.write("fsdp2", {"skipped": "bench/fsdp2_case.py is not present"})
    print(f"done in {time.monotonic() - suite.started:.0f} s; results: {suite.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

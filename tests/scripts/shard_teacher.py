"""Launched by tests/test_distributed.py under torchrun (2 CPU processes, gloo): the teacher sharded with FSDP2.

For a tiny ViT and a tiny Swin, each rank runs the whole teacher (a copy, never sharded) and the teacher placed by
``place_teacher`` under an FSDP2 accelerator, on the same images, and writes to <out>/rank<r>.json: the largest
difference of logits and of each tapped map, the parameter elements the rank holds, the whole teacher's, and the
teacher's state (eval mode, no parameter requiring a gradient).
"""

import argparse
import copy
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from helpers import tiny_swin, tiny_vit  # noqa: E402

from hf_spectralkd.teacher import run_teacher  # noqa: E402
from hf_spectralkd.training.teacher_setup import place_teacher  # noqa: E402
from hf_spectralkd.training.teacher_sharding import local_numel, teacher_blocks  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("--out", required=True)
options = parser.parse_args()
dist.init_process_group("gloo")
rank = dist.get_rank()


class FSDP2Accelerator:
    """What place_teacher reads of an accelerate ``Accelerator`` launched with FSDP version 2 (accelerate runs FSDP
    only on accelerators, so a CPU test cannot build the real one)."""

    is_fsdp2 = True
    torch_device_mesh = None
    state = SimpleNamespace(fsdp_plugin=SimpleNamespace(mixed_precision_policy=None))

    def prepare_model(self, model, evaluation_mode=False):
        # Under FSDP, accelerate's clip_grad_norm_ compares every prepared model's parameters with the student's.
        raise AssertionError("the FSDP2 teacher must stay out of accelerate's models")


torch.manual_seed(1)
images = torch.randn(4, 3, 32, 32)  # the same batch on both ranks (same seed)
report = {}
for name, build, layers in (("vit", tiny_vit, [0, 2]), ("swin", tiny_swin, [0, 1, 2])):
    whole = build(seed=3).eval()
    reference_logits, reference_maps = run_teacher(whole, images, layers)
    teacher = place_teacher(copy.deepcopy(whole), FSDP2Accelerator(), deepspeed=False)
    logits, maps = run_teacher(teacher, images, layers)
    report[name] = {
        "logits_max_diff": (logits - reference_logits).abs().max().item(),
        "maps_max_diff": [(m - r).abs().max().item() for m, r in zip(maps, reference_maps)],
        "map_shapes": [list(m.shape) for m in maps],
        "local_numel": local_numel(teacher),
        "whole_numel": sum(p.numel() for p in whole.parameters()),
        "units": len(teacher_blocks(whole)) + 1,
        "training": teacher.training,
        "requires_grad": any(p.requires_grad for p in teacher.parameters()),
        "sharded": all(hasattr(p, "to_local") for p in teacher.parameters()),
    }
Path(options.out, f"rank{rank}.json").write_text(json.dumps(report))
dist.destroy_process_group()

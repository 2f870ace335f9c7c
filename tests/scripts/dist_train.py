"""Launched by tests/test_distributed.py under torchrun: a few SpectralKD steps on tiny models.

Every rank writes its log history to <out>/rank<r>.json so the test can compare ranks.
"""

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from helpers import SyntheticImageDataset, tiny_cait, tiny_lift, tiny_vit, tiny_widelast  # noqa: E402

from hf_spectralkd import SpectralDistillationConfig, SpectralDistillationTrainer  # noqa: E402
from hf_spectralkd.cli.common import close_process_group  # noqa: E402
from hf_spectralkd.io.model_loading import ensure_deepspeed_distributed  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("--out", required=True)
parser.add_argument("--deepspeed", default=None)
parser.add_argument("--student", choices=["vit", "lift", "widelast"], default="vit",
                    help="lift/widelast: DDP with find_unused_parameters=False, which fails on any unused parameter")
options = parser.parse_args()
students = {"vit": tiny_vit, "lift": tiny_lift, "widelast": tiny_widelast}

args = SpectralDistillationConfig(
    output_dir=options.out, max_steps=6, per_device_train_batch_size=4, per_device_eval_batch_size=8,
    learning_rate=1e-3, logging_steps=3, save_strategy="steps", save_steps=6, eval_strategy="steps", eval_steps=6,
    report_to=[], use_cpu=True, disable_tqdm=True, seed=0, student_layers=[0, 2], teacher_layers=[0, 3],
    deepspeed=options.deepspeed, dataloader_num_workers=0, teacher_check_images=0,
    ddp_find_unused_parameters=False if options.student != "vit" else None,
)
ensure_deepspeed_distributed(args)  # ZeRO-3 builds models through zero.Init, which needs it
trainer = SpectralDistillationTrainer(
    model=students[options.student](), teacher_model=tiny_cait(), args=args,
    train_dataset=SyntheticImageDataset(48), eval_dataset=SyntheticImageDataset(16, seed=1),
)
trainer.train()
trainer.save_model(os.path.join(options.out, "student"))
rank = int(os.environ.get("RANK", 0))
payload = {"log_history": trainer.state.log_history, "world_size": args.world_size,
           "teacher_type": type(trainer.teacher).__name__, "deepspeed": trainer.is_deepspeed_enabled,
           "find_unused_parameters": getattr(trainer.model_wrapped, "find_unused_parameters", None)}
Path(options.out, f"rank{rank}.json").write_text(json.dumps(payload))
close_process_group()  # as the recipe does: gloo threads left running can abort the process at exit

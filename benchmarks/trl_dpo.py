"""The TRL side of the DPO benchmark: `trl.DPOTrainer` on the same checkpoint and pairs.

Run by benchmarks/run.py in its own interpreter (so peak RSS is TRL's own):

    python benchmarks/trl_dpo.py --shape dpo-tiny --out trl.json

Settings mirror benchmarks/psirl_dpo.py: loss_type "sigmoid", beta 0.1, reference = a frozen copy
of the initial model with its log-probs computed every step (precompute_ref_log_probs False),
per_device_train_batch_size 32, gradient_accumulation_steps 1, max_length 24, AdamW at a
constant LR, max_grad_norm 1, fp32, CPU, no logging, evaluation or saving in the timed steps.
Step time = on_step_begin -> on_step_end of a TrainerCallback.
"""

from __future__ import annotations

import json
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common as C  # noqa: E402
from psirl_dpo import BATCH, BETA, LR, MAX_LENGTH, pairs_file, parse_args  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    args, shape, warmup, steps = parse_args(__doc__, argv)
    C.set_threads()
    ckpt = C.prepare_checkpoint(shape)
    pairs = [json.loads(line) for line in pairs_file().read_text().splitlines() if line.strip()]
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    out_dir = C.CACHE / f"trl-dpo-{shape.name}"
    shutil.rmtree(out_dir, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(ckpt)
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    cfg = DPOConfig(
        output_dir=str(out_dir), per_device_train_batch_size=BATCH,
        gradient_accumulation_steps=1, max_length=MAX_LENGTH, beta=BETA, loss_type="sigmoid",
        precompute_ref_log_probs=False, learning_rate=LR, lr_scheduler_type="constant",
        warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, max_steps=warmup + steps,
        use_cpu=True, bf16=False, fp16=False, report_to="none", logging_steps=10_000,
        save_strategy="no", eval_strategy="no", seed=0, dataloader_num_workers=0,
        disable_tqdm=True,
    )
    times: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - self.t0)

    trainer = DPOTrainer(model=model, args=cfg, train_dataset=Dataset.from_list(pairs),
                         processing_class=tokenizer, callbacks=[StepTimer()])
    rss_imports = C.rss_mb()
    C.reset_peak_rss()
    t0 = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t0
    measured = times[warmup:]
    C.write_json(args.out, {
        "lib": "trl", "shape": shape.name, "batch": BATCH, "max_length": MAX_LENGTH,
        "warmup": warmup, "step_times": times, "median_step_s": statistics.median(measured),
        "train_wall_s": wall, "rss_after_imports_mb": rss_imports,
        "peak_train_rss_mb": C.peak_rss_mb(),
    })


if __name__ == "__main__":
    main()

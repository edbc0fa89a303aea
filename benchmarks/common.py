"""What both sides of the benchmark share: shapes, the SFT warm start, timers, memory, FLOPs.

Both libraries load the SAME model folder (built once by `prepare_checkpoint`: psirl's
`make_tiny_model`, then a short plain-torch SFT on the addition task so rewards are not all zero),
read the same prompts and score completions with the same task reward. Each library runs in its own
subprocess (`run_worker`) so its peak RSS is its own.

Memory is read from /proc/self/status (VmHWM, the kernel's peak resident set size); the peak is
reset after imports and model loading where the kernel allows it (write "5" to
/proc/self/clear_refs), so `peak_train_rss_mb` is the peak during training and `peak_rss_mb` the
peak of the whole process.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CACHE = ROOT / "runs" / "bench"
THREADS = 2  # the same for both libraries (and for the matmul measurement)
RECIPE_VERSION = 4  # bump when the checkpoint recipe (model build, SFT) changes
# Shape fields that change the checkpoint (the others only change the GRPO run).
CHECKPOINT_FIELDS = ("name", "hidden", "layers", "heads", "kv_heads", "intermediate", "vocab_size",
                     "tie_embeddings", "digits", "max_new_tokens", "sft_steps", "sft_batch", "sft_lr",
                     "seed")


# --------------------------------------------------------------------------- shapes


@dataclass(frozen=True)
class Shape:
    """One benchmark configuration (model size, batch, lengths, steps).

    vocab_size=None: the character vocabulary of the task (a few dozen tokens); an int pads the
    vocabulary with inert filler tokens up to that size (a realistic lm_head / softmax width).
    sft_steps=0: no warm start (a random model; completions run to max_new_tokens).
    """

    name: str
    hidden: int = 256
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 768
    vocab_size: int | None = None
    tie_embeddings: bool = False
    digits: int = 2
    n_prompts: int = 8
    group: int = 8
    max_new_tokens: int = 16
    temperature: float = 1.0
    beta: float = 0.04
    lr: float = 5e-5
    sft_steps: int = 800
    sft_batch: int = 64
    sft_lr: float = 1e-3
    steps: int = 15
    warmup: int = 3
    n_train: int = 2000
    device: str = "cpu"
    seed: int = 0


SHAPES: dict[str, Shape] = {
    # The shape: tiny Qwen2 (4 layers, hidden 256, intermediate 768), char vocabulary.
    "tiny": Shape(name="tiny"),
    # A realistic vocabulary (32k) and long completions: a random model, so every completion runs
    # the full 128 tokens in both libraries (EOS has probability ~1/32768 per token).
    "vocab32k": Shape(name="vocab32k", vocab_size=32768, max_new_tokens=128, sft_steps=0,
                      steps=6, warmup=1, n_prompts=4),
    # GPU only: the Qwen2-0.5B shape, random weights, vocabulary 151936.
    "qwen0.5b-gpu": Shape(name="qwen0.5b-gpu", hidden=896, layers=24, heads=14, kv_heads=2,
                          intermediate=4864, vocab_size=151936, tie_embeddings=True,
                          max_new_tokens=128, sft_steps=0, steps=10, warmup=2, device="cuda"),
}


# --------------------------------------------------------------------------- task


def addition_task(digits: int):
    """psirl's built-in addition task: prompts "23+58=", answers "81"."""
    from psirl.data.tasks import AdditionTask

    return AdditionTask(digits=digits)


def task_reward(task, completion: str, record: dict) -> float:
    """The task's own reward of one completion (the same function scores both libraries)."""
    return float(task.reward(completion, record))


def train_records(shape: Shape, seed: int | None = None) -> list[dict]:
    """The GRPO run's prompts: psirl's online loop draws `task.make(n_train, seed=config.seed)`,
    and the TRL side is given exactly these."""
    return addition_task(shape.digits).make(shape.n_train, seed=shape.seed if seed is None else seed)


def eval_records(shape: Shape, n: int) -> list[dict]:
    """Held-out prompts: up to `n` DISTINCT problems of the task's "test" split (never in the train
    split; `make` draws with replacement, so draws are de-duplicated). For 2-digit addition the
    test split has ~1000 problems, so n >= 1025 means all of them."""
    task = addition_task(shape.digits)
    seen, out = set(), []
    for record in task.make(max(20 * n, 30_000), seed=shape.seed, split="test"):
        if record["prompt"] not in seen:
            seen.add(record["prompt"])
            out.append(record)
            if len(out) == n:
                break
    return out


def eval_file(shape: Shape, n: int) -> Path:
    """`eval_records` as a JSONL file: psirl reads it as `data.eval_path`, TRL's side as records."""
    path = CACHE / f"eval-{shape.name}-d{shape.digits}-s{shape.seed}-n{n}.jsonl"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in eval_records(shape, n)))
        tmp.replace(path)
    return path


# --------------------------------------------------------------------------- the checkpoint


def checkpoint_dir(shape: Shape) -> Path:
    return CACHE / f"ckpt-{shape.name}"


def prepare_checkpoint(shape: Shape, force: bool = False) -> Path:
    """Build the shape's model folder once: make_tiny_model (+ filler vocab) + short SFT.

    The folder is reused when its recorded shape matches; both libraries load it.
    """
    out = checkpoint_dir(shape)
    stamp = out / "bench_shape.json"
    want = {"shape": {k: v for k, v in asdict(shape).items() if k in CHECKPOINT_FIELDS},
            "recipe": RECIPE_VERSION}
    if not force and stamp.exists():
        have = json.loads(stamp.read_text())
        if {k: have.get(k) for k in want} == want:
            return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from psirl.models.tiny import make_tiny_model

    task = addition_task(shape.digits)
    examples = task.sft_examples(512, seed=shape.seed)
    alphabet = "".join(sorted({ch for ex in examples for ch in ex["prompt"] + ex["completion"]}))
    make_tiny_model(out, arch="qwen2", hidden_size=shape.hidden, num_layers=shape.layers,
                    num_heads=shape.heads, intermediate_size=shape.intermediate, seed=shape.seed,
                    alphabet=alphabet, num_kv_heads=shape.kv_heads,
                    tie_word_embeddings=shape.tie_embeddings)
    if shape.vocab_size is None and shape.sft_steps == 0:
        stamp.write_text(json.dumps(want))
        return out
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(out)
    if shape.vocab_size is not None:
        n_fill = shape.vocab_size - len(tokenizer)
        # Inert filler tokens: real vocabulary entries (decodable), never produced by encoding
        # task text, so the model's lm_head and softmax have the realistic width.
        tokenizer.add_tokens([f"<|f{i}|>" for i in range(n_fill)])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(shape.seed)
            model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
            std = model.config.initializer_range
            model.get_input_embeddings().weight.data.normal_(0.0, std)
            if not shape.tie_embeddings:
                model.get_output_embeddings().weight.data.normal_(0.0, std)
    if shape.sft_steps > 0:
        t0 = time.perf_counter()
        losses = sft_warm_start(model, tokenizer, task.sft_examples(20_000, seed=shape.seed + 1),
                                steps=shape.sft_steps, batch=shape.sft_batch, lr=shape.sft_lr,
                                seed=shape.seed)
        want["sft_seconds"] = time.perf_counter() - t0
        want["sft_final_loss"] = statistics.mean(losses[-20:])
        want["sft_greedy_accuracy"] = greedy_accuracy(model, tokenizer, task, eval_records(shape, 256),
                                                      shape.max_new_tokens)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    stamp.write_text(json.dumps(want))
    return out


def checkpoint_info(shape: Shape) -> dict:
    """What prepare_checkpoint recorded (SFT seconds, loss, held-out greedy accuracy)."""
    stamp = checkpoint_dir(shape) / "bench_shape.json"
    return json.loads(stamp.read_text()) if stamp.exists() else {}


def sft_warm_start(model, tokenizer, examples: list[dict], *, steps: int, batch: int, lr: float,
                   seed: int) -> list[float]:
    """Plain-torch SFT: NLL of completion + EOS given the prompt; returns the loss per step.

    AdamW, LR warmed up over 20 steps then constant, grad-norm clip 1, batches drawn with
    replacement from `examples` with a seeded generator (the checkpoint is reproducible).
    """
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    enc = [(tokenizer(ex["prompt"], add_special_tokens=False)["input_ids"],
            tokenizer(ex["completion"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id])
           for ex in examples]
    model.train()
    losses = []
    for step in range(steps):
        idx = torch.randint(len(enc), (batch,), generator=g).tolist()
        width = max(len(enc[i][0]) + len(enc[i][1]) for i in idx)
        ids = torch.full((batch, width), tokenizer.pad_token_id, dtype=torch.long)
        att = torch.zeros((batch, width), dtype=torch.long)
        labels = torch.full((batch, width), -100, dtype=torch.long)
        for row, i in enumerate(idx):
            p, c = enc[i]
            seq = torch.tensor(p + c)
            ids[row, : len(seq)] = seq
            att[row, : len(seq)] = 1
            labels[row, len(p) : len(seq)] = seq[len(p):]
        lr_now = lr * min(1.0, (step + 1) / 20)  # linear warm-up over 20 steps, then constant
        for group in opt.param_groups:
            group["lr"] = lr_now
        loss = model(input_ids=ids, attention_mask=att, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    model.eval()
    return losses


@torch.no_grad()
def greedy_accuracy(model, tokenizer, task, records: list[dict], max_new_tokens: int,
                    batch_size: int = 256) -> float:
    """Held-out accuracy with greedy decoding (plain transformers generate): the shared yardstick."""
    was_training = model.training
    model.eval()
    total = 0.0
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    for start in range(0, len(records), batch_size):
        chunk = records[start : start + batch_size]
        enc = tokenizer([r["prompt"] for r in chunk], return_tensors="pt", padding=True,
                        add_special_tokens=False).to(model.device)
        out = model.generate(**enc, do_sample=False, max_new_tokens=max_new_tokens,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        total += sum(task_reward(task, t, r) for t, r in zip(texts, chunk, strict=True))
    tokenizer.padding_side = side
    if was_training:
        model.train()
    return total / len(records)


# --------------------------------------------------------------------------- timing, memory


@dataclass
class StepTimes:
    """Per-step wall-clock seconds; the first `warmup` steps are excluded from the statistics."""

    warmup: int
    times: list[float] = field(default_factory=list)

    def measured(self) -> list[float]:
        return self.times[self.warmup:]

    def median(self) -> float:
        return statistics.median(self.measured())


def read_status_kb(key: str) -> int:
    """A field of /proc/self/status in kB (e.g. VmHWM, VmRSS)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def rss_mb() -> float:
    return read_status_kb("VmRSS") / 1024


def peak_rss_mb() -> float:
    """Peak resident set size of this process since start or the last `reset_peak_rss`."""
    try:
        return read_status_kb("VmHWM") / 1024
    except (OSError, KeyError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (Linux >= 4.0); False where not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def set_threads() -> None:
    torch.set_num_threads(THREADS)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# --------------------------------------------------------------------------- FLOPs


def model_flops_per_sequence(cfg, prompt_len: float, completion_len: float) -> float:
    """Model FLOPs of one GRPO sample: generation, reference forward, policy forward + backward.

    One forward over L = p + c tokens costs 2*N_body*L (matmuls of the transformer body)
    + 2*layers*hidden*L^2 (causal attention scores and weighted sum) + 2*hidden*V*c (lm_head
    on the completion positions only). Generation ~ one forward, the reference one, the policy's
    forward + backward three: 5 forwards in all. Embedding lookups and norms are not counted.
    """
    n_body = body_parameters(cfg)
    h, layers = cfg.hidden_size, cfg.num_hidden_layers
    length = prompt_len + completion_len
    fwd = 2 * n_body * length + 2 * layers * h * length**2 + 2 * h * cfg.vocab_size * completion_len
    return 5.0 * fwd


def body_parameters(cfg) -> int:
    """Weights of the transformer body's matmuls: per layer q, k, v, o and the gated MLP."""
    h, inter = cfg.hidden_size, cfg.intermediate_size
    head_dim = h // cfg.num_attention_heads
    attn_proj = h * h + 2 * h * cfg.num_key_value_heads * head_dim + h * h  # q, k, v, o
    return cfg.num_hidden_layers * (attn_proj + 3 * h * inter)


def shared_prompt_flops_per_step(cfg, prompt_len: float, completion_len: float, batch: int,
                                 group: int) -> float:
    """Model FLOPs psirl executes in one GRPO step, running each prompt once per group.

    Same terms as model_flops_per_sequence, but generation prefills each of the batch / group
    prompts once, and the reference and policy passes run packed rows (one prompt + its group's
    completions minus their last token, psirl/models/prefix_sharing.py): N*p + B*(c-1) tokens,
    attention over rows of p + G*(c-1) tokens, or plain rows where that is cheaper, as psirl's
    own layout choice does. Padding is not counted (by either estimate).
    """
    n_body = body_parameters(cfg)
    h, layers = cfg.hidden_size, cfg.num_hidden_layers
    n_prompts = batch / group
    head = 2 * h * cfg.vocab_size * completion_len * batch
    gen = (2 * n_body * (n_prompts * prompt_len + batch * completion_len)
           + 2 * layers * h * batch * (prompt_len + completion_len) ** 2 + head)
    row = prompt_len + group * max(completion_len - 1, 0)
    packed = (2 * n_body * n_prompts * row + 2 * layers * h * n_prompts * row**2 + head)
    length = prompt_len + completion_len
    plain = 2 * n_body * batch * length + 2 * layers * h * batch * length**2 + head
    # psirl's cost model packs only when that is cheaper (long completions stay plain).
    return gen + 4.0 * min(packed, plain)  # reference forward + policy forward and backward (2x)


def matmul_gflops(n: int = 1024, reps: int = 20) -> float:
    """This machine's fp32 torch.matmul throughput (GFLOP/s) at `THREADS` threads, best of reps."""
    set_threads()
    a = torch.randn(n, n)
    b = torch.randn(n, n)
    for _ in range(3):
        torch.matmul(a, b)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.matmul(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


# --------------------------------------------------------------------------- machine, workers


def machine_info() -> dict:
    import importlib.metadata as md

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {}
    for pkg in ("torch", "transformers", "trl", "accelerate", "psirl"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    mem_gb = None
    try:
        import psutil

        mem_gb = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "memory_gb": mem_gb, "threads": THREADS,
            "python": platform.python_version(), "platform": platform.platform(), **versions}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def cpu_busy_fraction(seconds: float = 1.0) -> float:
    """Fraction of all CPUs' time spent busy over the next `seconds` (from /proc/stat)."""

    def read():
        fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        idle = fields[3] + fields[4]  # idle + iowait
        return sum(fields), idle

    total0, idle0 = read()
    time.sleep(seconds)
    total1, idle1 = read()
    return 1.0 - (idle1 - idle0) / max(1, total1 - total0)


def wait_for_idle_cpu(max_busy: float, timeout: float) -> dict:
    """Block until the machine is idle (busy fraction < max_busy over 1 s) or `timeout` passes.

    On a shared machine other processes' bursts would otherwise land inside a timed run (with
    2 cores and 2 torch threads, one competing process slows torch's thread team severalfold).
    Returns {"waited_s", "busy"} for the record; max_busy >= 1 disables the wait.
    """
    t0 = time.monotonic()
    busy = cpu_busy_fraction()
    while max_busy < 1.0 and busy >= max_busy and time.monotonic() - t0 < timeout:
        busy = cpu_busy_fraction()
    return {"waited_s": round(time.monotonic() - t0, 1), "busy": round(busy, 3)}


IDLE = {"max_busy": 0.25, "timeout": 300.0}  # set by run.py's --idle-* options


def run_worker(script: str, args: list[str], timeout: float = 3600,
               extra_env: dict[str, str] | None = None, python: str | None = None) -> dict:
    """Run benchmarks/<script> in a fresh interpreter (``python``, default this one: the vLLM
    rows use .venv-vllm's); it writes its result JSON to --out."""
    out = CACHE / f"result-{script.removesuffix('.py')}-{os.getpid()}-{time.monotonic_ns()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [python or sys.executable, str(HERE / script), *args, "--out", str(out)]
    idle = wait_for_idle_cpu(IDLE["max_busy"], IDLE["timeout"])
    load_before = os.getloadavg()[0]
    env = dict(os.environ, OMP_NUM_THREADS=str(THREADS), TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               **(extra_env or {}))
    proc = subprocess.run(cmd, env=env, timeout=timeout, capture_output=True, text=True)
    if proc.returncode != 0 or not out.exists():
        tail = (proc.stdout[-3000:] + "\n" + proc.stderr[-6000:]).strip()
        return {"error": f"{script} exited with {proc.returncode}", "log_tail": tail, "cmd": cmd}
    result = json.loads(out.read_text())
    out.unlink()
    # 1-minute load average around the run: above ~1.5 on 2 cores, other processes competed.
    result["loadavg_1min"] = [load_before, os.getloadavg()[0]]
    result["idle_wait"] = idle
    return result


def write_json(path: str | os.PathLike, data: dict) -> None:
    Path(path).write_text(json.dumps(data, indent=2))


def parse_worker_args(doc: str, argv: list[str] | None = None):
    """The command line shared by both library workers (trl_grpo.py, psirl_grpo.py)."""
    import argparse

    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--shape", default="tiny", choices=sorted(SHAPES))
    ap.add_argument("--ckpt", required=True, help="model folder from common.prepare_checkpoint")
    ap.add_argument("--steps", type=int, help="measured steps (default: the shape's)")
    ap.add_argument("--warmup", type=int, help="warm-up steps left out (default: the shape's)")
    ap.add_argument("--mode", choices=("speed", "learn"), default="speed")
    ap.add_argument("--target", type=float, default=None, help="learn: held-out greedy accuracy")
    ap.add_argument("--max-steps", type=int, default=300, help="learn: give up after this many")
    ap.add_argument("--eval-every", type=int, default=10)
    ap.add_argument("--eval-n", type=int, default=256)
    ap.add_argument("--gen-bench", action="store_true", help="also time generation alone")
    ap.add_argument("--lr", type=float, default=None, help="override the shape's GRPO learning rate")
    ap.add_argument("--seed", type=int, default=None, help="the run's seed (default: the shape's)")
    ap.add_argument("--profile", default=None,
                    help="write a cProfile of the training call here (pstats) and print the top")
    ap.add_argument("--out", required=True)
    return ap.parse_args(argv)


def resolve_run(args):
    """(shape, warm-up steps, measured steps, total steps) of a worker's command line."""
    import dataclasses

    shape = SHAPES[args.shape]
    if args.lr is not None:
        shape = dataclasses.replace(shape, lr=args.lr)
    warmup = shape.warmup if args.warmup is None else args.warmup
    steps = shape.steps if args.steps is None else args.steps
    total = warmup + steps if args.mode == "speed" else args.max_steps
    return shape, warmup, steps, total

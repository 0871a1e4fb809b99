"""Soak run: memory and verification-log size over a long run of the default training.

Trains ``build_model(TrainConfig())`` (the default run: VerifiedRecurrentPPO + SLMLstmPolicy,
128 environments, 1 torch thread) for ``--steps`` environment steps (default one million) and,
every ``--interval`` steps (at the first rollout start past it, so right after an update),
prints the process's resident memory (``VmRSS`` from /proc/self/status), its peak
(``resource.getrusage(...).ru_maxrss``) and the verification log's length and pickled size.
Then what one log entry costs (pickled, and in memory by tracemalloc), whether memory grew in
the second half of the run, and a check that ``max_log_entries`` bounds the log (a short run of
a small model with ``max_log_entries=--bound``).

    python benchmarks/soak.py                  # 1,000,000 steps (about 2 to 4 minutes on 2 cores)
    python benchmarks/soak.py --steps 200000
    python benchmarks/soak.py --quick          # tiny model and run, for a smoke test (seconds)
"""

from __future__ import annotations

import argparse
import math
import pickle
import resource
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any

try:
    import textenv_gym
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import textenv_gym  # noqa: F401

import torch as th
from stable_baselines3.common.callbacks import BaseCallback

from verl_sb3.app.config import TrainConfig
from verl_sb3.app.training import build_model

MB = 1024 * 1024
#: A quick run: small vocabulary and network, few environments.
QUICK = dict(
    total_timesteps=4_800,
    n_envs=8,
    n_steps=20,
    batch_size=80,
    vocab_size=12,
    max_length=20,
    policy_kwargs={"enable_critic_lstm": False, "lstm_hidden_size": 16, "embedding_dim": 8, "n_lstm_layers": 1},
)


def rss_bytes() -> float:
    """Resident memory now (VmRSS), NaN where /proc is not there."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return float(line.split()[1]) * 1024
    except OSError:
        pass
    return math.nan


def peak_rss_bytes() -> float:
    """Peak resident memory of the process (ru_maxrss: kilobytes on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return float(peak) * (1 if sys.platform == "darwin" else 1024)


def pickled_size(value: Any) -> int:
    return len(pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL))


def in_memory_size(value: Any) -> int:
    """Bytes that ``value`` holds: ``sys.getsizeof`` of its containers and values, each object once.

    Dictionary keys are not counted: they are the same string objects in every log entry.
    """
    seen: set[int] = set()

    def size(item: Any) -> int:
        if id(item) in seen:
            return 0
        seen.add(id(item))
        total = sys.getsizeof(item)
        if isinstance(item, dict):
            total += sum(size(v) for v in item.values())
        elif isinstance(item, (list, tuple, set)):
            total += sum(size(v) for v in item)
        return total

    return size(value)


def traced_size(value: Any) -> int:
    """Bytes Python allocates to build a pickled copy of ``value`` back (tracemalloc around the unpickling)."""
    data = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        duplicate = pickle.loads(data)
        size = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    del duplicate
    return size


class MemoryReport(BaseCallback):
    """Measures memory and the verification log every ``interval`` steps, right after an update."""

    HEADER = (
        f"{'steps':>10} {'updates':>8} {'wall s':>8} {'steps/s':>8} {'RSS MB':>8} {'peak MB':>8} "
        f"{'log entries':>11} {'log KB':>8} {'B/entry':>8} {'accepted':>8}"
    )

    def __init__(self, interval: int) -> None:
        super().__init__()
        self.interval = interval
        self.rows: list[dict[str, float]] = []
        self._next = interval

    def _on_training_start(self) -> None:
        self._start = time.perf_counter()
        print(self.HEADER, flush=True)

    def _on_step(self) -> bool:
        return True

    def _on_rollout_start(self) -> None:
        if self.num_timesteps >= self._next:
            while self._next <= self.num_timesteps:
                self._next += self.interval
            self.measure()

    def _on_training_end(self) -> None:
        if not self.rows or self.rows[-1]["steps"] != self.num_timesteps:
            self.measure()

    def measure(self) -> None:
        log = self.model.verification_log
        wall = time.perf_counter() - self._start
        log_bytes = pickled_size(log)
        accepted = sum(entry["accepted"] for entry in log) / len(log) if log else math.nan
        row = dict(
            steps=self.num_timesteps,
            updates=self.model.verification_report.n_verified,
            wall=wall,
            rss=rss_bytes(),
            peak=peak_rss_bytes(),
            entries=len(log),
            log_bytes=log_bytes,
            per_entry=log_bytes / len(log) if log else math.nan,
            accepted=accepted,
        )
        self.rows.append(row)
        print(
            f"{row['steps']:>10,} {row['updates']:>8,} {wall:>8.1f} {row['steps'] / wall:>8,.0f} "
            f"{row['rss'] / MB:>8.1f} {row['peak'] / MB:>8.1f} {row['entries']:>11,} {log_bytes / 1024:>8.1f} "
            f"{row['per_entry']:>8.0f} {accepted:>8.1%}",
            flush=True,
        )


def bound_check(bound: int, updates: int) -> tuple[list[int], list[int], int]:
    """A small model trained ``updates`` updates with ``max_log_entries=bound``: log lengths and sizes."""
    config = TrainConfig(
        **{**QUICK, "total_timesteps": updates * QUICK["n_envs"] * QUICK["n_steps"]},
        verification={"max_log_entries": bound},
        progress_bar=False,
    )
    model = build_model(config)
    lengths, sizes = [], []

    class Track(BaseCallback):
        def _on_step(self) -> bool:
            return True

        def _on_rollout_end(self) -> None:  # before the update of this rollout: the log of the earlier ones
            lengths.append(len(self.model.verification_log))
            sizes.append(pickled_size(self.model.verification_log))

    model.learn(config.total_timesteps, callback=Track())
    lengths.append(len(model.verification_log))
    sizes.append(pickled_size(model.verification_log))
    return lengths, sizes, model.verification_report.n_verified


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=None, help="environment steps (default 1,000,000; --quick: 4,800)")
    parser.add_argument("--interval", type=int, default=None, help="steps between reports (default steps / 10)")
    parser.add_argument("--quick", action="store_true", help="a tiny model and run, for a smoke test")
    parser.add_argument(
        "--max-log-entries",
        type=int,
        default=None,
        help="bound the main run's verification log (default: none, as the default training)",
    )
    parser.add_argument("--bound", type=int, default=10, help="max_log_entries of the bound check")
    args = parser.parse_args(argv)
    th.set_num_threads(1)

    overrides: dict[str, Any] = dict(QUICK) if args.quick else {}
    steps = args.steps or (QUICK["total_timesteps"] if args.quick else 1_000_000)
    overrides["total_timesteps"] = steps
    if args.max_log_entries is not None:
        overrides["verification"] = {"max_log_entries": args.max_log_entries}
    config = TrainConfig(**overrides, progress_bar=False)
    rollout = config.n_envs * config.n_steps
    interval = args.interval or max(rollout, steps // 10)
    model = build_model(config)
    print(
        f"Soak: {steps:,} steps of {'the quick' if args.quick else 'the default'} training "
        f"({config.n_envs} envs x {config.n_steps} steps per update, vocabulary {config.vocab_size}), "
        f"max_log_entries={model.max_log_entries}, report every {interval:,} steps"
    )
    report = MemoryReport(interval)
    model.learn(steps, callback=report)

    rows = report.rows
    log = model.verification_log
    print()
    print(
        f"updates: {model.verification_report.n_verified:,}; accepted at the full step: {model.verification_rate:.1%}; "
        f"rolled back: {model.verification_report.n_rolled_back}; undone on the next rollout: {model.n_undone}; "
        f"wall {rows[-1]['wall']:.1f} s ({rows[-1]['steps'] / rows[-1]['wall']:,.0f} steps/s)"
    )
    half = next((row for row in rows if row["steps"] >= steps / 2), rows[0])
    growth = rows[-1]["rss"] - half["rss"]
    span = max(rows[-1]["steps"] - half["steps"], 1)
    print(
        f"RSS: {rows[0]['rss'] / MB:.1f} MB at {rows[0]['steps']:,} steps, {half['rss'] / MB:.1f} MB at "
        f"{half['steps']:,}, "
        f"{rows[-1]['rss'] / MB:.1f} MB at the end; second half: {growth / MB:+.1f} MB "
        f"({growth / MB / span * 1e6:+.2f} MB per million steps); peak {rows[-1]['peak'] / MB:.1f} MB"
    )
    if log:
        entry = log[-1]
        pickled, in_memory, traced = pickled_size(entry), in_memory_size(entry), traced_size(entry)
        whole = pickled_size(log)
        per_million = 1e6 / rollout
        print(
            f"one log entry ({len(entry['checks'])} checks): {pickled:,} bytes pickled, {in_memory:,} bytes in memory "
            f"(sys.getsizeof, keys shared), {traced:,} bytes allocated to unpickle it (tracemalloc); "
            f"whole log: {len(log):,} entries, {whole / 1024:.1f} KB pickled, {in_memory_size(log) / 1024:.1f} "
            f"KB in memory"
        )
        if model.max_log_entries is None:
            print(
                f"the log is unbounded (max_log_entries=None): {per_million:,.0f} entries per million steps of this "
                f"training, about {per_million * in_memory / MB:.2f} MB in memory per million steps "
                f"({100 * per_million * in_memory / MB:,.0f} MB per 100 million)"
            )
        else:
            print(
                f"the log is bounded: at most {model.max_log_entries:,} entries, about "
                f"{model.max_log_entries * in_memory / MB:.2f} MB in memory"
            )
    lengths, sizes, updates = bound_check(args.bound, 3 * args.bound)
    bounded = max(lengths) <= args.bound and lengths[-1] == args.bound
    full = lengths.index(args.bound) if args.bound in lengths else len(lengths)
    print(
        f"max_log_entries={args.bound} check: {updates} updates of a small model; the log grew to "
        f"{max(lengths)} entries "
        f"by update {full} and stayed at {sorted(set(lengths[full:]))} for the {len(lengths) - full} "
        f"measurements after; "
        f"pickled size at most {max(sizes):,} bytes (at the end {sizes[-1]:,}): "
        f"{'BOUNDED' if bounded else 'NOT BOUNDED'}"
    )
    return 0 if bounded else 1


if __name__ == "__main__":
    sys.exit(main())

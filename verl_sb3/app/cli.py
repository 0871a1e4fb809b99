"""The command line, ``verl-sb3``: train, evaluate and sample from the verified small language model.

::

    verl-sb3 train [--total-timesteps N] [--config FILE.yaml] [--output-dir DIR] ...
    verl-sb3 evaluate CHECKPOINT [--n-sequences N] [--seed S] [--prompt TEXT] [--output-dir DIR]
    verl-sb3 generate CHECKPOINT [--prompt TEXT | --prompt-ids "1,2,3"] [--num-sequences N] ...
    verl-sb3 label CHECKPOINT [--output preferences.jsonl] [--pairs N] [--labeller NAME] ...
    verl-sb3 reward-model PREFERENCES.jsonl [--output reward_model] [--checkpoint CHECKPOINT] ...

Exit codes: 0 on success; 1 when ``train`` or ``evaluate`` ends below one of the evaluation
targets; 2 on a bad argument, a bad configuration, a missing or damaged checkpoint, an output
folder in use, holding another run or not writable (a one-line message on stderr); 130 when
interrupted (``train``: after a checkpoint that ``--resume`` continues). ``python -m verl_sb3`` is
the same command.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch as th

from verl_sb3 import __version__
from verl_sb3.advantages import ADVANTAGE_ESTIMATORS, LOSS_AGG_MODES
from verl_sb3.app.feedback import add_label_command, add_reward_model_command, add_reward_model_options

PROG = "verl-sb3"
#: The share of the task's train split that ``sft`` warm-starts on unless told otherwise.
SFT_SHARE = 0.1

#: ``train`` options that map one-to-one to :class:`verl_sb3.app.config.TrainConfig` fields.
TRAIN_OPTIONS = (
    "env_id",
    "env_kwargs",
    "total_timesteps",
    "n_envs",
    "seed",
    "learning_rate",
    "kl_threshold",
    "vocab_size",
    "max_length",
    "forbidden_tokens",
    "output_dir",
    "threads",
    "progress_bar",
    "advantage_estimator",
    "critic_warmup",
    "group_size",
    "warm_start_share",
    "warm_start_epochs",
    "loss_agg_mode",
    "stop_on_targets",
    "reward_model",
    "ref_kl_coef",
)


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error message (and argparse's exit code 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


# ---------------------------------------------------------------------- argument types
def _integer(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {value}")
        return value

    parse.__name__ = f"integer >= {minimum}"
    return parse


def _yaml_mapping(text: str) -> dict:
    import yaml

    from verl_sb3.app.config import YamlLoader

    try:
        value = yaml.load(text, Loader=YamlLoader)
    except yaml.YAMLError:
        raise argparse.ArgumentTypeError(f"expected a YAML mapping such as '{{length: 4}}', got {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a YAML mapping such as '{{length: 4}}', got {text!r}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text}")
    return value


def parse_token_ids(text: str | Sequence[str]) -> list[int]:
    """Token ids written as ``"1,2,3"``, ``"1 2 3"`` (or a list of such strings); ``""`` is no token."""
    joined = text if isinstance(text, str) else " ".join(text)
    parts = [part for part in re.split(r"[,\s]+", joined.strip()) if part]
    try:
        return [int(part) for part in parts]
    except ValueError:
        bad = [part for part in parts if not re.fullmatch(r"[+-]?\d+", part)]
        raise ValueError(
            f"expected integer token ids separated by commas or spaces, got {joined!r} (bad: {bad})"
        ) from None


# ---------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Verified PPO for a small LSTM language model on TextGen-v0.")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    commands = parser.add_subparsers(
        dest="command", required=True, metavar="{train,sft,evaluate,generate,label,reward-model}"
    )
    _add_train_command(commands)
    _add_train_command(commands, warm_start=True)
    _add_evaluate_command(commands)
    _add_generate_command(commands)
    add_label_command(commands)
    add_reward_model_command(commands)
    return parser


def _add_train_command(commands: Any, warm_start: bool = False) -> None:
    """``train``, or with ``warm_start`` ``sft``: the same job, starting with a supervised warm start."""
    train = commands.add_parser(
        "sft" if warm_start else "train",
        help="the job's LSTM policy warm-started on a share of a task's train split, then verified RL as train"
        if warm_start
        else "train the model, write the dashboard, logs, checkpoints and evaluation",
        description=(
            "Fit the job's policy (the LSTM SLM) to (prompt, answer) records of the task's train split by teacher "
            f"forcing (--warm-start-share, default {SFT_SHARE}), then train it with verified PPO as train does (a "
            "Hugging Face model: verl_sb3.sft.supervised_warm_start in Python). "
            if warm_start
            else "Train with verified PPO. "
        )
        + "Options left out take their value from --config, else from TrainConfig's defaults. Exit code 1 when an "
        "evaluation target is not met.",
        argument_default=argparse.SUPPRESS,  # only the options given reach TrainConfig
    )
    train.add_argument(
        "--config", metavar="FILE.yaml", help="YAML file of TrainConfig settings (options given here override it)"
    )
    train.add_argument(
        "--env", dest="env_id", help="TextGen-v0 (default) or a task: TextGen-Reverse-v0, TextGen-Arithmetic-v0"
    )
    train.add_argument(
        "--env-kwargs", type=_yaml_mapping, metavar="YAML", help="the environment's arguments: '{length: 4}'"
    )
    train.add_argument("--total-timesteps", type=int, help="environment steps to train for")
    train.add_argument("--n-envs", type=int, help="parallel sequences per rollout")
    train.add_argument("--seed", type=_integer(0), help="random seed (training and evaluation)")
    train.add_argument(
        "--learning-rate",
        type=float,
        help="Adam learning rate at the start (it decays linearly to learning_rate_final, set in --config)",
    )
    train.add_argument("--kl-threshold", type=float, help="largest accepted mean KL(old || new) per update")
    train.add_argument(
        "--threads", type=_integer(1), help="torch threads (default: one per core, at most 2; 1 on a shared machine)"
    )
    train.add_argument("--vocab-size", type=int, help="number of tokens of the environment")
    train.add_argument("--max-length", type=int, help="tokens per sequence")
    train.add_argument(
        "--forbidden-tokens",
        nargs="+",
        metavar="IDS",
        help='token ids that must not be generated: "3,7" or 3 7 ("" for none)',
    )
    train.add_argument(
        "--advantage-estimator",
        choices=ADVANTAGE_ESTIMATORS,
        help="gae (default, with the critic) or a critic-free one (then --critic-warmup 0); grpo, dr_grpo and "
        "rloo need --group-size >= 2",
    )
    train.add_argument("--critic-warmup", type=_integer(0), help="updates that train only the critic at the start")
    train.add_argument("--group-size", type=_integer(1), help="environments answering the same prompts (default 1)")
    train.add_argument("--loss-agg-mode", choices=LOSS_AGG_MODES, help="veRL's loss aggregation (default token-mean)")
    train.add_argument(
        "--no-stop-on-targets",
        dest="stop_on_targets",
        action="store_false",
        help="train for --total-timesteps even after the evaluation targets are met and confirmed",
    )
    train.add_argument(
        "--warm-start-share", type=float, help="share of the task's train split for a supervised warm start (0: none)"
    )
    train.add_argument("--warm-start-epochs", type=_integer(1), help="passes of the warm start over its records")
    add_reward_model_options(train)
    train.add_argument("--output-dir", help="folder of the outputs (default: results)")
    train.add_argument("--no-progress-bar", dest="progress_bar", action="store_false", help="hide the progress bar")
    job = train.add_mutually_exclusive_group()
    job.add_argument("--overwrite", action="store_true", help="replace an earlier run's outputs in the output folder")
    job.add_argument(
        "--resume", metavar="DIR", help="continue the run in DIR from its newest checkpoint, with its own settings"
    )
    train.set_defaults(handler=_train)
    if warm_start:
        train.set_defaults(sft_default_share=SFT_SHARE)


def _add_evaluate_command(commands: Any) -> None:
    evaluate = commands.add_parser(
        "evaluate",
        help="score a checkpoint against the evaluation targets",
        description="Sample sequences from a checkpoint and print the evaluation table.",
    )
    _add_checkpoint_arguments(evaluate)
    evaluate.add_argument(
        "--n-sequences",
        type=_integer(1),
        help="sequences to sample (default 200); a task's model: answers per test prompt (default 8)",
    )
    evaluate.add_argument("--seed", type=_integer(0), default=0, help="sampling seed (default 0)")
    _add_prompt_options(evaluate)
    evaluate.add_argument(
        "--temperature", type=_positive_float, default=1.0, help="sampling temperature > 0 (default 1.0)"
    )
    evaluate.add_argument("--output-dir", help="also write evaluation.md and evaluation.json into this folder")
    evaluate.set_defaults(handler=_evaluate)


def _add_generate_command(commands: Any) -> None:
    generate = commands.add_parser(
        "generate",
        help="sample sequences from a checkpoint",
        description="Sample sequences from a checkpoint and print them with their quality figures.",
    )
    _add_checkpoint_arguments(generate)
    _add_prompt_options(generate)
    generate.add_argument("--num-sequences", type=_integer(1), default=3, help="sequences to sample (default 3)")
    generate.add_argument("--length", type=_integer(1), help="tokens to generate (default: until the sequence is full)")
    generate.add_argument(
        "--temperature", type=_positive_float, default=1.0, help="sampling temperature > 0 (default 1.0)"
    )
    generate.add_argument("--seed", type=_integer(0), help="sampling seed (default: random)")
    generate.add_argument("--deterministic", action="store_true", help="take the most likely token instead of sampling")
    generate.set_defaults(handler=_generate)


def _add_checkpoint_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="model checkpoint (.zip)")
    parser.add_argument("--threads", type=_integer(1), default=1, help="torch threads (default 1)")
    parser.add_argument(
        "--trust-checkpoint",
        action="store_true",
        help="load every object the checkpoint names, which can run code: only for files you trust "
        "(default: only the classes of SB3, sb3-contrib, Gymnasium and verl_sb3 are built)",
    )


def _add_prompt_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--prompt", help="prompt text: words of the vocabulary, separated by spaces")
    group.add_argument("--prompt-ids", metavar='"1,2,3"', help="prompt as token ids, separated by commas or spaces")


# ---------------------------------------------------------------------- train
def train_config(args: argparse.Namespace):
    """The :class:`TrainConfig` of ``train``'s arguments: the YAML file, then the options given."""
    import yaml

    from verl_sb3.app.config import DEFAULT_ENV_ID, TrainConfig

    overrides: dict[str, Any] = {name: getattr(args, name) for name in TRAIN_OPTIONS if hasattr(args, name)}
    if "forbidden_tokens" in overrides:
        try:
            overrides["forbidden_tokens"] = parse_token_ids(overrides["forbidden_tokens"])
        except ValueError as error:
            raise ValueError(f"--forbidden-tokens: {error}") from None
    config_file = getattr(args, "config", None)
    try:
        if hasattr(args, "sft_default_share"):  # sft: a warm start unless the options or the file set its share
            settings = {**_yaml_settings(config_file), **overrides}
            if settings.get("env_id", DEFAULT_ENV_ID) == DEFAULT_ENV_ID:
                raise ValueError(
                    "--env: sft fits a task's (prompt, answer) records: name a task, e.g. TextGen-Reverse-v0"
                )
            overrides.setdefault("warm_start_share", settings.get("warm_start_share", args.sft_default_share))
        if config_file is not None:
            return TrainConfig.from_yaml(config_file, **overrides)
        return TrainConfig.from_dict(overrides)
    except yaml.YAMLError as error:
        raise ValueError(f"config {config_file!r}: not valid YAML ({_one_line(error)})") from None


def _yaml_settings(config_file: str | None) -> dict[str, Any]:
    """The settings a --config file gives itself (none without one)."""
    import yaml

    from verl_sb3.app.config import YamlLoader

    if config_file is None:
        return {}
    with open(config_file) as file:
        settings = yaml.load(file, Loader=YamlLoader)
    return settings if isinstance(settings, dict) else {}


def _check_buildable(config) -> None:
    """Build the model once before training, so that a bad ``policy_kwargs`` / ``verification`` /
    ``env_kwargs`` setting is reported as a configuration error, before any output is written."""
    from verl_sb3.app.training import build_model

    try:
        model = build_model(config)
    except Exception as error:
        raise ValueError(
            f"config: the model cannot be built from these settings ({type(error).__name__}: {error})"
        ) from None
    model.get_env().close()


def _train(args: argparse.Namespace) -> int:
    from verl_sb3.app.training import resume, train

    if getattr(args, "resume", None) is not None:
        given = [name for name in (*TRAIN_OPTIONS, "config") if hasattr(args, name) and name != "progress_bar"]
        if given:
            options = [f"--{name.replace('_', '-')}" for name in given]
            raise ValueError(f"--resume: the run goes on with its own settings (its config.yaml); leave out {options}")
        output = Path(args.resume)
        result = resume(output, progress_bar=getattr(args, "progress_bar", None))
    else:
        config = train_config(args)
        _check_buildable(config)
        output = Path(config.output_dir)
        result = train(config, overwrite=getattr(args, "overwrite", False))
    if result.get("interrupted"):
        print(
            f"Interrupted; the run is saved in {result['checkpoint']}: continue it with {PROG} train --resume {output}"
        )
        return 130
    checkpoints = output / "model_checkpoints"
    periodic = sorted(checkpoints.glob("model_*_steps.zip"))
    saved = [name for name in ("final_model.zip", "best_model.zip") if (checkpoints / name).is_file()]
    figures = result["figures"]
    print(result["table"])
    print()
    outcome = (
        f"test pass@1 {figures['pass@1']:.1%}"
        if "pass@1" in figures
        else f"mean return {figures['mean_return']:.3f}, optimum {figures['optimal_return']:g}"
    )
    print(f"Trained {figures['timesteps']} timesteps in {figures['train_seconds']:.1f} s ({outcome}).")
    print(f"Outputs in {output}/:")
    print(f"  dashboard        {output / 'training_curves.png'}")
    print(f"  per-update log   {output / 'updates.csv'}")
    print(f"  checkpoints      {checkpoints}/ ({', '.join(saved)}, {len(periodic)} periodic)")
    print(f"  evaluation       {output / 'evaluation.md'}, {output / 'evaluation.json'}")
    print(f"  configuration    {output / 'config.yaml'}")
    if (output / "warm_start.json").is_file():
        print(f"  warm start       {output / 'warm_start.json'}")
    if (output / "overoptimisation.png").is_file():
        print(f"  proxy vs gold    {output / 'overoptimisation.png'}, {output / 'overoptimisation.json'}")
    return _report_targets(result["rows"], fail_code=1)


def _report_targets(rows: list[dict[str, Any]], fail_code: int) -> int:
    failed = [row for row in rows if not row["passed"]]
    if not failed:
        print("All evaluation targets met.")
        return 0
    print(
        "Targets not met: "
        + "; ".join(f"{r['test_case']} ({r['metric']} {r['actual']}, target {r['target']})" for r in failed)
    )
    return fail_code


# ---------------------------------------------------------------------- evaluate / generate
def _load(args: argparse.Namespace):
    from verl_sb3.checkpoints import load_checkpoint

    th.set_num_threads(args.threads)
    return load_checkpoint(args.checkpoint, trusted=args.trust_checkpoint)


def _prompt(args: argparse.Namespace, config) -> str | list[int] | None:
    """The prompt given (text or ids), checked against the model's environment settings."""
    if args.prompt_ids is not None:
        try:
            prompt = parse_token_ids(args.prompt_ids)
            config.encode_prompt(prompt)
        except ValueError as error:
            raise ValueError(f"--prompt-ids: {error}") from None
        return prompt
    if args.prompt is not None:
        try:
            config.encode_prompt(args.prompt)
        except ValueError as error:
            raise ValueError(f"--prompt: {error}") from None
        return args.prompt
    return None


def _evaluate(args: argparse.Namespace) -> int:
    from verl_sb3.app.suites import TASK_SUITE, suite_for
    from verl_sb3.app.targets import evaluation_table, markdown_table, save_evaluation
    from verl_sb3.evaluation import evaluate_model
    from verl_sb3.generation import textgen_config

    model = _load(args)
    suite = suite_for(model)
    if suite is TASK_SUITE:
        if args.prompt is not None or args.prompt_ids is not None:
            raise ValueError("--prompt: a task's model is evaluated on its test split, whose prompts have answers")
        figures = suite.evaluate(model, args.n_sequences or 8, args.seed, temperature=args.temperature)
    else:
        prompt = _prompt(args, textgen_config(model))
        figures = evaluate_model(
            model, n_sequences=args.n_sequences or 200, seed=args.seed, prompt=prompt, temperature=args.temperature
        )
    rows = evaluation_table(figures, suite.targets)
    print(markdown_table(rows, figures))
    print()
    code = _report_targets(rows, fail_code=1)
    if args.output_dir is not None:
        markdown, data = save_evaluation(args.output_dir, figures, rows)
        print(f"Saved {markdown} and {data}")
    return code


def _generate(args: argparse.Namespace) -> int:
    from verl_sb3.generation import generate, optimal_return, textgen_config
    from verl_sb3.metrics import has_repetition, longest_run, unique_ratio

    model = _load(args)
    config = textgen_config(model)
    prompt = _prompt(args, config)
    if config.compute_score is not None:
        from verl_sb3.app.answers import print_answers

        return print_answers(model, args, prompt)
    generation = generate(
        model,
        prompt,
        num_sequences=args.num_sequences,
        length=args.length,
        temperature=args.temperature,
        seed=args.seed,
        deterministic=args.deterministic,
    )
    optimum = optimal_return(config, prompt, length=len(generation.generated[0]))
    if isinstance(prompt, str):
        shown = " ".join(prompt.split())
    elif generation.prompt:
        shown = f"{config.tokenizer.decode(generation.prompt)} (ids {generation.prompt})"
    else:
        shown = "(none)"
    for index, (tokens, text, episode_return) in enumerate(
        zip(generation.tokens, generation.texts, generation.returns), 1
    ):
        repeated = has_repetition(tokens, config.repetition_window)
        print(f"--- Sequence {index} of {args.num_sequences} ---")
        print(f"Prompt: {shown}")
        print(f"Generated: {text}")
        print(f"Quality Score: {unique_ratio(tokens):.3f}")
        print(f"Return: {episode_return:.3f} (optimum {optimum:.3f})")
        print(
            f"Repetition: {'yes' if repeated else 'no'} (longest run {longest_run(tokens)}, window "
            f"{config.repetition_window})"
        )
        print()
    print("Quality Score: unique-token ratio of the whole sequence (prompt included), 1.0 when no token repeats.")
    return 0


def with_default_checkpoint(command: str, argv: Sequence[str], default: str) -> list[str]:
    """``[command, *argv]``, with ``default`` as the checkpoint when ``argv`` names none (for the examples)."""
    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    options = subparsers.choices[command]._option_string_actions
    argv, index = list(argv), 0
    while index < len(argv):
        arg = argv[index]
        if arg == "--":
            return [command, *argv]
        if arg.startswith("-") and len(arg) > 1:
            action = options.get(arg)
            if action is not None and action.nargs != 0 and "=" not in arg:
                index += 1  # skip the option's value (which may look like "-1")
        else:
            return [command, *argv]  # a positional argument: the checkpoint
        index += 1
    return [command, default, *argv]


# ---------------------------------------------------------------------- entry point
def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``verl-sb3`` with ``argv`` (default: the command line); return the exit code."""
    from verl_sb3.checkpoints import CheckpointError

    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse: --help (0) or a bad argument (2, message printed)
        return exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 2)
    prog = f"{PROG} {args.command}"
    try:
        return args.handler(args)
    except (ValueError, OSError, CheckpointError) as error:  # JobError is a ValueError
        print(f"{prog}: error: {_one_line(error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

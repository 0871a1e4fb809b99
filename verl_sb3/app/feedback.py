"""The human-feedback commands: ``verl-sb3 label`` (preferences from the keyboard) and
``verl-sb3 reward-model`` (a Bradley-Terry reward model fitted to them)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

DEFAULT_PREFERENCES = "preferences.jsonl"
DEFAULT_REWARD_MODEL = "reward_model"


def add_reward_model_options(train: argparse.ArgumentParser) -> None:
    """``train``'s options for RL against a reward model."""
    train.add_argument(
        "--reward-model",
        help="train against this saved reward model (verl-sb3 reward-model); TextGen-v0's own reward becomes the "
        "gold score, measured into overoptimisation.json/.png (needs --ref-kl-coef)",
    )
    train.add_argument("--ref-kl-coef", type=float, help="coefficient of the KL penalty to the initial policy")


def add_label_command(commands: Any) -> None:
    from verl_sb3.app.cli import _add_checkpoint_arguments, _integer, _positive_float

    label = commands.add_parser(
        "label",
        help="label pairs of a checkpoint's completions at the keyboard",
        description="Show pairs of completions sampled from a checkpoint (same prompt, left and right) and "
        "append the choice typed for each to a JSONL preference file: l = left better, r = right better, "
        "t = tie, s = skip (not recorded, shown again next time), q = quit. Running the same command "
        "again resumes after the pairs already labelled.",
    )
    _add_checkpoint_arguments(label)
    label.add_argument("--output", default=DEFAULT_PREFERENCES, help=f"preference file (default {DEFAULT_PREFERENCES})")
    label.add_argument("--pairs", type=_integer(1), default=20, help="pairs in the session (default 20)")
    label.add_argument("--seed", type=_integer(0), default=0, help="sampling seed of the pairs (default 0)")
    label.add_argument("--temperature", type=_positive_float, default=1.0, help="sampling temperature (default 1.0)")
    label.add_argument("--prompt", help="prompt text for every pair (default: the model's task prompts, or none)")
    label.add_argument("--labeller", help="your name or id, recorded with each choice")
    label.set_defaults(handler=_label)


def add_reward_model_command(commands: Any) -> None:
    from verl_sb3.app.cli import _integer, _positive_float

    command = commands.add_parser(
        "reward-model",
        help="fit a Bradley-Terry reward model to a preference file",
        description="Fit a reward model (an embedding, an LSTM and a scalar head) to the preferences with the "
        "Bradley-Terry loss, keeping a held-out share of the pairs for early stopping, and save it (config.json "
        "and model.safetensors) for reward_fns, load_reward_model or train --reward-model.",
    )
    command.add_argument("preferences", help="preference file (JSONL)")
    command.add_argument("--output", default=DEFAULT_REWARD_MODEL, help=f"folder (default {DEFAULT_REWARD_MODEL})")
    command.add_argument("--overwrite", action="store_true", help="replace a reward model already saved there")
    command.add_argument(
        "--checkpoint",
        help="checkpoint whose environment (vocabulary, length) the completions come from (default: TextGen-v0's)",
    )
    command.add_argument(
        "--from-policy", action="store_true", help="start the embedding and LSTM from the checkpoint's policy"
    )
    command.add_argument("--trust-checkpoint", action="store_true", help="load a checkpoint you trust fully")
    command.add_argument("--held-out-share", type=_positive_float, default=0.2, help="pairs held out (default 0.2)")
    command.add_argument("--epochs", type=_integer(1), default=100, help="most epochs (default 100)")
    command.add_argument(
        "--patience",
        type=_integer(1),
        default=10,
        help="epochs without a better held-out loss before stopping (default 10)",
    )
    command.add_argument("--batch-size", type=_integer(1), default=64, help="pairs per step (default 64)")
    command.add_argument("--learning-rate", type=_positive_float, default=1e-3, help="Adam's (default 1e-3)")
    command.add_argument("--embedding-dim", type=_integer(1), default=64, help="default 64")
    command.add_argument("--hidden-size", type=_integer(1), default=128, help="default 128")
    command.add_argument("--seed", type=_integer(0), default=0, help="split and initialisation seed (default 0)")
    command.add_argument("--threads", type=_integer(1), default=1, help="torch threads (default 1)")
    command.set_defaults(handler=_reward_model)


def _label(args: argparse.Namespace) -> int:
    from verl_sb3.app.cli import _load
    from verl_sb3.generation import textgen_config
    from verl_sb3.rlhf import TerminalLabeller, label_pairs, read_preferences
    from verl_sb3.rlhf.labelling import iter_pairs

    output = Path(args.output)
    recorded = read_preferences(output) if output.exists() else []  # a bad file is refused before sampling
    done = {preference.pair for preference in recorded if preference.pair is not None and preference.pair < args.pairs}
    model = _load(args)
    prompts = None
    if args.prompt is not None:
        try:
            textgen_config(model).encode_prompt(args.prompt)
        except ValueError as error:
            raise ValueError(f"--prompt: {error}") from None
        prompts = [args.prompt]
    pairs = iter_pairs(model, args.pairs, prompts, args.seed, args.temperature)
    labeller = TerminalLabeller(total=args.pairs - len(done), left=bool(done))
    session = label_pairs(pairs, labeller, output, args.labeller)
    answered = session.already_labelled + len(session.recorded)
    left, in_file = args.pairs - answered - len(session.skipped), len(recorded) + len(session.recorded)
    print(
        f"recorded {len(session.recorded)} preference(s) in {output} ({in_file} in the file); "
        f"{answered} of the session's {args.pairs} pairs labelled, {len(session.skipped)} skipped"
        + (f", {left} not shown" if left else "")
    )
    if session.quit or session.skipped:
        print("run the same command again to go on where you stopped")
    return 0


def _reward_model(args: argparse.Namespace) -> int:
    import torch as th

    from textenv_gym.dynamics import TextGenConfig
    from verl_sb3.generation import textgen_config
    from verl_sb3.rlhf import SequenceRewardModel, environment_settings, fit_reward_model, read_preferences
    from verl_sb3.rlhf import save_reward_model as save

    if args.from_policy and args.checkpoint is None:
        raise ValueError("--from-policy: needs --checkpoint (the policy to start from)")
    if not 0 < args.held_out_share < 1:
        raise ValueError(f"--held-out-share: expected a number in (0, 1), got {args.held_out_share}")
    output = Path(args.output)
    if output.exists() and not args.overwrite:  # refused before the fit, not after it
        raise ValueError(f"--output {str(output)!r}: already exists; pass --overwrite to replace it")
    th.set_num_threads(args.threads)
    th.manual_seed(args.seed)
    preferences = read_preferences(args.preferences)
    if args.checkpoint is not None:
        from verl_sb3.checkpoints import load_checkpoint

        model = load_checkpoint(args.checkpoint, trusted=args.trust_checkpoint)
        config = textgen_config(model)
    else:
        model, config = None, TextGenConfig()
    if args.from_policy:
        module = SequenceRewardModel.from_policy(model.policy)
    else:
        module = SequenceRewardModel(config.vocab_size, args.embedding_dim, args.hidden_size)
    print(f"{len(preferences)} preferences from {args.preferences}; fitting on {config.vocab_size} tokens")
    fit = fit_reward_model(
        preferences,
        config,
        module,
        args.held_out_share,
        args.epochs,
        args.patience,
        args.batch_size,
        args.learning_rate,
        args.seed,
        progress=_print_epoch,
    )
    summary = fit.summary()
    save(
        fit.module, output, environment_settings(config), {**summary, "history": fit.history}, overwrite=args.overwrite
    )
    print(
        f"held-out preference accuracy {100 * summary['held_out_accuracy']:.1f} % on {fit.n_held_out} pairs "
        f"(ties left out; best epoch {fit.best_epoch} of {len(fit.history)}); saved to {output}"
    )
    return 0


def _print_epoch(figures: dict[str, float]) -> None:
    print(
        f"epoch {figures['epoch']}: train loss {figures['train_loss']:.4f} (accuracy "
        f"{100 * figures['train_accuracy']:.1f} %), held-out loss {figures['held_out_loss']:.4f} (accuracy "
        f"{100 * figures['held_out_accuracy']:.1f} %)",
        file=sys.stdout,
        flush=True,
    )

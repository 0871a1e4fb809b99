"""TextGen-v0 on Ray RLlib (new API stack, local Ray with 2 env runners) with the verified PPO learner."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch as th

ray = pytest.importorskip("ray")
pytest.importorskip("ray.rllib")

from verl_sb3.rllib import ppo_config  # noqa: E402
from verl_sb3.verification.context import CheckResult  # noqa: E402

SMALL = dict(train_batch_size_per_learner=400, minibatch_size=100, num_epochs=2)


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def learner_module(algo):
    return algo.learner_group._learner.module["default_policy"]


def test_two_iterations_with_two_env_runners_report_the_verification(local_ray):
    algo = ppo_config(num_env_runners=2).training(**SMALL).build_algo()
    try:
        for _ in range(2):
            results = algo.train()
            learners = results["learners"]
            assert learners["verl/rolled_back"] == 0.0 and learners["verl/finite_parameters"] == 0.0
            assert 0.0 < learners["verl/kl"] < 0.25 and learners["verl/advantage_finite"] == 0.0
            assert 0.01 < learners["verl/entropy"] <= math.log(50) + 1e-6  # nats, 50 tokens
        assert results["env_runners"]["num_env_steps_sampled_lifetime"] >= 800
        assert algo.config.num_env_runners == 2 and len(algo.env_runner_group.healthy_worker_ids()) == 2
    finally:
        algo.stop()


def test_a_forced_failure_restores_the_module_exactly(local_ray):
    config = ppo_config(num_env_runners=2, kl_threshold=1e-12).training(lr=1e-3, **SMALL)
    algo = config.build_algo()
    try:
        before = {k: v.clone() for k, v in learner_module(algo).state_dict().items()}
        results = algo.train()
        assert results["learners"]["verl/rolled_back"] == 1.0 and results["learners"]["verl/kl"] > 1e-12
        after = learner_module(algo).state_dict()
        assert before.keys() == after.keys() and all(th.equal(before[k], after[k]) for k in before)
        optimizers = algo.learner_group._learner._named_optimizers.values()
        assert all(optimizer.state_dict()["state"] == {} for optimizer in optimizers)  # Adam as before: untouched
    finally:
        algo.stop()


def test_a_users_check_runs_on_the_update_and_can_undo_it(local_ray):
    seen = []

    def no_update_please(ctx):  # the project's UpdateContext, as for VerifiedPPO's checks
        seen.append(float(ctx.kl.mean()))
        return CheckResult(False, float(ctx.kl.mean()), 0.0, "refuses every update")

    algo = ppo_config(num_env_runners=2, checks=[no_update_please]).training(lr=1e-3, **SMALL).build_algo()
    try:
        before = {k: v.clone() for k, v in learner_module(algo).state_dict().items()}
        learners = algo.train()["learners"]
        assert learners["verl/rolled_back"] == 1.0 and learners["verl/no_update_please"] == seen[0] > 0.0
        assert all(th.equal(before[k], v) for k, v in learner_module(algo).state_dict().items())
    finally:
        algo.stop()


def test_without_ray_ppo_config_names_the_extra():
    script = """
import sys
sys.modules["ray"] = None
import verl_sb3.rllib
try:
    verl_sb3.rllib.ppo_config()
except ImportError as error:
    assert '"rllib"' in str(error), error
    print("ok")
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr

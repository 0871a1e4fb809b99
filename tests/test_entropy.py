"""The entropy controller on any SB3 on-policy algorithm (``TargetEntropyCallback``)."""

from __future__ import annotations

import pytest
from sb3_contrib import RecurrentPPO
from stable_baselines3 import PPO
from stable_baselines3.common.callbacks import BaseCallback, CallbackList

from textenv_gym.sb3_vec_env import make_textgen_vec_env
from verl_sb3 import EntropyController, TargetEntropyCallback
from verl_sb3.entropy import rollout_entropy
from verl_sb3.policies import SLMLstmPolicy


class Watch(BaseCallback):
    """Records, at each rollout's end, the entropy the callback will read and the coefficient before it."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def _on_rollout_end(self):
        self.seen.append((self.model._n_updates, rollout_entropy(self.model), self.model.ent_coef))

    def _on_step(self):
        return True


@pytest.mark.parametrize(
    "cls, policy, kwargs",
    [
        (PPO, "MlpPolicy", dict(policy_kwargs=dict(net_arch=[16]))),
        (RecurrentPPO, SLMLstmPolicy, dict(policy_kwargs=dict(lstm_hidden_size=16, n_lstm_layers=1, embedding_dim=8))),
    ],
)
def test_the_coefficient_follows_dual_ascent_once_per_update(cls, policy, kwargs):
    env = make_textgen_vec_env(2, seed=0, vocab_size=8, max_length=6)
    model = cls(policy, env, n_steps=12, batch_size=24, n_epochs=2, seed=0, ent_coef=0.01, **kwargs)
    watch, control = Watch(), TargetEntropyCallback(target_entropy=5.0, entropy_coef_rate=0.1)
    model.learn(4 * 24, callback=CallbackList([watch, control]), log_interval=None)  # the logger keeps the figures
    expected = 0.01
    for n_updates, entropy, coefficient in watch.seen:
        assert coefficient == pytest.approx(expected)
        if n_updates > 0:  # not on the first rollout: no update yet
            expected = max(0.0, expected + 0.1 * (5.0 - entropy))  # ln 8 < 5: it rises
    assert len(watch.seen) == 4 and model.ent_coef == pytest.approx(expected) and model.ent_coef > 0.01
    assert model.logger.name_to_value["verl/ent_coef"] == model.ent_coef


def test_the_controller_falls_to_zero_above_its_target_and_ignores_broken_figures():
    controller = EntropyController(target_entropy=1.0, entropy_coef_rate=0.5)
    assert controller.next_coefficient(0.1, entropy=2.0) == 0.0
    assert controller.next_coefficient(0.1, entropy=0.5) == pytest.approx(0.35)
    assert controller.next_coefficient(0.1, entropy=float("nan")) == 0.1
    with pytest.raises(ValueError, match="entropy_coef_rate"):
        EntropyController(1.0, 0.0)
    with pytest.raises(ValueError, match="target_entropy"):
        TargetEntropyCallback(-1.0)

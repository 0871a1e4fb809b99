"""TextGen-v0 the way Stable-Baselines3 and Gymnasium users build environments: env ids,
``make_vec_env``, ``SubprocVecEnv``, and ``render_mode="rgb_array"`` frames for video recorders."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.wrappers import RecordVideo
from sb3_contrib import RecurrentPPO
from stable_baselines3 import PPO
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.vec_env import SubprocVecEnv

import textenv_gym  # noqa: F401  (registers TextGen-v0)
from textenv_gym.rendering import FRAME_SIZE, text_frame
from textenv_gym.sb3_vec_env import make_textgen_vec_env
from verl_sb3 import VerifiedPPO, VerifiedRecurrentPPO

SMALL = dict(vocab_size=8, max_length=5)
FRAME = (FRAME_SIZE[1], FRAME_SIZE[0], 3)


def test_an_rgb_frame_shows_the_text_and_has_a_fixed_size():
    blank, short, long = text_frame(""), text_frame("river ocean"), text_frame(" ".join(["mountain"] * 500))
    assert blank.shape == short.shape == long.shape == FRAME and short.dtype == np.uint8
    assert (blank == 255).all() and (short < 128).any()  # black text on white
    assert not np.array_equal(short, text_frame("ocean river"))


def test_every_form_renders_rgb_frames():
    env = gym.make("TextGen-v0", render_mode="rgb_array", **SMALL)
    env.reset(seed=0, options={"prompt": [1, 2]})
    assert env.render().shape == FRAME and np.array_equal(
        env.render(), text_frame(env.unwrapped.tokenizer.decode([1, 2]))
    )
    vector = gym.make_vec(
        "TextGen-v0", num_envs=3, vectorization_mode="vector_entry_point", render_mode="rgb_array", **SMALL
    )
    vector.reset(seed=0)
    frames = vector.render()
    assert len(frames) == 3 and all(frame.shape == FRAME for frame in frames)
    sb3 = make_textgen_vec_env(4, seed=0, render_mode="rgb_array", **SMALL)
    sb3.reset()
    assert len(sb3.get_images()) == 4 and sb3.render().shape == (2 * FRAME[0], 2 * FRAME[1], 3)  # SB3 tiles them
    with pytest.raises(ValueError, match="render_mode"):
        make_textgen_vec_env(2, render_mode="human")


def test_gymnasiums_video_recorder_records_an_episode(tmp_path):
    pytest.importorskip("moviepy")
    env = RecordVideo(gym.make("TextGen-v0", render_mode="rgb_array", **SMALL), str(tmp_path))
    env.reset(seed=0)
    for _ in range(5):
        env.step(env.action_space.sample())
    env.close()
    assert list(tmp_path.glob("*.mp4"))


@pytest.mark.parametrize(
    "cls, policy", [(PPO, "MlpPolicy"), (RecurrentPPO, "MlpLstmPolicy"), (VerifiedPPO, "MlpPolicy")]
)
def test_an_env_id_string_trains(cls, policy):
    model = cls(policy, "TextGen-v0", n_steps=40, batch_size=40, n_epochs=1, seed=0)
    model.learn(80)
    assert model.num_timesteps == 80


def test_make_vec_env_trains_ppo_and_the_verified_slm():
    env = make_vec_env("TextGen-v0", n_envs=4, seed=0, env_kwargs=dict(forbidden_tokens=[3], **SMALL))
    PPO("MlpPolicy", env, n_steps=10, batch_size=40, seed=0).learn(80)
    model = VerifiedRecurrentPPO(
        "SLMLstmPolicy",
        env,
        n_steps=10,
        batch_size=40,
        seed=0,
        max_reuse_rise=3.0,
        policy_kwargs=dict(lstm_hidden_size=16, n_lstm_layers=1, embedding_dim=8),
    )
    assert model.forbidden_tokens == (3,)  # read from the scalar environments, as from TextGen's own VecEnv
    model.learn(80)
    assert len(model.verification_log) + model.n_undone == 2


def test_subprocess_environments_train():
    """In a worker, Gymnasium imports ``textenv_gym`` when the id names it (``module:id``)."""
    env = make_vec_env("textenv_gym:TextGen-v0", n_envs=2, seed=0, vec_env_cls=SubprocVecEnv, env_kwargs=SMALL)
    try:
        model = VerifiedPPO("MlpPolicy", env, n_steps=10, batch_size=20, seed=0)
        model.learn(40)
        assert len(model.verification_log) == 2
    finally:
        env.close()


def test_tensorboard_log_writes_event_files(tmp_path):
    model = VerifiedPPO(
        "MlpPolicy",
        make_textgen_vec_env(2, seed=0, **SMALL),
        n_steps=10,
        batch_size=20,
        seed=0,
        tensorboard_log=str(tmp_path),
    )
    model.learn(40)
    events = list(tmp_path.rglob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0

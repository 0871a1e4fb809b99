"""Hugging Face tokenizers as the environments' vocabulary and causal LMs as the verified policy.

Every model and tokenizer is built offline (``verl_sb3.hf.tiny``), saved with ``save_pretrained``
and read back with ``from_pretrained``: the real loading code, no download.
"""

from __future__ import annotations

import copy
import shutil
import subprocess
import sys

import gymnasium as gym
import numpy as np
import pytest
import torch as th
from tensor_asserts import assert_same_tensors

pytest.importorskip("transformers")
pytest.importorskip("peft")

from textenv_gym.hf_tokenizer import HFTokenizer
from textenv_gym.sb3_vec_env import make_textgen_vec_env
from textenv_gym.tasks import task_kwargs
from verl_sb3 import VerifiedPPO
from verl_sb3.categorical import categorical_kl
from verl_sb3.hf.tiny import save_tiny_model, word_tokenizer
from verl_sb3.rollout import LogitsRecorder, policy_kind
from verl_sb3.sft import supervised_warm_start
from verl_sb3.task_evaluation import evaluate_task

ENVS, STEPS = 4, 8


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def model_dir(request, tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp(request.param), request.param)


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("gpt2"), "gpt2")


def hf_model(folder, env=None, policy_kwargs=None, **kwargs):
    env = env if env is not None else make_textgen_vec_env(ENVS, seed=0, tokenizer=folder, max_length=STEPS)
    settings = dict(n_steps=STEPS, batch_size=16, n_epochs=2, learning_rate=1e-3, seed=0)
    settings.update(kwargs)
    return VerifiedPPO("HFCausalLMPolicy", env, policy_kwargs={"model": folder, **(policy_kwargs or {})}, **settings)


def observations(model, n=6):
    env = model.get_env()
    obs = [env.reset()]
    for _ in range(n - 1):
        obs.append(env.step(np.array([env.action_space.sample() for _ in range(env.num_envs)]))[0])
    return th.as_tensor(np.concatenate(obs))


def logits_of(model, obs):
    with th.no_grad():
        return model.policy.get_distribution(obs).distribution.logits


# ---------------------------------------------------------------------- the tokenizer-backed environment
def test_the_tokenizer_is_the_vocabulary_and_round_trips_text(gpt2_dir):
    env = gym.make("TextGen-v0", tokenizer=gpt2_dir, max_length=8)
    tokenizer = word_tokenizer()
    assert env.action_space.n == len(tokenizer) and env.unwrapped.pad_id == len(tokenizer)
    assert env.unwrapped.eos_id == tokenizer.eos_token_id  # the tokenizer's end of sequence by default
    hf = env.unwrapped.tokenizer
    assert isinstance(hf, HFTokenizer)
    assert hf.encode("The") == [tokenizer.unk_token_id] != hf.encode("the")  # the case is kept: no lower-casing
    ids = hf.encode("model learns to write")
    assert ids == tokenizer("model learns to write", add_special_tokens=False)["input_ids"]
    assert hf.decode(ids) == "model learns to write"
    obs, _ = env.reset(options={"prompt": "model learns"})
    assert obs[:2].tolist() == ids[:2]
    obs, _, terminated, _, _ = env.step(tokenizer.eos_token_id)
    assert terminated  # the end token ends the episode


def test_the_tokenizer_environment_passes_both_checkers(gpt2_dir):
    from gymnasium.utils.env_checker import check_env as gym_check
    from stable_baselines3.common.env_checker import check_env as sb3_check

    env = gym.make("TextGen-v0", tokenizer=gpt2_dir, max_length=8).unwrapped
    gym_check(env)
    sb3_check(env, warn=False)


def test_a_task_on_the_tokenizer_scores_the_reference_answer(gpt2_dir):
    env = gym.make("TextGen-Reverse-v0", tokenizer=gpt2_dir).unwrapped
    obs, info = env.reset(seed=0)
    answer = [*env.tokenizer.encode(info["ground_truth"]), env.eos_id]
    total = 0.0
    for token in answer:
        obs, reward, terminated, _, step_info = env.step(token)
        total += reward
    assert terminated and total == pytest.approx(1.0)  # the score alone, unchanged on top of the tokenizer
    assert step_info["reward_components"]["score"] == pytest.approx(1.0)


def test_tokenizer_arguments_are_checked_by_name(gpt2_dir, tmp_path):
    with pytest.raises(ValueError, match="vocabulary: not used with tokenizer"):
        gym.make("TextGen-v0", tokenizer=gpt2_dir, vocabulary=["a", "b"])
    with pytest.raises(ValueError, match="vocab_size"):
        gym.make("TextGen-v0", tokenizer=gpt2_dir, vocab_size=5)
    with pytest.raises(ValueError, match="tokenizer: .* is neither a folder nor a model in the local Hugging Face"):
        gym.make("TextGen-v0", tokenizer=str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="tokenizer: 'someone/uncached-model' is neither a folder nor"):
        gym.make("TextGen-v0", tokenizer="someone/uncached-model")  # not in the cache: no server is asked
    with pytest.raises(ValueError, match="tokenizer: expected a tokenizer folder"):
        gym.make("TextGen-v0", tokenizer=3)
    with pytest.raises(ValueError, match="eos_token: expected one token"):
        gym.make("TextGen-v0", tokenizer=gpt2_dir, eos_token="two words")


def test_a_name_in_the_local_cache_is_read_from_it(gpt2_dir, tmp_path, monkeypatch):
    import huggingface_hub.constants

    snapshot = tmp_path / "hub" / "models--someone--tiny-gpt2" / "snapshots" / "0123abc"
    shutil.copytree(gpt2_dir, snapshot)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("0123abc")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    env = make_textgen_vec_env(ENVS, seed=0, tokenizer="someone/tiny-gpt2", max_length=STEPS)
    model = hf_model("someone/tiny-gpt2", env)
    assert env.action_space.n == len(word_tokenizer()) and model.policy.bos_token_id == word_tokenizer().bos_token_id


# ---------------------------------------------------------------------- the policy
def test_the_policy_gives_the_models_own_next_token_logits(model_dir):
    from transformers import AutoModelForCausalLM

    model = hf_model(model_dir)
    lm = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True).eval()
    obs = observations(model)
    pad = model.observation_space.high[0]
    logits = logits_of(model, obs)
    bos = model.policy.bos_token_id
    for row in range(0, len(obs), 5):
        tokens = [int(t) for t in obs[row] if t != pad]
        with th.no_grad():
            expected = lm(th.tensor([[bos, *tokens]])).logits[0, -1, : model.action_space.n]
        th.testing.assert_close(logits[row], th.log_softmax(expected, -1), atol=2e-5, rtol=0)


def test_the_rollout_reuses_the_key_value_cache_and_gives_the_same_logits(model_dir):
    model = hf_model(model_dir)
    widths = []
    hook = model.policy.mlp_extractor.body.register_forward_hook(
        lambda module, args, kwargs, output: widths.append(kwargs["input_ids"].shape[1]), with_kwargs=True
    )
    with LogitsRecorder(model.policy, ENVS, STEPS) as recorder:
        model.policy.set_training_mode(False)
        _, callback = model._setup_learn(ENVS * STEPS, None)
        model.collect_rollouts(model.get_env(), callback, model.rollout_buffer, STEPS)
        recorded = recorder.logits
    hook.remove()
    # one episode of STEPS tokens per environment: the first step reads BOS, each later one only its
    # new token (without the cache: 1, 2, ..., STEPS); then the critic reads the next episode's start
    assert widths == [1] * (STEPS + 1)
    kind = policy_kind(model.policy)
    batch = kind.rollout_batch(model.rollout_buffer, model.device)
    recomputed = logits_of(model, batch.observations)
    th.testing.assert_close(recorded.reshape(-1, recorded.shape[-1]), recomputed, atol=2e-5, rtol=0)


def rollout_tokens_read(model, n_steps):
    """The tokens the body read while collecting a rollout; the rollout's logits, recorded and recomputed."""
    read = []
    hook = model.policy.mlp_extractor.body.register_forward_hook(
        lambda module, args, kwargs, output: read.append(kwargs["input_ids"].numel()), with_kwargs=True
    )
    with LogitsRecorder(model.policy, model.n_envs, n_steps) as recorder:
        _, callback = model._setup_learn(model.n_envs * n_steps, None)
        model.policy.set_training_mode(False)
        model.collect_rollouts(model.get_env(), callback, model.rollout_buffer, n_steps)
        recorded = recorder.logits
    hook.remove()
    batch = policy_kind(model.policy).rollout_batch(model.rollout_buffer, model.device)
    return sum(read), recorded.reshape(-1, recorded.shape[-1]), logits_of(model, batch.observations)


def test_on_a_task_restarted_episodes_join_a_new_cohort_and_the_others_keep_their_cache(gpt2_dir):
    task = task_kwargs("TextGen-Reverse-v0", length=3, tokenizer=gpt2_dir)
    read = {}
    for cache in (True, False):
        env = make_textgen_vec_env(ENVS, seed=0, **task)
        model = hf_model(gpt2_dir, env, n_steps=24, policy_kwargs={"kv_cache": cache})
        read[cache], recorded, recomputed = rollout_tokens_read(model, 24)
        th.testing.assert_close(recorded, recomputed, atol=2e-5, rtol=0)
        starts = model.rollout_buffer.episode_starts[1:]
        assert starts.sum() > 0 and (starts.sum(axis=1) < ENVS).any()  # episodes restart at different steps
    assert read[True] < 0.5 * read[False]


def test_without_the_cache_training_is_the_same(gpt2_dir):
    cached = hf_model(gpt2_dir)
    cached.learn(ENVS * STEPS)
    plain = hf_model(gpt2_dir, policy_kwargs={"kv_cache": False})  # seeded again: the same draws
    plain.learn(ENVS * STEPS)
    # the same actions sampled (the logits agree to float rounding), so the same training to rounding
    assert np.array_equal(cached.rollout_buffer.actions, plain.rollout_buffer.actions)
    for name, value in cached.policy.state_dict().items():
        th.testing.assert_close(value, plain.policy.state_dict()[name], atol=1e-5, rtol=0)


@pytest.mark.parametrize("estimator, critic", [("gae", "shared"), ("grpo", "none"), ("gae", "detached")])
def test_verified_updates_on_textgen_and_a_task(gpt2_dir, estimator, critic):
    kwargs = dict(policy_kwargs={"critic": critic}, advantage_estimator=estimator)
    group = dict(group_size=2) if estimator == "grpo" else {}
    env = make_textgen_vec_env(ENVS, seed=0, tokenizer=gpt2_dir, max_length=STEPS, **group)
    model = hf_model(gpt2_dir, env, **kwargs)
    before = copy.deepcopy(model.policy.state_dict())
    model.learn(3 * ENVS * STEPS)
    assert len(model.verification_log) == 3 and all(e["accepted"] for e in model.verification_log)
    assert not th.equal(
        before["mlp_extractor.model.lm_head.weight"], model.policy.state_dict()["mlp_extractor.model.lm_head.weight"]
    )
    task = make_textgen_vec_env(
        ENVS, seed=0, **group, **task_kwargs("TextGen-Reverse-v0", length=2, tokenizer=gpt2_dir)
    )
    model = hf_model(gpt2_dir, task, n_steps=12, batch_size=24, **kwargs)
    model.learn(2 * ENVS * 12)
    assert all(e["accepted"] for e in model.verification_log)
    model.env_kwargs = task_kwargs("TextGen-Reverse-v0", length=2, tokenizer=gpt2_dir)
    figures = evaluate_task(model, k=2, max_prompts=4)
    assert 0.0 <= figures["pass@1"] <= 1.0 and figures["n_prompts"] == 4


def test_a_forced_failure_rolls_the_update_back_exactly(gpt2_dir):
    class Probe(VerifiedPPO):
        def train(self):
            self.before = (copy.deepcopy(self.policy.state_dict()), copy.deepcopy(self.policy.optimizer.state_dict()))
            super().train()

    env = make_textgen_vec_env(ENVS, seed=0, tokenizer=gpt2_dir, max_length=STEPS)
    model = Probe(
        "HFCausalLMPolicy",
        env,
        policy_kwargs={"model": gpt2_dir},
        n_steps=STEPS,
        batch_size=16,
        learning_rate=1e-3,
        seed=0,
        kl_threshold=1e-12,
        max_backtracks=1,
    )
    model.learn(2 * ENVS * STEPS)
    params, optimizer = model.before
    assert_same_tensors(dict(model.policy.state_dict()), params)
    assert_same_tensors(copy.deepcopy(model.policy.optimizer.state_dict()), optimizer)
    assert [entry["rolled_back"] for entry in model.verification_log] == [True, True]


def test_reference_kl_control_works_with_it(gpt2_dir):
    model = hf_model(gpt2_dir, ref_kl_coef=0.1, ref_kl_estimator="exact")
    model.learn(2 * ENVS * STEPS)
    assert all(e["accepted"] for e in model.verification_log)
    assert model.ref_policy is not None and model.ref_policy.mlp_extractor.rollout_cache.tokens is None


@pytest.mark.parametrize("lora", [None, {"r": 4, "lora_alpha": 8}])
def test_save_and_load_give_identical_logits_without_pickled_models(model_dir, tmp_path, lora):
    folder = shutil.copytree(model_dir, tmp_path / "base")
    model = hf_model(str(folder), policy_kwargs={"lora": lora})
    model.learn(ENVS * STEPS)
    path = tmp_path / "model.zip"
    model.save(path)
    shutil.rmtree(folder)  # the checkpoint holds every weight and the configuration: no folder needed
    loaded = VerifiedPPO.load(path, env=model.get_env())  # not trusted: nothing pickled to build
    obs = observations(model)
    assert th.equal(logits_of(model, obs), logits_of(loaded, obs))
    assert th.equal(model.policy.predict_values(obs), loaded.policy.predict_values(obs))


def test_lora_trains_only_the_adapters_and_the_value_head(gpt2_dir):
    model = hf_model(gpt2_dir, policy_kwargs={"lora": {"r": 4, "lora_alpha": 8, "target_modules": ["c_attn"]}})
    before = copy.deepcopy(model.policy.state_dict())
    model.learn(2 * ENVS * STEPS)
    after = model.policy.state_dict()
    changed = {name for name in before if not th.equal(before[name], after[name])}
    assert changed and all("lora_" in name or name.startswith("value_net.") for name in changed)
    assert any("lora_" in name for name in changed) and "value_net.weight" in changed
    trainable = {id(p) for p in model.policy.parameters() if p.requires_grad}
    optimised = {id(p) for group in model.policy.optimizer.param_groups for p in group["params"]}
    assert optimised == trainable


def test_policy_arguments_are_checked_by_name(gpt2_dir, tmp_path):
    env = make_textgen_vec_env(ENVS, seed=0, tokenizer=gpt2_dir, max_length=STEPS)
    with pytest.raises(ValueError, match="needs model="):
        VerifiedPPO("HFCausalLMPolicy", env)
    with pytest.raises(ValueError, match=r"policy_kwargs\['model'\]: .* is neither a folder nor a model"):
        VerifiedPPO("HFCausalLMPolicy", env, policy_kwargs={"model": str(tmp_path / "none")})
    with pytest.raises(ValueError, match="critic"):
        VerifiedPPO("HFCausalLMPolicy", env, policy_kwargs={"model": gpt2_dir, "critic": "big"})
    small = make_textgen_vec_env(ENVS, seed=0, vocab_size=200, max_length=STEPS)
    with pytest.raises(ValueError, match="fewer than the action space"):
        VerifiedPPO("HFCausalLMPolicy", small, policy_kwargs={"model": gpt2_dir})
    long = make_textgen_vec_env(ENVS, seed=0, tokenizer=gpt2_dir, max_length=300)
    with pytest.raises(ValueError, match="positions"):
        VerifiedPPO("HFCausalLMPolicy", long, policy_kwargs={"model": gpt2_dir})


def test_more_policy_arguments_are_checked_by_name(gpt2_dir):
    env = make_textgen_vec_env(ENVS, seed=0, tokenizer=gpt2_dir, max_length=STEPS)
    for kwargs, message in [
        ({"kv_cache": "no"}, "kv_cache: expected True or False"),
        ({"model_dtype": "int8"}, "model_dtype: expected None or one of"),
        ({"share_features_extractor": False}, "share_features_extractor: must be True"),
        ({"lora": {"rank": 4}}, "lora: not settings peft's LoraConfig"),
        ({"lora": {"task_type": "SEQ_CLS"}}, "lora: task_type must be 'CAUSAL_LM'"),
    ]:
        with pytest.raises(ValueError, match=message):
            VerifiedPPO("HFCausalLMPolicy", env, policy_kwargs={"model": gpt2_dir, **kwargs})
    kernel = {"model_type": "gpt2", "attn_implementation": "kernels-community/x"}
    auto_map = {"model_type": "gpt2", "auto_map": {}}
    for config, message in [("gpt2", "expected a configuration dict"), (auto_map, "auto_map"),
                            (kernel, "attn_implementation")]:  # fmt: skip
        with pytest.raises(ValueError, match=f"model_config: .*{message}"):
            VerifiedPPO("HFCausalLMPolicy", env, policy_kwargs={"model_config": config})


def test_the_model_runs_in_evaluation_mode_also_while_training(gpt2_dir):
    model = hf_model(gpt2_dir)
    model.policy.set_training_mode(True)
    assert model.policy.training and not model.policy.language_model.training
    assert not any(module.training for module in model.policy.language_model.modules())


def test_the_model_keeps_the_dtype_it_is_given(gpt2_dir):
    model = hf_model(gpt2_dir, policy_kwargs={"model_dtype": "bfloat16"})
    assert {p.dtype for p in model.policy.language_model.parameters()} == {th.bfloat16}
    model.learn(ENVS * STEPS)
    assert logits_of(model, observations(model, 2)).dtype == th.float32  # the distribution in float32
    assert model.verification_log[-1]["accepted"] and model.policy_kwargs["model_dtype"] == "bfloat16"


def test_a_model_object_is_copied_not_changed(gpt2_dir):
    from transformers import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_pretrained(gpt2_dir)
    before = copy.deepcopy(lm.state_dict())
    first = hf_model(gpt2_dir, policy_kwargs={"model": lm, "lora": {"r": 4, "target_modules": ["c_attn"]}})
    second = hf_model(gpt2_dir, policy_kwargs={"model": lm})
    first.learn(ENVS * STEPS)
    second.learn(ENVS * STEPS)
    assert_same_tensors(dict(lm.state_dict()), before)  # no LoRA layers, no training: the caller's model as it was
    assert lm.transformer.drop.p == 0.1  # its dropout too
    assert not th.equal(second.policy.language_model.lm_head.weight, lm.lm_head.weight)  # trained a copy
    assert second.policy.language_model.lm_head.weight.data_ptr() != lm.lm_head.weight.data_ptr()


def test_a_bos_id_equal_to_the_padding_id_is_still_read(gpt2_dir):
    from transformers import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_pretrained(gpt2_dir).eval()
    env = make_textgen_vec_env(2, seed=0, vocab_size=2, max_length=4)  # V = 2 = the model's BOS id
    model = hf_model(gpt2_dir, env)
    assert model.policy.bos_token_id == 2 == env.observation_space.high[0]
    logits = logits_of(model, th.as_tensor(env.reset()))
    with th.no_grad():
        expected = lm(th.tensor([[2]])).logits[0, -1, :2].log_softmax(-1)
    th.testing.assert_close(logits[0], expected, atol=2e-5, rtol=0)


def test_a_tampered_checkpoint_cannot_load_another_model_or_ask_for_more_memory(gpt2_dir, tmp_path):
    import json
    import zipfile

    from verl_sb3.trust import UntrustedCheckpointError

    model = hf_model(gpt2_dir)
    path = tmp_path / "model.zip"
    model.save(path)

    def tampered(change):
        with zipfile.ZipFile(path) as archive:
            entries = {name: archive.read(name) for name in archive.namelist()}
        data = json.loads(entries["data"])
        change(data["policy_kwargs"])
        entries["data"] = json.dumps(data).encode()
        out = tmp_path / "tampered.zip"
        with zipfile.ZipFile(out, "w") as archive:
            for name, content in entries.items():
                archive.writestr(name, content)
        return out

    other = tampered(lambda kwargs: kwargs.update(model=gpt2_dir))
    with pytest.raises(UntrustedCheckpointError, match="names a model to load"):
        VerifiedPPO.load(other, env=model.get_env())
    big = tampered(lambda kwargs: kwargs["model_config"].update(n_embd=4096, n_layer=48))
    with pytest.raises(UntrustedCheckpointError, match="describes .* bytes of weights, but the file holds only"):
        VerifiedPPO.load(big, env=model.get_env())
    kernel = tampered(lambda kwargs: kwargs["model_config"].update(attn_implementation="kernels-community/flash"))
    with pytest.raises(UntrustedCheckpointError, match="attn_implementation"):
        VerifiedPPO.load(kernel, env=model.get_env())
    nested = tampered(lambda kwargs: kwargs["model_config"].update(text_config={"auto_map": {"AutoModel": "x.Y"}}))
    with pytest.raises(UntrustedCheckpointError, match=r"model_config\['text_config'\]: names custom code"):
        VerifiedPPO.load(nested, env=model.get_env())
    dtype = tampered(lambda kwargs: kwargs.update(model_dtype="complex64"))
    with pytest.raises(UntrustedCheckpointError, match=r"policy_kwargs\['model_dtype'\]: expected one of"):
        VerifiedPPO.load(dtype, env=model.get_env())


def test_tokenizer_tokens_that_do_not_exist_are_refused(gpt2_dir):
    with pytest.raises(ValueError, match="eos_token: expected one token of the tokenizer"):
        gym.make("TextGen-v0", tokenizer=gpt2_dir, eos_token="<end>")  # not a token: not silently <unk>
    tokenizer = word_tokenizer()
    tokenizer.eos_token = None
    with pytest.raises(ValueError, match="the tokenizer has no end-of-sequence token, .* give eos_token="):
        task_kwargs("TextGen-Reverse-v0", tokenizer=tokenizer)
    assert (
        gym.make("TextGen-Reverse-v0", tokenizer=tokenizer, eos_token="=").unwrapped.eos_id
        == tokenizer("=")["input_ids"][0]
    )


# ---------------------------------------------------------------------- the exact KL at a large vocabulary
def test_the_chunked_exact_kl_equals_the_unchunked_one():
    generator = th.Generator().manual_seed(0)
    log_p = th.randn(300, 50_257, generator=generator).log_softmax(-1)
    log_q = th.randn(300, 50_257, generator=generator).log_softmax(-1)
    log_p[7, :10] = -th.inf  # zero probabilities in one chunk
    log_p = log_p.log_softmax(-1)
    whole = categorical_kl(log_p, log_q, chunk_elements=1 << 40)
    chunked = categorical_kl(log_p, log_q)  # 83 rows at a time
    assert th.equal(whole, chunked) and bool(th.isfinite(chunked).all())


# ---------------------------------------------------------------------- the supervised warm start
@pytest.mark.parametrize("policy", ["hf", "SLMTransformerPolicy", "SLMLstmPolicy"])
def test_the_warm_start_lowers_the_answer_loss(gpt2_dir, policy):
    from verl_sb3 import VerifiedRecurrentPPO

    tokenizer = {"tokenizer": gpt2_dir} if policy == "hf" else {}
    kwargs = task_kwargs("TextGen-Reverse-v0", length=2, **tokenizer)
    env = make_textgen_vec_env(ENVS, seed=0, **kwargs)
    if policy == "hf":
        model = hf_model(gpt2_dir, env, n_steps=12, batch_size=24)
    else:
        cls = VerifiedRecurrentPPO if policy == "SLMLstmPolicy" else VerifiedPPO
        model = cls(policy, env, n_steps=12, batch_size=24, seed=0)
    records = kwargs["prompts"][:16]
    result = supervised_warm_start(model, records, epochs=8, batch_size=4, learning_rate=3e-3)
    assert result.n_records == 16 and result.n_tokens == 16 * 3  # two symbols and the end token
    assert result.loss_after < 0.7 * result.loss_before
    model.learn(2 * ENVS * 12)  # RL goes on from it
    assert all(e["accepted"] for e in model.verification_log)


def test_a_diverging_warm_start_is_undone_and_refused():
    env = make_textgen_vec_env(ENVS, seed=0, **task_kwargs("TextGen-Reverse-v0", length=2))
    model = VerifiedPPO("SLMTransformerPolicy", env, n_steps=12, batch_size=24, ref_kl_coef=0.1)
    before = copy.deepcopy(model.policy.state_dict())
    reference = copy.deepcopy(model.ref_policy.state_dict())
    records = task_kwargs("TextGen-Reverse-v0", length=2)["prompts"][:8]
    with pytest.raises(ValueError, match="learning_rate: the warm start diverged .* the policy is restored"):
        supervised_warm_start(model, records, epochs=3, batch_size=2, learning_rate=1e6)
    assert_same_tensors(dict(model.policy.state_dict()), before)
    assert_same_tensors(dict(model.ref_policy.state_dict()), reference)
    with pytest.raises(ValueError, match="learning_rate: expected a number in"):
        supervised_warm_start(model, records, learning_rate=float("inf"))


def test_warm_start_records_are_checked_by_name(gpt2_dir):
    env = make_textgen_vec_env(ENVS, seed=0, **task_kwargs("TextGen-Reverse-v0", length=2))
    model = VerifiedPPO("SLMTransformerPolicy", env, n_steps=12, batch_size=24)
    with pytest.raises(ValueError, match=r"records\[1\]: expected a dict with 'prompt'"):
        supervised_warm_start(model, [{"prompt": "a b =", "answer": "b a"}, {"prompt": "a"}])
    with pytest.raises(ValueError, match=r"records\[0\]: prompt and answer hold 8 tokens"):
        supervised_warm_start(model, [{"prompt": "a b =", "answer": "b a b a"}])
    with pytest.raises(ValueError, match="records: expected a non-empty list"):
        supervised_warm_start(model, [])
    for answer in ([4.7], [True], None, 5, []):  # not silently made integers
        with pytest.raises(ValueError, match=r"records\[0\]: the answer must be"):
            supervised_warm_start(model, [{"prompt": "a b =", "answer": answer}])
    with pytest.raises(ValueError, match=r"records\[0\]: prompt: expected integer token ids"):
        supervised_warm_start(model, [{"prompt": [1.5], "answer": "a"}])


# ---------------------------------------------------------------------- without the extra
def test_without_transformers_the_packages_import_and_name_the_extra():
    script = """
import sys
sys.modules["transformers"] = None  # as if not installed
import textenv_gym, verl_sb3, verl_sb3.hf, gymnasium as gym
from verl_sb3.sft import supervised_warm_start
gym.make("TextGen-v0")
for make in (lambda: gym.make("TextGen-v0", tokenizer="some/folder"),
             lambda: verl_sb3.VerifiedPPO("HFCausalLMPolicy", "TextGen-v0", policy_kwargs={"model": "x"})):
    try:
        make()
    except ImportError as error:
        assert '"hf"' in str(error) and "pip install" in str(error), error
    else:
        raise AssertionError("no ImportError")
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"

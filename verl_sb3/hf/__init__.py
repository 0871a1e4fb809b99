"""Hugging Face causal language models as verified policies (:class:`HFCausalLMPolicy`).

Needs the optional extra ``hf`` (transformers, tokenizers, peft): ``pip install "textenv-gym[hf]"``.
Importing this package does not need it; building a policy or a tokenizer without it raises an
ImportError naming the extra.
"""

from verl_sb3.hf.policy import HFCausalLMPolicy, load_causal_lm

__all__ = ["HFCausalLMPolicy", "load_causal_lm"]

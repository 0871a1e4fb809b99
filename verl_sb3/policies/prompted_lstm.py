"""An LSTM run over a batch of environment steps, reading the whole prompt at each episode start.

sb3-contrib's recurrent policies feed one observation per step and carry the LSTM state. For a
language model whose observation is the whole sequence so far, that loses the prompt: at an
episode start the state is reset and only the newest token would be read. :func:`prompted_lstm`
feeds, at a step whose ``episode_starts`` flag is 1, the beginning-of-sequence token followed
by *all* ``n`` tokens of the observed sequence ``[BOS, s_0, ..., s_{n-1}]`` from a zero state, and
at any other step only the last token ``s_{n-1}`` (BOS if the sequence is empty) from the carried
state. Since the environment appends the chosen token to the sequence, the output at every step
is exactly that of the LSTM run over ``[BOS, s_0, ..., s_{n-1}]`` from a zero state: during data
collection (one step at a time), for the bootstrap values, and in training (the padded sequences
of ``RecurrentRolloutBuffer``, including episode starts in the middle of a sequence).
"""

from __future__ import annotations

import torch as th
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from verl_sb3.tokens import last_tokens, sequence_lengths

LSTMStates = tuple[th.Tensor, th.Tensor]


def prompted_lstm(
    lstm: nn.LSTM,
    embedding: nn.Embedding,
    tokens: th.Tensor,
    lstm_states: LSTMStates,
    episode_starts: th.Tensor,
    bos_id: int,
) -> tuple[th.Tensor, LSTMStates]:
    """The LSTM's output at each step and its states after the last step of each sequence.

    :param lstm: the LSTM (time-major, unidirectional).
    :param embedding: the token embedding; its padding id is the token space's ``V``.
    :param tokens: token ids, ``(n_seq * seq_len, L)``, sequence-major: the ``seq_len`` steps of
        sequence 0, then of sequence 1, ...
    :param lstm_states: hidden and cell states before the first step of each sequence, each
        ``(layers, n_seq, hidden)``.
    :param episode_starts: ``(n_seq * seq_len,)``, 1 where an episode starts (state reset, BOS and
        the whole sequence read).
    :param bos_id: the beginning-of-sequence id.
    :return: ``(n_seq * seq_len, hidden)`` outputs and the states after each sequence.
    """
    hidden, cell = lstm_states
    n_seq, batch_size = hidden.shape[1], tokens.shape[0]
    if batch_size % n_seq != 0:
        raise ValueError(f"batch of {batch_size} steps cannot be split into {n_seq} sequences")
    seq_len = batch_size // n_seq
    starts = (episode_starts.reshape(n_seq, seq_len) > 0.5).to(tokens.device)
    lengths = sequence_lengths(tokens, embedding.padding_idx)
    last = last_tokens(tokens, lengths, empty=bos_id)  # also the single token fed at an episode start without prompt
    if not bool(starts[:, 1:].any()) and not bool((starts.reshape(-1) & (lengths > 0)).any()):
        # one token per step, resets only at the first step of sequences: a single LSTM call
        keep = (~starts[:, 0]).to(hidden.dtype).view(1, n_seq, 1)
        inputs = embedding(last.view(n_seq, seq_len).transpose(0, 1))  # (seq_len, n_seq, emb)
        output, (h_n, c_n) = lstm(inputs, (hidden * keep, cell * keep))
        return output.transpose(0, 1).reshape(batch_size, -1), (h_n, c_n)
    return _segments(lstm, embedding, tokens, (hidden, cell), starts, lengths, last, bos_id)


def _segments(
    lstm: nn.LSTM,
    embedding: nn.Embedding,
    tokens: th.Tensor,
    lstm_states: LSTMStates,
    starts: th.Tensor,
    lengths: th.Tensor,
    last: th.Tensor,
    bos_id: int,
) -> tuple[th.Tensor, LSTMStates]:
    """The general case: each sequence cut at its episode starts into segments (zero initial state
    at an episode start, the given state otherwise); the per-step token chunks (``[BOS, s_0 ..
    s_{n-1}]`` at an episode start, ``[s_{n-1}]`` otherwise) laid out with index arithmetic, no
    loop over time; all segments through one LSTM call on a ``PackedSequence``. A step's output is
    the LSTM output at the last token of its chunk."""
    hidden, cell = lstm_states
    n_seq, seq_len = starts.shape
    batch_size, max_length, device = tokens.shape[0], tokens.shape[1], tokens.device
    starts_flat = starts.reshape(-1)
    chunk = th.where(starts_flat, lengths + 1, th.ones_like(lengths))  # tokens fed at each step
    seg_start = starts.clone()
    seg_start[:, 0] = True
    seg_start_flat = seg_start.reshape(-1)
    seg_id = seg_start_flat.long().cumsum(0) - 1  # (batch,)
    seg_first_step = th.nonzero(seg_start_flat).squeeze(1)  # (n_seg,)
    n_seg = seg_first_step.shape[0]
    chunk_end = chunk.cumsum(0)
    chunk_begin = chunk_end - chunk  # exclusive prefix sum over the whole batch
    offset = chunk_begin - chunk_begin[seg_first_step][seg_id]  # position of the chunk in its segment
    seg_len = th.zeros(n_seg, dtype=th.long, device=device).index_add_(0, seg_id, chunk)

    n_tokens = int(chunk_end[-1])
    token_step = th.repeat_interleave(th.arange(batch_size, device=device), chunk)  # (n_tokens,)
    within = th.arange(n_tokens, device=device) - chunk_begin[token_step]  # index inside the chunk
    prompt_token = tokens[token_step, (within - 1).clamp(min=0, max=max_length - 1)]
    token_value = th.where(
        starts_flat[token_step],
        th.where(within == 0, th.full_like(prompt_token, bos_id), prompt_token),
        last[token_step],
    )
    grid = th.full((int(seg_len.max()), n_seg), embedding.padding_idx, dtype=th.long, device=device)
    grid[offset[token_step] + within, seg_id[token_step]] = token_value

    seg_seq = seg_first_step // seq_len  # sequence of each segment
    seg_keep = (~starts_flat[seg_first_step]).to(hidden.dtype).view(1, n_seg, 1)
    h_0 = hidden[:, seg_seq] * seg_keep
    c_0 = cell[:, seg_seq] * seg_keep
    packed = pack_padded_sequence(embedding(grid), seg_len.cpu(), enforce_sorted=False)
    packed_output, (h_n, c_n) = lstm(packed, (h_0.contiguous(), c_0.contiguous()))
    output, _ = pad_packed_sequence(packed_output)  # (max_seg_len, n_seg, hidden)
    latent = output[offset + chunk - 1, seg_id]  # (batch, hidden)
    last_seg = seg_id.view(n_seq, seq_len)[:, -1]
    return latent, (h_n[:, last_seg], c_n[:, last_seg])

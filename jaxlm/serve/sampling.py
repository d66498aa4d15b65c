"""Per-request sampling in the serving engine: penalties, ``min_tokens``, and log-probabilities.

:func:`sample_rows` (traced inside the engine's one compiled step) turns each row's last logits
into its next token, that token's log-probability and the top :data:`~jaxlm.serve.request.MAX_LOGPROBS`
alternatives. :class:`SamplingRows` packs each row's knobs into fixed-shape host arrays, so every
setting runs through the same program.

Order, as vLLM's sampler applies it: OpenAI's penalties on the raw logits
(``mu[j] - c[j] * frequency_penalty - (c[j] > 0) * presence_penalty``, ``c[j]`` the count of ``j``
among the tokens generated so far; platform.openai.com/docs/advanced-usage, "Frequency and presence
penalties"), stop ids masked while ``min_tokens`` is not reached, then temperature, top-k, top-p
(:func:`jaxlm.generate.filter_logits`, which sorts the vocabulary only when a row's cut cannot be
found among its best :data:`~jaxlm.generate.CANDIDATES` tokens). Greedy rows (temperature 0) take
the arg-max of the penalised logits (a greedy batch draws no random numbers); their
log-probabilities use temperature 1. What no row needs is not computed: a batch without penalties
skips counting the generated ids, and a greedy batch whose rows ask for no log-probabilities
takes the arg-max alone (no filtering, log-softmax or top-k over the vocabulary).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm.generate import filter_logits
from jaxlm.serve.request import MAX_LOGPROBS, Request

LOGPROB_FLOOR = -9999.0  # what a token removed by top-k/top-p reports (JSON has no -inf)


def penalize(logits_BxV: jax.Array, generated_BxL: jax.Array, presence_B: jax.Array, frequency_B: jax.Array) -> jax.Array:
    """float32 ``[batch, vocab]``: OpenAI's presence/frequency penalties over each row's generated ids
    (``generated_BxL`` int32, padded with -1)."""
    vocab = logits_BxV.shape[-1]
    valid = generated_BxL >= 0
    counts = jax.vmap(lambda ids, ok: jnp.zeros((vocab,), jnp.float32).at[jnp.where(ok, ids, 0)].add(ok))(
        generated_BxL, valid.astype(jnp.float32))
    logits = logits_BxV.astype(jnp.float32)
    return logits - counts * frequency_B[:, None] - (counts > 0) * presence_B[:, None]


def sample_rows(logits_BxV, keys_B, generated_BxL, banned_BxS, temperature_B, top_k_B, top_p_B, presence_B, frequency_B,
                logprobs_B):
    """(next ids ``[B]`` int32, their log-probabilities ``[B]`` float32, top ids ``[B, K]`` int32,
    top log-probabilities ``[B, K]`` float32), K = MAX_LOGPROBS. ``banned_BxS``: ids a row may not
    sample (padded with -1). ``logprobs_B`` (bool): the rows that report log-probabilities; when
    every row is greedy and none reports them, the last three are zeros (not computed)."""
    vocab = logits_BxV.shape[-1]
    penalised = jnp.any(presence_B != 0) | jnp.any(frequency_B != 0)
    logits = jax.lax.cond(penalised, lambda: penalize(logits_BxV, generated_BxL, presence_B, frequency_B),
                          lambda: logits_BxV.astype(jnp.float32))
    ban = jax.vmap(lambda ids: jnp.zeros((vocab,), bool).at[jnp.where(ids >= 0, ids, vocab)].set(True, mode="drop"))(banned_BxS)
    logits = jnp.where(ban, -jnp.inf, logits)
    greedy_B = temperature_B == 0
    argmax_B = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def full():
        t_B = jnp.where(greedy_B, 1.0, temperature_B)
        processed = filter_logits(logits, t_B, top_k_B, top_p_B)  # the whole batch at once: see its cost rule

        def draw():
            sampled = jax.vmap(lambda key, lg: jax.random.categorical(key, lg[None], axis=-1)[0])(keys_B, processed)
            return jnp.where(greedy_B, argmax_B, sampled.astype(jnp.int32))

        next_B = jax.lax.cond(jnp.all(greedy_B), lambda: argmax_B, draw)
        logprobs = jnp.maximum(jax.nn.log_softmax(processed, axis=-1), LOGPROB_FLOOR)
        chosen = jnp.take_along_axis(logprobs, next_B[:, None], axis=-1)[:, 0]
        top_lp, top_ids = jax.lax.top_k(logprobs, MAX_LOGPROBS)
        return next_B, chosen, top_ids.astype(jnp.int32), top_lp

    def greedy_only():
        B = logits.shape[0]
        return (argmax_B, jnp.zeros((B,), jnp.float32), jnp.zeros((B, MAX_LOGPROBS), jnp.int32),
                jnp.zeros((B, MAX_LOGPROBS), jnp.float32))

    return jax.lax.cond(jnp.all(greedy_B) & ~jnp.any(logprobs_B), greedy_only, full)


def score_tokens(logits_BxTxV: jax.Array, targets_BxT: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Prompt log-probabilities: (log-probability of ``targets_BxT`` ``[B, T]`` float32, top ids
    ``[B, T, K]`` int32, top log-probabilities ``[B, T, K]`` float32), K = MAX_LOGPROBS, under the
    model's own distribution (float32 log-softmax of the logits; nothing else applied)."""
    logprobs = jax.nn.log_softmax(logits_BxTxV.astype(jnp.float32), axis=-1)
    chosen = jnp.take_along_axis(logprobs, targets_BxT[..., None], axis=-1)[..., 0]
    top_lp, top_ids = jax.lax.top_k(logprobs, MAX_LOGPROBS)
    return chosen, top_ids.astype(jnp.int32), top_lp


def knobs(request: Request, vocab_size: int) -> tuple:
    """A request's sampling knobs as the step's dtypes (top_k above the vocabulary disables it)."""
    top_k = request.top_k if 0 <= request.top_k < vocab_size else 0
    return (np.float32(request.temperature), np.int32(top_k), np.float32(request.top_p),
            np.float32(request.presence_penalty), np.float32(request.frequency_penalty))


class SamplingRows:
    """Host arrays of one step's sampling inputs, ``rows`` rows; unset rows sample greedily."""

    def __init__(self, rows: int, max_context: int, ban_width: int):
        self.seeds, self.counters, self.top_k = (np.zeros((rows,), np.int32) for _ in range(3))
        self.temperature, self.top_p = np.zeros((rows,), np.float32), np.ones((rows,), np.float32)
        self.presence, self.frequency = np.zeros((rows,), np.float32), np.zeros((rows,), np.float32)
        self.generated = np.full((rows, max_context), -1, np.int32)
        self.banned = np.full((rows, ban_width), -1, np.int32)
        self.logprobs = np.zeros((rows,), bool)

    def set(self, r: int, seed: int, generated: list[int], knob: tuple, banned, logprobs: bool = False) -> None:
        """Row ``r``: its seed, the ids it generated so far, its :func:`knobs`, the ids it may not
        sample, whether it reports log-probabilities."""
        self.seeds[r], self.counters[r] = seed, len(generated)
        self.logprobs[r] = logprobs
        self.generated[r, : len(generated)] = generated
        self.temperature[r], self.top_k[r], self.top_p[r], self.presence[r], self.frequency[r] = knob
        banned = sorted(banned)
        self.banned[r, : len(banned)] = banned

    def arrays(self) -> tuple[np.ndarray, ...]:
        return (self.seeds, self.counters, self.generated, self.banned, self.temperature, self.top_k, self.top_p,
                self.presence, self.frequency, self.logprobs)

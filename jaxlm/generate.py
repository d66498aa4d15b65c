"""Decoding: one jitted prefill over the prompts, then a compiled loop of one-token steps.

Both go through the same ``model(tokens, positions, cache)`` call as training. Prompts of
different lengths are right-padded into one batch; each sequence continues from its own length
(its next token is written at position ``length + i``), so padding never leaks into the output.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from tokenizers import Tokenizer

from jaxlm.cache import init_cache
from jaxlm.config import ConfigError, DecodeConfig, check_section
from jaxlm.data import eos_id as tokenizer_eos_id
from jaxlm.data import load_tokenizer
from jaxlm.metrics import memory_capacity
from jaxlm.detokenize import decode_continuation
from jaxlm.decoding_weights import decoding_model, decoding_placement
from jaxlm.model import Transformer
from sharding.rules import LOGICAL_RULES, mesh_axis_size

_BUCKET = 16  # prompt and cache lengths are rounded up to this, to reuse compiled programs


CANDIDATES = 256  # the best tokens a bounded top-k or top-p cut is looked for in, instead of sorting the vocabulary


def _cut(scaled_BxV: jax.Array, desc_BxN: jax.Array, top_k_B1: jax.Array, top_p_B1: jax.Array):
    """``(filtered [batch, vocab], exact [batch])``: ``scaled`` with the tokens outside top-k and top-p
    set to -inf, the cuts found in ``desc_BxN`` (each row's N best logits, descending: the whole
    vocabulary sorted, or its top :data:`CANDIDATES`). ``exact`` says a row's cuts would be the same
    with the whole vocabulary sorted (always true when N is the vocabulary)."""
    N, vocab = desc_BxN.shape[-1], scaled_BxV.shape[-1]
    top_k = jnp.where(top_k_B1 >= vocab, 0, top_k_B1)
    kth = jnp.take_along_axis(desc_BxN, jnp.clip(top_k - 1, 0, N - 1), axis=-1)
    kth = jnp.where(top_k > 0, kth, -jnp.inf)
    kept = jnp.where(desc_BxN < kth, -jnp.inf, desc_BxN)
    # probabilities over the tokens top-k keeps: with a top-k cut all of them are among the N
    norm = jnp.where(top_k > 0, jax.nn.logsumexp(kept, axis=-1, keepdims=True),
                     jax.nn.logsumexp(scaled_BxV, axis=-1, keepdims=True))
    probs = jnp.exp(kept - norm)
    before = jnp.cumsum(probs, axis=-1) - probs  # probability mass strictly above each token
    keep = jnp.sum(before < top_p_B1, axis=-1, keepdims=True)  # >= 1
    threshold = jnp.where(top_p_B1 < 1, jnp.take_along_axis(kept, keep - 1, axis=-1), -jnp.inf)
    last = jnp.min(desc_BxN, axis=-1, keepdims=True)  # no token outside the N is above it; ties with it may be
    exact_k = (top_k == 0) | ((top_k <= N) & (kth > last))
    exact_p = (top_k > 0) | (top_p_B1 >= 1) | (threshold > last)
    exact = (N == vocab) | (exact_k & exact_p)
    return jnp.where((scaled_BxV < kth) | (scaled_BxV < threshold), -jnp.inf, scaled_BxV), exact[:, 0]


def filter_logits(logits_BxV: jax.Array, temperature, top_k, top_p) -> jax.Array:
    """float32 logits ``[batch, vocab]`` divided by ``temperature`` (floored at 1e-6), the tokens
    outside top-k and top-p set to -inf: the distribution :func:`sample_logits` draws from.

    The knobs are scalars or ``[batch]`` arrays (one per row), possibly traced. top_k 0 (or at least
    the vocabulary) and top_p 1 disable those filters; ties at either threshold are kept. The cuts
    are found among each row's :data:`CANDIDATES` best tokens (``lax.top_k``); only when that cannot
    be exact for some row of the batch (top_k above it, ties across its edge, a top-p nucleus wider
    than it without top-k) is the whole vocabulary sorted, for the whole batch.
    """
    logits = logits_BxV.astype(jnp.float32)
    B, vocab = logits.shape
    per_row = lambda x, dtype: jnp.broadcast_to(jnp.asarray(x, dtype), (B,))[:, None]
    t, k, p = per_row(temperature, jnp.float32), per_row(top_k, jnp.int32), per_row(top_p, jnp.float32)
    scaled = logits / jnp.maximum(t, 1e-6)
    by_sort = lambda: _cut(scaled, -jnp.sort(-scaled, axis=-1), k, p)[0]
    if vocab <= CANDIDATES:
        return by_sort()
    filtered, exact = _cut(scaled, jax.lax.top_k(scaled, CANDIDATES)[0], k, p)
    return jax.lax.cond(jnp.all(exact), lambda: filtered, by_sort)


def sample_logits(logits_BxV: jax.Array, rng: jax.Array, temperature, top_k, top_p) -> jax.Array:
    """Next tokens ``[batch]`` int32. temperature 0 is greedy; top_k 0 and top_p 1 disable those filters.

    The knobs may be traced scalars (or ``[batch]`` arrays), so one compiled program serves every
    setting; a greedy batch computes only the arg-max. Ties at the top-k or top-p threshold are kept.
    """
    greedy = jnp.argmax(logits_BxV.astype(jnp.float32), axis=-1).astype(jnp.int32)
    is_greedy = jnp.asarray(temperature) == 0

    def draw():
        sampled = jax.random.categorical(rng, filter_logits(logits_BxV, temperature, top_k, top_p), axis=-1)
        return jnp.where(is_greedy, greedy, sampled.astype(jnp.int32))

    return jax.lax.cond(jnp.all(is_greedy), lambda: greedy, draw)


@functools.partial(jax.jit, static_argnums=0, static_argnames=("max_new_tokens", "cache_len"))
def _generate(graphdef, weights, tokens_BxT, lengths_B, rng, temperature, top_k, top_p, eos, *, max_new_tokens, cache_len):
    model = decoding_model(graphdef, weights)
    B, T = tokens_BxT.shape
    cache = init_cache(model.cfg, B, cache_len)
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    logits, cache = model(tokens_BxT, positions, cache)
    last_BxV = jnp.take_along_axis(logits, (lengths_B - 1)[:, None, None], axis=1)[:, 0]
    rng, sub = jax.random.split(rng)
    token = sample_logits(last_BxV, sub, temperature, top_k, top_p)
    out = jnp.full((B, max_new_tokens), -1, jnp.int32)
    done = jnp.zeros((B,), bool)

    def cond(carry):
        i, _, _, _, _, done = carry
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        i, token, cache, rng, out, done = carry
        out = out.at[:, i].set(jnp.where(done, -1, token))
        done = done | jnp.isin(token, eos)
        logits, cache = model(token[:, None], (lengths_B + i)[:, None], cache)
        rng, sub = jax.random.split(rng)
        token = sample_logits(logits[:, 0], sub, temperature, top_k, top_p)
        return i + 1, token, cache, rng, out, done

    carry = (jnp.int32(0), token, cache, rng, out, done)
    return jax.lax.while_loop(cond, body, carry)[4]


def _check_ids(prompts: Sequence[Sequence[int]], vocab: int) -> None:
    """ConfigError unless ``prompts`` is a non-empty list of non-empty lists of ids in ``[0, vocab)``."""
    if isinstance(prompts, (str, bytes)) or not prompts:
        raise ConfigError("prompts must be a non-empty list of prompts (each a list of token ids)")
    for i, p in enumerate(prompts):
        if isinstance(p, (str, bytes)):
            raise ConfigError(f"prompt {i} is text; generate_tokens takes token ids (use generate for text)")
        if len(p) == 0:
            raise ConfigError(f"prompt {i} is empty; every prompt needs at least one token")
        bad = [t for t in p if not (isinstance(t, (int, np.integer)) and 0 <= t < vocab)]
        if bad:
            raise ConfigError(f"prompt {i}: token id {bad[0]!r} is outside the vocabulary [0, {vocab})")


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def stop_ids(eos_token_id: int | Sequence[int] | None, stop_token_ids: Sequence[int] = (), ignore_eos: bool = False) -> tuple[int, ...]:
    """The ids that end a sequence: the EOS set (unless ``ignore_eos``) plus ``stop_token_ids``."""
    eos = () if eos_token_id is None or ignore_eos else (eos_token_id,) if isinstance(eos_token_id, int) else tuple(eos_token_id)
    return tuple(sorted({int(t) for t in (*eos, *stop_token_ids)}))


def kv_bytes_per_token(cfg) -> int:
    """Bytes of keys and values of every layer for one token, in the compute dtype."""
    return 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * jnp.dtype(cfg.compute_dtype).itemsize


def _check_cache_fits(cfg, batch: int, cache_len: int, mesh: Mesh | None, prompts: int | None = None) -> None:
    """ConfigError before anything is allocated when the KV cache of ``batch`` x ``cache_len`` tokens
    (keys and values of every layer, in the compute dtype) exceeds the devices' memory."""
    need = batch * cache_len * kv_bytes_per_token(cfg)
    have = memory_capacity(list(mesh.devices.flat) if mesh is not None else jax.devices()[:1])
    if need > have:
        raise ConfigError(
            f"a KV cache for {batch} prompts"
            + (f" ({prompts} padded to a multiple of the mesh's data-parallel size)" if prompts not in (None, batch) else "")
            + f" of up to {cache_len} tokens needs {need / 2**30:.3g} GiB but the devices "
            f"hold {have / 2**30:.3g} GiB; lower --max-new-tokens (decode.max_new_tokens) or the number of prompts"
        )


def generate_tokens(
    model: Transformer,
    prompts: Sequence[Sequence[int]],
    cfg: DecodeConfig = DecodeConfig(),
    *,
    eos_token_id: int | Sequence[int] | None = None,
    stop_token_ids: Sequence[int] = (),
    ignore_eos: bool = False,
    mesh: Mesh | None = None,
) -> list[list[int]]:
    """Continue each prompt (token ids); returns the new ids, stopping after max tokens or after any id
    of the EOS set ``eos_token_id`` (one id or several, as transformers' ``generate`` takes it) or of
    ``stop_token_ids`` (the stopping id is kept). ``ignore_eos`` disregards the EOS set.

    Runs on ``mesh``, by default the mesh the model's parameters live on, with the weights laid
    out for decoding (:mod:`jaxlm.decoding_weights`: a copy of the layers' weights for the call).
    """
    _check_ids(prompts, model.cfg.vocab_size)
    check_section("decode", cfg)
    stop = stop_ids(eos_token_id, stop_token_ids, ignore_eos)
    bad = [t for t in stop if not 0 <= t < model.cfg.vocab_size]
    if bad:
        raise ConfigError(f"stop/EOS token id {bad[0]} is outside the vocabulary [0, {model.cfg.vocab_size})")
    stop += (-1,) * (_round_up(len(stop) + 1, 8) - len(stop))  # a few shapes, so few compiled programs
    graphdef, weights, mesh = decoding_placement(model, mesh)
    n = len(prompts)
    batch = n
    if mesh is not None:  # the batch is split over the data-parallel axes: pad it to fit
        batch = _round_up(n, mesh_axis_size(mesh, LOGICAL_RULES["batch"]))
    lengths = np.array([len(p) for p in prompts] + [len(prompts[-1])] * (batch - n), np.int32)
    T = _round_up(int(lengths.max()), _BUCKET)
    tokens = np.zeros((batch, T), np.int32)
    for i in range(batch):
        p = prompts[min(i, n - 1)]
        tokens[i, : len(p)] = p
    cache_len = _round_up(T + cfg.max_new_tokens, _BUCKET)
    _check_cache_fits(model.cfg, batch, cache_len, mesh, n)
    args = (
        graphdef, weights, jnp.asarray(tokens), jnp.asarray(lengths), jax.random.key(cfg.seed),
        jnp.float32(cfg.temperature), jnp.int32(cfg.top_k), jnp.float32(cfg.top_p),
        jnp.asarray(stop, jnp.int32),
    )
    kwargs = dict(max_new_tokens=cfg.max_new_tokens, cache_len=cache_len)
    if mesh is None:
        out = _generate(*args, **kwargs)
    else:
        with jax.set_mesh(mesh):
            out = _generate(*args, **kwargs)
    out = np.asarray(jax.device_get(out))[:n]
    return [[int(t) for t in row if t >= 0] for row in out]


def generate(
    model: Transformer,
    prompts: Sequence[str],
    cfg: DecodeConfig = DecodeConfig(),
    *,
    tokenizer: Tokenizer | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    stop_token_ids: Sequence[int] = (),
    ignore_eos: bool = False,
    mesh: Mesh | None = None,
) -> list[str]:
    """Text in, text out: each prompt's continuation (without the prompt).

    Prompts are encoded with the tokenizer's own special tokens (BOS exactly when its ``encode``
    adds one). ``eos_token_id`` defaults to the tokenizer's ``<|endoftext|>``; pass the model's EOS
    set (:func:`jaxlm.interop.eos.eos_token_ids`) for converted models. The text is decoded against
    the prompt (:mod:`jaxlm.detokenize`), so ``prompt + text`` reads as the whole sequence decodes.
    ``tokenizer`` defaults to the built-in one; a model of another vocabulary size needs its own
    (ConfigError otherwise, as for a tokenizer with more ids than the model has embeddings).
    """
    vocab = model.cfg.vocab_size
    if tokenizer is None:
        tokenizer = load_tokenizer()
        if tokenizer.get_vocab_size() != vocab:
            raise ConfigError(f"the model has a vocabulary of {vocab} tokens, the built-in tokenizer "
                              f"{tokenizer.get_vocab_size()}: pass the model's own, "
                              "tokenizer=jaxlm.load_tokenizer(cfg.data.tokenizer_path)")
    elif tokenizer.get_vocab_size() > vocab:
        raise ConfigError(f"the tokenizer has {tokenizer.get_vocab_size()} ids but the model only {vocab} embeddings; "
                          "pass the model's own tokenizer (jaxlm.load_tokenizer(cfg.data.tokenizer_path))")
    if isinstance(prompts, (str, bytes)) or not all(isinstance(p, str) for p in prompts):
        raise ConfigError("prompts must be a list of strings, e.g. generate(model, [\"ROMEO:\"])")
    ids = [tokenizer.encode(p).ids for p in prompts]
    eos = tokenizer_eos_id(tokenizer) if eos_token_id is None else eos_token_id
    stop = stop_ids(eos, stop_token_ids, ignore_eos)
    new = generate_tokens(model, ids, cfg, eos_token_id=stop, mesh=mesh)
    return [decode_continuation(tokenizer, p, seq[:-1] if seq and seq[-1] in stop else seq) for p, seq in zip(ids, new)]

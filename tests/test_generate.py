"""Decoding: the cached loop equals recomputing from scratch; sampling filters do what they say."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.build import build_model
from jaxlm.config import DecodeConfig, MeshConfig
from jaxlm.generate import generate, generate_tokens, sample_logits
from sharding.mesh import make_mesh
from tests.conftest import tiny_config

GREEDY = DecodeConfig(max_new_tokens=10, temperature=0.0)


@pytest.fixture(scope="module")
def model():
    return build_model(tiny_config("model.init_std=0.2").model, seed=5)


@jax.jit
def _next_greedy(model, tokens_1xT, length):
    """Full forward, no cache; tokens past ``length`` are padding that causality ignores."""
    logits, _ = model(tokens_1xT, jnp.arange(tokens_1xT.shape[1])[None])
    return jnp.argmax(logits[0, length - 1])


def _greedy_without_cache(model, prompt, n, width=32):
    seq = list(prompt)
    for _ in range(n):
        padded = jnp.asarray([seq + [0] * (width - len(seq))])
        seq.append(int(_next_greedy(model, padded, len(seq))))
    return seq[len(prompt):]


PROMPTS = [[11, 250, 7], [3, 1000, 42, 99, 5, 17, 8], [512]]


def test_cached_greedy_equals_recomputation_ragged_batch(model):
    got = generate_tokens(model, PROMPTS, GREEDY)
    for prompt, out in zip(PROMPTS, got):
        assert out == _greedy_without_cache(model, prompt, GREEDY.max_new_tokens)
    # batching does not change any sequence
    assert [generate_tokens(model, [p], GREEDY)[0] for p in PROMPTS] == got


def test_sharded_generation_matches_single_device(model, devices):
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2), devices)
    assert generate_tokens(model, PROMPTS, GREEDY, mesh=mesh) == generate_tokens(model, PROMPTS, GREEDY)


def test_model_trained_with_the_sequence_split_decodes_on_the_folded_mesh(model, devices):
    mesh = make_mesh(MeshConfig(fsdp=2, sequence=2, tensor=2), devices)
    on_seq_mesh = build_model(tiny_config("model.init_std=0.2").model, mesh, seed=5)
    assert generate_tokens(on_seq_mesh, PROMPTS, GREEDY) == generate_tokens(model, PROMPTS, GREEDY)


def test_model_on_pipeline_stages_decodes_like_one_device(model, devices):
    mesh = make_mesh(MeshConfig(stage=2, fsdp=2, tensor=2), devices)
    staged = build_model(tiny_config("model.init_std=0.2").model, mesh, seed=5)
    assert generate_tokens(staged, PROMPTS, GREEDY) == generate_tokens(model, PROMPTS, GREEDY)


def test_eos_stops_only_its_sequence(model):
    full = generate_tokens(model, PROMPTS, GREEDY)
    eos = full[1][2]
    stopped = generate_tokens(model, PROMPTS, GREEDY, eos_token_id=eos)
    assert stopped[1] == full[1][: full[1].index(eos) + 1]
    for s, f in zip(stopped, full):
        cut = f.index(eos) + 1 if eos in f else len(f)
        assert s == f[:cut]


def test_text_round_trip_through_the_tokenizer(model):
    out = generate(model, ["ROMEO:", "To be"], DecodeConfig(max_new_tokens=8, temperature=0.0))
    assert len(out) == 2 and all(isinstance(o, str) and o for o in out)


def _draws(logits, n, **kw):
    rows = jnp.broadcast_to(logits, (n, logits.shape[-1]))
    args = {"temperature": jnp.float32(1.0), "top_k": jnp.int32(0), "top_p": jnp.float32(1.0)}
    args.update({k: jnp.asarray(v, args[k].dtype) for k, v in kw.items()})
    return np.asarray(jax.jit(sample_logits)(rows, jax.random.key(0), args["temperature"], args["top_k"], args["top_p"]))


def test_sampling_filters():
    logits = jax.random.normal(jax.random.key(3), (50,)) * 2
    order = np.argsort(-np.asarray(logits))
    probs = np.asarray(jax.nn.softmax(logits))
    n = 20000
    # temperature 1, no filter: frequencies follow softmax
    freq = np.bincount(_draws(logits, n), minlength=50) / n
    np.testing.assert_allclose(freq, probs, atol=4 * np.sqrt(probs.max() / n) + 1e-3)
    # greedy
    assert set(_draws(logits, 64, temperature=0.0)) == {order[0]}
    # top-k keeps exactly the k best, in proportion
    top3 = _draws(logits, n, top_k=3)
    assert set(top3) == set(order[:3])
    p3 = probs[order[:3]] / probs[order[:3]].sum()
    np.testing.assert_allclose(np.bincount(top3, minlength=50)[order[:3]] / n, p3, atol=0.02)
    # top-p keeps the smallest prefix whose mass reaches p
    cum = np.cumsum(probs[order])
    p = float(cum[4]) - 1e-4  # needs the first five tokens
    assert set(_draws(logits, n, top_p=p)) == set(order[:5])
    assert set(_draws(logits, 256, top_p=1e-6)) == {order[0]}


def test_generation_runs_on_the_models_own_mesh(model, devices):
    from flax import nnx

    from jaxlm.build import state_shardings
    from jaxlm.decoding_weights import decoding_placement

    mesh = make_mesh(MeshConfig(fsdp=4, tensor=2), devices)
    sharded = nnx.merge(nnx.graphdef(model), jax.device_put(nnx.state(model), state_shardings(nnx.state(model), mesh)))
    assert decoding_placement(model)[2] is None and decoding_placement(sharded)[2] is mesh
    assert generate_tokens(sharded, PROMPTS, GREEDY) == generate_tokens(model, PROMPTS, GREEDY)


def _filter_reference(logits, t, k, p):
    """numpy float64: logits / t with the tokens outside top-k, then top-p, at -inf (ties kept)."""
    s = np.asarray(logits, np.float64) / max(t, 1e-6)
    out = s.copy()
    if 0 < k < s.size:
        out[s < np.sort(s)[::-1][k - 1]] = -np.inf
    if p < 1:
        desc = np.sort(out[out > -np.inf])[::-1]
        probs = np.exp(desc - desc.max()) / np.exp(desc - desc.max()).sum()
        kept = int(np.sum(np.cumsum(probs) - probs < p))
        out[s < desc[kept - 1]] = -np.inf
    return out


# (temperature, top_k, top_p) per row; vocabulary 1000, so the cuts are looked for in the 256 best first
_FAST_ROWS = [(0.7, 0, 1.0), (1.0, 5, 1.0), (1.3, 40, 0.8), (1.0, 0, 0.3), (0.5, 1, 1.0), (1.0, 255, 0.95)]
_SORT_ROWS = [(1.0, 300, 1.0),   # top_k above the candidates
              (1.0, 0, 0.999),   # a nucleus wider than the candidates
              (1.0, 10, 1.0)]    # ties at the 10th logit reach past the candidates (row made below)


def test_top_k_and_top_p_cuts_equal_a_sorted_reference_with_and_without_sorting_the_vocabulary():
    from jaxlm.generate import CANDIDATES, filter_logits

    rng = np.random.default_rng(7)
    vocab = 1000
    for rows in (_FAST_ROWS, _FAST_ROWS + _SORT_ROWS):
        logits = rng.normal(size=(len(rows), vocab)).astype(np.float32) * 2
        if len(rows) > len(_FAST_ROWS):
            tied = logits[-1]
            tied[np.argsort(-tied)[9 : 9 + CANDIDATES]] = np.sort(tied)[::-1][9]  # 256 tokens share the 10th value
        t, k, p = (np.array(c, dt) for c, dt in zip(zip(*rows), (np.float32, np.int32, np.float32)))
        got = np.asarray(jax.jit(filter_logits)(logits, t, k, p))
        for r, knobs in enumerate(rows):
            want = _filter_reference(logits[r], *knobs)
            np.testing.assert_array_equal(np.isinf(got[r]), np.isinf(want), err_msg=str(knobs))
            kept = ~np.isinf(want)
            np.testing.assert_allclose(got[r][kept], want[kept], rtol=1e-6, err_msg=str(knobs))
            if knobs == (1.0, 10, 1.0):
                assert kept.sum() == 9 + CANDIDATES


def _primitives(jaxpr, into_cond: bool = True) -> set[str]:
    """Names of the primitives of ``jaxpr`` and of the jaxprs nested in it (not in conds' branches
    unless ``into_cond``)."""
    names = set()
    for eqn in jaxpr.eqns:
        names.add(eqn.primitive.name)
        if eqn.primitive.name == "cond" and not into_cond:
            continue
        for v in eqn.params.values():
            for sub in v if isinstance(v, (tuple, list)) else [v]:
                if hasattr(sub, "eqns") or hasattr(getattr(sub, "jaxpr", None), "eqns"):
                    names |= _primitives(getattr(sub, "jaxpr", sub), into_cond)
    return names


def test_bounded_cuts_and_greedy_batches_never_sort_the_vocabulary():
    """The whole-vocabulary sort sits only in the fallback branch of a conditional; a greedy batch's
    draw (filtering and random numbers) sits only in the other branch of another."""
    from jaxlm.generate import filter_logits

    x = jnp.ones((2, 1000), jnp.float32)
    jaxpr = jax.make_jaxpr(filter_logits)(x, jnp.float32(1), jnp.int32(40), jnp.float32(0.9)).jaxpr
    outside = _primitives(jaxpr, into_cond=False)
    assert "sort" not in outside and {"top_k", "cond"} <= outside
    (cond,) = [e for e in jaxpr.eqns if e.primitive.name == "cond"]
    assert ["sort" in _primitives(b.jaxpr) for b in cond.params["branches"]] == [True, False]
    # and XLA keeps it so: lax.top_k stays a top-k (a full sort plus a slice, were its result indexed
    # past the slice), the sort stays in the conditional's branch
    hlo = jax.jit(filter_logits).lower(x, jnp.float32(1), jnp.int32(40), jnp.float32(0.9)).compile().as_text()
    entry = hlo[hlo.index("\nENTRY") :]
    entry = entry[: entry.index("\n}")]
    assert "conditional(" in entry and " sort(" not in entry, entry
    jaxpr = jax.make_jaxpr(sample_logits)(x, jax.random.key(0), jnp.float32(0), jnp.int32(0), jnp.float32(1)).jaxpr
    outside = _primitives(jaxpr, into_cond=False)
    assert "cond" in outside and {"top_k", "sort", "random_bits"}.isdisjoint(outside)
    assert {"top_k", "sort"} <= _primitives(jaxpr)


def test_text_generation_refuses_a_tokenizer_that_is_not_the_models():
    from jaxlm.build import build_model
    from jaxlm.config import ConfigError
    from jaxlm.data import load_tokenizer

    other = build_model(tiny_config("model.vocab_size=512").model, seed=0)
    with pytest.raises(ConfigError, match="vocabulary of 512 tokens, the built-in tokenizer 4096: pass the model's own"):
        generate(other, ["ROMEO:"], GREEDY)
    with pytest.raises(ConfigError, match="the tokenizer has 4096 ids but the model only 512 embeddings"):
        generate(other, ["ROMEO:"], GREEDY, tokenizer=load_tokenizer())


def test_decoding_holds_the_matrices_in_the_compute_dtype_and_each_layer_apart_with_the_same_logits(devices):
    """float32 weights under bfloat16 compute: the decoding layout (the engine's and generate's)
    casts the embedding, the projections, their biases and the head, keeps the norm scales in
    float32, splits each stacked weight into one array per layer sharded as its slice of the stack
    was; the model rebuilt from it inside a compiled step gives the float32-weight model's logits
    bit for bit."""
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec

    from jaxlm.decoding_weights import decoding_model, decoding_placement

    mesh = make_mesh(MeshConfig(fsdp=2, tensor=2), devices[:4])
    cfg = tiny_config("model.init_std=0.2", "model.compute_dtype=bfloat16", "model.qkv_bias=true",
                      "model.tie_embeddings=false").model
    model = build_model(cfg, mesh, seed=3)
    graphdef, (rest, layers), placed_mesh = decoding_placement(model)
    assert placed_mesh is mesh and len(layers) == cfg.num_layers >= 2
    at = lambda tree, keys: functools.reduce(lambda t, k: t[k], keys, tree)[...]  # noqa: E731
    cast = set()
    for path, old in jax.tree_util.tree_leaves_with_path(nnx.split(model)[1]):
        keys = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
        name = keys[-1]
        if keys[0] == "blocks":
            news, olds = [at(layer, keys[1:]) for layer in layers], [old[i] for i in range(cfg.num_layers)]
            spec = PartitionSpec(*old.sharding.spec[1:])
        else:
            news, olds, spec = [at(rest, keys)], [old], old.sharding.spec
        assert old.dtype == jnp.float32, name
        for new, o in zip(news, olds, strict=True):
            assert new.sharding.is_equivalent_to(NamedSharding(mesh, spec), new.ndim), name
            if new.dtype == jnp.bfloat16:
                cast.add(name)
                assert jnp.array_equal(new, o.astype(jnp.bfloat16)), name
            else:
                assert new.dtype == jnp.float32 and jnp.array_equal(new, o), name
    assert cast == {"embed", "lm_head", "wq", "wk", "wv", "wo", "bq", "bk", "bv", "w_gate", "w_up", "w_down"}
    tokens = jax.random.randint(jax.random.key(4), (2, 12), 0, cfg.vocab_size)
    positions = jnp.broadcast_to(jnp.arange(12), (2, 12))
    with jax.set_mesh(mesh):
        decoded = jax.jit(lambda w: decoding_model(graphdef, w)(tokens, positions)[0])((rest, layers))
        assert jnp.array_equal(decoded, jax.jit(lambda m: m(tokens, positions)[0])(model))


@pytest.mark.parametrize("prompts, cfg, kwargs, message", [
    ([[5, 4096]], GREEDY, {}, r"prompt 0: token id 4096 is outside the vocabulary \[0, 4096\)"),
    ([[5], [7, -1]], GREEDY, {}, r"prompt 1: token id -1 is outside the vocabulary"),
    ([[5], []], GREEDY, {}, "prompt 1 is empty; every prompt needs at least one token"),
    ([], GREEDY, {}, "prompts must be a non-empty list of prompts"),
    ("ROMEO", GREEDY, {}, "prompts must be a non-empty list of prompts"),
    (["ROMEO"], GREEDY, {}, "prompt 0 is text; generate_tokens takes token ids"),
    ([[5]], DecodeConfig(max_new_tokens=0), {}, "config key 'decode.max_new_tokens' must be positive, got 0"),
    ([[5]], DecodeConfig(max_new_tokens=-1), {}, "config key 'decode.max_new_tokens' must be positive, got -1"),
    ([[5]], DecodeConfig(temperature=float("nan")), {}, "config key 'decode.temperature' must be a finite number"),
    ([[5]], DecodeConfig(temperature=-1.0), {}, "config key 'decode.temperature' must be >= 0, got -1"),
    ([[5]], DecodeConfig(top_k=-5), {}, "config key 'decode.top_k' must be >= 0, got -5"),
    ([[5]], DecodeConfig(top_p=0.0), {}, r"config key 'decode.top_p' must be in \(0, 1\], got 0"),
    ([[5]], GREEDY, {"eos_token_id": 10**12}, "stop/EOS token id 1000000000000 is outside the vocabulary"),
    ([[5]], GREEDY, {"stop_token_ids": [4096]}, "stop/EOS token id 4096 is outside the vocabulary"),
])
def test_bad_generate_tokens_input_is_one_line(model, prompts, cfg, kwargs, message):
    """What the engine refuses per request, generate_tokens refuses per call, before any compile."""
    from jaxlm.config import ConfigError

    with pytest.raises(ConfigError, match=message) as caught:
        generate_tokens(model, prompts, cfg, **kwargs)
    assert "\n" not in str(caught.value)
    with pytest.raises(ConfigError, match="prompts must be a list of strings"):
        generate(model, "ROMEO:", GREEDY)


def test_an_unsharded_model_decodes_on_a_mesh_it_is_handed(model, devices):
    """mesh= places a single-device model's weights as the sharding rules say (pipeline stages
    folded into fsdp for decoding) and decodes the same tokens, through generate_tokens and the engine."""
    from jaxlm.serve.engine import Engine
    from jaxlm.serve.request import Request

    mesh = make_mesh(MeshConfig(stage=2, fsdp=2, tensor=2), devices)
    expected = generate_tokens(model, PROMPTS, GREEDY)
    assert generate_tokens(model, PROMPTS, GREEDY, mesh=mesh) == expected
    engine = Engine(model, num_pages=16, page_size=16, max_batch=2, max_context=64, mesh=mesh)
    assert engine.mesh.shape["stage"] == 1 and engine.mesh.shape["fsdp"] == 4
    outs = engine.generate([Request(p, max_tokens=GREEDY.max_new_tokens, temperature=0.0) for p in PROMPTS])
    assert [o.token_ids for o in outs] == expected

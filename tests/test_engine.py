"""Serving engine: paged cache == contiguous cache, a busy engine == standalone generation, preemption."""

import collections
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlm.build import build_model, state_shardings
from jaxlm.cache import PagedKVCache, init_cache, init_paged_pools
from jaxlm.config import DecodeConfig, MeshConfig
from jaxlm.data import eos_id, load_tokenizer
from jaxlm.generate import generate_tokens
from jaxlm.serve import Engine, OutOfPages, PageAllocator, Request, RequestError
from sharding.mesh import make_mesh
from tests.conftest import tiny_config

PAGE = 16
MAX_NEW = 12


@pytest.fixture(scope="module")
def model():
    return build_model(tiny_config("model.init_std=0.2").model, seed=5)


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(1)
    lengths = [1, 5, 17, 38, 9, 26]
    return [rng.integers(0, 4096, n).tolist() for n in lengths]


MAX_TOKENS = [12, 7, 10, 12, 3, 9]


@pytest.fixture(scope="module")
def reference(model, prompts):
    """Standalone greedy generation of each prompt alone (a prefix of MAX_NEW tokens)."""
    greedy = DecodeConfig(max_new_tokens=MAX_NEW, temperature=0.0)
    return [generate_tokens(model, [p], greedy)[0][:m] for p, m in zip(prompts, MAX_TOKENS)]


def _check_pages(engine):
    holders = collections.Counter(p for pages in engine.pages_in_use().values() for p in pages)
    assert len(holders) == engine.allocator.num_used  # pages are shared only through their refcounts
    assert all(engine.allocator.refcount(p) == n for p, n in holders.items())
    assert 0 not in holders  # the scratch page is never handed out
    for seq in engine.running:
        assert len(seq.pages) * PAGE >= seq.num_cached


def _run_staggered(engine, requests, arrivals):
    """Add request i before step ``arrivals[i]``; step until done, checking pages after every step."""
    outputs, streamed, step = {}, {}, 0
    pending = sorted(zip(arrivals, range(len(requests))))
    ids = {}
    while pending or engine.has_work():
        while pending and pending[0][0] <= step:
            i = pending.pop(0)[1]
            ids[i] = engine.add_request(requests[i])
        for e in engine.step():
            streamed.setdefault(e.request_id, []).extend(e.new_token_ids)
            if e.output is not None:
                outputs[e.request_id] = e.output
        _check_pages(engine)
        step += 1
    assert engine.allocator.num_used == 0
    for rid, out in outputs.items():
        assert streamed[rid] == out.token_ids
    return [outputs[ids[i]] for i in range(len(requests))]


def test_allocator_never_hands_out_a_page_twice():
    rng = np.random.default_rng(0)
    alloc = PageAllocator(20)
    held: list[list[int]] = []
    for _ in range(500):
        if held and rng.random() < 0.45:
            alloc.free(held.pop(int(rng.integers(len(held)))))
        else:
            n = int(rng.integers(0, 6))
            free_before = alloc.num_free
            try:
                pages = alloc.allocate(n)
            except OutOfPages:
                assert n > free_before and alloc.num_free == free_before
                continue
            taken = {p for h in held for p in h}
            assert len(set(pages)) == n and not taken & set(pages) and 0 not in pages
            held.append(pages)
        assert alloc.num_used + alloc.num_free == alloc.capacity == 19
    for pages in held:
        alloc.free(pages)
    assert alloc.num_free == 19
    pages = alloc.allocate(2)
    alloc.free(pages)
    for bad in (pages[:1], [0]):  # a double free, the scratch page
        with pytest.raises(ValueError, match="not in use"):
            alloc.free(bad)


@pytest.mark.parametrize("impl, layers", [("xla", {}), ("pallas", {}), ("xla", {"scan_layers": False}),
                                           ("xla", {"remat": "full"})], ids=["xla", "pallas", "unrolled", "remat"])
def test_paged_cache_equals_contiguous(model, impl, layers):
    cfg = model.cfg
    paged_cfg = dataclasses.replace(cfg, attention_impl=impl, **layers)  # the layer loop the pools ride through
    paged_model = nnx.merge(nnx.graphdef(build_model(paged_cfg)), nnx.state(model))
    B, T, P = 2, 20, 3
    rng = np.random.default_rng(2)
    table = jnp.asarray(rng.permutation(np.arange(1, 10))[: B * P].reshape(B, P), jnp.int32)
    contiguous = init_cache(cfg, B, P * PAGE)
    k, v = init_paged_pools(cfg, 10, PAGE)
    k = jax.random.normal(jax.random.key(0), k.shape)  # stale pool contents must never be read
    v = jax.random.normal(jax.random.key(1), v.shape)
    paged = PagedKVCache(k, v, table)
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (B, T)), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    call = jax.jit(lambda m, t, p, c: m(t, p, c))
    for step in range(4):  # a prefill, then single tokens
        want, contiguous = call(model, tokens, positions, contiguous)
        got, paged = call(paged_model, tokens, positions, paged)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-4 if impl == "pallas" else 1e-5, rtol=1e-5)
        tokens = jnp.argmax(want[:, -1:], axis=-1).astype(jnp.int32)
        positions = positions[:, -1:] + 1
    assert isinstance(paged, PagedKVCache) and np.array_equal(paged.page_table_BxP, table)
    untouched = np.setdiff1d(np.arange(10), np.asarray(table))  # pages outside the table keep their contents
    np.testing.assert_array_equal(np.asarray(paged.k_LxNxPxKxD)[:, untouched], np.asarray(k)[:, untouched])


@pytest.mark.parametrize("scan_layers", [True, False])
def test_a_model_call_on_a_paged_cache_costs_the_same_whatever_the_pool_size(model, scan_layers):
    """The pools are updated in place: a call's temporary memory does not grow with the pool (a
    layer loop that sliced each layer's pool out and stacked them back would copy it all)."""
    cfg = dataclasses.replace(model.cfg, scan_layers=scan_layers)
    graphdef = nnx.graphdef(build_model(cfg))

    def call(state, k, v, tokens, positions, table):
        _, cache = nnx.merge(graphdef, state)(tokens, positions, PagedKVCache(k, v, table))
        return cache.k_LxNxPxKxD, cache.v_LxNxPxKxD

    tokens, positions = jnp.ones((2, 1), jnp.int32), jnp.full((2, 1), 20, jnp.int32)
    table = jnp.asarray([[1, 2], [3, 4]], jnp.int32)
    temps = {}
    for pages in (8, 2048):
        k, v = init_paged_pools(cfg, pages, PAGE)
        compiled = jax.jit(call, donate_argnums=(1, 2)).lower(nnx.state(model), k, v, tokens, positions, table).compile()
        temps[pages] = compiled.memory_analysis().temp_size_in_bytes
    assert k.nbytes > 10 * temps[8]  # so a copy of the pools would show
    assert temps[2048] == temps[8], temps


@pytest.fixture(scope="module")
def engine(model):
    e = Engine(model, num_pages=64, page_size=PAGE, max_batch=4, max_context=64, prefill_chunk=16, prefill_batch=2)
    e.warmup()
    return e


@pytest.fixture(scope="module")
def small_engine(model):
    """A pool of 6 usable pages (96 tokens) for requests of up to 50: preemption must happen."""
    e = Engine(model, num_pages=7, page_size=PAGE, max_batch=4, max_context=64, prefill_chunk=16, prefill_batch=2)
    e.warmup()
    return e


def _greedy(prompts):
    return [Request(p, max_tokens=m, temperature=0.0) for p, m in zip(prompts, MAX_TOKENS)]


ARRIVALS = [0, 0, 2, 3, 3, 7]


def test_busy_engine_greedy_equals_standalone(engine, prompts, reference):
    programs = engine.compiled_programs()
    outs = _run_staggered(engine, _greedy(prompts), ARRIVALS)
    assert [o.token_ids for o in outs] == reference
    assert [o.finish_reason for o in outs] == ["length"] * len(outs)
    assert engine.stats()["preemptions_total"] == 0
    assert engine.compiled_programs() == programs  # fixed shapes: no compilation per request


def test_preemption_recomputes_and_changes_nothing(small_engine, prompts, reference):
    before = small_engine.stats()
    outs = _run_staggered(small_engine, _greedy(prompts), ARRIVALS)
    assert [o.token_ids for o in outs] == reference
    after = small_engine.stats()
    assert after["preemptions_total"] > before["preemptions_total"]
    # what preemption dropped is found again in the prefix cache or computed again
    assert sum(after[k] - before[k] for k in ("recomputed_tokens_total", "prefix_cache_hits_total")) > 0
    assert sum(o.preemptions for o in outs) == after["preemptions_total"] - before["preemptions_total"]


def test_seeded_sampling_ignores_batch_company(engine, small_engine, prompts):
    probe = Request(prompts[2], max_tokens=10, temperature=1.5, top_k=200, top_p=0.95, seed=7)
    alone = engine.generate([probe])[0].token_ids
    company = [Request(p, max_tokens=m, temperature=1.0, seed=i) for i, (p, m) in enumerate(zip(prompts, MAX_TOKENS))]
    crowded = _run_staggered(engine, [company[0], company[3], probe, company[5]], [0, 0, 2, 2])[2].token_ids
    squeezed = _run_staggered(small_engine, [company[3], company[1], probe, company[2]], [0, 0, 1, 1])[2].token_ids
    assert alone == crowded == squeezed
    other = engine.generate([dataclasses.replace(probe, seed=8)])[0].token_ids
    assert other != alone  # the seed does matter


def test_eos_and_stop_strings_end_a_request(model, engine, prompts, reference):
    eos = reference[3][4]
    e = Engine(model, num_pages=64, page_size=PAGE, max_batch=4, max_context=64, prefill_chunk=16, prefill_batch=2,
               eos_token_id=eos)
    out = e.generate([Request(prompts[3], max_tokens=12, temperature=0.0)])[0]
    assert out.token_ids == reference[3][: reference[3].index(eos) + 1] and out.finish_reason == "stop"

    tok = load_tokenizer()
    e = Engine(model, num_pages=64, page_size=PAGE, max_batch=4, max_context=64, prefill_chunk=16, prefill_batch=2,
               tokenizer=tok, eos_token_id=eos_id(tok))
    full = e.generate([Request("ROMEO:", max_tokens=12, temperature=0.0)])[0]
    assert full.text == tok.decode(full.token_ids) and full.finish_reason == "length"
    stop = full.text[len(full.text) // 2:][:2]
    cut = e.generate([Request("ROMEO:", max_tokens=12, temperature=0.0, stop=(stop,))])[0]
    assert cut.finish_reason == "stop" and cut.text == full.text[: full.text.find(stop)]
    assert full.token_ids[: len(cut.token_ids)] == cut.token_ids


def test_bad_requests_are_refused_with_one_line(engine):
    with pytest.raises(RequestError, match="exceeds the context of 64 tokens"):
        engine.check(Request(list(range(60)), max_tokens=8))
    with pytest.raises(RequestError, match="max_tokens must be an integer >= 0"):
        engine.check(Request([1, 2], max_tokens=-1))
    with pytest.raises(RequestError, match="outside the vocabulary"):
        engine.check(Request([1, 99999]))
    with pytest.raises(RequestError, match="no tokenizer"):
        engine.check(Request("text"))
    assert not engine.has_work()


def test_engine_on_a_mesh_equals_one_device(model, prompts, reference, devices):
    mesh = make_mesh(MeshConfig(data=2, tensor=2), devices[:4])
    sharded = nnx.merge(nnx.graphdef(model), jax.device_put(nnx.state(model), state_shardings(nnx.state(model), mesh)))
    e = Engine(sharded, num_pages=7, page_size=PAGE, max_batch=3, max_context=64, prefill_chunk=16)
    assert e.max_batch == 4 and e.prefill_batch == 2  # rounded up to the data axis
    outs = _run_staggered(e, _greedy(prompts), ARRIVALS)
    assert [o.token_ids for o in outs] == reference
    assert e.stats()["preemptions_total"] > 0


def test_abort_frees_the_pages_of_a_running_request(engine, prompts):
    a = engine.add_request(Request(prompts[3], max_tokens=12, temperature=0.0))
    b = engine.add_request(Request(prompts[1], max_tokens=12, temperature=0.0))
    engine.step()
    assert engine.pages_in_use()[a] and engine.abort(a) and a not in engine.pages_in_use()
    assert engine.abort(b) and not engine.abort(b) and not engine.has_work()
    assert engine.allocator.num_used == 0


def test_penalties_and_logprobs_survive_preemption_and_a_huge_top_k_disables_only_itself(engine, small_engine, prompts):
    probe = Request(prompts[2], max_tokens=10, temperature=0.8, top_k=50, seed=3, presence_penalty=0.7,
                    frequency_penalty=1.1, min_tokens=4, logprobs=3)
    alone = engine.generate([probe])[0]
    company = [Request(p, max_tokens=m, temperature=1.0, seed=i) for i, (p, m) in enumerate(zip(prompts, MAX_TOKENS))]
    squeezed = _run_staggered(small_engine, [company[3], company[1], probe, company[2]], [0, 0, 1, 1])
    assert squeezed[2].token_ids == alone.token_ids and small_engine.stats()["preemptions_total"] > 0
    assert len(alone.logprobs) == len(alone.token_ids) and all(len(lp.top) == 3 for lp in alone.logprobs)
    np.testing.assert_allclose([lp.logprob for lp in squeezed[2].logprobs], [lp.logprob for lp in alone.logprobs],
                               atol=1e-5)
    # top_k past the int32 range used to overflow the step's arrays and fail the whole batch; it is
    # above the vocabulary, so it means "no top-k", for that request alone
    huge = Request(prompts[4], max_tokens=6, temperature=1.0, top_k=2**40, seed=9)
    outs = engine.generate([huge, company[0], dataclasses.replace(huge, top_k=0)])
    assert outs[0].token_ids == outs[2].token_ids and len(outs[1].token_ids) == MAX_TOKENS[0]
    assert engine.allocator.num_used == 0


DENSE_LEN = 40  # every prompt of the fixture fits: one compiled dense forward for all of them


def _dense_log_softmax(model, ids):
    """float32 ``[len(ids), vocab]``: log-softmax of one cache-less forward pass (row t predicts token
    t + 1), the ids padded to DENSE_LEN (causal: the padding changes no row before it)."""
    padded = jnp.asarray([list(ids) + [0] * (DENSE_LEN - len(ids))], jnp.int32)
    logits, _ = _dense(model, padded)
    return np.asarray(jax.nn.log_softmax(logits[0, : len(ids)].astype(jnp.float32), axis=-1))


@jax.jit
def _dense(model, tokens):
    return model(tokens, jnp.arange(tokens.shape[1], dtype=jnp.int32)[None])


def test_prompt_logprobs_equal_a_dense_forward_through_the_prefix_cache_and_preemption(model, small_engine, prompts,
                                                                                        reference):
    """Every prompt token's log-probability and top-4 alternatives equal a dense forward pass, for a
    first request, for one whose prompt is already in the prefix cache (the cached pages cannot give
    logits: it must compute them), and in a pool small enough that requests are preempted."""
    k = 4
    shared = prompts[3]  # 38 tokens: two full pages that the first request leaves cached
    requests = [Request(shared, max_tokens=5, temperature=0.0, prompt_logprobs=k),
                Request(shared, max_tokens=5, temperature=0.0, prompt_logprobs=k),
                Request(prompts[5], max_tokens=9, temperature=0.0, prompt_logprobs=0),
                Request(prompts[2], max_tokens=10, temperature=0.0),
                Request(prompts[0], max_tokens=3, temperature=0.0, prompt_logprobs=2)]
    before = small_engine.stats()["preemptions_total"]
    first = small_engine.generate(requests[:1])[0]
    outs = [first] + _run_staggered(small_engine, requests[1:], [0, 0, 0, 1])
    assert small_engine.stats()["preemptions_total"] > before
    for req, out, j in zip(requests, outs, [3, 3, 5, 2, 0]):
        ids = list(req.prompt)
        assert req.max_tokens <= MAX_TOKENS[j]  # greedy: a prefix of the standalone generation
        assert out.token_ids == reference[j][:req.max_tokens]
        if req.prompt_logprobs is None:
            assert out.prompt_logprobs is None
            continue
        assert len(out.prompt_logprobs) == len(ids) and out.prompt_logprobs[0] is None
        rows = _dense_log_softmax(model, ids)
        got = out.prompt_logprobs[1:]
        np.testing.assert_allclose([lp.logprob for lp in got], rows[np.arange(len(ids) - 1), ids[1:]], atol=2e-4)
        for t, lp in enumerate(got):
            assert len(lp.top) == req.prompt_logprobs
            want = np.argsort(-rows[t], kind="stable")[: req.prompt_logprobs]
            np.testing.assert_allclose([b for _, b in lp.top], rows[t][want], atol=2e-4)
            assert [a for a, _ in lp.top] == want.tolist()
    assert outs[1].cached_tokens == 0  # the cached pages hold no logits: its prompt was computed again
    np.testing.assert_allclose([lp.logprob for lp in outs[1].prompt_logprobs[1:]],
                               [lp.logprob for lp in outs[0].prompt_logprobs[1:]], atol=1e-5)
    assert small_engine.allocator.num_used == 0


def test_max_tokens_0_reads_the_prompt_generates_nothing_and_frees_its_pages(model, engine, prompts, reference):
    """Among generating requests: a one-token prompt, a prompt scored (prompt_logprobs), one not."""
    requests = [Request(prompts[0], max_tokens=0), Request(prompts[3], max_tokens=0, prompt_logprobs=2),
                Request(prompts[1], max_tokens=4, temperature=0.0), Request(prompts[5], max_tokens=0)]
    outs = engine.generate(requests)
    for out in (outs[0], outs[1], outs[3]):
        assert out.token_ids == [] and out.finish_reason == "length" and out.time_to_first_token_s >= 0
    assert outs[0].prompt_logprobs is None and outs[3].prompt_logprobs is None
    rows = _dense_log_softmax(model, prompts[3])
    got = outs[1].prompt_logprobs
    assert len(got) == len(prompts[3]) and got[0] is None
    np.testing.assert_allclose([lp.logprob for lp in got[1:]], rows[np.arange(len(prompts[3]) - 1), prompts[3][1:]],
                               atol=2e-4)
    assert outs[2].token_ids == reference[1][:4]
    assert engine.allocator.num_used == 0


def test_prompt_logprobs_are_refused_out_of_range(engine):
    for bad in (-1, 21, True, 2.0):
        with pytest.raises(RequestError, match=r"^prompt_logprobs must be None or an integer in \[0, 20\]"):
            engine.add_request(Request([1, 2, 3], prompt_logprobs=bad))


def test_sampling_skips_what_no_row_needs():
    """A greedy batch with no log-probabilities asked takes the (penalised) arg-max alone and reports
    zeros; one row asking turns the full path on, and the tokens stay the same."""
    from jaxlm.serve.sampling import SamplingRows, sample_rows

    @jax.jit
    def step(logits, seeds, counters, *rest):
        keys = jax.vmap(lambda s, c: jax.random.fold_in(jax.random.key(s), c))(seeds, counters)
        return sample_rows(logits, keys, *rest)

    rng = np.random.default_rng(4)
    logits = rng.standard_normal((3, 50)).astype(np.float32)
    generated = [[7, 7, 3], [int(np.argmax(logits[1]))] * 2, []]
    penalised = logits.copy()
    for r, (presence, frequency) in enumerate([(0.0, 0.0), (0.5, 2.0), (0.0, 0.0)]):
        counts = np.bincount(generated[r], minlength=50)
        penalised[r] -= counts * frequency + (counts > 0) * presence
    for asks in ([False, False, False], [False, False, True]):
        rows = SamplingRows(3, 8, 2)
        for r, (presence, frequency) in enumerate([(0.0, 0.0), (0.5, 2.0), (0.0, 0.0)]):
            knob = (np.float32(0), np.int32(0), np.float32(1), np.float32(presence), np.float32(frequency))
            rows.set(r, r, generated[r], knob, (), asks[r])
        next_ids, chosen, top_ids, top_lp = map(np.asarray, step(jnp.asarray(logits), *map(jnp.asarray, rows.arrays())))
        assert next_ids.tolist() == np.argmax(penalised, axis=-1).tolist()
        assert next_ids[1] != np.argmax(logits[1])  # the penalty moved it
        if not any(asks):
            assert not chosen.any() and not top_ids.any() and not top_lp.any()  # not computed
        else:
            want = penalised[2] - np.log(np.exp(penalised[2] - penalised[2].max()).sum()) - penalised[2].max()
            np.testing.assert_allclose(chosen[2], want[next_ids[2]], atol=1e-5)
            assert top_ids[2].tolist() == np.argsort(-want)[:20].tolist()


POISON = 4095  # a prompt holding this id makes the (wrapped) device call fail


def _drain(engine):
    errors, outputs = {}, {}
    while engine.has_work():
        for e in engine.step():
            if e.error is not None:
                errors[e.request_id] = e.error
            if e.output is not None:
                outputs[e.request_id] = e.output
        _check_pages(engine)
    return errors, outputs


def test_a_request_whose_output_fails_fails_alone(engine, prompts, reference):
    class Broken(frozenset):
        def __contains__(self, token):
            raise RuntimeError("broken stop set")

    good = engine.add_request(Request(prompts[0], max_tokens=MAX_TOKENS[0], temperature=0.0))
    bad = engine.add_request(Request(prompts[1], max_tokens=5, temperature=0.0))
    next(s for s in engine._waiting if s.request_id == bad).stop_ids = Broken()
    errors, outputs = _drain(engine)
    assert errors == {bad: "RuntimeError: broken stop set"}
    assert list(outputs) == [good] and outputs[good].token_ids == reference[0]
    assert engine.allocator.num_used == 0


@pytest.mark.parametrize("consumes_pools", [False, True], ids=["pools-kept", "pools-lost"])
def test_a_device_call_that_fails_for_one_request_fails_only_it(model, prompts, reference, monkeypatch, consumes_pools):
    """A call whose batch holds the poisoned prompt raises, before it consumed the donated KV pools
    (then run alone, only the poisoned request fails) or after (then the requests of that call fail,
    the others lose their cache and recompute). Every other request gives its reference tokens, and
    the engine serves on."""
    import jaxlm.serve.engine as engine_module

    real = engine_module._forward_and_sample

    def flaky(graphdef, score, state, k_pool, v_pool, tokens_BxT, *rest):
        if (np.asarray(tokens_BxT) == POISON).any():
            if consumes_pools:
                k_pool.delete(), v_pool.delete()
            raise RuntimeError("device says no\nsecond line")
        return real(graphdef, score, state, k_pool, v_pool, tokens_BxT, *rest)

    monkeypatch.setattr(engine_module, "_forward_and_sample", flaky)
    engine = Engine(model, num_pages=24, page_size=PAGE, max_batch=4, max_context=64, prefill_chunk=16, prefill_batch=2)
    requests = _greedy(prompts)
    bad = dataclasses.replace(requests[2], prompt=[POISON] + list(requests[2].prompt[1:]))
    ids = [engine.add_request(r) for r in requests[:2]]
    for _ in range(3):  # the first two are decoding when the poisoned one arrives
        engine.step()
    ids += [engine.add_request(bad)] + [engine.add_request(r) for r in requests[3:]]
    errors, outputs = _drain(engine)
    failed = ids[2:4] if consumes_pools else ids[2:3]  # prefilled together (prefill_batch=2)
    assert errors == {i: "engine step failed: RuntimeError: device says no" for i in failed}
    assert {i: o.token_ids for i, o in outputs.items()} == {i: ref for i, ref in zip(ids, reference) if i not in failed}
    assert engine.allocator.num_used == 0
    assert engine.stats()["preemptions_total"] == (2 if consumes_pools else 0)  # the two decoding lost their cache
    assert [o.token_ids for o in engine.generate(requests[2:4])] == reference[2:4]  # the same engine serves on

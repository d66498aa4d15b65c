"""Prefix caching: hash chain, refcounts and LRU by hand; cache on == cache off token for token
(greedy, seeded sampling, preemption, eviction, host tier, random multi-turn traffic)."""

import collections
import hashlib

import jax
import numpy as np
import pytest

from jaxlm.build import build_model
from jaxlm.serve import Engine, OutOfPages, PageAllocator, Request
from jaxlm.serve.costs import load_beats_recompute, load_seconds, prefill_flops, recompute_seconds
from jaxlm.serve.prefix_cache import HostTier, page_hashes, root_hash
from tests.conftest import tiny_config

PAGE = 16
SHAPES = dict(page_size=PAGE, max_batch=4, max_context=128, prefill_chunk=16, prefill_batch=2)


# ---------------------------------------------------------------- hash chain, allocator, host tier, costs
def test_hash_chain_by_hand():
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 4096, 3 * PAGE + 5).tolist()
    want, parent = [], hashlib.sha256(b"jaxlm-kv" + b"model-a").digest()
    for i in range(3):  # the partial fourth page gets no hash
        parent = hashlib.sha256(parent + np.asarray(tokens[i * PAGE:(i + 1) * PAGE], np.int64).tobytes()).digest()
        want.append(parent)
    got = page_hashes(tokens, PAGE, "model-a")
    assert got == want and root_hash("model-a") != root_hash("model-b")
    assert page_hashes(tokens, PAGE, "model-a", known=got[:2]) == want  # extended from known hashes
    other = page_hashes(tokens, PAGE, "model-b")
    assert not set(other) & set(want)  # another extra key shares nothing
    changed = list(tokens)
    changed[2 * PAGE + 3] += 1  # a token in page 2: pages 0, 1 keep their names
    assert page_hashes(changed, PAGE, "model-a") == want[:2] + page_hashes(changed, PAGE, "model-a")[2:]
    assert page_hashes(changed, PAGE, "model-a")[2] != want[2]
    changed[0] += 1  # the first token: every page changes
    assert not set(page_hashes(changed, PAGE, "model-a")) & set(want)


def test_allocator_refcounts_and_lru_by_hand():
    evicted = []
    alloc = PageAllocator(6, on_evict=lambda pages, hashes: evicted.append((pages, hashes)))
    a = alloc.allocate(3)
    assert a == [1, 2, 3] and alloc.num_used == 3 and alloc.num_free == 2
    for page, name in zip(a, (b"h1", b"h2", b"h3")):
        assert alloc.register(page, name)
    assert not alloc.register(a[0], b"h9")  # already named: it keeps its first name
    assert alloc.lookup(b"h2") == 2 and alloc.lookup(b"nope") is None
    alloc.acquire(1)
    alloc.acquire(2)  # a second sequence shares the first two pages
    assert [alloc.refcount(p) for p in a] == [2, 2, 1]
    alloc.free(a)  # the first sequence ends: 3 becomes cached, 1 and 2 stay held
    assert alloc.num_used == 2 and alloc.num_cached == 1 and alloc.num_free == 3
    alloc.free([1, 2])  # the second ends: LRU order (oldest first) is 3, then 2, then 1 (tail first)
    assert alloc.num_used == 0 and alloc.num_cached == 3 and alloc.num_free == 5
    assert alloc.allocate(2) == [4, 5] and not evicted  # empty pages go before cached ones
    assert alloc.allocate(2) == [3, 2] and evicted == [([3, 2], [b"h3", b"h2"])]
    assert alloc.lookup(b"h3") is None and alloc.lookup(b"h1") == 1 and alloc.evictions == 2
    alloc.acquire(1)  # a hit takes the cached page out of the LRU
    with pytest.raises(OutOfPages):
        alloc.allocate(1)
    assert alloc.num_used == 5
    with pytest.raises(ValueError, match="neither in use nor cached"):
        alloc.acquire(99)
    with pytest.raises(ValueError, match="not in use"):
        alloc.register(0, b"x")


def test_touch_makes_cached_pages_the_most_recent_head_last():
    alloc = PageAllocator(8)
    a, b = alloc.allocate(3), alloc.allocate(2)
    for page, name in zip(a + b, (b"a0", b"a1", b"a2", b"b0", b"b1")):
        alloc.register(page, name)
    alloc.free(a)
    alloc.free(b)  # LRU, oldest first: a2 a1 a0 b1 b0
    held = alloc.allocate(1)
    alloc.touch(a + held)  # a chain asked for again; a page in use is skipped
    got = alloc.allocate(4)
    assert got[0] not in a + b + held and got[1:] == [b[1], b[0], a[2]]  # the last empty page, then b, then a's tail


def test_allocator_matches_a_shadow_model():
    """Random allocate / share / register / free against a plain-dict model of refcounts and LRU."""
    rng = np.random.default_rng(1)
    alloc = PageAllocator(12)
    refs, named, lru = collections.Counter(), {}, []  # page -> holders; page -> hash; unheld named pages, oldest first
    held: list[list[int]] = []
    for step in range(600):
        r = rng.random()
        if r < 0.3 and held:
            pages = held.pop(int(rng.integers(len(held))))
            alloc.free(pages)
            for p in reversed(pages):
                refs[p] -= 1
                if not refs[p]:
                    del refs[p]
                    if p in named:
                        lru.append(p)
        elif r < 0.5 and (lru or refs):
            pool = sorted(set(lru) | set(refs))
            p = int(pool[int(rng.integers(len(pool)))])
            alloc.acquire(p)
            if p in lru:
                lru.remove(p)
            refs[p] += 1
            held.append([p])
        elif r < 0.65 and refs:
            p = int(sorted(refs)[int(rng.integers(len(refs)))])
            h = f"h{step}".encode()
            assert alloc.register(p, h) == (p not in named)
            named.setdefault(p, h)
        else:
            n = int(rng.integers(1, 4))
            free_pages = alloc.capacity - len(refs)
            if n > free_pages:
                with pytest.raises(OutOfPages):
                    alloc.allocate(n)
                continue
            empty = free_pages - len(lru)
            expect_evicted = lru[: max(0, n - empty)]
            pages = alloc.allocate(n)
            assert pages[len(pages) - len(expect_evicted):] == expect_evicted
            for p in expect_evicted:
                lru.remove(p)
                del named[p]
            for p in pages:
                assert p not in refs and p != 0
                refs[p] = 1
            held.append(pages)
        assert alloc.num_used == len(refs) and alloc.num_cached == len(lru)
        assert alloc.num_used + alloc.num_free == alloc.capacity
        assert all(alloc.refcount(p) == c for p, c in refs.items())
        assert all(alloc.lookup(h) == p for p, h in named.items())


def test_host_tier_keeps_the_most_recent_pages():
    tier = HostTier(2)
    k = np.arange(6.0).reshape(1, 2, 3)
    for h in (b"a", b"b"):
        tier.put(h, k, k + 1)
    tier.get(b"a")  # a is now more recent than b
    tier.put(b"c", k, k)
    assert b"a" in tier and b"b" not in tier and b"c" in tier and (tier.stored, tier.dropped) == (3, 1)
    np.testing.assert_array_equal(tier.get(b"a")[1], k + 1)
    HostTier(0).put(b"a", k, k)  # capacity 0 keeps nothing


def test_cost_formulas_by_hand():
    cfg = tiny_config().model  # 2 layers, embed 64, 4 heads x 16, kv 2 x 16, mlp 192, vocab 4096, tied
    E, L, H, K, D, F, V = 64, 2, 4, 2, 16, 192, 4096
    N = L * (E * H * D + 2 * E * K * D + H * D * E + 3 * E * F + 2 * E) + E + V * E  # body + tied head
    # positions 3, 4, 5 attend to 4, 5, 6 keys
    assert prefill_flops(cfg, 3, 6) == 2 * N * 3 + 4 * L * H * D * (4 + 5 + 6)
    kv_bytes = 2 * L * K * D * 4
    assert load_seconds(cfg, 32, 1e9) == pytest.approx(32 * kv_bytes / 1e9)
    assert recompute_seconds(cfg, 0, 32, 1e12) == pytest.approx(prefill_flops(cfg, 0, 32) / 1e12)
    assert load_beats_recompute(cfg, 0, 32, 1e9, 1e12) == (32 * kv_bytes / 1e9 < prefill_flops(cfg, 0, 32) / 1e12)
    assert load_beats_recompute(cfg, 0, 32, 1e12, 1e9) and not load_beats_recompute(cfg, 0, 32, 1e3, 1e12)


# ---------------------------------------------------------------- engine: cache on == cache off
@pytest.fixture(scope="module")
def model():
    return build_model(tiny_config("model.init_std=0.2").model, seed=5)


def _engine(model, num_pages, **kw):
    e = Engine(model, num_pages=num_pages, **SHAPES, **kw)
    e.warmup()
    return e


def _check(engine):
    """Every page a running sequence holds has a refcount equal to its holders; the rest are free or cached."""
    holders = collections.Counter(p for seq in engine.running for p in seq.pages)
    assert 0 not in holders
    assert all(engine.allocator.refcount(p) == n for p, n in holders.items())
    assert engine.allocator.num_used == len(holders)
    assert engine.allocator.num_used + engine.allocator.num_free == engine.allocator.capacity
    for seq in engine.running:
        assert len(seq.pages) * PAGE >= seq.num_cached


def _run(engine, requests, arrivals):
    """Add request i before step ``arrivals[i]``; step until done; outputs in request order."""
    pending, ids, outs, step = sorted(zip(arrivals, range(len(requests)))), {}, {}, 0
    while pending or engine.has_work():
        while pending and pending[0][0] <= step:
            i = pending.pop(0)[1]
            ids[i] = engine.add_request(requests[i])
        outs.update((e.request_id, e.output) for e in engine.step() if e.output is not None)
        _check(engine)
        step += 1
    assert engine.allocator.num_used == 0  # refcounts never leak: every page is free or cached
    assert engine.allocator.num_free == engine.allocator.capacity
    return [outs[ids[i]].token_ids for i in range(len(requests))]


def _shared_prefix_requests(seed, sampled):
    rng = np.random.default_rng(seed)
    system = rng.integers(0, 4096, 37).tolist()  # two full pages + 5 tokens shared by all
    knobs = dict(temperature=1.2, top_k=100, top_p=0.9) if sampled else dict(temperature=0.0)
    return [Request(system + rng.integers(0, 4096, int(n)).tolist(), max_tokens=int(m), seed=i, **knobs)
            for i, (n, m) in enumerate(zip(rng.integers(1, 30, 6), rng.integers(3, 14, 6)))]


@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "seeded"])
def test_shared_prefix_is_computed_once_and_changes_nothing(model, sampled):
    requests = _shared_prefix_requests(3, sampled)
    arrivals = [0, 4, 4, 9, 12, 12]
    on, off = _engine(model, 40), _engine(model, 40, enable_prefix_caching=False)
    assert _run(on, requests, arrivals) == _run(off, requests, arrivals)
    s_on, s_off = on.stats(), off.stats()
    # request 0 computes the two shared pages; each of the 5 later ones reuses them (32 tokens)
    assert s_on["prefix_cache_hits_total"] == 5 * 32 and s_off["prefix_cache_hits_total"] == 0
    assert s_on["prefix_cache_queries_total"] == sum(len(r.prompt) for r in requests)
    assert s_off["prefill_tokens_total"] - s_on["prefill_tokens_total"] == 5 * 32
    assert s_on["preemptions_total"] == s_off["preemptions_total"] == 0
    again = _run(on, requests[:1], [0])  # the same prompt again: all its full pages but the last token's
    assert again == _run(off, requests[:1], [0])
    assert on.stats()["prefix_cache_hits_total"] - s_on["prefix_cache_hits_total"] == (len(requests[0].prompt) - 1) // PAGE * PAGE
    (out,), (out_off,) = on.generate(requests[:1]), off.generate(requests[:1])  # what usage reports as cached_tokens
    assert out.cached_tokens == (len(requests[0].prompt) - 1) // PAGE * PAGE and out_off.cached_tokens == 0


def test_scoring_a_cached_prompt_keeps_its_pages_cached(model):
    """A request scoring its prompt computes the prompt's pages again (it needs their logits), but
    the cached pages it asked for count as used: the next eviction takes other pages."""
    rng = np.random.default_rng(5)
    p, q, r = (rng.integers(0, 4096, n).tolist() for n in (48, 48, 112))
    e = _engine(model, 12)  # 11 pages besides the scratch page
    e.generate([Request(p, max_tokens=1, temperature=0.0)])  # p's 3 full pages cached
    e.generate([Request(q, max_tokens=1, temperature=0.0)])  # then q's: more recent than p's
    (scored,) = e.generate([Request(p, max_tokens=0, prompt_logprobs=1)])
    assert scored.cached_tokens == 0 and len(scored.prompt_logprobs) == len(p)
    e.generate([Request(r, max_tokens=1, temperature=0.0)])  # 8 pages: the 5 empty and 3 evicted
    (again,) = e.generate([Request(p, max_tokens=1, temperature=0.0)])
    assert again.cached_tokens == 32  # p's pages stayed (its last token is always computed)
    (other,) = e.generate([Request(q, max_tokens=1, temperature=0.0)])
    assert other.cached_tokens == 0  # q's were evicted
    _check(e)


def test_preempted_request_refinds_its_own_pages(model):
    """6 usable pages, two requests of up to 4: the newer is preempted; its full pages stay cached
    (the older one takes the freed partial page first) and are found again on readmission."""
    rng = np.random.default_rng(4)
    requests = [Request(rng.integers(0, 4096, 40).tolist(), max_tokens=20, temperature=0.0) for _ in range(2)]
    on, off = _engine(model, 7), _engine(model, 7, enable_prefix_caching=False)
    assert _run(on, requests, [0, 0]) == _run(off, requests, [0, 0])
    s_on, s_off = on.stats(), off.stats()
    assert s_on["preemptions_total"] > 0 and s_off["preemptions_total"] > 0
    assert s_on["prefix_cache_hits_total"] >= 2 * PAGE  # random prompts share nothing: these are its own pages
    assert s_on["recomputed_tokens_total"] < s_off["recomputed_tokens_total"]


def _multiturn_traffic(seed, users, turns, sampled):
    """Per user, each turn's prompt = the last prompt + its answer + new tokens; several users share
    a system prompt. Yields (user, turn, new tokens, request knobs)."""
    rng = np.random.default_rng(seed)
    system = rng.integers(0, 4096, 20).tolist()
    return system, [[(rng.integers(0, 4096, int(rng.integers(1, 16))).tolist(), int(rng.integers(2, 9)),
                      dict(temperature=1.0, top_k=50, seed=int(rng.integers(1 << 30))) if sampled else dict(temperature=0.0))
                     for _ in range(turns)] for _ in range(users)]


def _converse(engine, system, plan):
    """Run every user's turns, a turn going in once that user's previous answer is out; some users
    start late. Returns every answer, per user."""
    users = len(plan)
    history = [list(system) for _ in range(users)]
    answers = [[] for _ in range(users)]
    waiting_on = {}
    start = {u: 2 * u for u in range(users)}
    step = 0
    while len(waiting_on) or any(len(answers[u]) < len(plan[u]) for u in range(users)):
        for u in range(users):
            if u not in waiting_on.values() and len(answers[u]) < len(plan[u]) and step >= start[u]:
                new, max_tokens, knobs = plan[u][len(answers[u])]
                history[u] += new
                rid = engine.add_request(Request(list(history[u]), max_tokens=max_tokens, **knobs))
                waiting_on[rid] = u
        for e in engine.step():
            if e.output is not None:
                u = waiting_on.pop(e.request_id)
                answers[u].append(e.output.token_ids)
                history[u] += e.output.token_ids
        _check(engine)
        step += 1
    assert engine.allocator.num_used == 0 and engine.allocator.num_free == engine.allocator.capacity
    return answers


@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "seeded"])
def test_fuzz_multiturn_under_eviction_and_preemption(model, sampled):
    """6 usable pages for 6 users of up to 6 pages each: eviction and preemption all the time."""
    system, plan = _multiturn_traffic(10 + sampled, users=6, turns=3, sampled=sampled)
    on, off = _engine(model, 7), _engine(model, 7, enable_prefix_caching=False)
    assert _converse(on, system, plan) == _converse(off, system, plan)
    s = on.stats()
    assert s["prefix_cache_hit_rate"] > 0.3 and s["kv_cache_evictions_total"] > 0 and s["preemptions_total"] > 0
    assert s["kv_host_pages"] == 0 and off.stats()["kv_cache_evictions_total"] == 0


def test_host_tier_brings_evicted_pages_back(model):
    """A pool that holds one conversation at a time: evicted pages go to host memory and come back
    (or, when the host link is made slow, are recomputed); the answers never change."""
    system, plan = _multiturn_traffic(20, users=3, turns=3, sampled=False)
    page_bytes = PAGE * 2 * 2 * 2 * 16 * 4
    gib = 64 * page_bytes / 2**30
    off = _converse(_engine(model, 7, enable_prefix_caching=False), system, plan)
    device_only = _engine(model, 7)
    host = _engine(model, 7, host_kv_gib=gib, host_link_bytes_per_s=1e12, matmul_flops_per_s=1e9)
    slow_link = _engine(model, 7, host_kv_gib=gib, host_link_bytes_per_s=1.0, matmul_flops_per_s=1e9)
    assert _converse(device_only, system, plan) == _converse(host, system, plan) == _converse(slow_link, system, plan) == off
    s, d, slow = host.stats(), device_only.stats(), slow_link.stats()
    assert s["kv_host_pages_total"] == 64 and s["kv_host_stored_pages_total"] > 0
    assert {k.sharding.memory_kind for k, _ in host.host._pages.values()} == {"pinned_host"}
    assert s["kv_host_loaded_pages_total"] > 0 and s["prefix_cache_host_hits_total"] == s["kv_host_loaded_pages_total"] * PAGE
    assert s["prefix_cache_hits_total"] > d["prefix_cache_hits_total"]
    assert s["prefill_tokens_total"] < d["prefill_tokens_total"]
    assert slow["kv_host_stored_pages_total"] > 0 and slow["kv_host_loaded_pages_total"] == 0  # recomputing was cheaper
    assert slow["prefill_tokens_total"] == d["prefill_tokens_total"]


def test_step_metrics(model):
    e = _engine(model, 40)
    programs = e.compiled_programs()
    _run(e, _shared_prefix_requests(5, False)[:2], [0, 0])
    s = e.stats()
    assert s["step_batch_size"] >= 1 and 0 <= s["step_kv_cache_usage_ratio"] <= 1
    assert 0 < s["step_arithmetic_intensity"] and 0 < s["step_arithmetic_intensity_mean"]
    assert e.compiled_programs() == programs  # prefill and decode only, whatever the cache did


@pytest.mark.slow
def test_host_tier_on_a_mesh(model, devices):
    """Pools split over kv heads (tensor=2) and rows over data=2: pages go to pinned host memory with
    their sharding and come back; answers equal the cache-off engine on one device."""
    from flax import nnx

    from jaxlm.build import state_shardings
    from jaxlm.config import MeshConfig
    from sharding.mesh import make_mesh

    mesh = make_mesh(MeshConfig(data=2, tensor=2), devices[:4])
    sharded = nnx.merge(nnx.graphdef(model), jax.device_put(nnx.state(model), state_shardings(nnx.state(model), mesh)))
    system, plan = _multiturn_traffic(20, users=3, turns=3, sampled=False)
    off = _converse(_engine(model, 7, enable_prefix_caching=False), system, plan)
    e = _engine(sharded, 7, host_kv_gib=64 * PAGE * 2 * 2 * 2 * 16 * 4 / 2**30, host_link_bytes_per_s=1e12,
                matmul_flops_per_s=1e9)
    assert _converse(e, system, plan) == off
    s = e.stats()
    assert s["kv_host_loaded_pages_total"] > 0
    k, _ = next(iter(e.host._pages.values()))
    assert k.sharding.memory_kind == "pinned_host" and k.sharding.mesh.shape == mesh.shape

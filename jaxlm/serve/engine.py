"""The serving engine: continuous batching over a paged KV cache.

Each :meth:`Engine.step` admits waiting requests into free batch slots, runs one prefill chunk
for up to ``prefill_batch`` sequences still reading their prompt, and one decode token for every
sequence that has read it; then finished sequences leave and free their pages. Both run the
model's ordinary ``model(tokens, positions, cache)`` with a :class:`jaxlm.cache.PagedKVCache`,
compiled once each: the prefill program on ``[prefill_batch, prefill_chunk]`` tokens, the decode
program on ``[max_batch, 1]`` (empty rows point at the scratch page), so no request recompiles.

Pages are taken as sequences grow. Full pages are named by a hash of their tokens and of all
tokens before them (:mod:`jaxlm.serve.prefix_cache`); a request admitted later starts from the
longest run of its pages already in the pool (held by others, or cached after their requests
finished), or copied back from the host-memory tier when that is cheaper than computing them
(:mod:`jaxlm.serve.costs`), and prefills only the rest (at least its last token). When too few
pages are free, the most recently admitted sequence is preempted: its pages are released (they
stay cached until needed) and it goes back to the front of the queue, to find what is left of
them and compute the rest (prompt and the tokens it generated so far) once pages free up.
Sampling draws token ``i`` of a request from ``fold_in(key(seed), i)`` with that request's own
knobs (temperature, top-k/top-p, penalties, ``min_tokens``; :mod:`jaxlm.serve.sampling`, which
also gives each token's log-probabilities), so its output does not depend on what else is in the
batch, nor on preemption. Each request's state, stop rules and text live in
:mod:`jaxlm.serve.sequence`. A request whose output cannot be made (an exception in
:meth:`Engine._append` or :meth:`Engine._read_only`) fails alone: its event carries the error and its pages are released; so
does one that makes a device call fail (:meth:`Engine._call_isolated`).
"""

from __future__ import annotations

import collections
import functools
import hashlib
import itertools
import os
import secrets
import time
from typing import Iterable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding

from jaxlm.cache import PAGED_CACHE_AXES, PagedKVCache, init_paged_pools
from jaxlm.detokenize import IncrementalDetokenizer
from jaxlm.decoding_weights import decoding_model, decoding_placement
from jaxlm.generate import kv_bytes_per_token, stop_ids
from jaxlm.metrics import memory_capacity
from jaxlm.model import Transformer
from jaxlm.serve.allocator import SCRATCH_PAGE, PageAllocator
from jaxlm.serve.costs import call_flops_and_bytes, device_rates, load_beats_recompute
from jaxlm.serve.metrics import EngineMetrics
from jaxlm.serve.prefix_cache import HostTier, compile_page_copies, copy_from_host, copy_to_host, page_hashes
from jaxlm.serve.request import MAX_STOP_TOKEN_IDS, Output, Request, RequestError, TokenLogprobs
from jaxlm.serve.sampling import SamplingRows, knobs, sample_rows, score_tokens
from jaxlm.serve.sequence import Event, RequestState
from sharding.rules import LOGICAL_RULES, constrain, logical_spec, mesh_axis_size


@functools.partial(jax.jit, static_argnums=(0, 1), donate_argnums=(3, 4))
def _forward_and_sample(graphdef, score: bool, weights, k_pool, v_pool, tokens_BxT, positions_BxT, page_table_BxP,
                        last_B, targets_BxT, seeds_B, counters_B, *sampling):
    """One model call over the paged cache, then each row samples from its token ``last_B``
    (:func:`jaxlm.serve.sampling.sample_rows`, ``sampling`` its remaining arguments).

    Returns ((next ids ``[B]``, their log-probabilities, top ids ``[B, K]``, top log-probabilities), k pool, v pool);
    with ``score`` (a third program, compiled when a request asks for prompt log-probabilities) the
    first tuple also holds :func:`jaxlm.serve.sampling.score_tokens` of ``targets_BxT``.
    """
    model = decoding_model(graphdef, weights)
    logits, cache = model(tokens_BxT, positions_BxT, PagedKVCache(k_pool, v_pool, page_table_BxP))
    last_BxV = jnp.take_along_axis(logits, last_B[:, None, None], axis=1)[:, 0]
    keys = jax.vmap(lambda s, c: jax.random.fold_in(jax.random.key(s), c))(seeds_B, counters_B)
    sampled = sample_rows(last_BxV, keys, *sampling)
    if score:
        sampled = (*sampled, *score_tokens(logits, targets_BxT))
    return sampled, constrain(cache.k_LxNxPxKxD, PAGED_CACHE_AXES), constrain(cache.v_LxNxPxKxD, PAGED_CACHE_AXES)


def sampling_seed(seed: int) -> int:
    """The 31-bit seed the compiled step takes (an int32 row) for a request's ``seed``: itself when
    it is in [0, 2^31), else 31 bits of its SHA-256, so that 64-bit seeds differing only in their
    high bits do not collide (only by chance, 2^-31)."""
    if 0 <= seed < 2**31:
        return seed
    digest = hashlib.sha256(seed.to_bytes(16, "little", signed=True)).digest()
    return int.from_bytes(digest[:4], "little") % 2**31


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


class Engine:
    """Continuous batching for one model over a pool of ``num_pages`` KV pages of ``page_size`` tokens.

    ``max_context``: tokens a request may hold (prompt + max_tokens), rounded up to whole pages.
    ``max_batch``: sequences in the running batch. ``prefill_chunk``: prompt tokens one sequence
    feeds per step; ``prefill_batch``: sequences prefilled per step (both rounded up to fit the
    mesh's data-parallel axes). ``tokenizer`` lets requests carry text and outputs have text;
    ``eos_token_id`` (one id or the model's EOS set, :func:`jaxlm.interop.eos.eos_token_ids`) ends a sequence.
    Runs on ``mesh``, by default the mesh the model's parameters live on, with the weights laid out
    for decoding (:mod:`jaxlm.decoding_weights`: the matrices in the compute dtype, each layer's
    weights as arrays of their own; a copy, so a caller that keeps ``model`` holds both).

    Prefix caching (``enable_prefix_caching``, on by default) reuses full pages across requests
    whose token ids agree from the start; ``extra_key`` names whatever else changes the keys and
    values (model id, adapter id), so engines with different keys never share a page.
    ``host_kv_gib``: GiB of host memory that keeps evicted pages (0: none). A page found there is
    copied back when ``host_link_bytes_per_s`` makes that faster than recomputing it at
    ``matmul_flops_per_s`` (both default to the device's figures in :mod:`jaxlm.serve.costs`).
    """

    def __init__(
        self,
        model: Transformer,
        *,
        num_pages: int,
        page_size: int = 16,
        max_batch: int = 8,
        max_context: int = 512,
        prefill_chunk: int = 64,
        prefill_batch: int = 1,
        tokenizer=None,
        eos_token_id: int | Sequence[int] | None = None,
        mesh: Mesh | None = None,
        clock=time.perf_counter,
        enable_prefix_caching: bool = True,
        extra_key: str = "",
        host_kv_gib: float = 0.0,
        host_link_bytes_per_s: float | None = None,
        matmul_flops_per_s: float | None = None,
    ):
        if page_size < 16 or page_size & (page_size - 1):
            raise ValueError(f"page_size must be a power of two >= 16 (the decode kernel's tile), got {page_size}")
        for name, value in (("max_batch", max_batch), ("max_context", max_context), ("prefill_chunk", prefill_chunk),
                            ("prefill_batch", prefill_batch)):
            if value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        if not 0 <= host_kv_gib < float("inf"):
            raise ValueError(f"host_kv_gib must be a finite number >= 0, got {host_kv_gib}")
        host_bytes = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        if host_kv_gib * 2**30 > host_bytes:
            raise ValueError(f"host_kv_gib={host_kv_gib:g} exceeds this machine's {host_bytes / 2**30:.3g} GiB of memory; "
                             f"lower --host-kv-gib")
        graphdef, weights, mesh = decoding_placement(model, mesh)
        self.mesh = mesh
        rows = 1 if mesh is None else mesh_axis_size(mesh, LOGICAL_RULES["batch"])
        self.cfg = model.cfg
        self.page_size = page_size
        self.pages_per_seq = -(-max_context // page_size)
        self.max_context = self.pages_per_seq * page_size
        self.max_batch = _round_up(max_batch, rows)
        self.prefill_chunk = prefill_chunk
        self.prefill_batch = _round_up(prefill_batch, rows)
        self.tokenizer = tokenizer
        self.eos_token_ids = stop_ids(eos_token_id)
        pool_bytes = num_pages * page_size * kv_bytes_per_token(model.cfg)
        have = memory_capacity(list(mesh.devices.flat) if mesh is not None else jax.devices()[:1])
        if pool_bytes > have:
            raise ValueError(f"a KV pool of {num_pages} pages of {page_size} tokens needs {pool_bytes / 2**30:.3g} GiB "
                             f"but the devices hold {have / 2**30:.3g} GiB; lower --num-pages")
        self.enable_prefix_caching = enable_prefix_caching
        self.extra_key = extra_key
        self.page_bytes = page_size * kv_bytes_per_token(model.cfg)
        self.host = HostTier(int(host_kv_gib * 2**30 // self.page_bytes) if enable_prefix_caching else 0)
        device = (mesh.devices.flat[0] if mesh is not None else jax.devices()[0])
        link, rate = device_rates(device.device_kind, device.platform, model.cfg.compute_dtype)
        self.host_link_bytes_per_s = host_link_bytes_per_s or link
        self.matmul_flops_per_s = matmul_flops_per_s or rate
        self._device = device
        self.metrics = EngineMetrics(clock)
        self._clock = clock
        self._graphdef, self._weights = graphdef, weights
        self._empty_cache(num_pages)
        self._waiting: collections.deque[RequestState] = collections.deque()
        self._slots: list[RequestState | None] = [None] * self.max_batch
        self._admissions = itertools.count()
        self._ids = itertools.count()

    def _empty_cache(self, num_pages: int) -> None:
        """A new page allocator and new, zeroed KV pools of ``num_pages`` pages (no page held or named)."""
        self.allocator = PageAllocator(num_pages, on_evict=self._offload if self.host.capacity else None)
        k, v = init_paged_pools(self.cfg, num_pages, self.page_size)
        if self.mesh is not None:
            sharding = NamedSharding(self.mesh, logical_spec(PAGED_CACHE_AXES))
            self._k_pool, self._v_pool = jax.device_put(k, sharding), jax.device_put(v, sharding)
        else:  # committed from the start, as the page copies leave them: one compiled program per shape
            self._k_pool, self._v_pool = jax.device_put(k, self._device), jax.device_put(v, self._device)

    # ---------------------------------------------------------------- requests in
    def check(self, request: Request) -> list[int]:
        """The request's prompt ids, or :class:`RequestError` saying why it cannot be served."""
        request.validate()
        if isinstance(request.prompt, str):
            if self.tokenizer is None:
                raise RequestError("this engine has no tokenizer: send the prompt as token ids")
            ids = self.tokenizer.encode(request.prompt).ids
            if not ids:
                raise RequestError("the prompt encodes to no tokens")
        else:
            ids = [int(t) for t in request.prompt]
            bad = [t for t in ids if not 0 <= t < self.cfg.vocab_size]
            if bad:
                raise RequestError(f"token id {bad[0]} is outside the vocabulary [0, {self.cfg.vocab_size})")
        if request.stop and self.tokenizer is None:
            raise RequestError("stop strings need a tokenizer; this engine has none")
        if len(request.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            raise RequestError(f"{len(request.stop_token_ids)} stop token ids; at most {MAX_STOP_TOKEN_IDS} are allowed")
        bad = [t for t in request.stop_token_ids if not 0 <= t < self.cfg.vocab_size]
        if bad:
            raise RequestError(f"stop token id {bad[0]} is outside the vocabulary [0, {self.cfg.vocab_size})")
        total = len(ids) + request.max_tokens
        if total > self.max_context:
            raise RequestError(
                f"prompt ({len(ids)} tokens) + max_tokens ({request.max_tokens}) = {total} exceeds the context of "
                f"{self.max_context} tokens; shorten the prompt or lower max_tokens"
            )
        if -(-total // self.page_size) > self.allocator.capacity:
            raise RequestError(f"the request needs more KV pages than the engine has ({self.allocator.capacity})")
        return ids

    def add_request(self, request: Request) -> str:
        """Queue a request (checked first, see :meth:`check`); returns its id."""
        ids = self.check(request)
        rid = request.request_id or f"req-{next(self._ids)}"
        seed = request.seed if request.seed is not None else secrets.randbits(31)
        stop = frozenset(stop_ids(self.eos_token_ids, request.stop_token_ids, request.ignore_eos))
        detok = IncrementalDetokenizer(self.tokenizer, ids) if self.tokenizer is not None else None
        seq = RequestState(request, rid, ids, list(ids), sampling_seed(seed), self._clock(), stop, detok,
                        knobs(request, self.cfg.vocab_size))
        seq.logprobs = [] if request.logprobs is not None else None
        seq.prompt_logprobs = [] if request.prompt_logprobs is not None else None
        self._waiting.append(seq)
        return rid

    def abort(self, request_id: str) -> bool:
        """Drop a queued or running request (its pages freed); False if the engine does not hold it."""
        for seq in self._waiting:
            if seq.request_id == request_id:
                self._waiting.remove(seq)
                return True
        for seq in self.running:
            if seq.request_id == request_id:
                self._release(seq)
                return True
        return False

    # ---------------------------------------------------------------- state
    @property
    def running(self) -> list[RequestState]:
        return sorted((s for s in self._slots if s is not None), key=lambda s: s.admitted)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    def has_work(self) -> bool:
        return bool(self._waiting) or any(s is not None for s in self._slots)

    def pages_in_use(self) -> dict[str, list[int]]:
        """Each running request's pages (for checks and debugging)."""
        return {s.request_id: list(s.pages) for s in self.running}

    def stats(self) -> dict[str, float]:
        """Metrics snapshot plus the gauges: KV-cache use (pages held, cached, on host), running
        batch, queue length."""
        used, total = self.allocator.num_used, self.allocator.capacity
        return {
            "kv_cache_usage_ratio": used / total, "kv_cache_pages_used": used, "kv_cache_pages_total": total,
            "kv_cache_pages_cached": self.allocator.num_cached, "kv_cache_evictions_total": self.allocator.evictions,
            "kv_host_pages": len(self.host), "kv_host_pages_total": self.host.capacity,
            "kv_host_stored_pages_total": self.host.stored, "kv_host_dropped_pages_total": self.host.dropped,
            "running_requests": sum(s is not None for s in self._slots), "waiting_requests": len(self._waiting),
            **self.metrics.snapshot(),
        }

    def compiled_programs(self) -> int:
        """How many programs the step function has compiled (stays 2 once warm: prefill, decode; 3
        once a request asked for prompt log-probabilities: prefill with scoring)."""
        return _forward_and_sample._cache_size()

    # ---------------------------------------------------------------- scheduling
    def _pages_for(self, tokens: int) -> int:
        return -(-tokens // self.page_size)

    def _hashes(self, seq: RequestState, pages: int) -> list[bytes]:
        """Hashes of the sequence's first ``pages`` full pages (computed once, kept on it)."""
        if len(seq.hashes) < pages:
            seq.hashes = page_hashes(seq.tokens[: pages * self.page_size], self.page_size, self.extra_key, seq.hashes)
        return seq.hashes[:pages]

    def _match(self, seq: RequestState) -> list[tuple[int | None, bytes]]:
        """The longest run of the sequence's leading full pages that need no computing: ``(page,
        hash)`` for a page in the pool, ``(None, hash)`` for one to copy back from host memory.
        Its last token is always left out (it must be computed to have logits to sample from)."""
        if not self.enable_prefix_caching:
            return []
        pages = (len(seq.tokens) - 1) // self.page_size
        if seq.prompt_logprobs is not None:  # only what it has scored: the rest needs its logits
            pages = min(pages, len(seq.prompt_logprobs) // self.page_size)
        found = []
        for h in self._hashes(seq, pages):
            page = self.allocator.lookup(h)
            if page is None and h not in self.host:
                break
            found.append((page, h))
        first_host = next((i for i, (page, _) in enumerate(found) if page is None), len(found))
        end = len(found) * self.page_size  # load every host page of the run, or cut the run at the first
        if first_host < len(found) and not load_beats_recompute(
                self.cfg, first_host * self.page_size, end, self.host_link_bytes_per_s, self.matmul_flops_per_s):
            found = found[:first_host]
        return found

    def _admit(self) -> None:
        while self._waiting and None in self._slots:
            seq = self._waiting[0]
            found = self._match(seq)
            cached = len(found) * self.page_size
            held = sum(1 for page, _ in found if page is not None)
            unheld = sum(1 for page, _ in found if page is not None and not self.allocator.refcount(page))
            need = self._pages_for(cached + min(len(seq.tokens) - cached, self.prefill_chunk)) - held
            if need > self.allocator.num_free - unheld:
                break
            self._waiting.popleft()
            for page, _ in found:
                if page is not None:
                    self.allocator.acquire(page)
            loads = [(i, h, *self.host.get(h)) for i, (page, h) in enumerate(found) if page is None]
            new = self.allocator.allocate(len(loads))  # may evict (to host): the copies to load are taken
            seq.pages = [page for page, _ in found]
            for page, (i, h, _, _) in zip(new, loads):
                seq.pages[i] = page
                self.allocator.register(page, h)
            if loads:
                self._k_pool, self._v_pool = self._on_mesh(copy_from_host, self._k_pool, self._v_pool, new,
                                                           [k for *_, k, _ in loads], [v for *_, v in loads],
                                                           self.pages_per_seq)
                self.metrics.record_host_load(len(new))
            seq.num_cached = cached
            if seq.prompt_cached is None:
                seq.prompt_cached = cached
            self.metrics.record_prefix_lookup(len(seq.tokens), cached, len(loads) * self.page_size,
                                              max(seq.lost - cached, 0))
            seq.lost = 0
            seq.admitted, seq.slot = next(self._admissions), self._slots.index(None)
            self._slots[seq.slot] = seq

    def _offload(self, pages: list[int], hashes: list[bytes]) -> None:
        """Copy evicted pages to the host tier (called by the allocator before it reuses them)."""
        self._on_mesh(copy_to_host, self._k_pool, self._v_pool, pages, hashes, self.host, self.pages_per_seq)

    def _on_mesh(self, fn, *args):
        if self.mesh is None:
            return fn(*args)
        with jax.set_mesh(self.mesh):
            return fn(*args)

    def _release(self, seq: RequestState) -> None:
        """Give back a sequence's pages (named ones stay cached) and its batch slot."""
        self.allocator.free(seq.pages)
        seq.pages = []
        if seq.slot >= 0:
            self._slots[seq.slot], seq.slot = None, -1

    def _preempt(self, seq: RequestState) -> None:
        self.metrics.record_preemption()
        seq.lost, seq.num_cached, seq.preemptions = seq.num_cached, 0, seq.preemptions + 1
        self._release(seq)
        self._waiting.appendleft(seq)

    def _name_pages(self, seq: RequestState, before: int) -> None:
        """Register the pages the last call filled (cached tokens went from ``before`` to now)."""
        if not self.enable_prefix_caching:
            return
        full = seq.num_cached // self.page_size
        hashes = self._hashes(seq, full)
        copies = []
        for i in range(before // self.page_size, full):
            if not self.allocator.register(seq.pages[i], hashes[i]):  # a copy of a named page stays unnamed;
                copies.append(self.allocator.lookup(hashes[i]))       # the named one was asked for: keep it
        self.allocator.touch([p for p in copies if p is not None])

    def _schedule(self) -> tuple[list[RequestState], list[RequestState]]:
        """(sequences to prefill a chunk of, sequences to decode), their pages taken."""
        running = self.running
        prefill = [s for s in running if s.remaining > 1][: self.prefill_batch]
        decode = [s for s in running if s.remaining == 1]
        for seq in sorted(prefill + decode, key=lambda s: s.admitted):  # oldest first: the newest yield
            if seq.slot < 0:
                continue  # preempted for an older one
            fed = min(seq.remaining, self.prefill_chunk)
            need = self._pages_for(seq.num_cached + fed) - len(seq.pages)
            while need > self.allocator.num_free:
                victim = self.running[-1]
                self._preempt(victim)
                if victim is seq:
                    break
            else:
                seq.pages += self.allocator.allocate(max(need, 0))
        return [s for s in prefill if s.slot >= 0], [s for s in decode if s.slot >= 0]

    # ---------------------------------------------------------------- running
    def _call(self, seqs: list[RequestState], rows: int, width: int, row_of) -> tuple[np.ndarray, ...]:
        tokens = np.zeros((rows, width), np.int32)
        targets = np.zeros((rows, width), np.int32)  # the token after each fed one (prompt scoring)
        score = width > 1 and any(seq.scoring for seq in seqs)
        positions = np.broadcast_to(np.arange(width, dtype=np.int32), (rows, width)).copy()
        table = np.full((rows, self.pages_per_seq), SCRATCH_PAGE, np.int32)
        last = np.zeros((rows,), np.int32)
        sampling = SamplingRows(rows, self.max_context, len(self.eos_token_ids) + MAX_STOP_TOKEN_IDS)
        for i, seq in enumerate(seqs):
            r, n, start = row_of(i, seq), min(seq.remaining, width), seq.num_cached
            tokens[r, :n] = seq.tokens[start:start + n]
            after = seq.tokens[start + 1:start + n + 1]
            targets[r, :len(after)] = after
            positions[r] += start
            table[r, : len(seq.pages)] = seq.pages
            last[r] = n - 1
            banned = seq.stop_ids if len(seq.generated) < seq.request.min_tokens else ()
            sampling.set(r, seq.seed, seq.generated, seq.knobs, banned, seq.logprobs is not None)
        args = (self._graphdef, score, self._weights, self._k_pool, self._v_pool, *map(jnp.asarray, (
            tokens, positions, table, last, targets, *sampling.arrays())))
        out, self._k_pool, self._v_pool = self._on_mesh(_forward_and_sample, *args)
        return tuple(np.asarray(a) for a in jax.device_get(out))

    def _call_isolated(self, seqs: list[RequestState], rows: int, width: int, row_of) -> list[list[np.ndarray] | str]:
        """Each sequence's sampled row of one call, or the one-line error of a call that failed for it.

        A failed call is run again one sequence at a time, so a failure that one request causes fails
        only that request. A failure that consumed the KV pools (the device call had taken them) loses
        every request's cache: the pools are made anew, the other running requests are preempted (they
        recompute, with the same tokens) and the ones of this call fail.
        """
        try:
            out = self._call(seqs, rows, width, row_of)
            return [[a[row_of(i, s)] for a in out] for i, s in enumerate(seqs)]
        except Exception as e:  # noqa: BLE001 - isolated below
            error = f"engine step failed: {type(e).__name__}: {e}".splitlines()[0]
            if self._k_pool.is_deleted() or self._v_pool.is_deleted():
                self._lose_pools(keep=seqs)
                return [error] * len(seqs)
            if len(seqs) == 1:
                return [error]
            return [self._call_isolated([s], rows, width, lambda _i, _s, i=i, s=s: row_of(i, s))[0]
                    for i, s in enumerate(seqs)]

    def _lose_pools(self, keep: list[RequestState]) -> None:
        """New, empty KV pools and page table after the old ones were lost; every running request but
        ``keep`` (about to fail) goes back to the queue to recompute."""
        for seq in self.running:
            if seq not in keep:
                self._preempt(seq)
        for seq in keep:
            seq.pages = []  # the old allocator's pages: nothing to free in the new one
        self._empty_cache(self.allocator.num_pages)

    def warmup(self) -> None:
        """Compile the prefill and decode programs (their rows all point at the scratch page), and
        with a host tier the page copies (of the scratch page onto itself)."""
        self._call([], self.prefill_batch, self.prefill_chunk, None)
        self._call([], self.max_batch, 1, None)
        if self.host.capacity:
            self._k_pool, self._v_pool = self._on_mesh(compile_page_copies, self._k_pool, self._v_pool, self.pages_per_seq)

    def step(self) -> list[Event]:
        """Admit, prefill one chunk, decode one token; returns what each touched request produced."""
        self._admit()
        prefill, decode = self._schedule()
        events, flops, moved = [], 0.0, 0.0
        for seqs, rows, width, row_of in (
            (prefill, self.prefill_batch, self.prefill_chunk, lambda i, s: i),
            (decode, self.max_batch, 1, lambda i, s: s.slot),
        ):
            if not seqs:
                continue
            fed = [min(s.remaining, width) for s in seqs]
            f, b = call_flops_and_bytes(self.cfg, [(s.num_cached, n) for s, n in zip(seqs, fed)])
            flops, moved = flops + f, moved + b
            seqs_fed = [(s, n) for s, n in zip(seqs, fed) if s.slot >= 0]  # a lost pool may have preempted some
            sampled = self._call_isolated([s for s, _ in seqs_fed], rows, width, row_of)
            (self.metrics.record_prefill if width > 1 else self.metrics.record_decode)(sum(fed))
            now = self._clock()
            for (seq, n), row in zip(seqs_fed, sampled):
                if isinstance(row, str):
                    events.append(self._fail(seq, row))
                    continue
                if seq.scoring and len(row) > 4:
                    seq.score(seq.num_cached, *(a[:n] for a in row[4:]))
                seq.num_cached += n
                self._name_pages(seq, seq.num_cached - n)
                if seq.num_cached == len(seq.tokens):  # it has read everything: its sample is the next token
                    try:
                        events.append(self._append(seq, row, now) if seq.request.max_tokens else self._read_only(seq, now))
                    except Exception as e:  # noqa: BLE001 - a failure of one request's output fails only it
                        events.append(self._fail(seq, f"{type(e).__name__}: {e}"))
        if prefill or decode:
            self.metrics.record_step(len(prefill) + len(decode), self.allocator.num_used / self.allocator.capacity,
                                     flops, moved)
        return events

    def _fail(self, seq: RequestState, message: str) -> Event:
        """Drop a running request whose output could not be made; its event carries the error."""
        self._release(seq)
        return Event(seq.request_id, [], error=message)

    def _read_only(self, seq: RequestState, now: float) -> Event:
        """Finish a request with ``max_tokens`` 0 once its prompt is read: no token, its prompt's scores
        (its ``time_to_first_token_s`` is the time until its prompt was read)."""
        seq.first_token_s = now - seq.arrival
        self._release(seq)
        self.metrics.record_finished()
        return Event(seq.request_id, [], seq.output("length"), "", None if seq.logprobs is None else [],
                     prompt_logprobs=seq.scored_prompt())

    def _append(self, seq: RequestState, sampled: list[np.ndarray], now: float) -> Event:
        token, lp = int(sampled[0]), None
        if seq.logprobs is not None:
            lp = TokenLogprobs(float(sampled[1]), tuple(zip(sampled[2][: seq.request.logprobs].tolist(),
                                                             sampled[3][: seq.request.logprobs].tolist())))
        prompt_lps = None
        if seq.first_token_s is None:
            seq.first_token_s = now - seq.arrival
            self.metrics.record_first_token(seq.first_token_s)
            prompt_lps = seq.scored_prompt()
        else:
            self.metrics.record_inter_token(now - seq.last_token_s)
        seq.last_token_s = now
        reason, delta = seq.accept(token, lp)
        if reason is None:
            return Event(seq.request_id, [token], text=delta, logprobs=None if lp is None else [lp],
                         prompt_logprobs=prompt_lps)
        self._release(seq)
        self.metrics.record_finished()
        return Event(seq.request_id, [token], seq.output(reason), delta, None if lp is None else [lp],
                     prompt_logprobs=prompt_lps)

    # ---------------------------------------------------------------- convenience loops
    def stream(self, requests: Iterable[Request]) -> Iterator[tuple[str, list[int]]]:
        """Queue the requests, then step until all work is done, yielding (request id, new token ids)."""
        for r in requests:
            self.add_request(r)
        while self.has_work():
            for e in self.step():
                yield e.request_id, e.new_token_ids

    def generate(self, requests: Sequence[Request]) -> list[Output]:
        """Run the requests to completion; their outputs in the order given."""
        ids = [self.add_request(r) for r in requests]
        done: dict[str, Output] = {}
        while self.has_work():
            done.update((e.request_id, e.output) for e in self.step() if e.output is not None)
        return [done[i] for i in ids]

"""Host-side page pool: reference-counted KV pages, content-addressed once full, evicted LRU.

Page 0 is reserved as the scratch page (writes past a sequence's own pages land there and are
never read), so pages ``1 .. num_pages - 1`` are handed out. A page is in one of three states:

* **in use** - held by one or more sequences (``refcount > 0``); never evicted;
* **cached** - no holder, but registered under the hash of its contents (:func:`jaxlm.serve.prefix_cache.page_hashes`),
  so a later request with the same prefix can take it back with :meth:`PageAllocator.acquire`;
* **empty** - no holder, no contents worth keeping.

:meth:`PageAllocator.allocate` hands out empty pages first, then evicts cached pages least recently
released first (their hashes are forgotten; ``on_evict`` sees them first, e.g. to copy them to
host memory). The design follows vLLM's v1 block pool (a free queue that doubles as the LRU list,
a hash -> block map, per-block reference counts) and SGLang's radix cache (evict unreferenced
entries by last use).
"""

from __future__ import annotations

import collections
from typing import Callable

SCRATCH_PAGE = 0


class OutOfPages(RuntimeError):
    """Fewer free pages than asked for (the engine answers by preempting)."""


class PageAllocator:
    """``num_pages`` KV pages with reference counts and a hash -> page map of full pages.

    ``on_evict(pages, hashes)`` is called with cached pages (and their hashes) just before they are
    handed out again, while their contents are still intact.
    """

    def __init__(self, num_pages: int, on_evict: Callable[[list[int], list[bytes]], None] | None = None):
        if num_pages < 2:
            raise ValueError(f"num_pages must be at least 2 (page 0 is the scratch page), got {num_pages}")
        self.num_pages = num_pages
        self._on_evict = on_evict
        self._empty = list(range(num_pages - 1, SCRATCH_PAGE, -1))  # pop() hands out low pages first
        self._refs: dict[int, int] = {}  # page -> holders, for pages in use
        self._lru: collections.OrderedDict[int, None] = collections.OrderedDict()  # cached, unheld; first = oldest
        self._hash_of: dict[int, bytes] = {}
        self._page_of: dict[bytes, int] = {}
        self.evictions = 0

    # ---------------------------------------------------------------- counts
    @property
    def capacity(self) -> int:
        """Pages that can be handed out (all but the scratch page)."""
        return self.num_pages - 1

    @property
    def num_free(self) -> int:
        """Pages :meth:`allocate` can hand out now: empty plus cached-and-unheld."""
        return len(self._empty) + len(self._lru)

    @property
    def num_used(self) -> int:
        """Pages held by at least one sequence."""
        return len(self._refs)

    @property
    def num_cached(self) -> int:
        """Unheld pages kept for their contents (evictable)."""
        return len(self._lru)

    def refcount(self, page: int) -> int:
        return self._refs.get(page, 0)

    # ---------------------------------------------------------------- content addressing
    def lookup(self, page_hash: bytes) -> int | None:
        """The page holding the contents ``page_hash`` names (held or cached), or None."""
        return self._page_of.get(page_hash)

    def register(self, page: int, page_hash: bytes) -> bool:
        """Name a full, computed page in use by its contents' hash. False (and nothing changes) when
        another page already holds these contents or this page already has a name."""
        if page not in self._refs:
            raise ValueError(f"page {page} is not in use; only a held page can be registered")
        if page_hash in self._page_of or page in self._hash_of:
            return False
        self._hash_of[page], self._page_of[page_hash] = page_hash, page
        return True

    def touch(self, pages: list[int]) -> None:
        """Mark cached pages as just used (most recent in the LRU, the first page of the list last, as
        :meth:`free` orders a sequence's pages); pages in use are skipped. For pages whose contents a
        request asked for but computed again (a request scoring its prompt needs the logits)."""
        for p in reversed(pages):
            if p in self._lru:
                self._lru.move_to_end(p)

    def acquire(self, page: int) -> None:
        """Take one more reference to a held or cached page (a prefix-cache hit)."""
        if page in self._refs:
            self._refs[page] += 1
        elif page in self._lru:
            del self._lru[page]
            self._refs[page] = 1
        else:
            raise ValueError(f"page {page} is neither in use nor cached")

    # ---------------------------------------------------------------- allocate / free
    def allocate(self, n: int) -> list[int]:
        """``n`` distinct unnamed pages, each with one reference, or :class:`OutOfPages` (and nothing
        taken) if fewer are free. Empty pages go first, then the least recently cached are evicted."""
        if n < 0:
            raise ValueError(f"cannot allocate {n} pages")
        if n > self.num_free:
            raise OutOfPages(f"asked for {n} pages, {self.num_free} free")
        pages = [self._empty.pop() for _ in range(min(n, len(self._empty)))]
        evicted = [self._lru.popitem(last=False)[0] for _ in range(n - len(pages))]
        if evicted:
            hashes = [self._hash_of.pop(p) for p in evicted]
            for h in hashes:
                del self._page_of[h]
            self.evictions += len(evicted)
            if self._on_evict is not None:
                self._on_evict(evicted, hashes)
        pages += evicted
        for p in pages:
            self._refs[p] = 1
        return pages

    def free(self, pages: list[int]) -> None:
        """Drop one reference to each page. A page nobody holds any more stays cached if it has a
        hash (most recently used last, so give a sequence's pages in order: its tail is evicted
        before its head), else becomes empty."""
        for p in pages:
            if p not in self._refs:
                raise ValueError(f"page {p} is not in use (double free or never allocated)")
        for p in reversed(pages):  # the tail of a sequence is the least likely to be shared: oldest in the LRU
            self._refs[p] -= 1
            if self._refs[p]:
                continue
            del self._refs[p]
            if p in self._hash_of:
                self._lru[p] = None
            else:
                self._empty.append(p)

"""Host-side page allocator: a free list over the KV page pool.

Page 0 is reserved as the scratch page (writes past a sequence's own pages land there and are
never read), so pages ``1 .. num_pages - 1`` are handed out. Every page is owned by at most one
sequence: freeing a page twice, or one never handed out, is an error, not a silent corruption.
"""

from __future__ import annotations

SCRATCH_PAGE = 0


class OutOfPages(RuntimeError):
    """Fewer free pages than asked for (the engine answers by preempting)."""


class PageAllocator:
    def __init__(self, num_pages: int):
        if num_pages < 2:
            raise ValueError(f"num_pages must be at least 2 (page 0 is the scratch page), got {num_pages}")
        self.num_pages = num_pages
        self._free = list(range(num_pages - 1, SCRATCH_PAGE, -1))  # pop() hands out low pages first
        self._used: set[int] = set()

    @property
    def capacity(self) -> int:
        """Pages that can be handed out (all but the scratch page)."""
        return self.num_pages - 1

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return len(self._used)

    def allocate(self, n: int) -> list[int]:
        """``n`` distinct pages, or :class:`OutOfPages` (and nothing taken) if fewer are free."""
        if n < 0:
            raise ValueError(f"cannot allocate {n} pages")
        if n > len(self._free):
            raise OutOfPages(f"asked for {n} pages, {len(self._free)} free")
        pages = [self._free.pop() for _ in range(n)]
        self._used.update(pages)
        return pages

    def free(self, pages: list[int]) -> None:
        """Return pages to the free list; each must be in use."""
        for p in pages:
            if p not in self._used:
                raise ValueError(f"page {p} is not in use (double free or never allocated)")
            self._used.remove(p)
            self._free.append(p)

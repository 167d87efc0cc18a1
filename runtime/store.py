"""What an engine keeps prepared: prepared requests by key, least recently used first, bounded in count
and bytes; declared buckets are pinned (never evicted) and the request being served is never evicted."""
from __future__ import annotations

from typing import Callable

from .errors import RequestError
from .prepared import Prepared


class PreparedStore:
    def __init__(self, max_prepared: int | None, max_prepared_bytes: int | None,
                 release: Callable[[Prepared], None]):
        for name, v in (("max_prepared", max_prepared), ("max_prepared_bytes", max_prepared_bytes)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise RequestError(f"{name} must be an integer >= 1 or None (no limit), got {v!r}")
        self.max_prepared, self.max_prepared_bytes = max_prepared, max_prepared_bytes
        self._release = release
        self._items: dict[tuple, Prepared] = {}        # least recently used first
        self.pinned: set[tuple] = set()

    def __contains__(self, key: tuple) -> bool:
        return key in self._items

    def __iter__(self):
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def values(self):
        return self._items.values()

    def items(self):
        return self._items.items()

    def get(self, key: tuple, make: Callable[[], Prepared]) -> Prepared:
        """The prepared request for key (made on first use, after room is made for it), now most recent."""
        if key not in self._items:
            self._evict(keep=1)
            self._items[key] = make()
        self._items[key] = self._items.pop(key)
        self._evict(current=key)
        return self._items[key]

    def _evict(self, keep: int = 0, current: tuple | None = None) -> None:
        """Release least-recently-used prepared requests (never a pinned one, never `current`) until at
        most max_prepared - keep remain and they hold at most max_prepared_bytes."""
        def over() -> bool:
            if self.max_prepared is not None and len(self._items) > self.max_prepared - keep:
                return True
            return self.max_prepared_bytes is not None and \
                sum(p.nbytes for p in self._items.values()) > self.max_prepared_bytes
        for key in [k for k in self._items if k not in self.pinned and k != current]:
            if not over():
                break
            self._release(self._items.pop(key))

    def clear(self) -> None:
        for prep in self._items.values():
            self._release(prep)
        self._items.clear()
        self.pinned.clear()

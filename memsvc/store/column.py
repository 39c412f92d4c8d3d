"""`Column`: one column of a memory's entries (ids, keys, values, ...) as a growable numpy array."""
from __future__ import annotations

import numpy as np


class Column:
    """An append-only numpy column with amortised growth; `data` is the filled prefix."""

    def __init__(self, dtype: np.dtype | type, tail: tuple[int, ...] = ()):
        self._buf = np.empty((1024, *tail), dtype=dtype)
        self.size = 0

    @property
    def data(self) -> np.ndarray:
        return self._buf[: self.size]

    def append(self, rows: np.ndarray) -> None:
        need = self.size + len(rows)
        if need > len(self._buf):
            grown = np.empty((max(need, 2 * len(self._buf)), *self._buf.shape[1:]), dtype=self._buf.dtype)
            grown[: self.size] = self.data
            self._buf = grown
        self._buf[self.size: need] = rows
        self.size = need

    def keep(self, mask: np.ndarray) -> None:
        kept = self.data[mask]
        self.size = 0
        self.append(kept)

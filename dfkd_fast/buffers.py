"""On-device ring buffer of named row tensors: the storage of CMI's memory bank and of online KD's image pool.

:class:`RingBuffer` keeps up to ``capacity`` rows per field; ``add`` writes a batch at the write pointer and
wraps around, overwriting the oldest rows once full (a batch larger than the capacity keeps its last
``capacity`` rows, as if every row had been written in turn). ``capacity=None`` grows without bound. Rows
live in *storage order* (``view``): until the buffer first wraps this is insertion order; ``ordered`` gives
them oldest first. Writes are one indexed copy per field (no host round trip).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

__all__ = ["RingBuffer"]


class RingBuffer:
    """Fixed-capacity (or growing) ring buffer of equally many rows per field, on one device.

    Args:
        capacity: rows kept (>= 1), or None to grow without bound.
        fields: name -> (row shape, dtype), e.g. ``{"images": ((3, 32, 32), torch.uint8)}``.
        device: device of the storage.

    Shape:
        ``add(**{name: (B, *row_shape)})``; ``view(name) -> (len, *row_shape)``.
    """

    def __init__(self, capacity: int | None, fields: Mapping[str, tuple[Sequence[int], torch.dtype]],
                 device: torch.device | str | None = None) -> None:
        if capacity is not None and int(capacity) < 1:
            raise ValueError(f"RingBuffer: capacity must be >= 1 or None, got {capacity}")
        if not fields:
            raise ValueError("RingBuffer: give at least one field")
        self.capacity = None if capacity is None else int(capacity)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.shapes = {k: tuple(int(s) for s in shape) for k, (shape, _) in fields.items()}
        rows = 0 if self.capacity is None else self.capacity
        self.storage = {k: torch.zeros((rows, *self.shapes[k]), dtype=dt, device=self.device)
                        for k, (_, dt) in fields.items()}
        self.ptr = 0  # next write position (capacity mode)
        self.count = 0  # filled rows

    def __len__(self) -> int:
        return self.count

    def clear(self) -> None:
        """Forget every row (the storage is zeroed)."""
        self.ptr = self.count = 0
        for k, t in self.storage.items():
            self.storage[k] = t[:0] if self.capacity is None else t.zero_()

    def add(self, **rows: torch.Tensor) -> None:
        """Write one batch (the same number of rows for every field), detached, cast to the storage dtype."""
        if set(rows) != set(self.storage):
            raise ValueError(f"RingBuffer.add: expected fields {sorted(self.storage)}, got {sorted(rows)}")
        b = {int(t.shape[0]) for t in rows.values()}
        if len(b) != 1:
            raise ValueError(f"RingBuffer.add: every field needs the same number of rows, got "
                             f"{ {k: int(t.shape[0]) for k, t in rows.items()} }")
        n = b.pop()
        if n == 0:
            return
        if self.capacity is None:
            for k, t in rows.items():
                self.storage[k] = torch.cat([self.storage[k], t.detach().to(self.device, self.storage[k].dtype)])
            self.count += n
            return
        kept = min(n, self.capacity)
        # rows dropped from an oversized batch still advance the pointer, as if written then overwritten
        start = (self.ptr + n - kept) % self.capacity
        idx = (start + torch.arange(kept, device=self.device)) % self.capacity
        for k, t in rows.items():
            self.storage[k][idx] = t.detach()[-kept:].to(self.device, self.storage[k].dtype)
        self.ptr = (self.ptr + n) % self.capacity
        self.count = min(self.capacity, self.count + n)

    def view(self, name: str) -> torch.Tensor:
        """The filled rows of ``name`` in storage order (a view, no copy)."""
        return self.storage[name][:self.count]

    def oldest_first(self) -> torch.Tensor:
        """Storage indices of the filled rows, oldest first. Shape: (len,) int64."""
        if self.capacity is None:
            return torch.arange(self.count, device=self.device)
        start = (self.ptr - self.count) % self.capacity
        return (start + torch.arange(self.count, device=self.device)) % self.capacity

    def ordered(self, name: str) -> torch.Tensor:
        """The filled rows of ``name``, oldest first (a copy)."""
        return self.storage[name][self.oldest_first()]

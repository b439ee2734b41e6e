"""CMI's contrastive building blocks (SPEC §3.2; Fang et al., "Contrastive Model Inversion", IJCAI 2021).

- :class:`MemoryBank`: on-device ring buffer (:class:`dfkd_fast.buffers.RingBuffer`) of (local, global) instance
  features of past batches.
- :class:`ProjectionHead`: the instance discriminator h, Linear(D, D)-ReLU-Linear(D, 256), L2-normalized.
- :func:`cmi_contrastive_loss`: L_cr over the current batch plus n_neg bank entries, through the fused
  :func:`dfkd_fast.ops.info_nce`.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dfkd_fast import comm
from dfkd_fast.buffers import RingBuffer
from dfkd_fast.ops import info_nce

__all__ = ["MemoryBank", "ProjectionHead", "cmi_contrastive_loss"]


class MemoryBank:
    """Ring buffer of (local, global) feature pairs on one device (CMI's memory bank, default 40,960 entries).

    ``add`` writes a batch at the write pointer and wraps around, overwriting the oldest entries once full.
    ``sample(n)`` draws ``min(n, len(bank))`` distinct entries uniformly at random (without replacement:
    when ``n >= len(bank)`` every stored entry is returned once, in random order -- a repeated entry would
    be a second, contradicting positive in InfoNCE). Features are stored detached.

    Args:
        capacity: number of entries kept (published default 40960).
        dims: (local_dim, global_dim), or one int for both; D = total channels of the probed layers.
        device: device of the buffers (the features' device).
        dtype: storage dtype (float32 by default; float16/bfloat16 halve the memory).
        all_gather: multi-process CMI: ``add`` all-gathers every rank's batch (rank order) before writing, so
            all ranks hold the same entries and contrast against all ranks' history (no-op without an
            initialized ``torch.distributed`` group). Every rank must call ``add`` equally often.
        group: process group of the all-gather (None: the default group).

    Shape:
        ``add(local (B, D_l), global (B, D_g))``; ``sample(n) -> (local (n', D_l), global (n', D_g))``,
        n' = min(n, len(bank)).
    """

    def __init__(self, capacity: int = 40960, dims: int | Sequence[int] = (256, 256),
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32,
                 all_gather: bool = False, group: Any = None) -> None:
        if int(capacity) < 1:
            raise ValueError(f"MemoryBank: capacity must be >= 1, got {capacity}")
        d = (int(dims), int(dims)) if isinstance(dims, int) else tuple(int(x) for x in dims)
        if len(d) != 2 or min(d) < 1:
            raise ValueError(f"MemoryBank: dims must be (local_dim, global_dim) with positive entries, got {dims}")
        if dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
            raise ValueError(f"MemoryBank: dtype must be a float dtype, got {dtype}")
        self.capacity = int(capacity)
        self.dims: tuple[int, int] = (d[0], d[1])
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.dtype = dtype
        self.ring = RingBuffer(self.capacity, {"local": ((d[0],), dtype), "global": ((d[1],), dtype)}, self.device)
        self.n_updates = 0  # number of add() calls
        self.all_gather = bool(all_gather)
        self.group = group

    @property
    def local(self) -> torch.Tensor:
        """(capacity, D_l) storage of the local features (rows past ``len(bank)`` are zero)."""
        return self.ring.storage["local"]

    @property
    def global_(self) -> torch.Tensor:
        """(capacity, D_g) storage of the global features."""
        return self.ring.storage["global"]

    @property
    def ptr(self) -> int:
        """Next write position."""
        return self.ring.ptr

    @property
    def count(self) -> int:
        """Filled entries, <= capacity."""
        return self.ring.count

    def __len__(self) -> int:
        return self.count

    def add(self, local: torch.Tensor, global_: torch.Tensor) -> None:
        """Append a batch of (local, global) features; the oldest entries are overwritten once full.

        Shape: local (B, D_l), global_ (B, D_g). A batch larger than the capacity keeps its last ``capacity`` rows.
        """
        for t, name, dim in ((local, "local", self.dims[0]), (global_, "global_", self.dims[1])):
            if not isinstance(t, torch.Tensor) or t.dim() != 2 or t.shape[1] != dim:
                shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"MemoryBank.add: '{name}' must be (B, {dim}), got {shape}")
        if local.shape[0] != global_.shape[0]:
            raise ValueError(f"MemoryBank.add: local and global_ need the same batch size, got {local.shape[0]} "
                             f"and {global_.shape[0]}")
        if self.all_gather:
            both = comm.all_gather_rows(torch.cat([local.detach(), global_.detach().to(local.dtype)], 1), self.group)
            local, global_ = both[:, :self.dims[0]], both[:, self.dims[0]:]
        if local.shape[0] == 0:
            return
        self.ring.add(local=local, **{"global": global_})
        self.n_updates += 1

    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw ``min(n, len(self))`` distinct stored entries uniformly at random.

        Args:
            n: number of entries wanted (>= 0).
            generator: optional ``torch.Generator`` (on any device) for reproducible draws.

        Returns:
            (local (n', D_l), global (n', D_g)) on the bank's device, in its dtype.
        """
        if int(n) < 0:
            raise ValueError(f"MemoryBank.sample: n must be >= 0, got {n}")
        k = min(int(n), self.count)
        gen_device = generator.device if generator is not None else self.device
        idx = torch.randperm(self.count, generator=generator, device=gen_device)[:k].to(self.device)
        return self.local[idx], self.global_[idx]

    def entries(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All stored entries, oldest first. Shape: (len, D_l), (len, D_g)."""
        idx = self.ring.oldest_first()
        return self.local[idx], self.global_[idx]

    def state_dict(self) -> dict[str, Any]:
        """Filled entries (oldest first) and counters; buffers are not padded to the capacity."""
        local, global_ = self.entries()
        return {"capacity": self.capacity, "dims": list(self.dims), "local": local.clone(),
                "global": global_.clone(), "n_updates": self.n_updates}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore entries written by :meth:`state_dict` (capacity and dims must match this bank)."""
        if int(state["capacity"]) != self.capacity or tuple(int(x) for x in state["dims"]) != self.dims:
            raise ValueError(f"MemoryBank.load_state_dict: state has capacity {state['capacity']} and dims "
                             f"{tuple(state['dims'])}; this bank has {self.capacity} and {self.dims}: build the "
                             "bank with the same settings")
        local, global_ = state["local"], state["global"]
        if local.shape[0] > self.capacity or local.shape[0] != global_.shape[0]:
            raise ValueError(f"MemoryBank.load_state_dict: inconsistent entries {tuple(local.shape)} / "
                             f"{tuple(global_.shape)} for capacity {self.capacity}")
        self.ring.clear()
        n_updates = int(state["n_updates"])
        gather, self.all_gather = self.all_gather, False  # restoring is local: no collective
        try:
            self.add(local, global_)
        finally:
            self.all_gather = gather
        self.n_updates = n_updates


class ProjectionHead(nn.Module):
    r"""CMI's instance discriminator h: :math:`v = \mathrm{normalize}(W_2\,\mathrm{relu}(W_1 x + b_1) + b_2)`.

    Args:
        in_dim: D, the feature dimension (sum of probed BN channels; 2704 for WRN-40-2).
        hidden: hidden width (default D).
        out_dim: embedding size (published default 256).

    Shape:
        (N, D) -> (N, out_dim), each row of unit L2 norm.
    """

    def __init__(self, in_dim: int, hidden: int | None = None, out_dim: int = 256) -> None:
        super().__init__()
        hidden = in_dim if hidden is None else hidden
        if min(in_dim, hidden, out_dim) < 1:
            raise ValueError(f"ProjectionHead: dims must be >= 1, got in_dim={in_dim}, hidden={hidden}, "
                             f"out_dim={out_dim}")
        self.in_dim, self.out_dim = in_dim, out_dim
        self.head = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2 or x.shape[1] != self.in_dim:
            raise ValueError(f"ProjectionHead: input must be (N, {self.in_dim}), got {tuple(x.shape)}")
        return F.normalize(self.head(x), dim=1)


def cmi_contrastive_loss(head: nn.Module, local_feats: torch.Tensor, global_feats: torch.Tensor,
                         bank: MemoryBank | None, n_neg: int = 4096, temperature: float = 0.1,
                         backend: str = "auto", generator: torch.Generator | None = None) -> torch.Tensor:
    r"""CMI's contrastive loss L_cr (SPEC §3.2), one fused InfoNCE over batch + bank.

    With N current rows and n' = min(n_neg, len(bank)) sampled bank rows:
    q = h([local; bank_local]), k = h([global; bank_global]) (k computed under ``no_grad``: the global view gets
    no gradient, as in the paper), loss_i = CE(q k^T / T, i) over all N + n' rows, and

    .. math::
        L_{cr} = \tfrac{1}{N}\textstyle\sum_{i<N} \ell_i + \tfrac{1}{n'}\sum_{i \ge N} \ell_i \quad (n' > 0),
        \qquad L_{cr} = \tfrac{1}{N}\textstyle\sum_{i<N} \ell_i \quad (\text{empty bank or } n\_neg = 0).

    The bank is only read here; add the batch's features after the synthesis step (``bank.add``).

    Args:
        head: projection head (e.g. :class:`ProjectionHead`), applied row-wise.
        local_feats: (N, D_l) instance features of the local (resized-crop) view, differentiable.
        global_feats: (N, D_g) instance features of the global view (treated as constant).
        bank: memory bank of past (local, global) features, or None.
        n_neg: bank entries drawn per step (published default 4096).
        temperature: cr_T (published default 0.1).
        backend: backend of :func:`dfkd_fast.ops.info_nce`.
        generator: optional generator for the bank draw.

    Returns:
        Scalar fp32 loss (gradient flows into ``head`` and ``local_feats`` only).
    """
    if local_feats.dim() != 2 or global_feats.dim() != 2 or local_feats.shape[0] != global_feats.shape[0]:
        raise ValueError(f"cmi_contrastive_loss: local_feats and global_feats must be (N, D) with the same N, got "
                         f"{tuple(local_feats.shape)} and {tuple(global_feats.shape)}")
    if local_feats.shape[0] == 0:
        raise ValueError("cmi_contrastive_loss: got an empty batch (N = 0)")
    if int(n_neg) < 0:
        raise ValueError(f"cmi_contrastive_loss: n_neg must be >= 0, got {n_neg}")
    n = local_feats.shape[0]
    if bank is not None and len(bank) > 0 and n_neg > 0:
        bank_local, bank_global = bank.sample(n_neg, generator=generator)
        local_all = torch.cat([local_feats, bank_local.to(local_feats.device, local_feats.dtype)])
        global_all = torch.cat([global_feats, bank_global.to(global_feats.device, global_feats.dtype)])
    else:
        local_all, global_all = local_feats, global_feats
    q = head(local_all)
    with torch.no_grad():
        k = head(global_all.detach())
    loss = info_nce(q, k.to(q.dtype), temperature, backend=backend)
    if loss.shape[0] > n:
        return loss[:n].mean() + loss[n:].mean()
    return loss.mean()

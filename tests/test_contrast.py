"""CMI building blocks: MemoryBank ring semantics, ProjectionHead, cmi_contrastive_loss vs a naive version."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dfkd_fast import kernels
from dfkd_fast.contrast import MemoryBank, ProjectionHead, cmi_contrastive_loss


def _ids(start: int, n: int, d: int = 3) -> torch.Tensor:
    """Rows whose every entry is the row id: makes ring positions readable."""
    return torch.arange(start, start + n, dtype=torch.float32)[:, None].expand(n, d).clone()


def test_ring_wraps_and_keeps_newest():
    bank = MemoryBank(capacity=5, dims=(3, 2))
    assert len(bank) == 0
    bank.add(_ids(0, 3), -_ids(0, 3, 2))
    assert len(bank) == 3 and bank.ptr == 3
    bank.add(_ids(3, 4), -_ids(3, 4, 2))  # wraps: ids 5, 6 overwrite ids 0, 1
    assert len(bank) == 5 and bank.ptr == 2 and bank.n_updates == 2
    local, global_ = bank.entries()
    assert local[:, 0].tolist() == [2, 3, 4, 5, 6]
    assert global_[:, 0].tolist() == [-2, -3, -4, -5, -6]
    assert bank.local[:, 0].tolist() == [5, 6, 2, 3, 4]


def test_batch_larger_than_capacity_keeps_last_rows():
    bank = MemoryBank(capacity=4, dims=3)
    bank.add(_ids(0, 1), _ids(0, 1))
    bank.add(_ids(1, 6), _ids(1, 6))  # ids 1..6, only 3..6 survive
    local, _ = bank.entries()
    assert local[:, 0].tolist() == [3, 4, 5, 6]
    assert bank.ptr == 7 % 4


def test_sample_without_replacement_and_aligned():
    bank = MemoryBank(capacity=16, dims=(3, 3))
    bank.add(_ids(0, 10), _ids(100, 10))
    gen = torch.Generator().manual_seed(1)
    local, global_ = bank.sample(6, generator=gen)
    ids = local[:, 0].tolist()
    assert len(set(ids)) == 6 and set(ids) <= set(range(10))
    assert (global_[:, 0] - local[:, 0]).eq(100).all()  # pairs stay aligned
    local_all, _ = bank.sample(50, generator=gen)  # more than stored: every entry once
    assert sorted(local_all[:, 0].tolist()) == list(range(10))
    a, _ = bank.sample(6, generator=torch.Generator().manual_seed(3))
    b, _ = bank.sample(6, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(a, b)
    empty_l, empty_g = MemoryBank(capacity=4, dims=(3, 2)).sample(5)
    assert empty_l.shape == (0, 3) and empty_g.shape == (0, 2)


def test_sample_is_uniform_over_entries():
    bank = MemoryBank(capacity=8, dims=1)
    bank.add(_ids(0, 12, 1), _ids(0, 12, 1))  # ids 4..11 stored
    gen = torch.Generator().manual_seed(0)
    counts = torch.zeros(12)
    for _ in range(400):
        local, _ = bank.sample(2, generator=gen)
        counts[local[:, 0].long()] += 1
    assert counts[:4].sum() == 0
    assert counts[4:].min() > 60 and counts[4:].max() < 140  # expected 100 each


def test_state_dict_round_trip():
    bank = MemoryBank(capacity=5, dims=(3, 2))
    bank.add(_ids(0, 4), _ids(0, 4, 2))
    bank.add(_ids(4, 3), _ids(4, 3, 2))
    state = bank.state_dict()
    other = MemoryBank(capacity=5, dims=(3, 2))
    other.load_state_dict(state)
    assert len(other) == len(bank) and other.n_updates == bank.n_updates
    for x, y in zip(other.entries(), bank.entries(), strict=True):
        torch.testing.assert_close(x, y)
    bank.add(_ids(7, 2), _ids(7, 2, 2))  # both continue identically
    other.add(_ids(7, 2), _ids(7, 2, 2))
    assert other.entries()[0][:, 0].tolist() == bank.entries()[0][:, 0].tolist() == [4, 5, 6, 7, 8]
    with pytest.raises(ValueError, match="same settings"):
        MemoryBank(capacity=6, dims=(3, 2)).load_state_dict(state)


def test_bank_bad_input():
    bank = MemoryBank(capacity=4, dims=(3, 2))
    with pytest.raises(ValueError, match="must be"):
        bank.add(torch.randn(2, 4), torch.randn(2, 2))
    with pytest.raises(ValueError, match="same batch size"):
        bank.add(torch.randn(2, 3), torch.randn(3, 2))
    with pytest.raises(ValueError, match="capacity"):
        MemoryBank(capacity=0, dims=3)


def test_projection_head_normalized():
    head = ProjectionHead(12, out_dim=7)
    assert head.head[0].out_features == 12  # hidden defaults to D
    v = head(torch.randn(9, 12) * 50)
    assert v.shape == (9, 7)
    torch.testing.assert_close(v.norm(dim=1), torch.ones(9))
    with pytest.raises(ValueError, match=r"\(N, 12\)"):
        head(torch.randn(9, 11))


def _naive_loss(head, local, global_, bank_local, bank_global, t):
    """The published CMI code path: one head forward over everything, detach k, full logits, CE."""
    n = local.shape[0]
    proj = head(torch.cat([local, bank_local, global_, bank_global]))
    q, k = proj.chunk(2, dim=0)
    logits = q @ k.detach().t() / t
    loss = F.cross_entropy(logits, torch.arange(logits.shape[0]), reduction="none")
    return loss[:n].mean() + loss[n:].mean() if bank_local.shape[0] else loss.mean()


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("n_bank", [0, 13])
def test_cmi_loss_matches_naive(backend, n_bank):
    d, n, t = 10, 6, 0.1
    head = ProjectionHead(d, out_dim=8)
    bank = MemoryBank(capacity=32, dims=(d, d))
    if n_bank:
        bank.add(torch.randn(n_bank, d), torch.randn(n_bank, d))
    local = torch.randn(n, d, requires_grad=True)
    global_ = torch.randn(n, d, requires_grad=True)
    before = kernels.LAUNCHES["info_nce_fwd"]
    loss = cmi_contrastive_loss(head, local, global_, bank, n_neg=9, temperature=t, backend=backend,
                                generator=torch.Generator().manual_seed(5))
    assert kernels.LAUNCHES["info_nce_fwd"] == before + (backend == "triton")
    loss.backward()
    grads = [p.grad.clone() for p in head.parameters()] + [local.grad.clone()]
    assert global_.grad is None  # the k half gets no gradient

    head.zero_grad()
    local_ref = local.detach().clone().requires_grad_()
    bl, bg = bank.sample(9, generator=torch.Generator().manual_seed(5))
    assert bl.shape[0] == min(9, n_bank)
    ref = _naive_loss(head, local_ref, global_.detach(), bl, bg, t)
    ref.backward()
    ref_grads = [p.grad for p in head.parameters()] + [local_ref.grad]
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_cmi_loss_no_dk_kernel_and_bank_untouched():
    d = 5
    head = ProjectionHead(d, out_dim=4)
    bank = MemoryBank(capacity=8, dims=(d, d))
    bank.add(torch.randn(3, d), torch.randn(3, d))
    before = dict(kernels.LAUNCHES)
    cmi_contrastive_loss(head, torch.randn(4, d, requires_grad=True), torch.randn(4, d), bank, n_neg=8,
                         backend="triton").backward()
    assert kernels.LAUNCHES["info_nce_bwd_dq"] == before.get("info_nce_bwd_dq", 0) + 1
    assert kernels.LAUNCHES["info_nce_bwd_dk"] == before.get("info_nce_bwd_dk", 0)
    assert len(bank) == 3 and bank.n_updates == 1


def test_cmi_loss_bad_input():
    head = ProjectionHead(4, out_dim=4)
    with pytest.raises(ValueError, match="same N"):
        cmi_contrastive_loss(head, torch.randn(3, 4), torch.randn(2, 4), None)
    with pytest.raises(ValueError, match="n_neg"):
        cmi_contrastive_loss(head, torch.randn(3, 4), torch.randn(3, 4), None, n_neg=-1)


# ----------------------------------------------------------------------------- the ring buffer under both users
def _per_row_pool(capacity, batches):
    """The pre-RingBuffer ImagePool semantics, row by row: append until full, then overwrite the oldest."""
    rows, nxt = [], 0
    for batch in batches:
        for r in batch:
            if capacity is None or len(rows) < capacity:
                rows.append(r)
            else:
                rows[nxt] = r
                nxt = (nxt + 1) % capacity
    return rows


@pytest.mark.parametrize("capacity", [None, 1, 5, 8])  # grows; minimal; wraps mid-batch; oversized batch
def test_ring_buffer_matches_row_by_row_writes(capacity):
    from dfkd_fast.buffers import RingBuffer

    sizes = (3, 0, 4, 9, 2)  # an empty batch, a batch larger than most capacities
    batches, v = [], 0
    for n in sizes:
        batches.append(torch.arange(v, v + n, dtype=torch.float32))
        v += n
    ring = RingBuffer(capacity, {"x": ((), torch.float32), "y": ((2,), torch.int64)})
    for b in batches:
        ring.add(x=b, y=b.long().unsqueeze(1).repeat(1, 2))
    want = _per_row_pool(capacity, [b.tolist() for b in batches])
    assert ring.view("x").tolist() == want and len(ring) == len(want)
    assert ring.view("y")[:, 1].tolist() == want  # fields stay row-aligned
    total = sum(sizes)
    oldest = list(range(total - len(want), total))
    assert ring.ordered("x").tolist() == oldest
    with pytest.raises(ValueError, match="same number of rows"):
        ring.add(x=torch.zeros(2), y=torch.zeros(3, 2))
    with pytest.raises(ValueError, match="fields"):
        ring.add(x=torch.zeros(2))
    ring.clear()
    assert len(ring) == 0 and ring.view("x").numel() == 0


def test_image_pool_is_a_ring_buffer():
    from dfkd_fast.tasks.distill import ImagePool

    pool = ImagePool((1, 2, 2), 3, torch.device("cpu"), capacity=5)
    for i in range(4):  # 12 images into 5 slots
        pool.add(torch.full((3, 1, 2, 2), i / 10), torch.full((3, 3), float(i)))
    assert len(pool) == 5 and pool.images.dtype == torch.uint8
    assert pool.logits[:, 0].tolist() == [3.0, 3.0, 2.0, 2.0, 3.0]  # 12 rows written round-robin into 5 slots
    assert torch.equal(pool.images[:, 0, 0, 0], (pool.logits[:, 0] / 10 * 255).round().to(torch.uint8))
    x = pool.sample(7, torch.Generator().manual_seed(0))
    assert x.shape == (7, 1, 2, 2) and float(x.max()) <= 1.0

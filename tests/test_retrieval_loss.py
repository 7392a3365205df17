import math
import os

import pytest
import torch
import torch.nn.functional as F
from conftest import free_port
from geoswc.retrieval.loss import InfoNCEWithMemory


def test_loss_hand_computed_two_pairs():
    # Two pairs in 2-D, tau = 0.5, no memory, queries as anchors only.
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    p = torch.tensor([[0.6, 0.8], [-1.0, 0.0]])
    loss = InfoNCEWithMemory(temperature=0.5, memory_size=0, symmetric=False)(q, p, torch.tensor([0, 1]))
    # anchor q0: positive p0 (0.6), negatives q1 (0.0), p1 (-1.0) -> logits 1.2, 0, -2
    l0 = -1.2 + math.log(math.exp(1.2) + math.exp(0.0) + math.exp(-2.0))
    # anchor q1: positive p1 (0.0), negatives q0 (0.0), p0 (0.8) -> logits 0, 0, 1.6
    l1 = -0.0 + math.log(math.exp(0.0) + math.exp(0.0) + math.exp(1.6))
    assert loss.item() == pytest.approx((l0 + l1) / 2, rel=1e-6)


def _dot(u, v):
    return sum(x * y for x, y in zip(u, v))


def _reference_loss(q, p, labels, mem, mem_labels, tau, symmetric=True):
    """Per-anchor loop over eq. 3 of the paper, with same-cell entries left out of the negatives."""
    batch = list(zip(q.tolist(), labels.tolist())) + list(zip(p.tolist(), labels.tolist()))
    keys = batch + list(zip(mem.tolist(), mem_labels.tolist()))
    n = len(q)
    anchors = range(2 * n if symmetric else n)
    total = 0.0
    for i in anchors:
        a, cell = batch[i]
        partner = (i + n) % (2 * n)
        pos = math.exp(_dot(a, batch[partner][0]) / tau)
        neg = sum(math.exp(_dot(a, k) / tau) for k, c in keys if c != cell)
        total += -math.log(pos / (pos + neg))
    return total / len(anchors)


@pytest.mark.parametrize("symmetric", [True, False])
def test_loss_matches_reference_with_memory_and_masking(symmetric):
    g = torch.Generator().manual_seed(0)
    q = F.normalize(torch.randn(4, 5, generator=g), dim=1)
    p = F.normalize(torch.randn(4, 5, generator=g), dim=1)
    labels = torch.tensor([3, 1, 3, 0])  # pairs 0 and 2 share a cell: never negatives of each other
    mem = F.normalize(torch.randn(6, 5, generator=g), dim=1)
    mem_labels = torch.tensor([1, 2, 3, 5, 0, 7])
    criterion = InfoNCEWithMemory(temperature=0.1, memory_size=8, symmetric=symmetric)
    criterion.enqueue(mem, mem_labels)
    loss = criterion(q, p, labels)
    expected = _reference_loss(q, p, labels, mem, mem_labels, 0.1, symmetric)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_same_cell_memory_entries_are_never_negatives():
    g = torch.Generator().manual_seed(1)
    q = F.normalize(torch.randn(1, 8, generator=g), dim=1)
    p = F.normalize(torch.randn(1, 8, generator=g), dim=1)
    labels = torch.tensor([4])
    other = F.normalize(torch.randn(2, 8, generator=g), dim=1)
    base = InfoNCEWithMemory(temperature=0.05, memory_size=16).eval()
    base.enqueue(other, torch.tensor([5, 6]))
    with_same = InfoNCEWithMemory(temperature=0.05, memory_size=16).eval()
    # Exact copies of the pair from its own cell: they would dominate the denominator if used as negatives.
    with_same.enqueue(torch.cat([other, q, p]), torch.tensor([5, 6, 4, 4]))
    torch.testing.assert_close(with_same(q, p, labels), base(q, p, labels))
    relabelled = InfoNCEWithMemory(temperature=0.05, memory_size=16).eval()
    relabelled.enqueue(torch.cat([other, q, p]), torch.tensor([5, 6, 9, 9]))
    assert relabelled(q, p, labels).item() > base(q, p, labels).item() + 1.0


def test_memory_fifo_order_and_size():
    criterion = InfoNCEWithMemory(memory_size=5)
    e = torch.arange(7, dtype=torch.float32)[:, None].repeat(1, 2)
    criterion.enqueue(e[:3], torch.tensor([0, 1, 2]))
    emb, lab = criterion.memory()
    assert lab.tolist() == [0, 1, 2] and emb[:, 0].tolist() == [0, 1, 2]
    criterion.enqueue(e[3:7], torch.tensor([3, 4, 5, 6]))
    emb, lab = criterion.memory()
    assert lab.tolist() == [2, 3, 4, 5, 6] and emb[:, 0].tolist() == [2, 3, 4, 5, 6]
    criterion.enqueue(torch.full((9, 2), 9.0), torch.arange(10, 19))  # more than the memory holds
    assert criterion.memory()[1].tolist() == [14, 15, 16, 17, 18]


def test_training_forward_enqueues_batch_and_state_dict_roundtrip():
    q = F.normalize(torch.randn(3, 4), dim=1)
    p = F.normalize(torch.randn(3, 4), dim=1)
    criterion = InfoNCEWithMemory(memory_size=10)
    criterion(q, p, torch.tensor([0, 1, 2]))
    emb, lab = criterion.memory()
    assert lab.tolist() == [0, 1, 2, 0, 1, 2]
    torch.testing.assert_close(emb, torch.cat([q, p]))
    restored = InfoNCEWithMemory(memory_size=10)
    restored.load_state_dict(criterion.state_dict())
    torch.testing.assert_close(restored.memory()[0], emb)
    criterion.eval()(q, p, torch.tensor([0, 1, 2]))
    assert len(criterion.memory()[1]) == 6  # evaluation does not touch the memory


def test_loss_gradient_flows_to_both_sides():
    q = F.normalize(torch.randn(4, 6), dim=1).requires_grad_()
    p = F.normalize(torch.randn(4, 6), dim=1).requires_grad_()
    InfoNCEWithMemory()(q, p, torch.arange(4)).backward()
    assert q.grad.abs().sum() > 0 and p.grad.abs().sum() > 0


def _rank_worker(rank, world, port, q, p, labels, mem, mem_labels, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        b = len(q) // world
        sl = slice(rank * b, (rank + 1) * b)
        lq, lp = q[sl].clone().requires_grad_(), p[sl].clone().requires_grad_()
        criterion = InfoNCEWithMemory(temperature=0.1, memory_size=32)
        criterion.enqueue(mem, mem_labels)
        loss = criterion(lq, lp, labels[sl])
        loss.backward()
        # DDP divides the summed parameter gradients by the world size.
        grads = torch.cat([lq.grad, lp.grad]) / world
        out[rank] = {"loss": loss.item(), "grad": grads, "memory": criterion.memory()[1].tolist()}
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_equal_single_process_global_batch():
    import torch.multiprocessing as mp

    g = torch.Generator().manual_seed(5)
    q = F.normalize(torch.randn(6, 4, generator=g), dim=1)
    p = F.normalize(torch.randn(6, 4, generator=g), dim=1)
    labels = torch.tensor([0, 1, 2, 3, 0, 5])
    mem = F.normalize(torch.randn(5, 4, generator=g), dim=1)
    mem_labels = torch.tensor([1, 9, 9, 3, 4])

    ref_q, ref_p = q.clone().requires_grad_(), p.clone().requires_grad_()
    single = InfoNCEWithMemory(temperature=0.1, memory_size=32)
    single.enqueue(mem, mem_labels)
    ref_loss = single(ref_q, ref_p, labels)
    ref_loss.backward()

    manager = mp.Manager()
    out = manager.dict()
    mp.spawn(_rank_worker, args=(2, free_port(), q, p, labels, mem, mem_labels, out), nprocs=2)
    for rank in range(2):
        assert out[rank]["loss"] == pytest.approx(ref_loss.item(), rel=1e-6)
        assert out[rank]["memory"] == single.memory()[1].tolist()
    sl = [slice(0, 3), slice(3, 6)]
    for rank in range(2):
        expected = torch.cat([ref_q.grad[sl[rank]], ref_p.grad[sl[rank]]])
        torch.testing.assert_close(out[rank]["grad"], expected, rtol=1e-5, atol=1e-7)

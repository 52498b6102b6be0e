"""The eager fast path (``direct_call``): ops skip torch's dispatcher only when nothing needs it,
and give bitwise the same results as through it."""

import longattn as la
import pytest
import torch
from longattn._runtime import direct_call
from torch.utils._python_dispatch import TorchDispatchMode


class RecordOps(TorchDispatchMode):
    """Names of the ops that reach the dispatcher."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


def _cases():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 32, 4, 16, generator=g) for _ in range(3))
    gate = torch.rand(1, 32, 4, 16, generator=g) * 0.8 + 0.1
    k_cmp, _ = la.nsa_compress(k, kernel_size=8, kernel_stride=4)
    _, lse = la.nsa_compressed_attn(
        q, k_cmp, k_cmp, kernel_size=8, kernel_stride=4, return_lse=True
    )
    return {
        "lightning_fwd": lambda: la.lightning_attn(q, k, v, la.lightning_slopes(4))[0],
        "rat_fwd": lambda: la.rat_attn(q, k, v, gate, chunk_size=8),
        "nsa_branch_fwd": lambda: la.sliding_window_attn(q, k, v, window_size=8),
        "nsa_compress_fwd": lambda: la.nsa_compress(k, kernel_size=8, kernel_stride=4)[0],
        "nsa_topk_blocks": lambda: la.nsa_topk_blocks(
            q, k_cmp, lse, kernel_size=8, kernel_stride=4, block_size=8, topk=2
        ),
        "landmark_fwd": lambda: la.landmark_attn(q, k, v, block_size=8),
        "landmark_topk": lambda: la.landmark_topk_blocks(q, k, block_size=8, topk=2),
    }


@pytest.mark.parametrize("op", list(_cases()))
def test_direct_path_is_bitwise_the_dispatched_one(op):
    fn = _cases()[op]
    with torch.no_grad():
        direct = fn()
        with RecordOps() as seen:
            dispatched = fn()
    assert f"longattn.{op}.default" in seen.names  # a watching mode still sees the op
    assert torch.equal(direct, dispatched)


def test_direct_call_only_where_nothing_needs_the_dispatcher():
    x = torch.randn(3)
    assert direct_call(x, None)
    leaf = x.clone().requires_grad_()
    assert not direct_call(x, leaf)
    with torch.no_grad():
        assert direct_call(x, leaf)
    assert not direct_call(torch.empty(3, device="meta"))
    assert not direct_call(torch.nn.Parameter(x, requires_grad=False))
    with RecordOps():
        assert not direct_call(x)
    with torch.autograd.profiler.profile():
        assert not direct_call(x)
    under_vmap = []
    torch.vmap(lambda y: under_vmap.append(direct_call(y)) or y)(torch.randn(2, 3))
    assert under_vmap == [False]

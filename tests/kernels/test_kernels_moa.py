"""MoA's Triton kernels (band + sink varlen prefill, per-head-span split-K decode) and their PyTorch
references against SDPA over the whole sequence with span_mask per KV head (spec §10.3): varlen
batches, chunked prefill with chunks longer than the ring, prompts shorter than the sink, dense-span
heads next to 2B-minimum ones, decode across the ring wrap, GQA groups 1 and 4, pages shuffled over
a NaN pool (a read of any slot a unit does not own poisons the output). On CPU the kernels run in
Triton's interpreter (tests/conftest.py)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from paged_kv_builders import TOL

from leanserve.kernels.moa_reference import (
    moa_decode_attention_ref,
    moa_prefill_attention_ref,
    moa_store_kv,
    store_rows,
)
from leanserve.models.moa_plan import span_mask

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.usefixtures("interpreter_bf16_dot")  # tests/conftest.py
SINK = 16  # the plan's block size


class Layout:
    """B sequences x U units, unit (b, u) keeping capacity[b][u] slots (sink SINK) in shuffled pages
    of a NaN pool; full-sequence q, k, v to feed it from and the masked-SDPA oracle."""

    def __init__(self, lengths: list[int], capacity: list[list[int]], group: int, page_size: int,
                 dtype: torch.dtype, seed: int = 0, head_dim: int = 16):
        gen = torch.Generator().manual_seed(seed)
        self.lengths, self.group, self.dtype = lengths, group, dtype
        num_units = len(capacity[0])
        cap = torch.tensor(capacity, dtype=torch.int32)
        self.sink = cap.clamp_max(SINK)
        self.ring = cap - self.sink
        pages = -(-cap // page_size)
        self.offsets = (pages.cumsum(1) - pages).int()
        num_pages = int(pages.sum()) + 3
        perm = torch.randperm(num_pages, generator=gen)
        self.tables = torch.full((len(lengths), int(pages.sum(1).max()) + 2), -1, dtype=torch.int32)
        used = 0
        for b, row in enumerate(pages.sum(1).tolist()):
            self.tables[b, :row] = perm[used:used + row].int()
            used += row
        # + the trash page the store writes what it drops into
        self.k_pool = torch.full((num_pages + 1, page_size, head_dim), float("nan"), dtype=dtype)
        self.v_pool = self.k_pool.clone()
        self.q = [torch.randn(n, num_units * group, head_dim, generator=gen).to(dtype) for n in lengths]
        self.k = [torch.randn(n, num_units, head_dim, generator=gen).to(dtype) for n in lengths]
        self.v = [torch.randn(n, num_units, head_dim, generator=gen).to(dtype) for n in lengths]
        self.scale = head_dim ** -0.5
        self.oracle = [self._oracle(b) for b in range(len(lengths))]
        for name in ("sink", "ring", "offsets", "tables", "k_pool", "v_pool"):
            setattr(self, name, getattr(self, name).to(DEVICE))

    def _oracle(self, b: int) -> torch.Tensor:
        """[n, Hq, D]: every position's output, KV head u masked by span_mask(n, S, R)."""
        n = self.lengths[b]
        mask = torch.stack([span_mask(n, int(s), int(r)) for s, r in zip(self.sink[b], self.ring[b])])
        q, k, v = (t.float().transpose(0, 1) for t in (self.q[b], self.k[b], self.v[b]))
        o = F.scaled_dot_product_attention(q, k.repeat_interleave(self.group, 0), v.repeat_interleave(self.group, 0),
                                           attn_mask=mask.repeat_interleave(self.group, 0), scale=self.scale)
        return o.transpose(0, 1)

    def step(self, spans: list[tuple[int, int]]):
        """A step where sequence b computes positions spans[b] = (start, end): its q, k, v and metadata."""
        rows = [(b, s, e) for b, (s, e) in enumerate(spans)]
        q = torch.cat([self.q[b][s:e] for b, s, e in rows]).to(DEVICE)
        k = torch.cat([self.k[b][s:e] for b, s, e in rows]).to(DEVICE)
        v = torch.cat([self.v[b][s:e] for b, s, e in rows]).to(DEVICE)
        qsl = torch.tensor([0] + [e - s for _, s, e in rows], dtype=torch.int32).cumsum(0).int().to(DEVICE)
        seq_lens = torch.tensor([e for _, _, e in rows], dtype=torch.int32, device=DEVICE)
        token_seq = torch.cat([torch.full((e - s,), b) for b, s, e in rows]).to(DEVICE)
        positions = torch.cat([torch.arange(s, e) for _, s, e in rows]).to(DEVICE)
        want = torch.cat([self.oracle[b][s:e] for b, s, e in rows]).to(DEVICE)
        return q, k, v, qsl, seq_lens, token_seq, positions, want

    def store(self, k, v, seq_lens, token_seq, positions) -> None:
        moa_store_kv(k, v, self.k_pool, self.v_pool, self.tables, self.offsets, self.sink, self.ring, token_seq,
                     positions, seq_lens, torch.ones_like(positions, dtype=torch.bool))


def prefill(layout: Layout, triton: bool, q, k, v, qsl, seq_lens) -> torch.Tensor:
    args = (q, k, v, layout.k_pool, layout.v_pool, qsl, seq_lens, layout.tables, layout.offsets, layout.sink,
            layout.ring, layout.scale)
    if not triton:
        return moa_prefill_attention_ref(*args)
    from leanserve.kernels.moa_prefill import moa_prefill_attention
    return moa_prefill_attention(*args, block_m=16, block_n=16)


def decode(layout: Layout, triton: bool, q, seq_lens, num_splits: int) -> torch.Tensor:
    cap = layout.sink + layout.ring
    valid = torch.minimum(seq_lens[:, None], cap).int()
    max_valid = int(cap.max())
    if not triton:
        return moa_decode_attention_ref(q, layout.k_pool, layout.v_pool, layout.tables, layout.offsets, valid,
                                        layout.scale, max_valid)
    from leanserve.kernels.moa_decode import moa_decode_attention
    return moa_decode_attention(q, layout.k_pool, layout.v_pool, layout.tables, layout.offsets, valid, layout.scale,
                                max_valid, num_splits=num_splits, block_n=16)


# lengths 68 and 9 (shorter than the sink); units: the 2B minimum (16 + 16, wraps), 48 slots, dense
CAPACITY = [[32, 48, 80], [32, 80, 48]]


@pytest.mark.parametrize("triton", [False, True], ids=["reference", "triton"])
@pytest.mark.parametrize("group,page_size,dtype", [(1, 16, torch.float32), (4, 8, torch.bfloat16)])
def test_chunked_prefill_then_decode_across_the_ring_wrap(triton, group, page_size, dtype):
    layout = Layout([68, 9], CAPACITY, group, page_size, dtype, seed=group)
    tol = TOL[dtype] if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    # prefill in chunks (both longer than a 16-slot ring), the short prompt in one step
    for spans in ([(0, 40), (0, 5)], [(40, 58), (5, 6)]):
        q, k, v, qsl, seq_lens, token_seq, positions, want = layout.step(spans)
        got = prefill(layout, triton, q, k, v, qsl, seq_lens)
        torch.testing.assert_close(got.float(), want, **tol)
        layout.store(k, v, seq_lens, token_seq, positions)
    # decode: every step from 58 to 68 (sequence 1 from 6 to 9), ring slots overwritten on the way, the
    # 16-slot ring's slot 16 again at 64
    for step in range(10):
        spans = [(58 + step, 59 + step), (6 + min(step, 2), 7 + min(step, 2))]
        q, k, v, qsl, seq_lens, token_seq, positions, want = layout.step(spans)
        layout.store(k, v, seq_lens, token_seq, positions)
        got = decode(layout, triton, q, seq_lens, num_splits=1 + step % 3)
        torch.testing.assert_close(got.float(), want, **tol)


@pytest.mark.parametrize("triton", [False, True], ids=["reference", "triton"])
def test_one_shot_prefill_and_mixed_steps(triton):
    """Three sequences in one varlen step (one-shot prefills), then a step mixing a chunk with decode rows."""
    layout = Layout([45, 30, 20], [[32, 48], [80, 32], [32, 32]], 2, 16, torch.float32, seed=3)
    for spans in ([(0, 33), (0, 30), (0, 17)], [(33, 45), (30, 30), (17, 20)]):
        q, k, v, qsl, seq_lens, token_seq, positions, want = layout.step(spans)
        got = prefill(layout, triton, q, k, v, qsl, seq_lens)
        torch.testing.assert_close(got, want, **TOL[torch.float32])
        layout.store(k, v, seq_lens, token_seq, positions)


def test_the_store_writes_each_slot_once():
    """A chunk longer than a ring keeps only its last R positions there: no slot is written twice
    (index_copy_ of duplicates on a GPU has no defined winner)."""
    layout = Layout([70], [[32, 80]], 1, 16, torch.float32)
    _, k, _, _, seq_lens, token_seq, positions, _ = layout.step([(0, 70)])
    rows = store_rows(layout.k_pool, layout.tables, layout.offsets, layout.sink, layout.ring, token_seq, positions,
                      seq_lens, torch.ones(70, dtype=torch.bool, device=DEVICE))
    trash = (layout.k_pool.shape[0] - 1) * 16
    kept = rows[rows != trash]
    assert kept.numel() == 32 + 70 and kept.unique().numel() == kept.numel()


@pytest.mark.parametrize("triton", [False, True], ids=["reference", "triton"])
def test_decode_of_a_cuda_graph_padding_row_reads_only_the_pool(triton):
    """A CUDA-graph padding row (the table's last: [PAD_BLOCK, -1, ...]) whose units start past column
    0, one even past the row's end, reads clamped pages: what the reference reads, never page -1
    (here NaN memory just before the pool) nor memory past the table."""
    gen = torch.Generator().manual_seed(0)
    page_size, head_dim, units = 8, 16, 3
    memory = torch.randn(7, page_size, head_dim, generator=gen)
    memory[0] = float("nan")  # page -1 of the pool below
    k_pool, v_pool = memory[1:4].to(DEVICE), memory[4:].to(DEVICE)
    tables = torch.tensor([[2, 1, 0, 2], [0, -1, -1, -1]], dtype=torch.int32, device=DEVICE)
    offsets = torch.tensor([[0, 1, 2], [0, 2, 6]], dtype=torch.int32, device=DEVICE)
    valid = torch.tensor([[8, 8, 12], [1, 8, 8]], dtype=torch.int32, device=DEVICE)
    q = torch.randn(2, units * 2, head_dim, generator=gen).to(DEVICE)
    if triton:
        from leanserve.kernels.moa_decode import moa_decode_attention
        got = moa_decode_attention(q, k_pool, v_pool, tables, offsets, valid, head_dim ** -0.5, 12, block_n=16)
    else:
        got = moa_decode_attention_ref(q, k_pool, v_pool, tables, offsets, valid, head_dim ** -0.5, 12)
    want = moa_decode_attention_ref(q, k_pool, v_pool, tables, offsets, valid, head_dim ** -0.5, 12)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, **TOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_store_writes_what_the_reference_keeps(dtype):
    """The Triton store against moa_store_kv: a chunk longer than the ring (its early ring positions
    dropped), a short prompt inside the sink, and a padding token (write False) — every page but the
    reference's trash page equal, NaN where nothing was written."""
    from leanserve.kernels.moa_store import moa_store_kv as fused

    layout = Layout([70, 9], [[32, 80], [48, 32]], 1, 8, dtype, seed=5)
    q, k, v, qsl, seq_lens, token_seq, positions, _ = layout.step([(0, 70), (0, 9)])
    write = torch.ones_like(positions, dtype=torch.bool)
    write[-1] = False  # the last token stands for a padding row
    pools = []
    for store in (moa_store_kv, fused):
        k_pool, v_pool = layout.k_pool.clone(), layout.v_pool.clone()
        store(k, v, k_pool, v_pool, layout.tables, layout.offsets, layout.sink, layout.ring, token_seq, positions,
              seq_lens, write)
        pools.append((k_pool[:-1], v_pool[:-1]))
    (k_ref, v_ref), (k_got, v_got) = pools
    assert torch.equal(k_ref.isnan(), k_got.isnan()) and not k_got.isnan().all()
    torch.testing.assert_close(k_got, k_ref, equal_nan=True, rtol=0, atol=0)
    torch.testing.assert_close(v_got, v_ref, equal_nan=True, rtol=0, atol=0)

"""Every running sequence's block table in one tensor on the model's device (vLLM V1's persistent
batch, `BlockTable`): a step sends row indices, not tables.

A sequence takes a row the first time it is scheduled and gives it back when its blocks are freed
(finished, aborted or preempted: SchedulerOutput.freed). Block tables only grow between the two
(BlockManager appends), so a step copies just the entries added since the sequence's last step:
none for a cache allocated whole at admission (per-head sink + ring pages: tens of thousands of
entries per long request), one block now and then for a dense cache. Columns past a sequence's
own blocks keep stale ids of the row's previous owner, real blocks, which no attention reads.
The last row is the padding row of CUDA-graph buckets: block PAD_BLOCK, then -1.
"""
from __future__ import annotations

import numpy as np
import torch

from leanserve.server.engine.sequence import Sequence

# a padding row's table: block 0 always exists and holds finite values (the cache is zero-initialised)
PAD_BLOCK = 0
NO_UPDATE = np.empty(0, dtype=np.int64)


class PersistentBlockTable:
    def __init__(self, max_rows: int, width: int, device: torch.device):
        self.width = width
        self.table = torch.full((max_rows + 1, width), -1, dtype=torch.int32, device=device)
        self.table[max_rows, 0] = PAD_BLOCK
        self.pad_row = max_rows
        self._free_rows = list(range(max_rows - 1, -1, -1))  # pop() hands out row 0 first
        self._synced: dict[Sequence, list[int]] = {}  # sequence -> [its row, entries already in it]

    @property
    def num_rows_in_use(self) -> int:
        return len(self._synced)

    def rows(self, seqs: list[Sequence]) -> list[int]:
        """The rows of `seqs`, in order, with their newest blocks copied in first (one copy for
        all of them; nothing when no table grew)."""
        rows, update = self.assign(seqs)
        self.write(update)
        return rows

    def assign(self, seqs: list[Sequence]) -> tuple[list[int], np.ndarray]:
        """Host bookkeeping only: the rows of `seqs` and the update that brings the device table up
        to date (int64: flat indices then values, for write; numpy throughout, since a per-head sink + ring
        cache's admission brings ~33k entries). Tensor parallel: rank 0 assigns, every rank writes the same
        update into its own table."""
        out, index, values = [], [], []
        for seq in seqs:
            entry = self._synced.get(seq)
            if entry is None:
                if not self._free_rows:
                    raise RuntimeError(f"no block-table row left for {seq.request_id!r}: {len(self._synced)} "
                                       f"sequences hold rows (is a freed sequence not released?)")
                entry = self._synced[seq] = [self._free_rows.pop(), 0]
            row, done = entry
            n = len(seq.block_table)
            if n != done:
                if n < done or n > self.width:
                    raise RuntimeError(f"{seq.request_id!r}: block table of {n} entries, {done} already copied, "
                                       f"{self.width} columns (a table shrank without a release, or is too wide)")
                index.append(np.arange(row * self.width + done, row * self.width + n, dtype=np.int64))
                values.append(np.array(seq.block_table[done:n], dtype=np.int64))
                entry[1] = n
            out.append(row)
        return out, np.concatenate(index + values) if index else NO_UPDATE

    def write(self, update: np.ndarray) -> None:
        """Apply assign's update: table.flat[indices] = values with one host-to-device copy (pinned,
        non-blocking on CUDA; the pinned buffer stays alive until the copy ran, torch's host
        allocator sees to it)."""
        if not len(update):
            return
        data = torch.from_numpy(update)
        if self.table.is_cuda:
            data = data.pin_memory().to(self.table.device, non_blocking=True)
        n = len(update) // 2
        self.table.view(-1).index_copy_(0, data[:n], data[n:].to(torch.int32))

    def release(self, seqs: list[Sequence]) -> None:
        """Give back the rows of sequences whose blocks were freed (unknown ones: never scheduled)."""
        for seq in seqs:
            entry = self._synced.pop(seq, None)
            if entry is not None:
                self._free_rows.append(entry[0])

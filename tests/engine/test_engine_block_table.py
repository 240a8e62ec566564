"""The persistent block table: rows handed out and given back, only new entries copied, the padding
row, clear errors; and in the engine, every row back once the requests are gone (finished,
preempted)."""
from __future__ import annotations

import pytest
import torch
from test_engine_e2e import engine_config

from leanserve.server.engine.block_table import PAD_BLOCK, PersistentBlockTable
from leanserve.server.engine.llm_engine import LLMEngine
from leanserve.server.engine.model_runner import StepInputs, step_from_wire, step_to_wire
from leanserve.server.engine.sampling_params import SamplingParams
from leanserve.server.engine.sequence import Sequence


def seq_with(table: list[int], rid: str = "r") -> Sequence:
    seq = Sequence(rid, [1], SamplingParams(), 0.0, [])
    seq.block_table = list(table)
    return seq


@pytest.fixture
def writes(monkeypatch) -> list[int]:
    """How many entries each copy into a table carried."""
    counts: list[int] = []
    write = PersistentBlockTable.write
    monkeypatch.setattr(PersistentBlockTable, "write",
                        lambda self, update: (len(update) and counts.append(len(update) // 2)) or write(self, update))
    return counts


def test_rows_hold_the_tables_and_copy_only_new_entries(writes):
    bt = PersistentBlockTable(max_rows=3, width=5, device=torch.device("cpu"))
    assert bt.table[bt.pad_row].tolist() == [PAD_BLOCK, -1, -1, -1, -1] and bt.pad_row == 3
    a, b = seq_with([7, 3], "a"), seq_with([9], "b")
    assert bt.rows([a, b]) == [0, 1] and writes == [3]  # both new tables in one copy
    assert bt.table[0].tolist() == [7, 3, -1, -1, -1] and bt.table[1].tolist() == [9, -1, -1, -1, -1]
    assert bt.rows([b, a]) == [1, 0] and writes == [3]  # unchanged tables: no copy
    bt.table[0, :2] = -7  # a copy of the whole row would overwrite these
    a.block_table.append(4)
    assert bt.rows([a, b]) == [0, 1] and writes == [3, 1]
    assert bt.table[0].tolist() == [-7, -7, 4, -1, -1]


def test_released_rows_are_reused_from_their_first_column():
    bt = PersistentBlockTable(max_rows=2, width=4, device=torch.device("cpu"))
    a, b = seq_with([1, 2, 3], "a"), seq_with([4], "b")
    bt.rows([a, b])
    with pytest.raises(RuntimeError, match="no block-table row left"):
        bt.rows([seq_with([5], "c")])
    bt.release([a, seq_with([6], "never scheduled")])
    assert bt.num_rows_in_use == 1
    c = seq_with([8], "c")
    assert bt.rows([c]) == [0]
    assert bt.table[0].tolist() == [8, 2, 3, -1]  # past c's blocks: stale ids, never read
    # the same sequence after a preemption: released, then a new table from its first entry
    bt.release([c])
    c.block_table = [5, 6]
    assert bt.rows([c]) == [0] and bt.table[0, :2].tolist() == [5, 6]


def test_a_table_that_shrank_or_overflows_is_an_error():
    bt = PersistentBlockTable(max_rows=2, width=3, device=torch.device("cpu"))
    a = seq_with([1, 2], "a")
    bt.rows([a])
    a.block_table = [5]  # freed and re-allocated without a release
    with pytest.raises(RuntimeError, match="shrank"):
        bt.rows([a])
    with pytest.raises(RuntimeError, match="3 columns"):
        bt.rows([seq_with([1, 2, 3, 4], "b")])


def test_engine_gives_every_row_back(tiny_llm_dir):
    """Five requests through 8 blocks (preemptions) and a sixth aborted while waiting: once they are
    gone and one more step ran, no row is held."""
    engine = LLMEngine(engine_config(tiny_llm_dir, num_kv_blocks=8, max_model_len=32))
    prompts = [engine.tokenizer(t)["input_ids"] for t in ("1 + 2 =", "The json", "os.path", "7 + 14", "pytest is")]
    engine.generate(prompts, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))
    assert engine.scheduler.num_preemptions > 0
    engine.add_request("aborted", prompts[0], SamplingParams(max_tokens=4))
    engine.abort("aborted")
    assert engine.step() == []
    assert engine.model_runner.block_table.num_rows_in_use == 0


def test_assign_then_write_elsewhere_gives_the_same_table():
    """Tensor parallel: rank 0 assigns rows and ships the update; another rank's table, written with
    it alone, ends up identical."""
    host = PersistentBlockTable(max_rows=3, width=4, device=torch.device("cpu"))
    other = PersistentBlockTable(max_rows=3, width=4, device=torch.device("cpu"))
    a, b = seq_with([5, 6], "a"), seq_with([2], "b")
    for step in range(3):
        rows, update = host.assign([a, b])
        host.write(update)
        # through the workers' wire encoding, as the other ranks get it
        other.write(step_from_wire(step_to_wire(StepInputs(None, None, [], [], update))).table_update)
        assert rows == [0, 1] and torch.equal(host.table, other.table)
        a.block_table.append(10 + step)
        if step == 1:
            host.release([b])
            b = seq_with([8, 9], "c")  # takes b's row again: its entries from column 0

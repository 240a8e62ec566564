"""Continuous batching with chunked prefill and preemption by recompute (vLLM V1 scheduler).

There are no prefill or decode phases: every step hands out a token budget
(max_num_batched_tokens) as {sequence: num_tokens}. Running sequences go first (a decode takes
1 token, an unfinished prefill its next chunk), then waiting ones are admitted FCFS with what is
left, so long prompts are split across steps while decodes keep flowing. With
max_prefill_tokens_with_decodes, a step that carries decodes gives prompts at most that many tokens:
the prefill chunk is what a decoding stream waits for, so it bounds the inter-token gap's tail, while a
step without decodes still prefills with the whole budget.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from leanserve.server.engine.block_manager import BlockManager
from leanserve.server.engine.errors import QueueFullError
from leanserve.server.engine.sequence import Sequence, SequenceStatus


@dataclass(slots=True)
class SchedulerOutput:
    scheduled: list[tuple[Sequence, int]] = field(default_factory=list)  # (sequence, new tokens), batch order
    num_preempted: int = 0
    # sequences whose blocks were freed since the last schedule (finished, aborted, preempted): the
    # model runner gives back their block-table rows before this step takes rows for new ones
    freed: list[Sequence] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(n for _, n in self.scheduled)


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 max_queued_requests: int, max_prefill_tokens_with_decodes: int | None = None):
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_prefill_tokens_with_decodes = max_prefill_tokens_with_decodes
        self.max_queued_requests = max_queued_requests
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # admission order: the last one is preempted first
        self.num_preemptions = 0
        self._freed: list[Sequence] = []  # for the next SchedulerOutput.freed

    def add(self, seq: Sequence, check_queue: bool = True) -> None:
        if check_queue and len(self.waiting) >= self.max_queued_requests:
            raise QueueFullError(f"waiting queue is full ({self.max_queued_requests} requests)")
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = prefill_budget = self.max_num_batched_tokens
        cap = self.max_prefill_tokens_with_decodes
        if cap is not None and any(s.num_tokens - s.num_computed_tokens == 1 and not s.awaiting_final
                                   for s in self.running):
            prefill_budget = cap
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            remaining = seq.num_tokens - seq.num_computed_tokens
            if seq.awaiting_final:  # its last token is still being read back: nothing more to compute
                i += 1
                continue
            num_new = min(remaining, budget) if remaining == 1 else min(remaining, budget, prefill_budget)
            if num_new == 0:  # a prompt chunk with the step's prefill share spent: it goes on next step
                i += 1
                continue
            while not self.block_manager.allocate_slots(seq, num_new):
                # out of blocks: recompute the most recently admitted sequence later. It is never
                # one already scheduled this step (those come before i).
                victim = self.running.pop()
                self._preempt(victim)
                out.num_preempted += 1
                if victim is seq:
                    break
            else:
                out.scheduled.append((seq, num_new))
                budget -= num_new
                if remaining > 1:
                    prefill_budget -= num_new
                i += 1
        # after a preemption the pool is exhausted: admitting now would only thrash
        while (self.waiting and min(budget, prefill_budget) > 0 and len(self.running) < self.max_num_seqs
               and not out.num_preempted):
            seq = self.waiting[0]
            computed_blocks = self.block_manager.get_computed_blocks(seq)
            num_cached = len(computed_blocks) * self.block_manager.block_size
            num_new = min(seq.num_tokens - num_cached, budget, prefill_budget)
            if not self.block_manager.allocate_slots(seq, num_new, computed_blocks):
                break  # FCFS: nobody overtakes the head of the queue
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            if seq.times.scheduled is None:  # first admission, not a resume after preemption
                seq.times.scheduled = time.monotonic()
                seq.num_cached_tokens = num_cached
            self.running.append(seq)
            out.scheduled.append((seq, num_new))
            budget -= num_new
            prefill_budget -= num_new
        out.freed, self._freed = self._freed, []
        return out

    def _preempt(self, seq: Sequence) -> None:
        self.block_manager.free(seq)  # also resets num_computed_tokens: prompt + output are recomputed
        self._freed.append(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def finish(self, seq: Sequence) -> None:
        """Remove a finished or aborted sequence wherever it is and release its blocks."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        self.block_manager.free(seq)
        self._freed.append(seq)
        seq.status = SequenceStatus.FINISHED

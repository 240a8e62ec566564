"""Sampler: greedy, masks (top-k / top-p / min-p), penalties, logit_bias, min_tokens, seeds, logprobs."""
from __future__ import annotations

import torch

from leanserve.server.engine.sampler import Sampler, apply_penalties, apply_top_k_top_p
from leanserve.server.engine.sampling_params import SamplingParams
from leanserve.server.engine.sequence import Sequence

V = 12


def seq(prompt=(1, 2), output=(), eos=(0,), **params) -> Sequence:
    s = Sequence("r", list(prompt), SamplingParams(**params), 0.0, eos_token_ids=list(eos),
                 generator=torch.Generator().manual_seed(params["seed"]) if params.get("seed") is not None else None)
    for t in output:
        s.append_token(t)
    return s


def random_logits(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, V, generator=torch.Generator().manual_seed(seed)) * 3


def sampler(seed: int = 0) -> Sampler:
    return Sampler(torch.Generator().manual_seed(seed))


def support(logits_row: torch.Tensor, n: int = 400, **params) -> set[int]:
    """Tokens drawn in n samples of one row (batched as n identical rows)."""
    seqs = [seq(**params) for _ in range(n)]
    return set(sampler()(logits_row.repeat(n, 1), seqs).token_ids)


def test_greedy_is_argmax():
    logits = random_logits(4)
    out = sampler()(logits.clone(), [seq(temperature=0) for _ in range(4)])
    assert out.token_ids == logits.argmax(-1).tolist()
    assert out.logprobs is None


def test_mixed_batch_greedy_rows_stay_argmax():
    logits = random_logits(6)
    seqs = [seq(temperature=0) if i % 2 else seq(temperature=1.5) for i in range(6)]
    out = sampler()(logits.clone(), seqs)
    assert [out.token_ids[i] for i in (1, 3, 5)] == logits.argmax(-1)[[1, 3, 5]].tolist()


def test_top_k_top_p_masks():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0, 4.0], [0.0, 1.0, 2.0, 3.0, 4.0], [4.0, 3.0, 2.0, 1.0, 0.0]])
    out = apply_top_k_top_p(logits.clone(), torch.tensor([2, 5, 5]), torch.tensor([1.0, 1.0, 0.7]))
    kept = torch.isfinite(out)
    assert kept[0].tolist() == [False, False, False, True, True]       # top-2
    assert kept[1].all()                                             # off
    probs = logits[2].softmax(-1)                                    # 0.64, 0.24, ...: 0.64 < 0.7 <= 0.88
    assert probs[0] < 0.7 <= probs[:2].sum()
    assert kept[2].tolist() == [True, True, False, False, False]
    assert torch.equal(out[kept], logits[kept])                      # survivors untouched


def test_top_p_keeps_the_best_token_even_when_tiny():
    logits = torch.tensor([[5.0, 0.0, 0.0]])
    out = apply_top_k_top_p(logits.clone(), torch.tensor([3]), torch.tensor([0.01]))
    assert torch.isfinite(out).tolist() == [[True, False, False]]


def test_sampling_respects_masks():
    row = torch.linspace(0, 2, V)  # rising logits: the last tokens are the most likely
    assert support(row, top_k=3) == {V - 1, V - 2, V - 3}
    probs = row.softmax(-1)
    min_p = 0.5
    allowed = {i for i in range(V) if probs[i] >= min_p * probs.max()}
    assert support(row, min_p=min_p) == allowed
    assert len(support(row)) > len(allowed)  # plain sampling reaches beyond both masks


def test_temperature_sharpens():
    row = torch.linspace(0, 2, V)
    cold = sampler()(row.repeat(300, 1), [seq(temperature=0.05) for _ in range(300)]).token_ids
    assert cold.count(V - 1) > 250


def test_penalties_match_definition():
    logits = random_logits(2)
    s_rep = seq(prompt=[1, 2], output=[2, 3, 3], repetition_penalty=2.0)
    s_freq = seq(prompt=[1, 2], output=[2, 3, 3], frequency_penalty=0.5, presence_penalty=0.25)
    got = apply_penalties(logits.clone(), [s_rep, s_freq])
    want = logits.clone()
    for t in (1, 2, 3):  # prompt + output tokens: positive logits divided, negative multiplied
        want[0, t] = logits[0, t] / 2 if logits[0, t] > 0 else logits[0, t] * 2
    for t, count in ((2, 1), (3, 2)):  # output tokens only
        want[1, t] = logits[1, t] - 0.5 * count - 0.25
    torch.testing.assert_close(got, want)


def test_penalties_leave_other_rows_alone():
    logits = random_logits(2)
    got = apply_penalties(logits.clone(), [seq(output=[3]), seq(output=[3], presence_penalty=1.0)])
    assert torch.equal(got[0], logits[0]) and not torch.equal(got[1], logits[1])


def test_logit_bias_changes_the_greedy_choice():
    logits = random_logits(1)
    loser = int(logits[0].argmin())
    out = sampler()(logits.clone(), [seq(temperature=0, logit_bias={loser: 100.0})])
    assert out.token_ids == [loser]


def test_min_tokens_masks_stop_ids_until_reached():
    logits = torch.zeros(2, V)
    logits[:, 0] = 50.0  # eos is by far the best
    logits[:, 7] = 40.0  # a stop_token_id, second best
    early = seq(output=[5], temperature=0, min_tokens=3, stop_token_ids=[7])
    done = seq(output=[5, 5, 5], temperature=0, min_tokens=3, stop_token_ids=[7])
    out = sampler()(logits.clone(), [early, done])
    assert out.token_ids[0] not in (0, 7) and out.token_ids[1] == 0


def test_ignore_eos_does_not_mask_under_min_tokens():
    logits = torch.zeros(1, V)
    logits[0, 0] = 50.0
    out = sampler()(logits, [seq(temperature=0, min_tokens=2, ignore_eos=True)])
    assert out.token_ids == [0]  # eos is just a token then


def test_seeded_rows_are_batch_independent():
    logits = random_logits(5, seed=1)
    alone = sampler(seed=1)(logits[2:3].clone(), [seq(seed=123)]).token_ids[0]
    # same row in a batch with other (seeded, unseeded) rows and another engine generator
    batch = [seq(seed=7), seq(), seq(seed=123), seq(temperature=0), seq()]
    together = sampler(seed=2)(logits.clone(), batch).token_ids[2]
    assert alone == together
    # and a seeded request's whole sequence of draws is reproducible
    draws = []
    for engine_seed in (0, 1):
        s = seq(seed=99)
        draws.append([sampler(engine_seed)(random_logits(1, seed=i), [s]).token_ids[0] for i in range(20)])
    assert draws[0] == draws[1] and len(set(draws[0])) > 1


def test_unseeded_rows_use_the_engine_generator():
    logits = torch.zeros(64, V)
    a = sampler(seed=1)(logits.clone(), [seq() for _ in range(64)]).token_ids
    b = sampler(seed=2)(logits.clone(), [seq() for _ in range(64)]).token_ids
    assert a != b


def test_logprobs_are_raw_and_top_k_sorted():
    logits = random_logits(2)
    seqs = [seq(temperature=0.7, top_k=2, logit_bias={3: 5.0}, logprobs=3, seed=0), seq(temperature=0)]
    out = sampler()(logits.clone(), seqs)
    raw = logits.log_softmax(-1)
    assert abs(out.logprobs[0] - raw[0, out.token_ids[0]].item()) < 1e-5
    top = out.top_logprobs[0]
    assert [t for t, _ in top] == raw[0].topk(3).indices.tolist()
    assert [lp for _, lp in top] == sorted((lp for _, lp in top), reverse=True)
    assert out.top_logprobs[1] == []  # not requested by that row

"""Format-gated rewards (spec B.3, B.9) and GRPO's pieces (B.2): the gate, partial credit, group advantages,
the loss's gradient and clip, the completion mask, and log-probs of left-padded rollouts."""
from __future__ import annotations

import pytest
import torch

from leanserve.data.rewards import Reward, parse_answer, reward, tag_answer
from leanserve.data.tasks import Task, check
from leanserve.trainers import grpo

ADD = Task("add", "What is 12 + 30?", "42")
SORT = Task("sort", "Sort these numbers in ascending order: 3, 1, 2.", "1, 2, 3")


def test_format_gates_every_component():
    assert reward(ADD, "<answer>42</answer>") == Reward(1.0, 1.0)
    assert reward(ADD, "<answer>42</answer>").total == 3.0
    assert reward(ADD, "<think>12 + 30</think> <answer> 42 </answer>\n") == Reward(1.0, 1.0)
    assert reward(ADD, "<answer>41</answer>") == Reward(1.0, 0.0)
    assert reward(ADD, "<answer>41</answer>").total == 1.0
    for broken in ("42", "<answer>42", "42</answer>", "the answer is <answer>42</answer>",
                   "<answer>42</answer> and <answer>42</answer>", "<answer>42</answer> done", ""):
        assert reward(ADD, broken) == Reward(0.0, 0.0), broken  # right text, wrong format: nothing
        assert reward(ADD, broken).total == 0.0


def test_tag_answer_round_trips():
    assert parse_answer(tag_answer("1, 2, 3")) == "1, 2, 3"


def test_sort_partial_credit_is_positional_and_bounded():
    assert reward(SORT, "<answer>1, 2, 3</answer>").accuracy == 1.0
    assert reward(SORT, "<answer>1, 3, 2</answer>").accuracy == pytest.approx(1 / 3)
    assert reward(SORT, "<answer>1, 2</answer>").accuracy == pytest.approx(2 / 3)  # a missing item costs it
    assert reward(SORT, "<answer>1, 2, 3, 4</answer>").accuracy == pytest.approx(3 / 4)  # so does an extra one
    assert reward(SORT, "<answer>3, 2, 1</answer>").accuracy == pytest.approx(1 / 3)
    assert reward(SORT, "<answer></answer>").accuracy == 0.0
    for reply in ("<answer>1 2 3</answer>", "<answer>9, 9, 9, 9, 9</answer>", "<answer>x</answer>"):
        assert 0.0 <= reward(SORT, reply).accuracy <= 1.0
    # partial credit is 1 exactly when the exact-match checker accepts
    assert reward(SORT, "<answer>1 ,2,3.</answer>").accuracy == 1.0 and check(SORT, "1 ,2,3.")


def test_group_advantages_zero_for_constant_groups():
    r = torch.tensor([[3.0, 3.0, 3.0, 3.0], [0.0, 1.0, 3.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    a = grpo.group_advantages(r)
    assert torch.equal(a[0], torch.zeros(4)) and torch.equal(a[2], torch.zeros(4))
    assert float(a[1].sum()) == pytest.approx(0.0, abs=1e-6)
    assert float(a[1].std()) == pytest.approx(1.0, abs=1e-5)
    assert a[1, 2] > a[1, 1] > a[1, 0] == a[1, 3]


def test_one_update_loss_is_advantage_weighted_loglik_plus_kl():
    torch.manual_seed(0)
    logp = (-torch.rand(4, 5)).requires_grad_()
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 0, 0, 0]], dtype=torch.float32)
    adv = torch.tensor([1.0, -0.5, 2.0, 0.0])
    loss, stats = grpo.grpo_loss(logp, logp.detach(), logp.detach(), adv, mask, clip_eps=0.2, beta=0.04)
    assert stats["kl"] == pytest.approx(0.0) and stats["clipped"] == 0.0  # ratio 1, policy = reference
    loss.backward()
    # d/dlogp of −mean_g (1/|a_g|) Σ_t Â_g·ρ at ρ = 1 is −Â_g·mask/(|a_g|·N); the k3 gradient is 0 there
    want = -(adv[:, None] * mask / mask.sum(1, keepdim=True)) / 4
    torch.testing.assert_close(logp.grad, want)


def test_kl_penalty_and_clip():
    logp = torch.zeros(1, 2, requires_grad=True)
    mask = torch.ones(1, 2)
    # the reference puts more mass on the tokens: k3 > 0 and its gradient pulls logp up
    loss, stats = grpo.grpo_loss(logp, logp.detach(), torch.full((1, 2), 0.5), torch.zeros(1), mask,
                                 clip_eps=0.2, beta=1.0)
    assert stats["kl"] == pytest.approx(float(torch.exp(torch.tensor(0.5)) - 0.5 - 1))
    loss.backward()
    assert (logp.grad < 0).all()
    # ratio 1.5 > 1 + ε with a positive advantage: clipped, no gradient from the surrogate
    logp = torch.zeros(1, 2, requires_grad=True)
    old = torch.log(torch.tensor([[1 / 1.5, 1.0]]))
    loss, stats = grpo.grpo_loss(logp, old, logp.detach(), torch.ones(1), mask, clip_eps=0.2, beta=0.0)
    loss.backward()
    assert stats["clipped"] == 0.5 and logp.grad[0, 0] == 0 and logp.grad[0, 1] < 0


def test_completion_mask_keeps_tokens_up_to_the_first_stop():
    completion = torch.tensor([[5, 6, 9, 0, 0], [5, 5, 5, 5, 5], [9, 8, 9, 0, 0], [7, 8, 6, 8, 9]])
    want = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.float32)
    assert torch.equal(grpo.completion_mask(completion, [9, 8]), torch.tensor(
        [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 0, 0, 0]], dtype=torch.float32))
    assert torch.equal(grpo.completion_mask(completion, [9]), want)


def test_rollout_logprobs_match_unpadded_forwards(tiny_llm_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from leanserve.data.tokenizer import stop_token_ids

    model = AutoModelForCausalLM.from_pretrained(tiny_llm_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(tiny_llm_dir)
    encoded = [tok("1 + 2 =")["input_ids"], tok("The json module encodes objects")["input_ids"]]
    torch.manual_seed(0)
    rollout = grpo.sample(model, encoded, max_new_tokens=6, temperature=1.0, stop_ids=stop_token_ids(tok),
                          pad_id=tok.pad_token_id, device="cpu")
    with torch.no_grad():
        lp = grpo.token_logprobs(model, rollout, temperature=1.0)
    for row, prompt in enumerate(encoded):
        n = int(rollout.completion_mask[row].sum())
        completion = rollout.completion_ids()[row, :n].tolist()
        with torch.no_grad():
            logits = model(torch.tensor([prompt + completion])).logits[0, len(prompt) - 1:-1]
        want = logits.log_softmax(-1).gather(1, torch.tensor(completion)[:, None])[:, 0]
        torch.testing.assert_close(lp[row, :n], want, atol=1e-4, rtol=0)


def test_padding_with_a_huge_log_ratio_leaves_the_loss_finite():
    # after the stop token the reference can put ~100 nats more on the padding than the policy: exp of that
    # overflows, and a masked inf would still make the loss NaN
    logp = torch.tensor([[-1.0, -1.0, -150.0]], requires_grad=True)
    ref = torch.tensor([[-1.0, -1.0, -0.1]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    loss, stats = grpo.grpo_loss(logp, logp.detach(), ref, torch.ones(1), mask, clip_eps=0.2, beta=0.04)
    loss.backward()
    assert torch.isfinite(loss) and stats["kl"] == pytest.approx(0.0)
    assert torch.isfinite(logp.grad).all() and logp.grad[0, 2] == 0

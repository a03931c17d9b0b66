"""Training losses: LM / MTP targets, the (global-batch) load-balancing loss against hand computations."""
import math

import pytest
import torch

from qwen3next.train.losses import (IGNORE, BalanceCounter, expert_counts, expert_load, fractions, lm_loss,
                                    load_balancing_loss, mtp_accuracy, mtp_loss, mtp_targets, router_entropy)

# One MoE layer, 4 tokens, E = 4 experts, top-2. Top-2 per row: {0,1}, {0,2}, {1,0}, {3,2}
LOGITS = [[3.0, 2.0, 0.0, 0.0],
          [3.0, 0.0, 2.0, 0.0],
          [2.0, 3.0, 0.0, 0.0],
          [0.0, 0.0, 1.0, 3.0]]


def softmax(row):
    z = sum(math.exp(v) for v in row)
    return [math.exp(v) / z for v in row]


def test_load_balancing_loss_equals_the_hand_computation():
    f = [3 / 8, 2 / 8, 2 / 8, 1 / 8]                       # assignments: e0 x3, e1 x2, e2 x2, e3 x1 of 8
    P = [sum(softmax(r)[e] for r in LOGITS) / 4 for e in range(4)]
    expected = 4 * sum(fe * pe for fe, pe in zip(f, P))
    logits = torch.tensor(LOGITS)
    counts = expert_counts([logits], top_k=2)
    assert counts.tolist() == [[3, 2, 2, 1]]
    assert fractions(counts).tolist() == [f]
    assert load_balancing_loss([logits], fractions(counts)).item() == pytest.approx(expected, rel=1e-6)
    # two layers: the mean of the per-layer losses; uniform routing gives exactly 1
    uniform = torch.zeros(4, 4)
    two = load_balancing_loss([logits, uniform], torch.cat([fractions(counts), torch.full((1, 4), 0.25)]))
    assert two.item() == pytest.approx((expected + 1.0) / 2, rel=1e-6)


def _micro_batches():
    """Micro-batch 1 routes everything to experts {0, 1}, micro-batch 2 to {2, 3}: each is unbalanced on its own,
    the step as a whole is perfectly balanced."""
    a = torch.tensor([[2.0, 1.5, 0.0, -1.0], [1.0, 2.0, -1.0, 0.0], [2.5, 2.0, 1.0, 0.0]], requires_grad=True)
    b = torch.tensor([[0.0, -1.0, 2.0, 1.5], [-1.0, 0.0, 1.0, 2.0], [0.0, 1.0, 2.5, 2.0]], requires_grad=True)
    return a, b


def test_global_batch_fractions_differ_from_per_micro_batch_ones():
    a, b = _micro_batches()
    ca, cb = expert_counts([a], 2), expert_counts([b], 2)
    assert fractions(ca).tolist() == [[0.5, 0.5, 0.0, 0.0]] and fractions(cb).tolist() == [[0.0, 0.0, 0.5, 0.5]]
    glob = BalanceCounter("global")
    glob.add(ca)
    glob.add(cb)
    f = glob.fractions_for(ca)
    assert f.tolist() == [[0.25] * 4]
    # global f: E * sum_e 1/4 * P_e = sum_e P_e = 1 for each micro-batch, however skewed its own routing
    assert load_balancing_loss([a], f).item() == pytest.approx(1.0, abs=1e-6)
    assert load_balancing_loss([b], f).item() == pytest.approx(1.0, abs=1e-6)
    # per micro-batch f: penalised for the skew that the other micro-batch balances out
    pa = torch.softmax(a, -1).mean(0)
    micro = BalanceCounter("micro")
    assert load_balancing_loss([a], micro.fractions_for(ca)).item() == pytest.approx(
        (4 * 0.5 * (pa[0] + pa[1])).item(), rel=1e-6)
    assert load_balancing_loss([a], micro.fractions_for(ca)).item() > 1.3


def test_accumulated_global_loss_has_the_gradient_of_the_whole_batch():
    a, b = _micro_batches()
    glob = BalanceCounter("global")
    glob.add(expert_counts([a], 2))
    glob.add(expert_counts([b], 2))
    for x in (a, b):   # as the trainer does: each micro-batch's loss / grad_accum, backward one at a time
        (load_balancing_loss([x], glob.fractions_for(None)) / 2).backward()
    ga, gb = a.grad.clone(), b.grad.clone()
    a.grad = b.grad = None
    whole = torch.cat([a, b])
    load_balancing_loss([whole], fractions(expert_counts([whole], 2))).backward()
    assert torch.allclose(ga, a.grad, atol=1e-7) and torch.allclose(gb, b.grad, atol=1e-7)


def test_running_scope_counts_the_micro_batches_seen_so_far():
    a, b = _micro_batches()
    run = BalanceCounter("running")
    assert run.fractions_for(expert_counts([a], 2)).tolist() == [[0.5, 0.5, 0.0, 0.0]]
    assert run.fractions_for(expert_counts([b], 2)).tolist() == [[0.25] * 4]
    run.reset()
    assert run.fractions_for(expert_counts([b], 2)).tolist() == [[0.0, 0.0, 0.5, 0.5]]
    with pytest.raises(RuntimeError, match="add every micro-batch"):
        BalanceCounter("global").fractions_for(expert_counts([a], 2))
    with pytest.raises(ValueError, match="scope"):
        BalanceCounter("local")


def test_mtp_targets_are_the_labels_shifted_by_one_more():
    tokens = torch.tensor([[5, 6, 7, 8, 9]])
    labels = tokens[:, 1:]                       # labels[p] = t_{p+1}
    targets = mtp_targets(labels)                # targets[p] = t_{p+2}
    assert targets.tolist() == [[7, 8, 9, IGNORE]]
    V = 10
    onehot = torch.full((1, 4, V), -30.0)
    for p in range(3):
        onehot[0, p, tokens[0, p + 2]] = 30.0    # the head is right about t_{p+2}
    onehot[0, 3, 0] = 30.0                        # position without a target: anything, ignored
    assert mtp_loss(onehot, labels).item() < 1e-6
    assert mtp_accuracy(onehot, labels).item() == 1.0
    shifted_by_one = torch.full((1, 4, V), -30.0)
    for p in range(4):
        shifted_by_one[0, p, tokens[0, p + 1]] = 30.0
    assert mtp_loss(shifted_by_one, labels).item() > 50
    assert lm_loss(shifted_by_one, labels).item() < 1e-6   # ... which is exactly the LM's target


def test_lm_loss_ignores_masked_labels_and_router_stats():
    logits = torch.randn(2, 3, 7)
    labels = torch.tensor([[1, IGNORE, 2], [IGNORE, IGNORE, 6]])
    keep = labels != IGNORE
    expected = torch.nn.functional.cross_entropy(logits[keep], labels[keep])
    assert lm_loss(logits, labels).item() == pytest.approx(expected.item(), rel=1e-6)
    counts = torch.tensor([[4.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    assert expert_load(counts).item() == pytest.approx((4.0 + 1.0) / 2)
    assert router_entropy([torch.zeros(5, 4)]).item() == pytest.approx(math.log(4), rel=1e-6)

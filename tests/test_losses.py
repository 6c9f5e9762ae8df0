import pytest
import torch
from torch.testing import assert_close

from gere.config import parse_margin_weight, parse_objective
from gere.errors import GeReError
from gere.losses import (
    causal_lm_ce,
    coded_margin_loss,
    feature_loss,
    margin_loss,
    threshold_codes,
    topk_kl_loss,
)
from gere.stats import thresholds
from gere.store.format import pack_codes, unpack_codes


def slow_margin(hidden, reference, mean, std, mask, k=1.0, reduction="nonzero"):
    """Element by element, straight from the paper's definition."""
    low, high = mean - k * std, mean + k * std
    total, nonzero, real = 0.0, 0, 0
    B, T, H = hidden.shape
    for b in range(B):
        for t in range(T):
            if not mask[b, t]:
                continue
            for d in range(H):
                real += 1
                h, r, lo, hi = (
                    float(hidden[b, t, d]),
                    float(reference[b, t, d]),
                    float(low[d]),
                    float(high[d]),
                )
                if r <= lo:
                    loss = max(h - lo, 0.0)
                elif r >= hi:
                    loss = max(hi - h, 0.0)
                else:
                    loss = max(h - hi, 0.0) + max(lo - h, 0.0)
                total += loss
                nonzero += loss != 0
    if reduction == "nonzero":
        return total / max(nonzero, 1)
    if reduction == "mean":
        return total / max(real, 1)
    return total


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 5, 6, generator=g, dtype=torch.float64)
    reference = torch.randn(2, 5, 6, generator=g, dtype=torch.float64)
    mean = torch.randn(6, generator=g, dtype=torch.float64) * 0.1
    std = torch.rand(6, generator=g, dtype=torch.float64) + 0.5
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    return hidden, reference, mean, std, mask


@pytest.mark.parametrize("reduction", ["nonzero", "mean", "sum"])
@pytest.mark.parametrize("k", [0.5, 1.0])
def test_margin_loss_matches_slow_reference(batch, reduction, k):
    hidden, reference, mean, std, mask = batch
    got = margin_loss(hidden, reference, mean, std, mask, k=k, reduction=reduction)
    want = slow_margin(hidden, reference, mean, std, mask, k=k, reduction=reduction)
    assert want > 0
    assert_close(got.double(), torch.tensor(want, dtype=torch.float64), rtol=1e-5, atol=1e-6)


def test_margin_loss_gradient_matches_autograd_of_slow_formula(batch):
    hidden, reference, mean, std, mask = batch
    h1 = hidden.clone().float().requires_grad_(True)
    margin_loss(h1, reference, mean, std, mask).backward()
    # Plain autograd of the elementwise hinge, reduced by the (constant) number of non-zero elements.
    h2 = hidden.clone().float().requires_grad_(True)
    low, high = (t.float() for t in thresholds(mean, std, 1.0))
    ref = reference.float()
    neg, pos = ref <= low, ref >= high
    neu = ~neg & ~pos
    per = (
        neg * torch.relu(h2 - low)
        + pos * torch.relu(high - h2)
        + neu * (torch.relu(h2 - high) + torch.relu(low - h2))
    )
    per = per * mask.unsqueeze(-1)
    (per.sum() / (per != 0).sum()).backward()
    assert_close(h1.grad, h2.grad)
    assert h1.grad.abs().sum() > 0
    assert (h1.grad[1, 3:] == 0).all()  # padding gets no gradient


def test_all_masked_gives_zero_and_zero_grad(batch):
    hidden, reference, mean, std, _ = batch
    h = hidden.clone().requires_grad_(True)
    loss = margin_loss(h, reference, mean, std, torch.zeros(2, 5))
    loss.backward()
    assert float(loss) == 0.0
    assert (h.grad == 0).all()


def test_unchanged_states_give_zero_loss(batch):
    hidden, _, mean, std, mask = batch
    assert float(margin_loss(hidden, hidden, mean, std, mask)) == 0.0


def test_packed_label_path_agrees(batch):
    hidden, reference, mean, std, mask = batch
    low, high = thresholds(mean, std, 1.0)
    codes = threshold_codes(reference, low, high)
    flat = codes.reshape(-1, 6).numpy()
    roundtrip = torch.from_numpy(unpack_codes(pack_codes(flat), 6)).reshape(codes.shape)
    assert torch.equal(roundtrip, codes)
    assert_close(
        coded_margin_loss(hidden, roundtrip, low, high, mask), margin_loss(hidden, reference, mean, std, mask)
    )


def test_chunked_forward_matches_unchunked(batch, monkeypatch):
    import gere.losses as losses

    hidden, reference, mean, std, mask = batch
    whole = margin_loss(hidden, reference, mean, std, mask)
    monkeypatch.setattr(losses, "CHUNK_ROWS", 3)
    assert_close(margin_loss(hidden, reference, mean, std, mask), whole)


def test_zero_variance_dimension_keeps_finite_loss():
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 0.0]]])
    reference = torch.ones(1, 2, 2)
    loss = margin_loss(hidden, reference, torch.ones(2), torch.zeros(2))
    assert torch.isfinite(loss)
    # low = high = 1: every reference element is labelled negative (band (-inf, 1]); 2 and 3 are above it.
    assert_close(loss, torch.tensor((1.0 + 2.0) / 2))


def test_codes_tie_goes_to_negative():
    codes = threshold_codes(torch.tensor([1.0, 0.5, 2.0]), torch.tensor(1.0), torch.tensor(1.0))
    assert codes.tolist() == [0, 0, 2]


def test_causal_lm_ce_against_manual():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 4, 7, generator=g)
    labels = torch.tensor([[3, 1, -100, 2], [5, -100, 6, 0]])
    terms = []
    for b in range(2):
        for t in range(3):
            y = int(labels[b, t + 1])
            if y != -100:
                terms.append(-torch.log_softmax(logits[b, t], -1)[y])
    assert_close(causal_lm_ce(logits, labels), torch.stack(terms).mean())
    assert float(causal_lm_ce(logits, torch.full((2, 4), -100))) == 0.0


def test_feature_losses():
    h = torch.tensor([[[1.0, 2.0], [5.0, 5.0]]])
    r = torch.tensor([[[0.0, 4.0], [0.0, 0.0]]])
    mask = torch.tensor([[1, 0]])
    assert_close(feature_loss(h, r, mask, "l1"), torch.tensor(1.5))
    assert_close(feature_loss(h, r, mask, "l2"), torch.tensor(2.5))


def test_topk_kl_full_vocab_equals_kl_div():
    g = torch.Generator().manual_seed(2)
    logits, ref = torch.randn(1, 3, 5, generator=g), torch.randn(1, 3, 5, generator=g)
    values, indices = ref.topk(5, dim=-1)
    t = 2.0
    p = torch.log_softmax(ref / t, -1)
    q = torch.log_softmax(logits / t, -1)
    want = (p.exp() * (p - q)).sum(-1).mean()
    assert_close(topk_kl_loss(logits, values, indices, None, t), want)
    assert float(topk_kl_loss(ref, values, indices, None, t)) == pytest.approx(0.0, abs=1e-6)


def test_parsers_reject_bad_values():
    assert parse_objective("ce+tm") == ("ce", "tm")
    assert parse_objective("none") == ()
    for bad in ("ce+foo", "tm+tm"):
        with pytest.raises(GeReError, match="objective"):
            parse_objective(bad)
    assert parse_margin_weight("100") == 100.0
    assert parse_margin_weight("dy") == "dy"
    with pytest.raises(GeReError, match="margin weight"):
        parse_margin_weight("lots")


def test_dynamic_weight():
    from gere.losses import resolve_margin_weight

    ce, margin = torch.tensor(2.0), torch.tensor(0.5)
    assert resolve_margin_weight("dy", ce, margin) == pytest.approx(4.0)
    assert resolve_margin_weight(100.0, ce, margin) == 100.0
    assert resolve_margin_weight("dy", ce, torch.tensor(0.0)) == 0.0  # nothing to weigh


def test_topk_kl_is_zero_at_the_base_model_and_matches_a_slow_reference():
    torch.manual_seed(0)
    vocab, k, t = 50, 5, 2.0
    ref = torch.randn(2, 3, vocab)
    values, indices = ref.topk(k, dim=-1)
    # At the base model itself the loss and its gradient vanish (comparing with the full softmax would
    # give -log of the mass on the k tokens here instead: 1.4 at the start of the study's kl runs).
    at_base = ref.clone().requires_grad_(True)
    loss = topk_kl_loss(at_base, values, indices, None, t)
    loss.backward()
    assert float(loss) == pytest.approx(0.0, abs=1e-6) and float(at_base.grad.abs().max()) < 1e-6
    current = torch.randn(2, 3, vocab)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    total, count = 0.0, 0
    for b in range(2):
        for i in range(3):
            if not mask[b, i]:
                continue
            p = torch.softmax(values[b, i] / t, -1)
            q = torch.softmax(current[b, i, indices[b, i]] / t, -1)
            total += float((p * (p / q).log()).sum())
            count += 1
    assert float(topk_kl_loss(current, values, indices, mask, t)) == pytest.approx(total / count, rel=1e-5)


def test_margin_weight_rules_parse_to_one_canonical_text():
    from gere.config import weight_rule

    assert parse_margin_weight("dy:10") == "dy:10.0" and weight_rule("dy:10").value == 10.0
    assert parse_margin_weight("warm:4:dy") == "warm:4:dy" and weight_rule("warm:4:dy").warmup == 4
    assert parse_margin_weight("warm:8:10") == "warm:8:10.0" and weight_rule("warm:8:10").kind == "fixed"
    assert parse_margin_weight("gb:0.5") == "gb:0.5" and weight_rule("warm:2:gb:1").kind == "gb"
    for text in ("dy:10", "warm:3:dy:5", "warm:2:1", "100", "dy", "gb:1", "warm:4:gb:0.25"):
        assert parse_margin_weight(parse_margin_weight(text)) == parse_margin_weight(text)
    for bad in ("gb:0", "gb:", "gb:x", "dy:0", "dy:-3", "dy:inf", "warm:0:dy", "warm:2", "warm:x:dy", "warm:2:warm:2:dy", "nan"):
        with pytest.raises(GeReError, match="margin weight"):
            parse_margin_weight(bad)


@pytest.mark.parametrize("rule,ce,reg,step,expected", [
    ("dy", 2.0, 0.5, 1, 4.0),                 # CE / regulariser
    ("dy:3", 2.0, 0.5, 1, 3.0),               # capped
    ("dy:10", 2.0, 0.5, 1, 4.0),              # under the cap: dy itself
    ("warm:4:dy", 2.0, 0.5, 1, 1.0),          # 1/4 of dy at the task's first step
    ("warm:4:dy", 2.0, 0.5, 2, 2.0),
    ("warm:4:dy", 2.0, 0.5, 9, 4.0),          # warm-up over: dy
    ("warm:4:dy:2", 2.0, 0.5, 2, 1.0),        # 2/4 of the capped dy
    ("warm:5:100", 2.0, 0.5, 1, 20.0),        # a fixed weight warmed up
    ("dy:3", 2.0, 0.0, 1, 0.0),               # nothing to weigh
])  # fmt: skip
def test_weight_rules_against_hand_computed_values(rule, ce, reg, step, expected):
    from gere.losses import resolve_margin_weight

    got = resolve_margin_weight(rule, torch.tensor(ce), torch.tensor(reg), step)
    assert got == pytest.approx(expected, rel=1e-6)


def test_loss_contributions_sum_to_the_combined_loss():
    from gere.losses import combine_losses, loss_contributions

    parts = {"task_ce": torch.tensor(2.0), "replay_ce": torch.tensor(3.0), "replay_margin": torch.tensor(0.25),
             "ewc": torch.tensor(0.5)}  # fmt: skip
    for rule, step in (("dy", 1), (10.0, 1), ("warm:4:dy:6", 3)):
        loss, weights = combine_losses(parts, rule, step)
        contributions = loss_contributions(parts, weights)
        assert set(contributions) == set(parts)
        assert_close(sum(contributions.values()), loss)
        assert_close(contributions["task_ce"], torch.tensor(1.0))


def test_each_objective_reads_and_keeps_what_its_table_row_says():
    from gere.config import GeReConfig
    from gere.losses import PART_LOSSES
    from gere.parts import REPLAY_PARTS, reads_hidden_states, reference_targets
    from gere.store.format import StoreSpec

    assert list(PART_LOSSES) == list(REPLAY_PARTS)  # every part has its loss, in the table's order
    # objective -> (reads hidden states, store keeps label codes, hidden states, top-k logits)
    expected = {"ce": (False, False, False, 0), "tm": (True, True, False, 0), "kl": (False, False, False, 3),
                "l1": (True, False, True, 0), "ce+l2": (True, False, True, 0), "ce+kl+l1+l2+tm": (True, True, True, 3)}  # fmt: skip
    for objective, (hidden, tm, features, topk) in expected.items():
        cfg = GeReConfig(objective=objective, kl_topk=3)
        spec = StoreSpec.for_config(cfg)
        assert reads_hidden_states(cfg.parts) == hidden, objective
        assert (spec.tm, spec.features, spec.topk) == (tm, features, topk), objective
        assert cfg.needs_reference == bool(reference_targets(cfg.parts)) == (objective != "ce"), objective


def test_replay_losses_are_each_parts_own_loss_averaged_over_layers():
    from gere.losses import ReplayTargets, replay_losses

    g = torch.Generator().manual_seed(3)
    logits, ref_logits = torch.randn(2, 5, 7, generator=g), torch.randn(2, 5, 7, generator=g)
    labels = torch.tensor([[3, 1, 4, 2, -100], [5, 6, 0, -100, -100]])
    mask = (labels != -100).long()
    hidden = {-1: torch.randn(2, 5, 6, generator=g), 1: torch.randn(2, 5, 6, generator=g)}
    reference = {layer: torch.randn(2, 5, 6, generator=g) for layer in hidden}
    low, high = -0.5 * torch.ones(6), 0.5 * torch.ones(6)
    targets = ReplayTargets(
        bands={layer: (low, high) for layer in hidden},
        codes={layer: threshold_codes(r, low, high) for layer, r in reference.items()},
        features=reference,
        topk=ref_logits.topk(4, dim=-1),
    )
    got = replay_losses(("ce", "tm", "kl", "l1", "l2"), logits, hidden, labels, mask, targets, reduction="mean")
    assert list(got) == ["replay_ce", "replay_margin", "replay_kl", "replay_l1", "replay_l2"]
    assert_close(got["replay_ce"], causal_lm_ce(logits, labels))
    zero, half = torch.zeros(6), 0.5 * torch.ones(6)  # the bands above: mean 0, std 0.5, k 1
    margins = [slow_margin(hidden[n], reference[n], zero, half, mask, reduction="mean") for n in hidden]
    assert got["replay_margin"].item() == pytest.approx(sum(margins) / 2, rel=1e-5)
    assert_close(got["replay_kl"], topk_kl_loss(logits, *targets.topk, mask, 2.0))
    for norm in ("l1", "l2"):
        assert_close(got[f"replay_{norm}"], sum(feature_loss(hidden[n], reference[n], mask, norm) for n in hidden) / 2)
    assert list(replay_losses(("tm",), logits, hidden, labels, mask, targets)) == ["replay_margin"]


def test_margin_weight_is_parsed_once_into_the_rule_the_trainer_uses(monkeypatch):
    import gere.config as config

    seen = []
    real = config._parse_rule
    monkeypatch.setattr(config, "_parse_rule", lambda text, original: seen.append(text) or real(text, original))
    cfg = config.GeReConfig(objective="ce+tm", margin_weight="DY:10")
    assert seen == ["DY:10"]  # once (before: again for the gb check, and again by the trainer)
    assert cfg.margin_rule == config.WeightRule("dy", 10.0) and cfg.margin_weight == "dy:10.0"  # the text for files
    assert config.GeReConfig(margin_weight="warm:2:gb:0.5").margin_rule == config.WeightRule("gb", 0.5, 2)
    assert config.GeReConfig(margin_weight=3).margin_rule == config.WeightRule("fixed", 3.0)

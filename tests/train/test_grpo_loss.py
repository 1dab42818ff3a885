"""GRPO numerics: advantages per scale_rewards mode (hand-derived), loss and gradient per loss_type against
TRL 1.16's own `GRPOTrainer._compute_loss` (when trl is installed), and hand-derived loss fixtures."""

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from fp4kit.train.grpo import GRPOConfig, LossType, NoiseSchedule, ScaleRewards, compute_advantages, grpo_loss, token_logps

NAN = float("nan")
EPS = 1e-4  # TRL's std epsilon


# ------------------------------------------------------------------------------------------ advantages

def test_advantages_group_scaling_by_hand():
    r = torch.tensor([[1.0], [0.0], [0.0], [1.0], [1.0], [1.0], [1.0], [1.0]])
    a = compute_advantages(r, torch.ones(1), 4, ScaleRewards.GROUP)
    std = math.sqrt(1 / 3)  # group 1: values 1,0,0,1, mean 0.5, Bessel var (4 * 0.25) / 3
    want = [0.5 / (std + EPS), -0.5 / (std + EPS), -0.5 / (std + EPS), 0.5 / (std + EPS), 0, 0, 0, 0]
    torch.testing.assert_close(a.advantages, torch.tensor(want), rtol=1e-6, atol=1e-7)
    assert a.frac_zero_std == 0.5


def test_advantages_batch_scaling_uses_group_mean_and_batch_std():
    r = torch.tensor([[2.0], [0.0], [1.0], [1.0]])
    a = compute_advantages(r, torch.ones(1), 2, ScaleRewards.BATCH)
    std = math.sqrt(((2 - 1) ** 2 + 1 + 0 + 0) / 3)  # batch mean 1
    torch.testing.assert_close(a.advantages, torch.tensor([1 / (std + EPS), -1 / (std + EPS), 0.0, 0.0]))


def test_advantages_none_scaling_is_centered_reward():
    r = torch.tensor([[3.0], [1.0], [5.0], [5.0]])
    a = compute_advantages(r, torch.ones(1), 2, ScaleRewards.NONE)
    torch.testing.assert_close(a.advantages, torch.tensor([1.0, -1.0, 0.0, 0.0]))


def test_advantages_weighted_rewards_and_none():
    # two reward functions weighted 1 and 0.5; row 2 has one None (ignored), row 3 all None (unscorable)
    r = torch.tensor([[1.0, 1.0], [0.0, 1.0], [1.0, NAN], [NAN, NAN]])
    a = compute_advantages(r, torch.tensor([1.0, 0.5]), 4, ScaleRewards.NONE)
    torch.testing.assert_close(a.rewards[:3], torch.tensor([1.5, 0.5, 1.0]))
    assert math.isnan(a.rewards[3])
    torch.testing.assert_close(a.advantages, torch.tensor([0.5, -0.5, 0.0, 0.0]))  # mean 1.0 over scorable rows


def test_advantages_need_whole_groups():
    with pytest.raises(ValueError, match="whole groups"):
        compute_advantages(torch.zeros(5, 1), torch.ones(1), 2, ScaleRewards.GROUP)


# ------------------------------------------------------------------------------------------ loss fixtures

def _fixture(seed=0, B=4, T=5):
    g = torch.Generator().manual_seed(seed)
    logps = (-torch.rand(B, T, generator=g) * 3).requires_grad_(True)
    old = logps.detach() + torch.randn(B, T, generator=g) * 0.3  # ratios well outside [0.8, 1.2] in places
    ref = logps.detach() + torch.randn(B, T, generator=g) * 0.2
    mask = torch.ones(B, T)
    mask[0, 3:] = 0
    mask[2, 1:] = 0
    adv = torch.tensor([1.0, -0.5, 2.0, -1.5])
    return logps, old, ref, mask, adv


def test_grpo_loss_by_hand_one_token():
    cfg = GRPOConfig(loss_type="grpo", epsilon=0.2)
    logps = torch.tensor([[math.log(0.5)], [math.log(0.5)]], requires_grad=True)
    old = torch.tensor([[math.log(0.25)], [math.log(0.25)]])  # ratio 2: clipped to 1.2 for A > 0, not for A < 0
    parts = grpo_loss(logps, old, torch.tensor([1.0, -1.0]), torch.ones(2, 1), cfg)
    # row 0: -min(2 * 1, 1.2 * 1) = -1.2 ; row 1: -min(-2, -1.2) = 2 ; mean 0.4
    assert parts.loss.item() == pytest.approx(0.4)
    parts.loss.backward()
    # d/dlogp: row 0 clipped (no gradient), row 1: -A * ratio / 2 = 1
    torch.testing.assert_close(logps.grad, torch.tensor([[0.0], [1.0]]))
    assert parts.clip_high == 0.5 and parts.clip_low == 0.0


def test_loss_types_reduce_as_documented():
    logps, old, ref, mask, adv = _fixture()
    for lt in LossType:
        cfg = GRPOConfig(loss_type=lt, max_completion_length=7, epsilon=0.2, epsilon_high=0.28)
        ratio = torch.exp(logps.detach() - old)
        pt = -torch.min(ratio * adv[:, None], torch.clamp(ratio, 0.8, 1.28) * adv[:, None])
        want = {LossType.GRPO: ((pt * mask).sum(1) / mask.sum(1)).mean(),
                LossType.BNPO: (pt * mask).sum() / mask.sum(),
                LossType.DR_GRPO: (pt * mask).sum() / (4 * 7),
                LossType.DAPO: (pt * mask).sum() / 40.0}[lt]
        got = grpo_loss(logps, old, adv, mask, cfg, num_items_in_batch=40.0).loss
        torch.testing.assert_close(got, want, msg=str(lt))


def test_dapo_needs_token_count_and_beta_needs_ref():
    logps, old, ref, mask, adv = _fixture()
    with pytest.raises(ValueError, match="num_items_in_batch"):
        grpo_loss(logps, old, adv, mask, GRPOConfig(loss_type="dapo"))
    with pytest.raises(ValueError, match="ref_logps"):
        grpo_loss(logps, old, adv, mask, GRPOConfig(loss_type="grpo", beta=0.1))


def test_token_logps_matches_log_softmax():
    logits = torch.randn(2, 3, 11)
    ids = torch.randint(0, 11, (2, 3))
    want = torch.log_softmax(logits / 0.7, -1).gather(-1, ids[..., None])[..., 0]
    torch.testing.assert_close(token_logps(logits, ids, 0.7), want)


def test_noise_schedule_matches_qerl_stages():
    s = NoiseSchedule(sigma_start=1e-2, sigma_end=1e-4, num_stages=3)  # stages: none, 1e-2, 1e-4
    assert [s.sigma(k, 30) for k in (0, 9, 10, 19, 20, 29)] == [0, 0, 1e-2, 1e-2, pytest.approx(1e-4), pytest.approx(1e-4)]
    ten = NoiseSchedule()
    sig = [ten.sigma(k, 100) for k in range(100)]
    assert sig[0] == 0 and sig[10] == 1e-2 and sig[-1] == pytest.approx(1e-4)
    assert all(a >= b for a, b in zip(sig[10:], sig[11:]))  # decays monotonically after the first stage


def test_config_validation():
    with pytest.raises(ValueError, match="num_generations"):
        GRPOConfig(num_generations=1)
    with pytest.raises(ValueError):
        GRPOConfig(loss_type="ppo")
    assert GRPOConfig(scale_rewards="batch").scale_rewards is ScaleRewards.BATCH
    assert GRPOConfig(epsilon=0.2).epsilon_upper == 0.2 and GRPOConfig(epsilon_high=0.28).epsilon_upper == 0.28


# ------------------------------------------------------------------------------------------ against TRL itself

def _trl_trainer(cfg: GRPOConfig, logps, accumulation):
    trl = pytest.importorskip("trl")
    t = trl.GRPOTrainer.__new__(trl.GRPOTrainer)  # no model/dataset: only the loss method is exercised
    acc = SimpleNamespace(num_processes=1, sync_gradients=True, reduce=lambda x, reduction="sum": x,
                          gather=lambda x: x, gather_for_metrics=lambda x: x)
    attrs = dict(loss_type=cfg.loss_type.value, beta=cfg.beta, epsilon_low=cfg.epsilon_low,
                 epsilon_high=cfg.epsilon_upper, max_completion_length=cfg.max_completion_length,
                 importance_sampling_level="token", top_entropy_quantile=1.0, off_policy_mask_threshold=None,
                 use_vllm=False, _entropy_bonus_enabled=False, aux_loss_enabled=False, accelerator=acc,
                 current_gradient_accumulation_steps=accumulation, model=SimpleNamespace(training=True),
                 _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
                 args=SimpleNamespace(delta=None, use_bias_correction_kl=False, steps_per_generation=accumulation))
    for k, v in attrs.items():
        object.__setattr__(t, k, v)
    object.__setattr__(t, "_get_per_token_logps_and_entropies",
                       lambda *a, **k: (logps, torch.zeros_like(logps), None))
    return t


@pytest.mark.parametrize("loss_type", [lt.value for lt in LossType])
@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("reuse", [False, True])  # old logps given (num_iterations > 1) or the detached current
def test_loss_and_gradient_equal_trl(loss_type, beta, reuse):
    cfg = GRPOConfig(loss_type=loss_type, beta=beta, epsilon=0.2, epsilon_high=0.28, max_completion_length=9)
    logps, old, ref, mask, adv = _fixture(seed=3)
    old = old if reuse else None
    accumulation, n_items = 2, 2 * mask.sum()  # this micro-batch is one of two of the generation batch
    ours = grpo_loss(logps, old, adv, mask, cfg, ref_logps=ref if beta else None, num_items_in_batch=n_items,
                     accumulation_steps=accumulation)
    (g_ours,) = torch.autograd.grad(ours.loss, logps)

    theirs_logps = logps.detach().clone().requires_grad_(True)
    trainer = _trl_trainer(cfg, theirs_logps, accumulation)
    B, T = mask.shape
    inputs = {"prompt_ids": torch.zeros(B, 2, dtype=torch.long), "prompt_mask": torch.ones(B, 2, dtype=torch.long),
              "completion_ids": torch.zeros(B, T, dtype=torch.long), "completion_mask": mask.long(),
              "advantages": adv, "num_items_in_batch": n_items}
    if old is not None:
        inputs["old_per_token_logps"] = old
    if beta:
        inputs["ref_per_token_logps"] = ref
    theirs = trainer._compute_loss(None, inputs)
    (g_theirs,) = torch.autograd.grad(theirs, theirs_logps)
    torch.testing.assert_close(ours.loss, theirs, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(g_ours, g_theirs, rtol=1e-6, atol=1e-8)
    m = trainer._metrics["train"]
    assert ours.clip_region == pytest.approx(m["clip_ratio/region_mean"][0])
    assert ours.clip_high == pytest.approx(m["clip_ratio/high_mean"][0])
    if beta:
        assert ours.kl == pytest.approx(m["kl"][0], rel=1e-6)
    if reuse:
        assert ours.clip_region > 0  # the fixture's ratios do reach the clip range

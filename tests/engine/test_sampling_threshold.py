"""The engine's sampler on the threshold formulation: same kept sets as the sort/scatter filter it replaced
(tie-free logits), `sample` equal to the kernel's twin, and the draws still follow the kept distribution."""

import torch

from fp4kit.engine import SamplingParams, filter_logits, sample
from fp4kit.kernels.sampling import (
    gumbel_argmax_torch,
    inverse_temperature,
    keep_threshold,
    sort_filter,
)


def test_threshold_keeps_what_the_sort_scatter_filter_kept():
    logits = torch.randn(64, 500) * 2  # continuous: no ties
    for k, p, t in [(0, 0.9, 1.0), (50, 1.0, 1.0), (50, 0.9, 0.5), (0, 0.3, 2.0), (499, 0.99, 1.0)]:
        ours = torch.isfinite(filter_logits(logits, k, p, t))
        before = torch.isfinite(sort_filter(logits * inverse_temperature(t), k, p))
        assert torch.equal(ours, before), (k, p, t)


def test_sample_is_the_twin_with_the_engine_threshold():
    logits = torch.randn(16, 300)
    rows = torch.arange(16) + 3
    for params in (SamplingParams(temperature=0.7), SamplingParams(temperature=1.0, top_k=20, top_p=0.8)):
        inv_t = inverse_temperature(params.temperature)
        thr = keep_threshold(logits, params.top_k, params.top_p, inv_t)
        want = gumbel_argmax_torch(logits, inv_t, thr, 4, 9, rows)
        assert torch.equal(sample(logits, params, 4, 9, rows), want)
    assert torch.equal(sample(logits, SamplingParams(temperature=0)), logits.argmax(-1))


def test_top_p_draws_follow_the_renormalised_nucleus():
    """p = (0.5, 0.3, 0.15, 0.05), top_p 0.8 keeps the first two: frequencies 0.625 / 0.375 / 0 / 0."""
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(20000, 1)
    tok = sample(logits, SamplingParams(temperature=1.0, top_p=0.8), seed=3, slot=1)
    freq = torch.bincount(tok, minlength=4) / 20000
    torch.testing.assert_close(freq, torch.tensor([0.625, 0.375, 0.0, 0.0]), atol=0.015, rtol=0)

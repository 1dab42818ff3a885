"""The fused Gumbel-max sampling kernel against its torch twin: scores bit for bit, tokens equal, edge cases.

On the CPU the kernel runs in Triton's interpreter (small B and V); on CUDA the same tests run on the
device, and the GPU-only tests add real shapes and CUDA-graph capture.
"""

import math

import pytest
import torch

triton = pytest.importorskip("triton")

from fp4kit.kernels.sampling import (
    gumbel_argmax,
    gumbel_argmax_torch,
    gumbel_scores,
    gumbel_scores_torch,
    inverse_temperature,
    keep_threshold,
    log_f32,
    split_plan,
    uniform_from_hash,
)

DEV = "cuda" if torch.cuda.is_available() else "cpu"
GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="real shapes and CUDA graphs need a GPU")


def bits(x: torch.Tensor) -> torch.Tensor:
    return x.view(torch.int32)


def logits_with_gaps(B: int, V: int, scale: float = 3.0) -> torch.Tensor:
    return (torch.randn(B, V) * scale).to(DEV)


# ------------------------------------------------------------------------------------------ the definition


def test_log_f32_is_within_2_ulp_of_log_over_the_noise_range():
    u = (torch.arange(0, 1 << 24, 997, dtype=torch.float64) + 0.5) / (1 << 24)  # uniforms the hash can give
    w = torch.cat([u, -torch.log(u), torch.tensor([2.0**-25, 1 - 2.0**-25, 1.0, 0.5, 2.0, 16.6], dtype=torch.float64)])
    x = w.float()
    err = (log_f32(x).double() - torch.log(x.double())).abs()
    ulp = torch.log(x.double()).abs().clamp(min=2.0**-126) * 2.0**-23
    assert (err / ulp).max().item() < 2.0
    assert log_f32(torch.tensor([1.0])).item() == 0.0


def test_uniforms_are_never_0_or_1_and_the_noise_is_bounded():
    """The extreme hashes: u = 2^-24 and 1 - 2^-24 exactly, g finite. (The first sampler's 24-bit
    (m + 0.5) * 2^-24 rounded m = 2^24 - 1 to u = 1.0: infinite noise, a uniformly random token.)"""
    h = torch.tensor([0, 511, 512, 0xFFFFFFFF, 0xFFFFFE00])
    u = uniform_from_hash(h)
    assert u.tolist()[:2] == [2.0**-24, 2.0**-24] and u[3].item() == 1 - 2.0**-24 and (u < 1).all()
    assert ((torch.tensor([0xFFFFFFFF]) >> 8).float() + 0.5).item() * 2.0**-24 == 1.0  # the old mapping's 1.0
    g = 0.0 - log_f32(0.0 - log_f32(u))
    assert torch.isfinite(g).all() and g.max().item() < 17 and g.min().item() > -3


def test_inverse_temperature_is_a_float32_value():
    t = inverse_temperature(0.7)
    assert torch.tensor(t, dtype=torch.float32).item() == t and abs(t - 1 / 0.7) < 1e-7
    assert inverse_temperature(1.0) == 1.0
    with pytest.raises(ValueError, match="temperature"):
        inverse_temperature(0.0)


# ------------------------------------------------------------------------------------------ kernel == twin


@pytest.mark.parametrize("filt", ["none", "top_k", "top_p", "both"])
def test_kernel_scores_are_bit_exact_with_the_twin(filt):
    """V = 300 (not a multiple of the tile), temperature 0.7, a threshold or none: every score equal."""
    logits = logits_with_gaps(4, 300)
    inv_t = inverse_temperature(0.7)
    top_k, top_p = {"none": (0, 1.0), "top_k": (17, 1.0), "top_p": (0, 0.9), "both": (40, 0.8)}[filt]
    thr = keep_threshold(logits, top_k, top_p, inv_t)
    rows = torch.tensor([0, 3, 1000, 2**40 + 5], device=DEV)
    slot = torch.tensor([123], device=DEV)
    a = gumbel_scores(logits, inv_t, thr, 9, slot, rows)
    b = gumbel_scores_torch(logits, inv_t, thr, 9, slot, rows)
    assert torch.equal(bits(a), bits(b))
    assert torch.isfinite(a).sum().item() == (4 * 300 if thr is None else (logits >= thr[:, None]).sum().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block", [32, 128])
def test_kernel_tokens_equal_the_twin(dtype, block):
    """Many rows and seeds, rows split into several chunks (block 32) or one; bf16 logits read as float32."""
    logits = logits_with_gaps(16, 200, scale=1.0).to(dtype)
    rows = torch.arange(16, device=DEV) * 7
    for seed in (0, 12345):
        for thr in (None, keep_threshold(logits, 5, 1.0, 1.0)):
            a = gumbel_argmax(logits, 1.0, thr, seed, 3, rows, block=block)
            b = gumbel_argmax_torch(logits, 1.0, thr, seed, 3, rows)
            assert torch.equal(a, b), (seed, thr is None)


def test_greedy_mode_is_argmax_with_first_index_ties():
    """inv_t None: the plain argmax; a row's maximum repeated in several chunks answers its first index."""
    logits = torch.randn(3, 333)
    logits[0, [40, 200, 301]] = 9.0  # tie across chunks
    logits[1, :] = float("-inf")  # torch answers 0
    logits[2, 100:] = float("-inf")
    logits = logits.to(DEV)
    got = gumbel_argmax(logits, None, block=32)
    assert torch.equal(got, logits.argmax(-1)) and got[0].item() == 40 and got[1].item() == 0


def test_minus_inf_logits_are_never_drawn():
    logits = torch.randn(8, 150)
    logits[:, ::3] = float("-inf")
    logits = logits.to(DEV)
    tok = gumbel_argmax(logits, 1.0, None, 4, 5, block=32)
    assert (tok % 3 != 0).all()
    assert torch.equal(tok, gumbel_argmax_torch(logits, 1.0, None, 4, 5, torch.arange(8, device=DEV)))
    dead = torch.full((2, 100), float("-inf"), device=DEV)
    assert gumbel_argmax(dead, 1.0, None, 0, 0, block=32).tolist() == [0, 0]  # as torch.argmax answers


def test_top_k_1_and_tiny_top_p_are_greedy():
    logits = logits_with_gaps(8, 250)
    greedy = logits.argmax(-1)
    for k, p in ((1, 1.0), (0, 1e-6), (1, 1e-6)):
        thr = keep_threshold(logits, k, p, 1.0)
        assert torch.equal(gumbel_argmax(logits, 1.0, thr, 3, 4, block=64), greedy)


def test_top_k_above_v_and_top_p_1_filter_nothing():
    logits = logits_with_gaps(2, 64)
    assert keep_threshold(logits, 64, 1.0, 1.0) is None and keep_threshold(logits, 1000, 1.0, 1.0) is None
    assert keep_threshold(logits, 0, 1.0, 1.0) is None
    assert keep_threshold(logits, 63, 1.0, 1.0) is not None


def test_threshold_keeps_ties_and_the_nucleus():
    logits = torch.log(torch.tensor([[0.4, 0.2, 0.2, 0.1, 0.1], [0.5, 0.3, 0.15, 0.05, 0.0]]))
    thr = keep_threshold(logits, 2, 1.0, 1.0)  # 2nd largest of row 0 is 0.2, tied: three tokens stay
    assert ((logits >= thr[:, None]).sum(-1)).tolist() == [3, 2]
    thr = keep_threshold(logits, 0, 0.8, 1.0)  # row 1: 0.5 + 0.3 reaches 0.8
    assert (logits[1] >= thr[1]).tolist() == [True, True, False, False, False]
    thr = keep_threshold(logits, 3, 0.99, 1.0)  # top-p inside the top-3 list renormalised: 0.95 < 0.99
    assert (logits[1] >= thr[1]).sum().item() == 3


# ------------------------------------------------------------------------------------------ determinism


def test_same_seed_same_tokens_and_slots_rows_seeds_differ():
    logits = torch.zeros(32, 64, device=DEV)  # uniform: the tokens are the noise's argmax
    rows = torch.arange(32, device=DEV)
    a = gumbel_argmax(logits, 1.0, None, 5, 9, rows)
    assert torch.equal(a, gumbel_argmax(logits, 1.0, None, torch.tensor([5]), torch.tensor([9]), rows))
    assert not torch.equal(a, gumbel_argmax(logits, 1.0, None, 5, 10, rows))
    assert not torch.equal(a, gumbel_argmax(logits, 1.0, None, 6, 9, rows))
    assert len(set(a.tolist())) > 16  # rows draw independently
    sub = gumbel_argmax(logits[8:12], 1.0, None, 5, 9, rows[8:12])
    assert torch.equal(sub, a[8:12])  # a row's draw does not depend on the batch around it


def test_split_plan_fills_the_grid():
    assert split_plan(1, 49152, 1024, 132) == (1, 48)
    assert split_plan(256, 49152, 1024, 132) == (16, 3)
    assert split_plan(32, 128256, 1024, 132) == (8, 16)
    tiles, n = split_plan(3, 300, 64, 4)
    assert tiles * n * 64 >= 300 and (n - 1) * tiles * 64 < 300


# ------------------------------------------------------------------------------------------ GPU only


@GPU
@pytest.mark.parametrize("B,V", [(1, 49152), (256, 49152), (32, 128256)])
def test_real_shapes_bit_exact_on_the_gpu(B, V):
    """Scores bit for bit and tokens equal at the engine's shapes, for several seeds and slots."""
    logits = torch.randn(B, V, device="cuda") * 4
    rows = torch.arange(B, device="cuda")
    for seed, slot, (k, p, t) in [(0, 1, (0, 1.0, 1.0)), (7, 100, (50, 1.0, 0.8)), (3, 5, (0, 0.9, 1.0)),
                                  (11, 2047, (50, 0.9, 0.6))]:
        inv_t = inverse_temperature(t)
        thr = keep_threshold(logits, k, p, inv_t)
        s = torch.tensor([slot], device="cuda")
        assert torch.equal(bits(gumbel_scores(logits, inv_t, thr, seed, s, rows)),
                           bits(gumbel_scores_torch(logits, inv_t, thr, seed, s, rows)))
        assert torch.equal(gumbel_argmax(logits, inv_t, thr, seed, s, rows),
                           gumbel_argmax_torch(logits, inv_t, thr, seed, s, rows))


@GPU
@pytest.mark.parametrize("B,V", [(1, 49152), (256, 49152), (32, 128256)])
def test_radix_thresholds_on_the_gpu(B, V):
    """Top-k: torch.topk's value exactly. Top-p: the sorted-cumsum nucleus threshold in >= 99% of rows
    (the two sum in different orders; a differing row moves its boundary by a rounding-sized mass)."""
    x = torch.randn(B, V, device="cuda") * 4
    assert torch.equal(keep_threshold(x, 50, 1.0, 1.0, kernel=True), torch.topk(x, 50, dim=-1).values[:, -1])
    for k, p in ((0, 0.9), (50, 0.9)):
        a, b = keep_threshold(x, k, p, 1.25, kernel=True), keep_threshold(x, k, p, 1.25, kernel=False)
        assert (a != b).sum().item() <= B // 100, (k, p, (a != b).sum().item())


@GPU
def test_kernel_is_capturable_in_a_cuda_graph():
    """seed and slot as device tensors: replays draw afresh as the slot advances, equal to eager calls."""
    logits = torch.randn(64, 49152, device="cuda")
    rows = torch.arange(64, device="cuda")
    seed, slot = torch.tensor([3], device="cuda"), torch.tensor([10], device="cuda")
    thr = keep_threshold(logits, 50, 0.9, 1.0)
    gumbel_argmax(logits, 1.0, thr, seed, slot, rows)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = gumbel_argmax(logits, 1.0, keep_threshold(logits, 50, 0.9, 1.0), seed, slot, rows)
    for step in range(3):
        slot.fill_(10 + step)
        graph.replay()
        assert torch.equal(out, gumbel_argmax_torch(logits, 1.0, thr, seed, slot, rows))
    assert math.isfinite(float(out.float().mean()))



# ------------------------------------------------------------------------------------------ the threshold kernel


def test_radix_threshold_top_k_is_torch_topk_value():
    """Count mode: exactly torch.topk's k-th value, with ties, -inf tails and a constant row."""
    from fp4kit.kernels.sampling import radix_threshold

    x = torch.randn(3, 300).round(decimals=1)  # many ties
    x[1, 120:] = float("-inf")
    x[2] = 0.5
    x = x.to(DEV)
    for k in (1, 50):
        assert torch.equal(radix_threshold(x, k, mass=False), torch.topk(x, k, dim=-1).values[:, -1])


def test_radix_threshold_top_p_is_the_sorted_nucleus():
    """Mass mode through keep_threshold: the same threshold as the sorted softmax + cumsum on tie-free
    logits (top-p alone, and top-p inside top-k), and the row maximum for a tiny top_p."""
    x = (torch.randn(3, 300) * 2).to(DEV)
    for k, p, t in ((0, 0.9, 0.7), (20, 0.8, 1.0)):
        inv_t = inverse_temperature(t)
        want = keep_threshold(x, k, p, inv_t, kernel=False)
        assert torch.equal(keep_threshold(x, k, p, inv_t, kernel=True), want), (k, p)
    assert torch.equal(keep_threshold(x, 0, 1e-6, 1.0, kernel=True), x.max(-1).values)


@pytest.mark.parametrize("inv_t", [None, 1.3])
def test_tokens_written_into_out(inv_t):
    """`out=` (the decode step's token buffer) receives the same tokens as the returned tensor would; the row
    maxima sit in different splits (64-token blocks under the interpreter), one row ties across two splits
    (the lower index wins)."""
    B, V = 4, 1000
    logits = logits_with_gaps(B, V)
    logits[1, 900] = 50.0
    logits[2, 10] = logits[2, 700] = 60.0  # a tie across splits: token 10
    ref = gumbel_argmax(logits, inv_t, None, 5, 7, torch.arange(B, device=DEV))
    buf = torch.full((B + 2, 1), -1, dtype=torch.long, device=DEV)
    out = buf[1:B + 1, 0]
    got = gumbel_argmax(logits, inv_t, None, 5, 7, torch.arange(B, device=DEV), out=out)
    assert got.data_ptr() == out.data_ptr() and torch.equal(got, ref)
    assert buf[0, 0] == -1 and buf[B + 1, 0] == -1  # nothing written outside the view
    if inv_t is None:
        assert ref[1] == 900 and ref[2] == 10 and torch.equal(ref, logits.argmax(-1))

"""The fused forward: fused projections (when allowed, and only then), the decode kernels inside the engine
(Triton interpreter on the CPU), the FP8 cache read in place, rebuilds after in-place weight changes."""

import copy

import pytest
import torch
from engine_models import hf_greedy, tiny
from torch import nn

from fp4kit.engine import Engine, SamplingParams
from fp4kit.engine.fused import FusedLinear, fuse_linears, norm_kind

PROMPTS = [[1, 5, 9, 20, 3], [7, 8], [50, 3, 4, 5, 6, 7, 8, 11, 12]]
GREEDY = SamplingParams(max_new_tokens=10, temperature=0, ignore_eos=True)


def _kernel_engine(model, **kw):
    eng = Engine(model, max_batch=4, max_seq_len=48, seq_bucket=16, **kw)
    eng.runner.use_kernels = True  # the Triton kernels even on the CPU (interpreter)
    return eng


@pytest.mark.parametrize("kind", ["llama", "gemma3"])
def test_unfused_path_still_equals_hf(kind):
    model = tiny(kind)
    outs = Engine(model, max_batch=4, max_seq_len=48, fused=False).generate(PROMPTS, GREEDY)
    assert [o.token_ids for o in outs] == [hf_greedy(model, p, 10) for p in PROMPTS]


@pytest.mark.parametrize("kind", ["llama", "qwen3", "gemma3"])
def test_decode_kernels_equal_hf_generate(kind):
    """Fused projections + add_rmsnorm + rope_write + decode_attention (float32: the attention kernel's
    IEEE float32 dots) give HF generate's greedy tokens; gemma3 exercises windows and the (1 + w) norm."""
    model = tiny(kind)
    eng = _kernel_engine(model)
    outs = eng.generate(PROMPTS, GREEDY)
    assert [o.token_ids for o in outs] == [hf_greedy(model, p, 10) for p in PROMPTS]
    assert all(p.qkv is not None and p.gate_up is not None for p in eng.runner.plans())
    assert all(p.silu for p in eng.runner.plans()) == (kind != "gemma3")  # gemma's gelu is called as a module


def test_fp8_cache_kernel_equals_twin():
    """The FP8 cache read in place by the kernel (scales in registers) gives the twin's tokens (which
    dequantize the prefix and run SDPA)."""
    model = tiny("llama")
    kw = {"kv_dtype": torch.float8_e4m3fn}
    twin = Engine(model, max_batch=4, max_seq_len=48, seq_bucket=16, **kw).generate(PROMPTS, GREEDY)
    kern = _kernel_engine(model, **kw).generate(PROMPTS, GREEDY)
    assert [o.token_ids for o in kern] == [o.token_ids for o in twin]


def test_fused_linear_equals_modules():
    from fp4kit.formats import NVFP4Config
    from fp4kit.nn import quantize_

    model = tiny("llama")
    q4 = copy.deepcopy(model)
    quantize_(q4, NVFP4Config(), progress=False)
    x = torch.randn(3, 5, 64)
    for m in (model, q4):
        a = m.model.layers[0].self_attn
        mods = (a.q_proj, a.k_proj, a.v_proj)
        fused = fuse_linears(mods)
        assert isinstance(fused, FusedLinear)
        for got, mod in zip(fused.split(fused(x)), mods):
            torch.testing.assert_close(got, mod(x), rtol=1e-6, atol=1e-6)


def test_fused_linear_with_bias_and_mxfp4():
    from fp4kit.formats import MXFP4Config
    from fp4kit.nn import FP4Linear

    lins = [nn.Linear(64, n, bias=True) for n in (32, 16, 16)]  # Qwen2-style q/k/v biases
    x = torch.randn(4, 64)
    fused = fuse_linears(lins)
    for got, mod in zip(fused.split(fused(x)), lins):
        torch.testing.assert_close(got, mod(x), rtol=1e-6, atol=1e-6)
    fp4 = [FP4Linear.from_linear(m, MXFP4Config()) for m in lins]
    fused = fuse_linears(fp4)
    assert fused.qt.global_scale is None
    for got, mod in zip(fused.split(fused(x)), fp4):
        torch.testing.assert_close(got, mod(x), rtol=1e-6, atol=1e-6)
    assert fuse_linears([lins[0], nn.Linear(64, 8, bias=False)]) is None  # bias on one only


def test_fusion_falls_back_when_layers_differ():
    from fp4kit.formats import NVFP4Config
    from fp4kit.nn import add_lora, quantize_

    model = tiny("llama")
    quantize_(model, NVFP4Config(), progress=False)
    a = model.model.layers[0].self_attn
    with torch.no_grad():
        a.k_proj.weight_global_scale.mul_(2)  # a global scale q/k/v do not share
    assert fuse_linears((a.q_proj, a.k_proj, a.v_proj)) is None
    mlp = model.model.layers[1].mlp
    assert fuse_linears((mlp.gate_proj, mlp.up_proj)) is not None
    assert fuse_linears((mlp.gate_proj, nn.Linear(64, 96))) is None  # mixed types
    add_lora(model, targets=("gate_proj", "q_proj", "k_proj", "v_proj"), rank=2, alpha=4)
    assert fuse_linears((mlp.gate_proj, mlp.up_proj)) is None  # a LoRA wrapper is called as it is
    a1 = model.model.layers[1].self_attn
    assert fuse_linears((a1.q_proj, a1.k_proj, a1.v_proj)) is None  # all wrapped alike: still not fused
    eng = Engine(model, max_batch=4, max_seq_len=48)
    eng.generate(PROMPTS[:1], GREEDY)
    plans = eng.runner.plans()
    assert all(p.qkv is None and p.gate_up is None for p in plans)


def test_in_place_weight_change_rebuilds_fused_weights():
    model = tiny("llama")
    eng = Engine(model, max_batch=4, max_seq_len=48)
    before = [o.token_ids for o in eng.generate(PROMPTS, GREEDY)]
    old = eng.runner.plans()[0].qkv
    with torch.no_grad():  # a training step on a plain linear layer
        model.model.layers[0].self_attn.k_proj.weight.mul_(-1.5)
    after = [o.token_ids for o in eng.generate(PROMPTS, GREEDY)]
    assert eng.runner.plans()[0].qkv is not old
    assert after != before and after == [hf_greedy(model, p, 10) for p in PROMPTS]


def test_norm_kind_only_for_known_classes():
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    assert norm_kind(LlamaRMSNorm(8, eps=1e-5)).gemma is False
    assert norm_kind(Gemma3RMSNorm(8, eps=1e-6)).gemma is True

    class MyNorm(LlamaRMSNorm):  # a subclass may compute something else: called as a module
        pass

    assert norm_kind(MyNorm(8)) is None
    assert norm_kind(nn.LayerNorm(8)) is None


def _forced_logits(eng, prompts, tokens) -> torch.Tensor:
    """float32 logits [steps + 1, B, V]: prefill, then decode steps fed `tokens` [B][steps] (teacher forcing,
    so two engines see the same inputs even where their greedy choices would part at a near-tie)."""
    logits, pad, P = eng.prefill(prompts)
    out = [logits]
    for step in range(len(tokens[0])):
        t = torch.tensor([row[step] for row in tokens], device=logits.device)
        out.append(eng.decode(t, pad, P + step).clone())  # with graphs: a view of the graph's output
    return torch.stack(out)


def _rel_err(got: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    return (got - ref).norm(dim=-1) / ref.norm(dim=-1)  # [steps + 1, B]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the decode kernels run for real only on CUDA")
@pytest.mark.parametrize("scheme", ["none", "nvfp4"])
@pytest.mark.parametrize("kv", [torch.bfloat16, torch.float8_e4m3fn])
def test_cuda_fused_equals_unfused(scheme, kv):
    """bf16 on the GPU, logits over 24 teacher-forced decode steps (tokens are not compared: greedy choices can
    part at near-ties on this random tiny model).

    bf16 cache: the fused kernels stay within bf16 rounding of the module-by-module torch path (normalised error
    < 2^-5: GEMMs of other shapes and an online softmax round differently).

    FP8 cache: a one-ulp bf16 difference in a key or value can move its E4M3 code by a whole step (6%), and such
    flips persist in the cache, so the two bf16 paths drift apart by about as much as either drifts from a
    float32 model with the same FP8 cache. The judge is that float32 run: the fused path must be no farther from it
    than the module path (H100, 2026-11-23, NVFP4: fused vs module 0.103 max / 0.030 mean, fused vs float32
    0.128 / 0.056, module vs float32 0.125 / 0.055; no quantization: 0.061 / 0.022 vs 0.124 / 0.042 and
    0.143 / 0.044). A wrong scale or a misplaced code would show as a multiple, not a few percent."""
    import copy

    from fp4kit.formats import NVFP4Config
    from fp4kit.nn import quantize_

    torch.manual_seed(0)
    model = tiny("llama", hidden_size=128, intermediate_size=256).to("cuda", torch.bfloat16)
    if scheme == "nvfp4":
        quantize_(model, NVFP4Config(), progress=False)
    kw = {"max_batch": 4, "max_seq_len": 96, "kv_dtype": kv, "seq_bucket": 16}
    params = SamplingParams(max_new_tokens=24, temperature=0, ignore_eos=True)
    plain_eng = Engine(model, fused=False, **kw)
    tokens = [o.token_ids for o in plain_eng.generate(PROMPTS, params)]
    ref = _forced_logits(plain_eng, PROMPTS, tokens)
    got = _forced_logits(Engine(model, fused=True, **kw), PROMPTS, tokens)
    if kv == torch.bfloat16:
        err = _rel_err(got, ref).max().item()
        assert err < 2 ** -5, err
        return
    f32 = _forced_logits(Engine(copy.deepcopy(model).float(), fused=False, **kw), PROMPTS, tokens)
    fused_err, module_err = _rel_err(got, f32), _rel_err(ref, f32)
    assert fused_err.mean() <= 1.15 * module_err.mean(), (fused_err.mean(), module_err.mean())
    assert fused_err.max() <= 1.5 * module_err.max(), (fused_err.max(), module_err.max())


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0),
                    reason="programmatic dependent launch needs a Hopper (sm_90+) GPU")
@pytest.mark.parametrize("kv", [torch.bfloat16, torch.float8_e4m3fn])
def test_cuda_fused_pdl_equals_serial(kv):
    """The fused engine's decode graphs with programmatic dependent launch (GEMV and decode kernels
    overlapping their predecessors' tails) give bit for bit the logits of the same graphs without it."""
    from fp4kit.formats import NVFP4Config
    from fp4kit.kernels import fp4_gemm
    from fp4kit.nn import quantize_

    model = tiny("llama", hidden_size=128, intermediate_size=256).to("cuda", torch.bfloat16)
    quantize_(model, NVFP4Config(), progress=False)
    kw = {"max_batch": 4, "max_seq_len": 96, "kv_dtype": kv, "seq_bucket": 16, "lm_head": "nvfp4"}
    params = SamplingParams(max_new_tokens=24, temperature=0, ignore_eos=True)
    old = fp4_gemm.PDL
    try:
        fp4_gemm.PDL = False
        eng = Engine(model, **kw)
        tokens = [o.token_ids for o in eng.generate(PROMPTS, params)]
        serial = _forced_logits(eng, PROMPTS, tokens)
        fp4_gemm.PDL = True
        pdl_eng = Engine(model, **kw)
        with_pdl = _forced_logits(pdl_eng, PROMPTS, tokens)
        assert [o.token_ids for o in pdl_eng.generate(PROMPTS, params)] == tokens
    finally:
        fp4_gemm.PDL = old
    assert torch.equal(with_pdl, serial)


@pytest.mark.parametrize("kind", ["llama", "gemma3"])
def test_decode_rope_table_rows_equal_the_rotary_module(kind):
    """The decode step's cos / sin come from a table of every position built by the model's own rotary module:
    row p equals what the module gives for position p alone, bit for bit, for each rope type (Gemma-3: local
    and global)."""
    model = tiny(kind)
    eng = Engine(model, max_batch=3, max_seq_len=40)
    runner = eng.runner
    assert runner.rope_static and runner._max_positions == 40
    h = torch.zeros(3, 1, 64)
    positions = torch.tensor([[0], [17], [39]])
    got = runner.decode_rope(h, positions)
    per_step = runner.rope(h, positions)
    assert set(got) == set(per_step) and len(got) == (2 if kind == "gemma3" else 1)
    for t, (cos, sin) in got.items():
        assert cos.is_contiguous() and cos.shape == (3, per_step[t][0].shape[-1])
        assert torch.equal(cos, per_step[t][0][:, 0]) and torch.equal(sin, per_step[t][1][:, 0])


def test_dynamic_rope_is_computed_per_step():
    """A dynamic rope rescales with the sequence it has seen, so no table: the module runs every step."""
    from fp4kit.engine.model import static_rope

    model = tiny("llama", rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0})
    assert not static_rope(model.model.rotary_emb)
    eng = Engine(model, max_batch=1, max_seq_len=40)
    assert not eng.runner.rope_static
    eng.runner.decode_rope(torch.zeros(1, 1, 64), torch.tensor([[5]]))
    assert not eng.runner._rope_tables

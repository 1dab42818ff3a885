"""Engine vs transformers' greedy `generate`, batching, prompt errors, EOS, FP4 layers used as they are."""

import pytest
import torch
from engine_models import hf_greedy, tiny

from fp4kit.engine import Engine, SamplingParams, UnsupportedModel

PROMPTS = [[1, 5, 9, 20, 3], [7, 8], [50, 3, 4, 5, 6, 7, 8, 11, 12]]
GREEDY = SamplingParams(max_new_tokens=12, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def llama():
    return tiny("llama")


@pytest.mark.parametrize("kind", ["llama", "qwen3", "gemma3", "qwen3_moe"])
def test_greedy_equals_hf_generate(kind):
    model = tiny(kind)
    eng = Engine(model, max_batch=4, max_seq_len=64, seq_bucket=16)
    outs = eng.generate(PROMPTS, GREEDY)
    for p, o in zip(PROMPTS, outs):
        assert o.token_ids == hf_greedy(model, p, 12), (kind, p)
        assert o.prompt_ids == p and o.finish_reason == "length"


def test_gemma3_window_is_exercised():
    # the prompt (9) plus 12 new tokens is far longer than the sliding window (4): masks and rope differ
    model = tiny("gemma3")
    assert model.config.sliding_window < len(PROMPTS[2])


def test_batched_equals_one_by_one(llama):
    eng = Engine(llama, max_batch=4, max_seq_len=64, seq_bucket=16)
    batched = [o.token_ids for o in eng.generate(PROMPTS, GREEDY)]
    single = [eng.generate([p], GREEDY)[0].token_ids for p in PROMPTS]
    assert batched == single


def test_more_prompts_than_max_batch(llama):
    eng = Engine(llama, max_batch=2, max_seq_len=64)
    outs = eng.generate(PROMPTS, GREEDY)
    assert [o.token_ids for o in outs] == [hf_greedy(llama, p, 12) for p in PROMPTS]


def test_empty_prompt_is_an_error(llama):
    eng = Engine(llama, max_batch=2, max_seq_len=32)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        eng.generate([[1, 2], []], GREEDY)


def test_prompt_longer_than_cache_is_an_error(llama):
    eng = Engine(llama, max_batch=2, max_seq_len=16)
    with pytest.raises(ValueError, match="prompt 0 has 16 tokens.*max_seq_len=16"):
        eng.generate([list(range(3, 19))], GREEDY)


def test_full_cache_ends_with_length(llama):
    eng = Engine(llama, max_batch=1, max_seq_len=12)
    out = eng.generate([[1, 5, 9, 20, 3]], SamplingParams(max_new_tokens=50, temperature=0, ignore_eos=True))[0]
    assert len(out.token_ids) == 12 - 5 and out.finish_reason == "length"
    assert out.token_ids == hf_greedy(llama, [1, 5, 9, 20, 3], 7)


def test_string_prompt_needs_tokenizer(llama):
    with pytest.raises(ValueError, match="tokenizer"):
        Engine(llama, max_batch=1, max_seq_len=16).generate(["hello"], GREEDY)


def test_eos_stops_the_row_and_is_kept_in_token_ids(llama):
    ref = hf_greedy(llama, PROMPTS[0], 12)
    llama.generation_config.eos_token_id = ref[3]
    try:
        out = Engine(llama, max_batch=2, max_seq_len=32).generate(
            [PROMPTS[0]], SamplingParams(max_new_tokens=12, temperature=0))[0]
    finally:
        llama.generation_config.eos_token_id = None
    assert out.token_ids == ref[:ref.index(ref[3]) + 1] and out.finish_reason == "eos"


def test_unsupported_architecture_is_named():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=50))
    with pytest.raises(UnsupportedModel, match="gpt2"):
        Engine(model, max_batch=1, max_seq_len=16)


def test_fp4_layers_run_as_they_are(llama):
    """After quantize_, the engine's tokens equal HF generate over the same FP4Linear modules."""
    import copy

    from fp4kit.formats import NVFP4Config
    from fp4kit.nn import FP4Linear, quantize_

    model = copy.deepcopy(llama)
    quantize_(model, NVFP4Config(), progress=False)
    assert isinstance(model.model.layers[0].self_attn.q_proj, FP4Linear)
    outs = Engine(model, max_batch=4, max_seq_len=64).generate(PROMPTS, GREEDY)
    assert [o.token_ids for o in outs] == [hf_greedy(model, p, 12) for p in PROMPTS]
    assert [o.token_ids for o in outs] != [hf_greedy(llama, p, 12) for p in PROMPTS]  # FP4 changed something


def test_fp8_cache_logit_error(llama):
    """Prompt logits with FP8 keys/values stay within E4M3's per-element relative bound (2^-4) of the
    float32 cache's, and are further off than a bf16 cache's (so the FP8 path really quantizes).
    Recorded (2026-11-22): FP8 0.033, bf16 0.0024."""

    def logits(dtype):
        return Engine(llama, max_batch=4, max_seq_len=64, kv_dtype=dtype).prefill(PROMPTS)[0]

    ref = logits(torch.float32)
    err = {dt: ((logits(dt) - ref).norm() / ref.norm()).item() for dt in (torch.bfloat16, torch.float8_e4m3fn)}
    assert err[torch.bfloat16] < err[torch.float8_e4m3fn] < 2**-4


def test_prompt_logits_equal_hf_forward(llama):
    ids = [1, 5, 9, 20, 3, 7, 8]
    ours = Engine(llama, max_batch=1, max_seq_len=16, kv_dtype=torch.float32).prompt_logits(ids)
    with torch.no_grad():
        ref = llama(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs and the FP4 kernels need a GPU")


@CUDA
@pytest.mark.parametrize("scheme", ["none", "nvfp4", "mxfp4"])
@pytest.mark.parametrize("kv", [torch.bfloat16, torch.float8_e4m3fn])
def test_cuda_graph_decode_equals_eager(scheme, kv):
    """Graph replays compute what the eager decode computes: same greedy tokens (4 rows: the bucket's size,
    so both run the same GEMM shapes)."""
    from fp4kit.formats import MXFP4Config, NVFP4Config
    from fp4kit.nn import quantize_

    model = tiny("llama", hidden_size=128, intermediate_size=256).to("cuda", torch.bfloat16)
    if scheme != "none":
        quantize_(model, NVFP4Config() if scheme == "nvfp4" else MXFP4Config(), progress=False)
    prompts = [[1, 5, 9, 20, 3], [7, 8], [50, 3, 4, 5, 6, 7, 8, 11, 12], [9, 9, 4]]
    params = SamplingParams(max_new_tokens=40, temperature=0, ignore_eos=True)
    kw = {"max_batch": 4, "max_seq_len": 128, "kv_dtype": kv, "seq_bucket": 16, "prefill_bucket": 64}
    graphed = Engine(model, cuda_graphs=True, **kw)
    eager = Engine(model, cuda_graphs=False, **kw)  # same padded prefill shapes, without graphs
    a = [o.token_ids for o in graphed.generate(prompts, params)]
    b = [o.token_ids for o in eager.generate(prompts, params)]
    assert a == b
    assert len(graphed._graphs) >= 3  # one per 16-slot bucket crossed (batch bucket 4)
    again = [o.token_ids for o in graphed.generate(prompts, params)]  # replays only
    assert again == a


@CUDA
@pytest.mark.parametrize("head", ["model", "nvfp4"])
def test_cuda_graph_sampling_equals_eager(head):
    """Temperature / top-k / top-p sampling inside the graph (counter-based RNG keyed by seed, slot and row on
    the device, next token fed back on the device): the same tokens as the eager loop, rows stopping at
    different steps (EOS), the same again on a second call; another seed differs."""
    from fp4kit.formats import NVFP4Config
    from fp4kit.nn import quantize_

    model = tiny("llama", hidden_size=128, intermediate_size=256).to("cuda", torch.bfloat16)
    quantize_(model, NVFP4Config(), progress=False)
    prompts = [[1, 5, 9, 20, 3], [7, 8], [50, 3, 4, 5, 6, 7, 8, 11, 12], [9, 9, 4]]
    params = SamplingParams(max_new_tokens=40, temperature=0.8, top_k=20, top_p=0.9, seed=11)
    kw = {"max_batch": 4, "max_seq_len": 128, "seq_bucket": 16, "lm_head": head, "prefill_bucket": 64}
    graphed = Engine(model, cuda_graphs=True, **kw)
    eager = Engine(model, cuda_graphs=False, **kw)
    graphed.eos = eager.eos = {17}  # some rows end early, at different steps
    a = [(o.token_ids, o.finish_reason) for o in graphed.generate(prompts, params)]
    b = [(o.token_ids, o.finish_reason) for o in eager.generate(prompts, params)]
    assert a == b
    assert a == [(o.token_ids, o.finish_reason) for o in graphed.generate(prompts, params)]
    other = [o.token_ids for o in graphed.generate(prompts, SamplingParams(max_new_tokens=40, seed=12))]
    assert other != [t for t, _ in a]


@CUDA
@pytest.mark.parametrize("scheme", ["none", "nvfp4"])
def test_cuda_prefill_graph_equals_eager_prefill(scheme):
    """Prefill graphs: the first prefill of a (rows, padded length) runs eagerly, the second captures and
    replays, later ones replay; each gives the logits of an engine without graphs on the same padded shapes
    bit for bit, also for other prompts of the same bucket (the static inputs are refilled), and the cache
    the replay wrote carries decode on to the same tokens."""
    from fp4kit.formats import NVFP4Config
    from fp4kit.nn import quantize_

    torch.manual_seed(0)
    model = tiny("llama", hidden_size=128, intermediate_size=256).to("cuda", torch.bfloat16)
    if scheme == "nvfp4":
        quantize_(model, NVFP4Config(), progress=False)
    kw = {"max_batch": 4, "max_seq_len": 160, "seq_bucket": 16, "prefill_bucket": 32}
    graphed, eager = Engine(model, **kw), Engine(model, cuda_graphs=False, **kw)
    # 4 prompts (the rows bucket, so the engine without graphs runs the same GEMM shapes)
    first = [[1, 5, 9, 20, 3], [7, 8], [50, 3, 4, 5, 6, 7, 8, 11, 12], [9, 9, 4]]
    other = [[4, 4, 4, 4], [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5], [2, 7], [8] * 20]  # same bucket, other pads
    for prompts in (first, first, other, first):
        got, pad, P = graphed.prefill(prompts)
        want, pad_e, P_e = eager.prefill(prompts)
        assert P == P_e == 32 and torch.equal(pad, pad_e)
        assert torch.equal(got, want), prompts
    ((st, graph, _),) = graphed._prefill.values()
    assert graph is not None and tuple(st["tokens"].shape) == (4, 32)
    params = SamplingParams(max_new_tokens=24, temperature=0, ignore_eos=True)
    assert ([o.token_ids for o in graphed.generate(other, params)]
            == [o.token_ids for o in eager.generate(other, params)])
    assert torch.equal(got, want)  # the returned logits are the caller's: decode replays since left them alone
    graphed.reset_graphs()
    assert not graphed._prefill


@pytest.mark.parametrize("kind", ["gemma3", "qwen3_moe"])
def test_prefill_bucket_padding_with_windows_and_experts(kind):
    """The same with sliding windows (Gemma-3, window 4 < the prompts) and MoE blocks (pad tokens are routed too)."""
    model = tiny(kind)
    outs = Engine(model, max_batch=4, max_seq_len=64, seq_bucket=16, prefill_bucket=16).generate(PROMPTS, GREEDY)
    assert [o.token_ids for o in outs] == [hf_greedy(model, p, 12) for p in PROMPTS]


def test_prefill_bucket_pads_without_changing_tokens(llama):
    """Padding the prompts to `prefill_bucket` (what prefill graphs run) only adds masked slots: greedy tokens
    equal transformers' on the unpadded prompts; padding never takes the room the generation needs."""
    eng = Engine(llama, max_batch=4, max_seq_len=64, seq_bucket=16, prefill_bucket=16)
    assert eng.prefill_shape(3, 9, room=12) == (3, 16)
    assert eng.prefill_shape(3, 9, room=50) == (3, 14)  # only as far as 64 - 50 slots
    assert eng.prefill_shape(3, 9, room=60) == (3, 9)  # never below the prompt
    assert eng.prefill_shape(3, 40, room=1) == (3, 48)
    outs = eng.generate(PROMPTS, GREEDY)
    assert [o.token_ids for o in outs] == [hf_greedy(llama, p, 12) for p in PROMPTS]
    assert Engine(llama, max_batch=1, max_seq_len=8).prefill_bucket is None  # CPU: no graphs, no padding
    with pytest.raises(ValueError, match="prefill_bucket >= 1"):
        Engine(llama, max_batch=1, max_seq_len=8, prefill_bucket=0)


def test_generate_ignores_torch_default_device(llama):
    """Every tensor the engine makes names its device, so a default device set by the user (or left over by
    another library) changes nothing: the H100 engine tests once failed after a test left
    `torch.set_default_device("cpu")` active (`torch.arange(..., out=<cuda tensor>)`)."""
    want = [o.token_ids for o in Engine(llama, max_batch=4, max_seq_len=64).generate(PROMPTS, GREEDY)]
    torch.set_default_device("meta")  # on this CPU run the foreign device; any tensor made without device= breaks
    try:
        eng = Engine(llama, max_batch=4, max_seq_len=64)
        got = [o.token_ids for o in eng.generate(PROMPTS, SamplingParams(max_new_tokens=12, temperature=0,
                                                                          ignore_eos=True, seed=None))]
    finally:
        torch.set_default_device(None)
    assert got == want


def test_lora_over_fp4_is_used_as_is(llama):
    """LoRA wrappers around FP4 layers: the engine calls the wrappers (its tokens follow the adapter) and
    equals HF generate over the same modules."""
    import copy

    from fp4kit.formats import NVFP4Config
    from fp4kit.nn import LoRALinear, add_lora, quantize_

    model = copy.deepcopy(llama)
    quantize_(model, NVFP4Config(), progress=False)
    add_lora(model, targets=("q_proj", "v_proj", "down_proj"), rank=4, alpha=8)
    assert isinstance(model.model.layers[0].self_attn.q_proj, LoRALinear)
    eng = Engine(model, max_batch=4, max_seq_len=64)
    before = [o.token_ids for o in eng.generate(PROMPTS, GREEDY)]
    with torch.no_grad():  # a "training step": the engine sees it without being rebuilt
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.normal_(0, 0.5)
    after = [o.token_ids for o in eng.generate(PROMPTS, GREEDY)]
    assert after != before
    assert after == [hf_greedy(model, p, 12) for p in PROMPTS]


def test_default_cache_dtype_is_the_models(llama):
    """A float32 model keeps a float32 cache by default (a bf16 cache would move its logits by ~0.5%)."""
    assert Engine(llama, max_batch=1, max_seq_len=8).caches[0].k.dtype == torch.float32
    assert Engine(llama, max_batch=1, max_seq_len=8, kv_dtype=torch.bfloat16).caches[0].k.dtype == torch.bfloat16

"""Where the fused engine's FP8-cache logits drift: fused kernels vs the module path vs a float32 model with the
same FP8 cache, per teacher-forced decode step (tiny random llama, CUDA). Run: PYTHONPATH=. python benchmarks/fp8_cache_drift.py
Result (H100, 2026-11-23) in tests/engine/test_engine_fused.py::test_cuda_fused_equals_unfused's docstring."""
import sys, torch, copy
sys.path.insert(0, "tests/engine"); sys.path.insert(0, "tests")
from engine_models import tiny
from fp4kit.engine import Engine, SamplingParams
from fp4kit.formats import NVFP4Config
from fp4kit.nn import quantize_
from test_engine_fused import _forced_logits, PROMPTS
torch.manual_seed(0)
params = SamplingParams(max_new_tokens=24, temperature=0, ignore_eos=True)
def rel(a, b): return ((a - b).norm(dim=-1) / b.norm(dim=-1))
for scheme in ["none", "nvfp4"]:
  for kv in [torch.bfloat16, torch.float8_e4m3fn]:
    model = tiny("llama", hidden_size=128, intermediate_size=256).to("cuda", torch.bfloat16)
    if scheme == "nvfp4": quantize_(model, NVFP4Config(), progress=False)
    kw = {"max_batch": 4, "max_seq_len": 96, "kv_dtype": kv, "seq_bucket": 16}
    plain = Engine(model, fused=False, **kw)
    tokens = [o.token_ids for o in plain.generate(PROMPTS, params)]
    ref = _forced_logits(plain, PROMPTS, tokens)
    got = _forced_logits(Engine(model, fused=True, **kw), PROMPTS, tokens)
    e2 = Engine(model, fused=True, **kw); e2.runner.use_kernels = False
    fz_torch = _forced_logits(e2, PROMPTS, tokens)
    m32 = copy.deepcopy(model).float()
    r32 = _forced_logits(Engine(m32, fused=False, **kw), PROMPTS, tokens)
    print(f"== {scheme} {kv}")
    for name, x in [("fused-kern vs unfused", rel(got, ref)), ("fused-torch vs unfused", rel(fz_torch, ref)),
                    ("fused-kern vs fused-torch", rel(got, fz_torch)),
                    ("unfused vs fp32", rel(ref, r32)), ("fused-kern vs fp32", rel(got, r32)), ("fused-torch vs fp32", rel(fz_torch, r32))]:
        print(f"  {name:28s} max {x.max().item():.4f} mean {x.mean().item():.4f} steps {[round(v,3) for v in x.amax(1).tolist()]}")

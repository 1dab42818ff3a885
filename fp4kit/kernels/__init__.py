"""Triton kernels for FP4 weights and activations, each launcher beside its torch twin.

    fp4_gemm      W4A16 GEMM (dense) and the bit-exact weight dequantizer
    fp4_moe       grouped W4A16 GEMM over routed (token, expert) pairs, one launch for all experts
    fp4_quantize  fused bf16/fp16/fp32 -> NVFP4 / MXFP4 quantizers, bit-exact with `fp4kit.formats`

Kernels run on CUDA tensors when triton is importable (and anywhere under TRITON_INTERPRET=1);
the public functions fall back to their torch twins otherwise. Imports go down to
`fp4kit.formats` only.
"""

from .fp4_gemm import (GemmConfig, PreparedFP4Weight, fp4_dequantize, fp4_dequantize_torch, fp4_linear, fp4_matmul,
                       fp4_matmul_torch, prepare_fp4_weight)

from .fp4_moe import (FP4Experts, MoERouting, PreparedFP4Experts, experts_from_quantized, fp4_moe_gemm,
                      fp4_moe_gemm_torch, fp4_moe_mlp, fp4_moe_mlp_torch, prepare_fp4_experts, quantize_experts,
                      route_topk, stack_experts)
from .fp4_topk import KeyCacheView, KeyFormat, index_topk, rerank_topk  # noqa: F401
from .sampling import gumbel_argmax, gumbel_argmax_torch, keep_threshold  # noqa: F401

__all__ = ["GemmConfig", "PreparedFP4Weight", "prepare_fp4_weight", "fp4_dequantize", "fp4_dequantize_torch",
           "fp4_linear", "fp4_matmul", "fp4_matmul_torch",
           "FP4Experts", "MoERouting", "PreparedFP4Experts", "experts_from_quantized", "fp4_moe_gemm",
           "fp4_moe_gemm_torch", "fp4_moe_mlp", "fp4_moe_mlp_torch", "prepare_fp4_experts", "quantize_experts",
           "route_topk", "stack_experts"]

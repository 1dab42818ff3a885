"""Build a real transformers Mixtral from a dense Llama-style model: an MoE to quantize, export and serve.

No mixture-of-experts weights are reachable offline (shared/DATA.md), so accuracy work on MoE starts from
a dense model ("sparse upcycling", Komatsuzaki et al. 2022). Mixtral's decoder is Llama's with the MLP
replaced by a sparse MoE block, so a Llama checkpoint maps onto it name for name:

    embed_tokens, norms, q/k/v/o_proj, lm_head     copied as they are
    mlp.{gate,up,down}_proj                        -> every expert e of mlp.experts:
        experts.gate_up_proj[e] = cat(gate, up)    [E, 2I, H]   (+ noise, if asked)
        experts.down_proj[e]    = down             [E, H, I]
    mlp.gate (the router, [E, H])                  new: N(0, router_std^2)

Mixtral's block routes each token to its top-k experts with softmax weights renormalised over the k, so
the weights of a token sum to 1. With identical experts (noise 0) the upcycled model computes the dense
model's function whatever the router says (up to float rounding, which the tests bound). Noise makes the
experts differ, so each one gets its own FP4 scales, as in a trained MoE.

What this is for: PTQ of fused 3-D experts (`fp4kit.nn.FP4Experts`), per-expert export in Mixtral's
checkpoint names (`block_sparse_moe.experts.E.w1/w2/w3`, which vLLM's Mixtral loader reads) and accuracy
of an FP4 MoE against its dense origin. `fp4kit.train.moe_upcycle` is the other upcycler: it keeps the
dense model's class and puts `nn.Linear` experts in an `nn.ModuleList`, the form QAT's fake-quant
modules train; it exports nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

_COPIED_CONFIG = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps", "hidden_act",
                  "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id", "rope_parameters")


@dataclass(frozen=True)
class MixtralUpcycle:
    """num_experts E, top_k k (<= E); noise: relative std of the Gaussian added to each expert's weights
    (0: identical experts); router_std: std of the new router's weights; seed for both."""

    num_experts: int = 8
    top_k: int = 2
    noise: float = 0.0
    router_std: float = 0.02
    seed: int = 0

    def __post_init__(self):
        if self.num_experts < 1 or not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"MixtralUpcycle: need 1 <= top_k <= num_experts, got top_k={self.top_k}, "
                             f"num_experts={self.num_experts}")
        if self.noise < 0 or self.router_std < 0:
            raise ValueError("MixtralUpcycle: noise and router_std must be >= 0")


def _check_dense(model: nn.Module) -> None:
    cfg = model.config
    if getattr(cfg, "attention_bias", False) or getattr(cfg, "mlp_bias", False):
        raise ValueError(f"upcycle_to_mixtral: {type(model).__name__} has biases, which Mixtral has not")
    for i, layer in enumerate(model.model.layers):
        mlp = getattr(layer, "mlp", None)
        if not all(isinstance(getattr(mlp, n, None), nn.Linear) for n in ("gate_proj", "up_proj", "down_proj")):
            raise ValueError(f"upcycle_to_mixtral: model.layers.{i}.mlp is not a float gate/up/down MLP "
                             f"(quantize after upcycling, not before)")


@torch.no_grad()
def upcycle_to_mixtral(model: nn.Module, config: MixtralUpcycle = MixtralUpcycle()) -> nn.Module:
    """A `MixtralForCausalLM` (same dtype and device as `model`) whose experts are copies of its MLPs."""
    from transformers import MixtralConfig, MixtralForCausalLM

    _check_dense(model)
    src = model.config
    kwargs = {k: getattr(src, k) for k in _COPIED_CONFIG if getattr(src, k, None) is not None}
    cfg = MixtralConfig(**kwargs, num_local_experts=config.num_experts, num_experts_per_tok=config.top_k,
                        sliding_window=None, router_jitter_noise=0.0, output_router_logits=False)
    p = next(model.parameters())
    moe = MixtralForCausalLM._from_config(cfg, dtype=p.dtype).to(p.device).eval()
    state = {}
    g = torch.Generator().manual_seed(config.seed)
    for name, t in model.state_dict().items():
        if ".mlp." not in name:
            state[name] = t
    E, H = config.num_experts, src.hidden_size
    for i, layer in enumerate(model.model.layers):
        gate_up = torch.cat([layer.mlp.gate_proj.weight, layer.mlp.up_proj.weight]).float().cpu()  # [2I, H]
        down = layer.mlp.down_proj.weight.float().cpu()  # [H, I]

        def copies(w):
            out = w.expand(E, *w.shape).clone()
            if config.noise:
                out += torch.randn(out.shape, generator=g) * config.noise * w.std()
            return out.to(p.dtype).to(p.device)

        state[f"model.layers.{i}.mlp.experts.gate_up_proj"] = copies(gate_up)
        state[f"model.layers.{i}.mlp.experts.down_proj"] = copies(down)
        state[f"model.layers.{i}.mlp.gate.weight"] = (torch.randn(E, H, generator=g) * config.router_std).to(p.dtype).to(p.device)
    missing, unexpected = moe.load_state_dict(state, strict=False)
    missing = [m for m in missing if not (cfg.tie_word_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"upcycle_to_mixtral: names did not map (missing {missing[:4]}, unexpected {unexpected[:4]})")
    if cfg.tie_word_embeddings:
        moe.tie_weights()
    return moe

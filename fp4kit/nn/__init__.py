"""Modules: FP4Linear and the `quantize_` tree walk that swaps it in."""

from .experts import FP4Experts, is_fused_experts
from .fake_quant import FakeQuantLinear, QATConfig, ScaleMode, convert, prepare_qat
from .indexer import FP4KeyCache, IndexerConfig, IndexPrecision, IndexScore, select_decode, select_mask  # noqa: F401
from .kv_cache import KVCache  # noqa: F401
from .linear import FP4Linear
from .lora import LoRAConfig, LoRALinear, add_lora, load_adapter, save_adapter
from .observe import observe_input_amax
from .parametrize import FP4Parametrization, register_fp4
from .quantize import DEFAULT_IGNORE, QuantizeReport, quantize_
from .rotation import RotatedLinear, RotationConfig  # noqa: F401

__all__ = ["DEFAULT_IGNORE", "FP4Experts", "FP4Linear", "FP4Parametrization", "QuantizeReport", "observe_input_amax", "is_fused_experts", "quantize_", "register_fp4"]

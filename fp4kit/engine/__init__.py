"""Generation engine: static KV cache (bf16 or FP8), prefill then CUDA-graph decode, sampling, stops, chat.

    from fp4kit.engine import Engine, SamplingParams
    eng = Engine(model, tokenizer, max_batch=32, max_seq_len=2048)
    outs = eng.generate(["Hello"], SamplingParams(max_new_tokens=32, temperature=0))

engine.py holds the loop and the graphs, model.py the decoder forward over the model's own modules,
sampling.py the parameters and the sampler, text.py stop strings and streaming, chat.py templates,
random_model.py the random-weight Llama-3-8B-shaped model for speed runs.
"""

from .chat import chat_ids
from .engine import Engine, batch_bucket
from .fused import HeadFormat
from .model import DecoderRunner, UnsupportedModel, arch_spec
from .sampling import Completion, FinishReason, SamplingParams, filter_logits, sample

__all__ = ["Completion", "DecoderRunner", "Engine", "FinishReason", "HeadFormat", "SamplingParams", "UnsupportedModel",
           "arch_spec", "batch_bucket", "chat_ids", "filter_logits", "sample"]

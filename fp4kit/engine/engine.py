"""`Engine`: batched generation with a static KV cache, prefill then decode, CUDA graphs for decode.

    eng = Engine(model, tokenizer, max_batch=32, max_seq_len=2048, kv_dtype=None, cuda_graphs=True)
    outs = eng.generate(["Hello", "2+2="], SamplingParams(max_new_tokens=64, temperature=0))

One `generate` call, per chunk of at most `max_batch` prompts (static batching):

    1. left-pad the prompts to the longest one, P tokens: row b has pad[b] pad slots first
    2. prefill: one eager forward over [B, P] writes slots 0..P-1 of every layer's cache and gives
       the logits of each row's last prompt token
    3. decode: sample a token per row, stop rows that hit EOS / a stop string / their budget, and run
       one forward over [B, 1] at slot P + step, until every row is done

Decode steps have fixed shapes, so each is a CUDA graph replay. A graph is captured lazily per
(batch bucket, cache-length bucket): the batch is rounded up to 1, 2, 4, 8, 16, 32, ... (rows past
B compute garbage nobody reads) and attention reads only the first `kv_len` slots, rounded up to a
multiple of `seq_bucket`, so short contexts do not pay for the whole cache. All graphs share one
memory pool. Capture happens on a side stream after two warm-up runs (which also let fp4_linear
prepare its FP4 weights). Sampling, stop checks and streaming run eagerly between replays; each
step reads the sampled tokens back to the host (one sync per step).

Models with MoE blocks run decode eagerly (`cuda_graphs` is ignored): transformers' MoE modules
route with data-dependent shapes that a graph cannot hold.

The model is used as it is (its own linear modules: FP4Linear, LoRA, ...); the engine holds only
its caches and graphs. If the model's weights change in place (a training step), nothing needs
rebuilding: graphs read the same tensors. FP4Linear weights prepared for the decode kernel are
re-prepared by fp4_linear when their version changes, which cannot happen inside a replay, so
call `eng.reset_graphs()` after changing FP4 weights in place.

`fused=True` (default) runs the fused forward of model.py (one GEMM for q/k/v and for gate/up,
fused norm / rope / attention kernels on CUDA). Its fused weights are copies: `prefill` checks
their sources' versions and rebuilds them (and the graphs) when a source changed in place, and
`reset_graphs()` drops them too. `fused=False` is the module-by-module torch path.

`lm_head=HeadFormat.NVFP4` (or "nvfp4") runs the output head as an NVFP4 copy of `lm_head.weight`
through the FP4 GEMV (fused.py says why and what it costs); the default runs the model's own head.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from .fused import HeadFormat
from .model import DecoderRunner
from .sampling import Completion, FinishReason, SamplingParams, sample
from .text import TextTracker

StreamFn = Callable[[int, int, str], None]  # (prompt index, token id, text delta)


def batch_bucket(n: int) -> int:
    b = 1
    while b < n:
        b *= 2
    return b


def eos_ids(model: nn.Module, tokenizer) -> set[int]:
    ids = set()
    for src in (getattr(tokenizer, "eos_token_id", None), getattr(getattr(model, "generation_config", None),
                                                                   "eos_token_id", None)):
        if isinstance(src, int):
            ids.add(src)
        elif src is not None:
            ids.update(int(i) for i in src)
    return ids


class Engine:
    def __init__(self, model: nn.Module, tokenizer=None, *, max_batch: int = 32, max_seq_len: int = 2048,
                 kv_dtype: torch.dtype | None = None, cuda_graphs: bool = True, seq_bucket: int = 256,
                 progress: bool = False, fused: bool = True, lm_head: HeadFormat | str = HeadFormat.MODEL):
        if max_batch < 1 or max_seq_len < 2 or seq_bucket < 1:
            raise ValueError(f"Engine needs max_batch >= 1, max_seq_len >= 2, seq_bucket >= 1; got "
                             f"{max_batch}, {max_seq_len}, {seq_bucket}")
        self.runner = DecoderRunner(model, fused=fused, head=HeadFormat(lm_head))
        self.model, self.tokenizer = self.runner.model, tokenizer
        embed = self.model.get_input_embeddings().weight
        self.device, self.dtype = embed.device, embed.dtype
        self.max_batch, self.max_seq_len, self.seq_bucket = max_batch, max_seq_len, seq_bucket
        self.kv_dtype = kv_dtype or self.dtype  # None: the model's own dtype (float32 models keep a float32 cache)
        self.caches = self.runner.make_caches(max_batch, max_seq_len, self.kv_dtype, self.dtype, self.device)
        self.use_graphs = cuda_graphs and self.device.type == "cuda" and not self.runner.spec.is_moe
        self.eos = eos_ids(self.model, tokenizer)
        self.progress = progress
        self._graphs: dict[tuple[int, int], tuple] = {}
        self._pool = None
        self._static: dict[str, torch.Tensor] = {}

    # ------------------------------------------------------------------ prompts

    def encode(self, prompts: Sequence[str] | Sequence[Sequence[int]]) -> list[list[int]]:
        if isinstance(prompts, str):
            raise TypeError("generate takes a list of prompts; wrap a single prompt in a list")
        out = []
        for i, p in enumerate(prompts):
            if isinstance(p, str):
                if self.tokenizer is None:
                    raise ValueError("string prompts need a tokenizer; pass token ids or give the Engine one")
                ids = self.tokenizer(p)["input_ids"]
            else:
                ids = [int(t) for t in p]
            if not ids:
                raise ValueError(f"prompt {i} is empty: the engine needs at least one token to condition on")
            if len(ids) >= self.max_seq_len:
                raise ValueError(f"prompt {i} has {len(ids)} tokens; the cache holds max_seq_len="
                                 f"{self.max_seq_len}, which leaves no room to generate")
            out.append(ids)
        return out

    # ------------------------------------------------------------------ forward passes

    def prefill(self, ids: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Left-pad and run the prompts: (logits [B, V], pad [B], P)."""
        if self.runner.refresh():  # a fused weight's source changed in place: graphs point at the old copy
            self.reset_graphs()
        B, P = len(ids), max(len(x) for x in ids)
        pad = torch.tensor([P - len(x) for x in ids], device=self.device)
        tokens = torch.zeros(B, P, dtype=torch.long, device=self.device)
        for b, x in enumerate(ids):
            tokens[b, P - len(x):] = torch.tensor(x, device=self.device)
        slots = torch.arange(P, device=self.device)
        positions = (slots[None, :] - pad[:, None]).clamp(min=0)
        logits = self.runner.forward(tokens, positions, pad, slots, P, self.caches)
        return logits, pad, P

    @torch.no_grad()
    def prompt_logits(self, ids: list[int]) -> torch.Tensor:
        """float32 logits [T, V] of every position of one prompt, through the cache (so an FP8 cache's
        rounding of keys and values is in them): what perplexity with this engine's cache needs."""
        self.encode([ids])
        tokens = torch.tensor([ids], device=self.device)
        slots = torch.arange(len(ids), device=self.device)
        pad = torch.zeros(1, dtype=torch.long, device=self.device)
        return self.runner.forward(tokens, slots[None], pad, slots, len(ids), self.caches, last_only=False)[0]

    def kv_len(self, slot: int) -> int:
        n = slot + 1
        return min(-(-n // self.seq_bucket) * self.seq_bucket, self.max_seq_len)

    def _decode_eager(self, tokens, positions, pad, slot, kv_len):
        return self.runner.forward(tokens, positions, pad, slot, kv_len, self.caches)

    def decode(self, tokens: torch.Tensor, pad: torch.Tensor, slot: int) -> torch.Tensor:
        """tokens [B] at `slot` -> logits [B, V]."""
        B, kv_len = tokens.shape[0], self.kv_len(slot)
        positions = (slot - pad)[:, None]
        if not self.use_graphs:
            slot_t = torch.full((1,), slot, dtype=torch.long, device=self.device)  # a fill, not a host copy
            return self._decode_eager(tokens[:, None], positions, pad, slot_t, kv_len)
        Bb = min(batch_bucket(B), self.max_batch)
        st = self._static_inputs()
        st["tokens"][:Bb].zero_()
        st["tokens"][:B, 0] = tokens
        st["positions"][:Bb] = slot
        st["positions"][:B] = positions
        st["pad"][:Bb].zero_()
        st["pad"][:B] = pad
        st["slot"].fill_(slot)
        key = (Bb, kv_len)
        if key not in self._graphs:
            self._graphs[key] = self._capture(Bb, kv_len)
        graph, logits = self._graphs[key]
        graph.replay()
        return logits[:B]

    def _static_inputs(self) -> dict[str, torch.Tensor]:
        if not self._static:
            n, d = self.max_batch, self.device
            self._static = {"tokens": torch.zeros(n, 1, dtype=torch.long, device=d),
                            "positions": torch.zeros(n, 1, dtype=torch.long, device=d),
                            "pad": torch.zeros(n, dtype=torch.long, device=d),
                            "slot": torch.zeros(1, dtype=torch.long, device=d)}
        return self._static

    def _capture(self, Bb: int, kv_len: int):
        st = self._static
        args = (st["tokens"][:Bb], st["positions"][:Bb], st["pad"][:Bb], st["slot"], kv_len)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):  # warm-up: same inputs, so its cache writes are the real step's
                self._decode_eager(*args)
        torch.cuda.current_stream(self.device).wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            logits = self._decode_eager(*args)
        return graph, logits

    def reset_graphs(self) -> None:
        """Drop captured graphs and the fused weights (both are rebuilt on demand)."""
        self._graphs.clear()
        self._pool = None
        self.runner.drop_fused()

    # ------------------------------------------------------------------ generation

    def generate(self, prompts, params: SamplingParams | None = None, stream: StreamFn | None = None
                 ) -> list[Completion]:
        """Complete each prompt (strings or token-id lists); `stream(i, token_id, text_delta)` is called as
        prompt i's completion grows (text deltas only with a tokenizer)."""
        params = params or SamplingParams()
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer")
        ids = self.encode(prompts)
        gen = None
        if not params.greedy and params.seed is not None:
            gen = torch.Generator(self.device).manual_seed(params.seed)
        out = []
        for start in range(0, len(ids), self.max_batch):
            out += self._generate_batch(ids[start:start + self.max_batch], params, stream, start, gen)
        return out

    def _generate_batch(self, ids, params: SamplingParams, stream, offset: int, gen) -> list[Completion]:
        B = len(ids)
        done = [Completion(prompt_ids=list(x)) for x in ids]
        trackers = [TextTracker(self.tokenizer, params.stop, stream is not None) if self.tokenizer else None
                    for _ in ids]
        logits, pad, P = self.prefill(ids)
        budget = min(params.max_new_tokens, self.max_seq_len - P)
        live = list(range(B))
        bar = tqdm(total=budget, desc="decode", disable=not self.progress, leave=False)
        for step in range(budget):
            tokens = sample(logits, params, gen)
            host = tokens.tolist()
            for b in list(live):
                reason = self._push(b, host[b], done[b], trackers[b], params, step + 1 == budget)
                if stream is not None:
                    self._emit(stream, offset + b, host[b], trackers[b], reason is not None)
                if reason is not None:
                    done[b].finish_reason = reason
                    live.remove(b)
            bar.update(1)
            if not live:
                break
            logits = self.decode(tokens, pad, P + step)
        bar.close()
        for b in range(B):
            if trackers[b] is not None and trackers[b].text is None:
                trackers[b].finish(False)
            done[b].text = trackers[b].text if trackers[b] is not None else ""
        return done

    def _push(self, b, token, comp: Completion, tracker, params, last: bool) -> FinishReason | None:
        comp.token_ids.append(token)
        if token in self.eos and not params.ignore_eos:
            if tracker is not None:
                tracker.ids.append(token)
                tracker.finish(False)
            return FinishReason.EOS
        if tracker is not None and tracker.push(token):
            tracker.finish(True)
            return FinishReason.STOP
        if last:
            if tracker is not None:
                tracker.finish(False)
            return FinishReason.LENGTH
        return None

    @staticmethod
    def _emit(stream, index, token, tracker, final: bool):
        delta = "" if tracker is None else tracker.delta(final)
        stream(index, token, delta)

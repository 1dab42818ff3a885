"""`Engine`: batched generation with a static KV cache, prefill then decode, CUDA graphs for decode.

    eng = Engine(model, tokenizer, max_batch=32, max_seq_len=2048, kv_dtype=None, cuda_graphs=True)
    outs = eng.generate(["Hello", "2+2="], SamplingParams(max_new_tokens=64, temperature=0))

One `generate` call, per chunk of at most `max_batch` prompts (static batching):

    1. left-pad the prompts to the longest one, P tokens: row b has pad[b] pad slots first
    2. prefill: one eager forward over [B, P] writes slots 0..P-1 of every layer's cache and gives
       the logits of each row's last prompt token
    3. decode: sample a token per row, stop rows that hit EOS / a stop string / their budget, and run
       one forward over [B, 1] at slot P + step, until every row is done

A decode step has fixed shapes and no host work (`_step`): the forward at the state's slot, the
sampler (greedy, or temperature / top-k / top-p with the counter-based RNG of sampling.py, keyed by
seed, slot and prompt index held on the device), the sampled tokens written back as the next step's
input, positions and slot advanced. So each step is one CUDA graph replay with nothing between
replays: the host enqueues step t+1 before it reads step t's tokens (a non-blocking copy into a
pinned buffer, an event), then checks stops and streams while the GPU runs (no host gap). Rows
that finish keep computing until all are done; at most one step past the last is computed.

Prefill graphs (`prefill_graphs=True`, the default where decode graphs run). An eager prefill is
bound by the host, not the GPU: ~30 launches per layer through Python (norms, GEMMs, rope, the cache
write, SDPA) cost ~1 ms per layer on the H100's host, 30-40 ms of time to first token for a 32-layer
model whose prefill GPU work at 128 tokens is a few milliseconds. So prefill runs on fixed shapes
too: the batch rounded up to its bucket and the prompt length P rounded up to a multiple of
`prefill_bucket` (64; never past max_seq_len - 1) with more left padding, which the masks already
handle (padding only adds masked key slots and pad rows nobody reads). The first prefill of a
(batch bucket, padded length) runs eagerly on static input tensors (compiling kernels and preparing
FP4 weights); the second captures it as a CUDA graph and replays it, and every later one replays. A
one-off `generate` pays nothing extra; repeated prompt lengths (serving, `fp4kit bench`, chat turns
within one bucket) get the GPU-bound time. The same padded shapes are used eagerly and in the
graph, so the logits do not depend on which one ran. `prefill_bucket` also pads without graphs
(CPU tests use that to check the padding is neutral).

A graph is captured lazily per (batch bucket, cache-length bucket, sampler): the batch is rounded
up to 1, 2, 4, 8, 16, 32, ... (rows past B compute garbage nobody reads) and attention reads only
the first `kv_len` slots, rounded up to a multiple of `seq_bucket`, so short contexts do not pay
for the whole cache. All graphs share one memory pool and one step state. Capture happens on a
side stream after two warm-up runs from a saved state (which also let fp4_linear prepare its FP4
weights). Without graphs (CPU, MoE) the same step runs eagerly on B rows.

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

`lm_head=HeadFormat.INT8` ("int8") or `HeadFormat.NVFP4` ("nvfp4") runs the output head as a quantized
copy of `lm_head.weight` (INT8 per row through `kernels.int8_linear`, or NVFP4 through the FP4 GEMV / GEMM;
fused.py says why and what each costs); the default runs the model's own head.
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
GREEDY_STEP = SamplingParams(temperature=0)
PREFILL_BUCKET = 64  # prompt lengths are padded to a multiple of this when prefill graphs run


def _sampler_key(params: SamplingParams) -> tuple:
    """What a captured step bakes in of the sampling parameters (seed, rows and slot are device state)."""
    return ("greedy",) if params.greedy else (params.temperature, params.top_k, params.top_p)


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
                 progress: bool = False, fused: bool = True, lm_head: HeadFormat | str = HeadFormat.MODEL,
                 prefill_graphs: bool = True, prefill_bucket: int | None = None):
        if max_batch < 1 or max_seq_len < 2 or seq_bucket < 1 or (prefill_bucket is not None and prefill_bucket < 1):
            raise ValueError(f"Engine needs max_batch >= 1, max_seq_len >= 2, seq_bucket >= 1, prefill_bucket >= 1; "
                             f"got {max_batch}, {max_seq_len}, {seq_bucket}, {prefill_bucket}")
        self.runner = DecoderRunner(model, fused=fused, head=HeadFormat(lm_head))
        self.model, self.tokenizer = self.runner.model, tokenizer
        embed = self.model.get_input_embeddings().weight
        self.device, self.dtype = embed.device, embed.dtype
        self.max_batch, self.max_seq_len, self.seq_bucket = max_batch, max_seq_len, seq_bucket
        self.kv_dtype = kv_dtype or self.dtype  # None: the model's own dtype (float32 models keep a float32 cache)
        self.caches = self.runner.make_caches(max_batch, max_seq_len, self.kv_dtype, self.dtype, self.device)
        self.use_graphs = cuda_graphs and self.device.type == "cuda" and not self.runner.spec.is_moe
        self.use_prefill_graphs = self.use_graphs and prefill_graphs
        # prompts are padded to a multiple of this (None: no padding); 64 by default with prefill graphs
        self.prefill_bucket = prefill_bucket if prefill_bucket is not None else (
            PREFILL_BUCKET if self.use_prefill_graphs else None)
        self._prefill: dict[tuple[int, int], list] = {}  # (rows, padded P) -> [static inputs, graph, logits]
        self.eos = eos_ids(self.model, tokenizer)
        self.progress = progress
        self._graphs: dict[tuple[int, int], tuple] = {}
        self._pool = None
        self._static: dict[str, torch.Tensor] = {}
        self._host: torch.Tensor | None = None

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

    def prefill_shape(self, B: int, P: int, room: int = 1) -> tuple[int, int]:
        """(rows, prompt length) prefill runs for B prompts of at most P tokens: unchanged without
        `prefill_bucket`; else P rounded up to the bucket, but never so far that fewer than `room` slots
        (the tokens to generate) stay free in the cache, and with prefill graphs the batch rounded up to its
        bucket as decode does."""
        if self.prefill_bucket is None:
            return B, P
        Pb = min(-(-P // self.prefill_bucket) * self.prefill_bucket, self.max_seq_len - max(room, 1))
        return (self._rows(B) if self.use_prefill_graphs else B), max(Pb, P)

    def prefill(self, ids: list[list[int]], room: int = 1) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Left-pad and run the prompts: (logits [B, V], pad [B], P), P the (padded) prompt length: decode
        starts at slot P. `room`: cache slots to keep free for generation when padding to the bucket.
        Rows past B (batch bucket) hold token 0 without padding; nobody reads them."""
        if self.runner.refresh():  # a fused weight's source changed in place: graphs point at the old copy
            self.reset_graphs()
        B = len(ids)
        rows, P = self.prefill_shape(B, max(len(x) for x in ids), room)
        pad = torch.tensor([P - len(x) for x in ids] + [0] * (rows - B), device=self.device)
        tokens = torch.zeros(rows, P, dtype=torch.long, device=self.device)
        for b, x in enumerate(ids):
            tokens[b, P - len(x):] = torch.tensor(x, device=self.device)
        if self.use_prefill_graphs:
            logits = self._prefill_replay(tokens, pad)
        else:
            logits = self._prefill_run({"tokens": tokens, "pad": pad, "slots": torch.arange(P, device=self.device)})
        return logits[:B], pad[:B], P

    def _prefill_run(self, st: dict[str, torch.Tensor]) -> torch.Tensor:
        """The prefill forward on static inputs (tokens [rows, P], pad [rows], slots [P]): what a graph captures."""
        slots, pad = st["slots"], st["pad"]
        positions = (slots[None, :] - pad[:, None]).clamp(min=0)
        return self.runner.forward(st["tokens"], positions, pad, slots, slots.shape[0], self.caches)

    def _prefill_replay(self, tokens: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        """Prefill through the graph of this (rows, P): the first use runs eagerly on fresh static inputs,
        the second captures, later ones copy the inputs in and replay. Returns logits [rows, V], a copy of
        the graph's output: graphs share one memory pool, so a later replay of any graph (a decode step) may
        overwrite that output (seen on the H100: teacher-forced tests that kept the view read garbage)."""
        key = tuple(tokens.shape)
        entry = self._prefill.get(key)
        if entry is None:
            st = {"tokens": tokens, "pad": pad, "slots": torch.arange(tokens.shape[1], device=self.device)}
            logits = self._prefill_run(st)
            self._prefill[key] = [st, None, None]  # only once the eager run got through
            return logits
        st, graph, logits = entry
        st["tokens"].copy_(tokens)
        st["pad"].copy_(pad)
        if graph is None:  # the eager first use compiled every kernel and prepared every weight of these shapes
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._graph_pool()):  # captured, not run
                logits = self._prefill_run(st)
            entry[1], entry[2] = graph, logits
        graph.replay()
        return logits.clone()

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

    # ------------------------------------------------------------------ the decode step (device side)

    def _static_inputs(self) -> dict[str, torch.Tensor]:
        """The step's device state, read and advanced by each step (graph or eager):
        tokens [Bmax, 1] (this step's input; the step writes the next token here), positions [Bmax, 1],
        pad [Bmax], slot [1] (the query's cache slot), seed [1] and rows [Bmax] (the sampler's keys).
        positions and slot are views of one buffer, `counters` [Bmax + 1], which the step advances with one
        add (rows past the step's bucket move too; `_load_state` sets the rows a step uses)."""
        if not self._static:
            n, d = self.max_batch, self.device
            counters = torch.zeros(n + 1, dtype=torch.long, device=d)
            self._static = {"tokens": torch.zeros(n, 1, dtype=torch.long, device=d),
                            "counters": counters,
                            "positions": counters[:n].view(n, 1),
                            "pad": torch.zeros(n, dtype=torch.long, device=d),
                            "slot": counters[n:],
                            "seed": torch.zeros(1, dtype=torch.long, device=d),
                            "rows": torch.zeros(n, dtype=torch.long, device=d)}
        return self._static

    def _rows(self, B: int) -> int:
        """Rows a step computes for B prompts: the batch bucket with graphs (one graph per bucket), else B."""
        return min(batch_bucket(B), self.max_batch) if self.use_graphs else B

    def _load_state(self, tokens: torch.Tensor, pad: torch.Tensor, slot: int, seed: int, first_row: int) -> None:
        """Fill the step state for B rows at `slot` (rows past B up to the bucket: token 0, no padding)."""
        B, Bb, st = tokens.shape[0], self._rows(tokens.shape[0]), self._static_inputs()
        st["tokens"][:Bb].zero_()
        st["tokens"][:B, 0] = tokens
        st["positions"][:Bb] = slot
        st["positions"][:B, 0] = slot - pad
        st["pad"][:Bb].zero_()
        st["pad"][:B] = pad
        st["slot"].fill_(slot)
        st["seed"].fill_(seed)
        torch.arange(first_row, first_row + Bb, out=st["rows"][:Bb], device=self.device)

    def _step(self, Bb: int, kv_len: int, params: SamplingParams) -> torch.Tensor:
        """One decode step on the state: logits of tokens at `slot`, the next tokens sampled (keyed by seed,
        slot, rows) and written back as the next input, positions and slot advanced. Fixed shapes, no
        host work: this is what a CUDA graph captures. Returns logits [Bb, V]."""
        st = self._static
        logits = self.runner.forward(st["tokens"][:Bb], st["positions"][:Bb], st["pad"][:Bb], st["slot"], kv_len,
                                     self.caches)
        sample(logits, params, st["seed"], st["slot"], st["rows"][:Bb], out=st["tokens"][:Bb, 0])  # next input
        st["counters"] += 1  # positions and slot
        return logits

    def _run_step(self, B: int, slot: int, params: SamplingParams) -> torch.Tensor:
        """The step at `slot` for B rows: a graph replay (captured on first use per bucket, cache length
        and sampler), or eagerly. Returns the logits [B, V] (with graphs: a view of the graph's output)."""
        Bb, kv_len = self._rows(B), self.kv_len(slot)
        if not self.use_graphs:
            return self._step(Bb, kv_len, params)[:B]
        key = (Bb, kv_len, _sampler_key(params))
        if key not in self._graphs:
            self._graphs[key] = self._capture(Bb, kv_len, params)
        graph, logits = self._graphs[key]
        graph.replay()
        return logits[:B]

    def decode(self, tokens: torch.Tensor, pad: torch.Tensor, slot: int) -> torch.Tensor:
        """tokens [B] at `slot` -> logits [B, V] (one greedy step; the step state is set from the arguments)."""
        self._load_state(tokens, pad, slot, 0, 0)
        return self._run_step(tokens.shape[0], slot, GREEDY_STEP)

    def _capture(self, Bb: int, kv_len: int, params: SamplingParams):
        st = self._static
        saved = {k: v.clone() for k, v in st.items()}
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):  # warm-up from the same state, so its cache writes are the real step's
                self._step(Bb, kv_len, params)
                for k, v in saved.items():
                    st[k].copy_(v)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._graph_pool()):  # captured, not run: the state is untouched
            logits = self._step(Bb, kv_len, params)
        return graph, logits

    def _graph_pool(self):
        """One memory pool for every graph (decode and prefill): they never run at the same time."""
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        return self._pool

    def reset_graphs(self) -> None:
        """Drop captured graphs (decode and prefill) and the fused weights (both are rebuilt on demand)."""
        self._graphs.clear()
        self._prefill.clear()
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
        seed = params.seed if params.seed is not None else int(torch.randint(0, 2**31 - 1, (), device="cpu").item())
        out = []
        for start in range(0, len(ids), self.max_batch):
            out += self._generate_batch(ids[start:start + self.max_batch], params, stream, start, seed)
        return out

    def _host_tokens(self, steps: int, B: int) -> torch.Tensor:
        """long [steps, B] host buffer the sampled tokens are copied into (pinned on CUDA; grown on demand)."""
        buf = self._host
        if buf is None or buf.shape[0] < steps or buf.shape[1] < B:
            rows, cols = max(steps, self.max_seq_len), max(B, self.max_batch)
            buf = torch.empty(rows, cols, dtype=torch.long, device="cpu", pin_memory=self.device.type == "cuda")
            self._host = buf
        return buf

    def _fetch(self, dst: torch.Tensor, B: int):
        """Copy the step state's tokens [B] to the host row `dst` without waiting (an event marks the copy)."""
        if self.device.type != "cuda":
            dst[:B].copy_(self._static["tokens"][:B, 0])
            return None
        dst[:B].copy_(self._static["tokens"][:B, 0], non_blocking=True)
        ev = torch.cuda.Event()
        ev.record()
        return ev

    def _generate_batch(self, ids, params: SamplingParams, stream, offset: int, seed: int) -> list[Completion]:
        """Prefill, then decode with the host one step behind the device: step t+1 is enqueued (it reads
        the token step t sampled on the device) before the host reads step t's tokens (pinned buffer,
        non-blocking copy, an event), checks stops and streams. Rows that finish keep computing until
        every row is done (their tokens are dropped); at most one step past the last one is enqueued."""
        B = len(ids)
        done = [Completion(prompt_ids=list(x)) for x in ids]
        trackers = [TextTracker(self.tokenizer, params.stop, stream is not None) if self.tokenizer else None
                    for _ in ids]
        logits, pad, P = self.prefill(ids, room=params.max_new_tokens)
        budget = min(params.max_new_tokens, self.max_seq_len - P)
        rows = torch.arange(offset, offset + B, device=self.device)
        first = sample(logits, params, seed, P - 1, rows)  # token of slot P, keyed by the prompt's last slot
        self._load_state(first, pad, P, seed, offset)
        host = self._host_tokens(budget, B)
        events = [self._fetch(host[0], B)]
        live = list(range(B))
        bar = tqdm(total=budget, desc="decode", disable=not self.progress, leave=False)
        for step in range(budget):
            if step + 1 < budget:  # enqueue the next step before reading this one's tokens
                self._run_step(B, P + step, params)
                events.append(self._fetch(host[step + 1], B))
            if events[step] is not None:
                events[step].synchronize()
            tokens = host[step, :B].tolist()
            for b in list(live):
                reason = self._push(b, tokens[b], done[b], trackers[b], params, step + 1 == budget)
                if stream is not None:
                    self._emit(stream, offset + b, tokens[b], trackers[b], reason is not None)
                if reason is not None:
                    done[b].finish_reason = reason
                    live.remove(b)
            bar.update(1)
            if not live:
                break
        bar.close()
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()  # the host buffer is reused by the next call
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

"""Top-k key selection for sparse decode attention: index scores over a (packed FP4) key cache, and the rerank.

What it computes. A decode step has one index query per row (row = batch x KV head), q [R, D]
float32, and a key cache of L positions per row. Stage one scores every position t in [lo, hi)

    score[r, t] = bf16( q[r] . key[r, t] )        key decoded from bf16, FP8 or FP4 (MXFP4 / NVFP4)

and keeps the top n. Stage two (the rerank) rescores n candidates against the exact bf16 keys in
float32 and keeps the top k. The caller adds the positions it always keeps (first tokens, a
sliding window) by passing [lo, hi) around them (see `fp4kit.nn.indexer`).

Order and ties. Scores are compared as numbers with -0 == +0; equal scores go to the LOWER position.
That total order is what `topk_order_torch` implements with a stable descending sort. A selection
is a set: both stages return positions in ascending order (what a gather of K/V wants, too).

How the kernels select without sorting (a radix select, all on the GPU, graph-capturable):
    1. scan: score every position, write its bf16 score as a monotone int16 m (2 bytes)
    2. a per-row 256-bin histogram of m's high byte (where: `COARSE_HIST_FORMAT` / `COARSE_HIST`), the
       bin b1 holding the n-th best score
    3. histogram of the low byte over the positions in bin b1: the n-th best score u* and
       need = n - #(score > u*)
    4. per tile: #(> u*) and #(== u*); then each tile writes its positions with score > u* and its
       ties whose rank among all ties is < need, at offsets summed from the tiles before it
With `FUSED_SELECT` (default) steps 2-4 are ONE launch: each program keeps its tile of scores in
registers and meets the row's other programs at two barriers (arrival counters; a cooperative
launch guarantees every program is resident, the launcher sizes the tiles so they fit); it then
waits only for the tiles before it to publish their counts. Its int32 workspace belongs to the
stream and is zeroed again by the row's last program, so a selection is two launches (scan +
select) and no memset. Unfused, steps 2-4 are three launches (each program recomputes the
thresholds from the histograms, so no per-row threshold launches).
`index_topk_rerank` runs both stages; with at most `RERANK_IN_SELECT_MAX` candidates the fused select itself
scores the candidates each program writes against the bf16 keys and the row's last program takes the k best
(scan + one launch; by one sort of unique (score, position) keys with `RERANK_IN_SELECT_SORT`). Otherwise, and in `rerank_topk`:
the rerank scores n <= 8192 candidates (many programs) and takes the k best in one program per row:
a 32-step bitwise search for the k-th best float32 key, then the same ">, then the first ties" write
(`FUSED_RERANK`, on since round 3: both in one launch, the row's last program selecting;
`RERANK_BYTE_RADIX` / `RERANK_DIGITS`: the search by four byte histograms or 4 bits per step instead,
both off: slower on the H100, see BENCHMARKS.md rounds 2 and 3).

Bytes per key (head dim D): bf16 2D; FP8 D + 4 (a float32 scale per position, as
`fp4kit.nn.kv_cache`); MXFP4 D/2 + D/32; NVFP4 D/2 + D/16; plus the 2-byte score written once and
read once by the fused select (three times unfused). At D = 128 that is 256 / 132 / 68 / 72 bytes of
keys: FP4 moves 1.9x fewer than FP8. The rerank reads only n bf16 keys (n = 2k: 1 MB per row at
k = 2048, D = 128).

The MXFP4 scan is persistent by default (`SCAN_PERSISTENT`, `_fp4_topk.index_scan_kernel`): one wave of programs
strides over each row's tiles and loads tile t + P before it scores tile t, so a program never waits for its own
next bytes with nothing in flight (the tiled kernel's programs loaded, waited, then computed: 65% of DRAM bandwidth
against 75% in ncu at 128K x 8 on the H100). bf16 and FP8 keys keep the tiled kernel (faster for them).

The MXFP4 scan reads int32 words (8 codes) and places nibbles i and i + 4, which sit 16 bits apart,
as one float16 pair with two shifts and two logic ops (`_fp4_topk`); then a float32 FFMA per
element, or (`MXFP4_PACKED_HALF`, off: slower on the H100 for its registers) packed half2 FMAs when
the query is MXFP4, checked per program, or (`MXFP4_DP4A`, on) integer products: PRMT looks the
codes up as bytes (2 x E2M1), IDP4A multiplies them four at a time with the MXFP4 query's integers.

`SELECT_METHOD` THRESHOLD (off: slower on the H100, see BENCHMARKS.md round 3) replaces the radix
select's histograms by a lower bound: the scan writes the maximum of every G consecutive scores,
the n-th largest maximum T is <= the n-th best score, the ~1.4 n positions with a score >= T are
compacted in position order and the exact n best are taken from them (`_fp4_topk`, "the threshold
select"; all scores when the candidates overflow their buffer).

Layout: `KeyCacheView` holds [R, L, ...] tensors of any row stride (a slice of a preallocated cache
with capacity > L is read in place); the last two dims must be contiguous.

Exactness (tests/kernels/test_fp4_topk.py): with MXFP4 keys and an MXFP4-dequantized query every
product and partial sum is exact in float32 (power-of-two scales, 3-bit significands) while a
vector's block exponents span fewer than ~10 binades, so the kernel's scores equal the twin's bit for
bit and so do the selected positions (the packed-half2 path too: its float16 sums are exact, see
`_fp4_topk`). A query that is not MXFP4 against MXFP4 keys, and bf16, FP8 and NVFP4 keys, round
inside the float32 sum, so their scores can differ from the twin's by the summation order (1 bf16
ulp, rarely).
"""

from __future__ import annotations

import enum
import os
from dataclasses import dataclass

import torch

from fp4kit.formats import GlobalScale, MXFP4Config, NVFP4Config, QuantizedTensor

try:
    import triton

    from . import _fp4_topk

    HAS_TRITON = True
except ImportError:  # CPU installs without triton use the torch twins
    HAS_TRITON = False

# (positions per tile, warps, tiles per program) of the scan kernel per key format on a GPU (a program prepares
# the query once and loops over its tiles; fewer tiles when the grid would not fill the device);
# benchmarks/bench_sparse_select.py sweeps these on the device and reports the best
SCAN_TILE = {"bf16": (128, 4, 1), "fp8": (128, 4, 4), "mxfp4": (128, 4, 4), "nvfp4": (128, 4, 1)}  # H100 best
SCAN_MIN_PROGRAMS_PER_SM = 4
# the persistent scan (`_fp4_topk.index_scan_kernel`: a few programs per SM stride over the tiles, loading the next
# tile before scoring this one) for bf16, FP8 and MXFP4 keys; programs per SM (all rows together) per format
# tile and, per format, the programs per SM: None = as many as fit at once (one full wave, from the compiled
# kernel's registers). Measured on the H100 (benchmarks/bench_scan_persistent.py, 2026-11-24): MXFP4 at 128K x 8
# keys 30 us against the tiled kernel's 33-34 (ncu kernel time); bf16 and FP8 keys were slower persistent (their
# double-buffered tiles need 159-185 registers), so only MXFP4 uses it
SCAN_PERSISTENT = {"bf16": False, "fp8": False, "mxfp4": True}
SCAN_PERSISTENT_TILE = {"bf16": (128, 4), "fp8": (128, 4), "mxfp4": (128, 4)}
SCAN_PROGRAMS_PER_SM: dict = {"bf16": None, "fp8": None, "mxfp4": None}
# a register cap for the persistent scan per format (Triton's `maxnreg`; None: the compiler's choice): fewer
# registers let more programs share an SM
SCAN_MAXNREG: dict = {"bf16": None, "fp8": None, "mxfp4": None}
SELECT_BLOCK = 2048  # positions per program of the unfused select passes (the fused select picks its own)
# MXFP4 keys: bf16-pair decode + tl.dot (see _fp4_topk; bit-exact on the H100 but 108 us against the FMA path's
# 72 us for 128K x 8 keys, 2026-11-22), so off by default
MXFP4_TENSOR_CORES = False
# MXFP4 keys: packed-half2 products when the query is MXFP4 (checked per program, float32 otherwise). Bit-exact on
# the H100 but slower there (48 against 40 us for 128K x 8 keys, 2026-11-23: 127 registers against 48), so off
MXFP4_PACKED_HALF = False
# MXFP4 keys: integer products when the query is MXFP4 (checked per program, float32 otherwise): PRMT looks up
# 2 x E2M1 magnitudes as bytes, IDP4A multiplies four at a time with the query's integers (see _fp4_topk).
# ~3 instructions per element in the tile against ~6 (takes precedence over MXFP4_PACKED_HALF). Bit-exact on the
# H100 but barely faster there (39.4 against 40.2 us for 128K x 8 keys, 2026-11-23): the scan is not issue-bound
MXFP4_DP4A = True
# the whole radix select in one launch (per-row barriers; cooperative launch so every program is resident)
FUSED_SELECT = True
# (positions per program, warps) the fused select tries in turn: the first whose grid fits on the device at once
FUSED_BLOCKS = ((2048, 4), (4096, 4), (8192, 8), (16384, 16))
# the rerank's scoring and its top-k in one launch (the row's last program selects): with the bitwise search 1-2 us
# faster than two launches on the H100 (two-stage FP4 at 128K x 8: 69.1 / 78.7 us against 71.0 / 79.9 at
# k = 256 / 2048, 2026-11-23)
FUSED_RERANK = True
# the rerank's k-th-key search: four 256-bin histograms (True) or the 32-step bitwise search (False). The byte radix
# made two-stage FP4 at k = 2048 slower on the H100 (+30 us over single stage against +18 us, 2026-11-23)
RERANK_BYTE_RADIX = False
# the two-stage selection in one launch (`index_topk_rerank`): the fused select scores the candidates it writes
# against the exact keys, and the row's last program keeps the k best; candidates scored per step of its loop
RERANK_IN_SELECT = True
RERANK_IN_SELECT_CHUNK = 32
# at most this many candidates: measured on the H100 (2026-11-24, back to back) 1-2 us faster than the two calls at
# n = 512 (k = 256) for every length and batch, but 13-37 us slower at n = 4096 (its last program's 4,096-wide
# select, and larger select tiles to stay resident); sizes in between not measured
RERANK_IN_SELECT_MAX = 512
# that last program's k-of-n: one descending sort of unique (score, position) keys instead of the 32-step search.
# Measured on the H100 (2026-11-24, back to back, equal selections): 0.5-3.0 us faster in all 12 cases of
# 32K/128K x 1/8 and k = 64/128/256 (128K x 8, k = 256: 55.5 against 56.2 us; k = 64: 51.4 against 54.3)
RERANK_IN_SELECT_SORT = True


class CoarseHist(enum.Enum):
    """Where the 256-bin histogram of the scores' high byte is built."""

    SCAN = "scan"  # atomics inside the scan kernel
    PASS = "pass"  # a separate pass over the 2-byte scores
    FUSED = "fused"  # inside the fused select (the scores are in its registers already); PASS when unfused


COARSE_HIST = CoarseHist.FUSED
# per key format, where it differs from COARSE_HIST. FP8 keys: in the (tiled) scan, whose programs wait on memory
# anyway: at 128K x 8 on the H100 a whole FP8 selection took 69-70 us against 73-75 with the histogram in the select
# (benchmarks/bench_select_variants.py, 2026-11-24). MXFP4 keys keep it in the select: the persistent scan's
# per-tile histogram (a CTA barrier in every tile) cost 12.5 us there, the select's ~6
COARSE_HIST_FORMAT: dict = {"fp8": CoarseHist.SCAN}


class SelectMethod(enum.Enum):
    """How the n best positions are found from the scan's int16 scores."""

    RADIX = "radix"  # two 256-bin histograms (tl.histogram), fused into one launch with `FUSED_SELECT`
    THRESHOLD = "threshold"  # group maxima from the scan -> a lower bound T -> compaction -> exact select


# the threshold select is exact on the H100 in every check but one (all scores tied with c > its buffer: see
# BENCHMARKS.md round 3) and slower there (select alone at 128K x 1: 24.6 against 20.5 us at n = 512, 49.5 against
# 20.2 at n = 4096; its threshold kernel alone, a 4-bit-per-step search over 1,024 maxima, measures 10.2 us), so off
SELECT_METHOD = SelectMethod.RADIX
# the threshold select: the scan writes one maximum per group of G positions, with G the largest power of two
# (<= the scan tile) leaving at least MAXIMA_PER_N * n groups; candidates (u >= T) go to a buffer of
# next_power_of_2(CAND_PER_N * n) entries, the first THRESH_REGISTERS of them selected in registers
MAXIMA_PER_N = 2
CAND_PER_N = 4
THRESH_REGISTERS = 4096
THRESH_BLOCK = (2048, 8)  # (positions per compaction program, warps)
# bits the threshold select's k-th searches resolve per step: 1 (16 steps of one count each) or 4 (16 prefixes
# counted at once, 4 steps). One bit per step was faster in every threshold setting on the H100 (select kernels
# alone at 128K: 47.9 -> 29.6 us for n = 4,096 at batch 1, 61.4 -> 43.7 at batch 8; BENCHMARKS.md), yet the
# radix select stays the default (19.0 / 26.7 us there)
THRESH_SEARCH_STEP = 1
# the rerank's k-th-key search four bits at a time (8 steps of 16 prefixes) instead of 32 bitwise steps: exact, but
# slower on the H100 at k = 2048 (two-stage FP4 at 128K x 8: 116 against 79 us), so off
RERANK_DIGITS = False
# the interpreter runs the threshold select with the GPU's block sizes (tests: size-dependent paths)
INTERPRETER_GPU_SIZES = False


def _pair_order(D: int, device) -> torch.Tensor:
    """perm[p] = the element at pair-order position p = 8w + 2J + a: element 8w + J + 4a."""
    p = torch.arange(D, device=device)
    return (p // 8) * 8 + (p % 8) // 2 + 4 * (p % 2)


def _bf16_parts(q: torch.Tensor) -> torch.Tensor:
    """q [R, D] float32 -> [R, 3, D] bf16 with q ~= p0 + p1 + p2 to 24 bits (exactly when q fits bf16)."""
    p0 = q.bfloat16()
    r = q - p0.float()
    p1 = r.bfloat16()
    p2 = (r - p1.float()).bfloat16()
    return torch.stack([p0, p1, p2], dim=1)


class KeyFormat(enum.Enum):
    """How the index keys are stored (see the module docstring for bytes per key)."""

    BF16 = "bf16"
    FP8 = "fp8"  # float8_e4m3fn with a float32 scale per position
    MXFP4 = "mxfp4"  # packed E2M1, E8M0 scale per 32
    NVFP4 = "nvfp4"  # packed E2M1, UE4M3 scale per 16, one float32 global scale


_FMT_CODE = {KeyFormat.BF16: 0, KeyFormat.FP8: 1, KeyFormat.MXFP4: 2, KeyFormat.NVFP4: 3}


@dataclass(frozen=True)
class KeyCacheView:
    """Keys of R rows x L positions. data: [R, L, D] bf16 / float8_e4m3fn, or [R, L, D/2] uint8 (FP4).
    scale: None (bf16), [R, L] float32 (FP8), [R, L, D/bs] uint8 scale codes (FP4: E8M0 or UE4M3 bits).
    global_scale: float32 [1] for NVFP4. fp4_config: the MXFP4/NVFP4 config that wrote the codes."""

    format: KeyFormat
    data: torch.Tensor
    scale: torch.Tensor | None = None
    global_scale: torch.Tensor | None = None
    fp4_config: MXFP4Config | NVFP4Config | None = None

    def __post_init__(self):
        fp4 = self.format in (KeyFormat.MXFP4, KeyFormat.NVFP4)
        if self.data.dim() != 3:
            raise ValueError(f"KeyCacheView.data must be [R, L, D], got shape {tuple(self.data.shape)}")
        if fp4 and (self.data.dtype != torch.uint8 or self.scale is None or self.fp4_config is None):
            raise ValueError(f"{self.format.name} keys need uint8 packed data, scale codes and fp4_config")
        if self.format is KeyFormat.NVFP4 and self.global_scale is None:
            raise ValueError("NVFP4 keys need a global_scale")
        if self.format is KeyFormat.FP8 and (self.data.dtype != torch.float8_e4m3fn or self.scale is None):
            raise ValueError("FP8 keys need float8_e4m3fn data and a float32 scale per position")

    @property
    def rows(self) -> int:
        return self.data.shape[0]

    @property
    def length(self) -> int:
        return self.data.shape[1]

    @property
    def head_dim(self) -> int:
        return self.data.shape[2] * (2 if self.format in (KeyFormat.MXFP4, KeyFormat.NVFP4) else 1)

    def dequantize(self) -> torch.Tensor:
        """float32 [R, L, D]: the key values the scores use."""
        if self.format is KeyFormat.BF16:
            return self.data.float()
        if self.format is KeyFormat.FP8:
            return self.data.float() * self.scale.unsqueeze(-1)
        scale = self.scale.contiguous()
        if self.format is KeyFormat.NVFP4:
            scale = scale.view(torch.float8_e4m3fn)
        shape = (self.rows, self.length, self.head_dim)
        return QuantizedTensor(self.data.contiguous(), scale, self.global_scale, shape, self.fp4_config).dequantize()


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(t: torch.Tensor) -> bool:
    return HAS_TRITON and (t.is_cuda or _interpreting())


def _check(q: torch.Tensor, keys: KeyCacheView, lo: int, hi: int | None) -> int:
    if q.dim() != 2 or q.shape[0] != keys.rows or q.shape[1] != keys.head_dim:
        raise ValueError(f"index query must be [R={keys.rows}, D={keys.head_dim}], got {tuple(q.shape)}")
    if q.dtype != torch.float32:
        raise TypeError(f"index query must be float32, got {q.dtype}")
    hi = keys.length if hi is None else hi
    if not 0 <= lo <= hi <= keys.length:
        raise ValueError(f"need 0 <= lo <= hi <= L={keys.length}, got lo={lo}, hi={hi}")
    return hi


# ----------------------------------------------------------------------------------------------
# the order


def _monotone_int(bits: torch.Tensor, sign_mask: int) -> torch.Tensor:
    """Float bits as a signed int whose order is the float order (-0 mapped to +0 first)."""
    neg_zero = -(sign_mask + 1)
    bits = torch.where(bits == neg_zero, torch.zeros_like(bits), bits)
    return torch.where(bits < 0, bits ^ sign_mask, bits)


def order_key64(scores: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """int64 keys, larger = better: the score's monotone bits above, 2^32 - 1 - position below.
    scores: bf16 or float32; positions: int64 in [0, 2^32), same shape."""
    if scores.dtype == torch.bfloat16:
        m = _monotone_int(scores.view(torch.int16).to(torch.int64), 0x7FFF)
    elif scores.dtype == torch.float32:
        m = _monotone_int(scores.view(torch.int32).to(torch.int64), 0x7FFFFFFF)
    else:
        raise TypeError(f"order keys need bf16 or float32 scores, got {scores.dtype}")
    return (m << 32) | (0xFFFFFFFF - positions)


def topk_order_torch(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Positions of the k best along the last dim: larger score first, equal scores by lower position
    (-0 == +0; -inf last). A stable descending sort: the specification the kernels follow."""
    s = torch.where(scores == 0, torch.zeros_like(scores), scores)  # -0 -> +0
    return torch.sort(s, dim=-1, descending=True, stable=True).indices[..., :k]


# ----------------------------------------------------------------------------------------------
# stage one: index scores and top-n


def index_scores_torch(q: torch.Tensor, keys: KeyCacheView) -> torch.Tensor:
    """bf16 scores [R, L]: q [R, D] float32 against the decoded keys (float64 dot, FP8 scale after)."""
    if keys.format is KeyFormat.FP8:
        dot = torch.einsum("rd,rld->rl", q.double(), keys.data.double()).float()
        return (dot * keys.scale).to(torch.bfloat16)
    return torch.einsum("rd,rld->rl", q.double(), keys.dequantize().double()).float().to(torch.bfloat16)


def index_topk_torch(q: torch.Tensor, keys: KeyCacheView, n: int, *, lo: int = 0, hi: int | None = None):
    """Twin of `index_topk`: int64 [R, min(n, hi - lo)] positions in [lo, hi), ascending."""
    hi = _check(q, keys, lo, hi)
    scores = index_scores_torch(q, keys)[:, lo:hi]
    return (topk_order_torch(scores, n) + lo).sort(dim=-1).values


def _fp4_args(keys: KeyCacheView):
    cfg = keys.fp4_config
    gs = keys.global_scale.float() if keys.format is KeyFormat.NVFP4 else keys.scale
    enc = isinstance(cfg, NVFP4Config) and cfg.global_scale is GlobalScale.ENCODE
    return cfg.block_size, keys.scale.view(torch.uint8), gs, enc


def _scan_launch(q: torch.Tensor, keys: KeyCacheView, lo: int, hi: int, ws: torch.Tensor, out: torch.Tensor,
                 block_t: int, warps: int, iters: int, hist_in_scan: bool, mx: torch.Tensor | None = None,
                 group: int = 0):
    """(grid, args, meta) of the scan kernel writing monotone int16 scores into out [R, n_out] (and, with
    group > 0, the maximum of every `group` positions into mx [R, n_out // group])."""
    R, D = keys.rows, keys.head_dim
    n_out = out.shape[1]
    fmt = _FMT_CODE[keys.format]
    qk = q
    if keys.format is KeyFormat.MXFP4 and MXFP4_TENSOR_CORES:
        bs, s, gs, enc = _fp4_args(keys)
        data = keys.data.view(torch.int32)  # 8 codes per word
        qk = _bf16_parts(q)[:, :, _pair_order(D, q.device)].contiguous()
        fmt = 4
    elif keys.format is KeyFormat.MXFP4:
        bs, s, gs, enc = _fp4_args(keys)
        data = keys.data.view(torch.int32)  # 8 codes per word
    elif keys.format is KeyFormat.NVFP4:
        bs, s, gs, enc = _fp4_args(keys)
        data = keys.data
    else:
        bs, gs, enc = 1, q, True
        data = keys.data.view(torch.uint8) if keys.format is KeyFormat.FP8 else keys.data
        s = keys.scale if keys.scale is not None else q
    grid = (R, n_out // (block_t * iters))
    mx = out if mx is None else mx
    args = (qk, data, s, gs, out, ws, mx, lo, hi, n_out, qk.stride(0), data.stride(0), data.stride(1), s.stride(0),
            s.stride(1) if s.dim() > 1 else 0, out.stride(0), ws.stride(0), mx.stride(0))
    meta = {"D": D, "FMT": fmt, "BS": bs, "GS_ENCODE": enc, "BLOCK_T": block_t, "ITERS": iters, "HIST": hist_in_scan,
            "PACKED": 2 if MXFP4_DP4A else int(MXFP4_PACKED_HALF), "G": group, "INTERPRET": _interpreting(), "num_warps": warps}
    return grid, args, meta


def _persistent(keys: KeyCacheView) -> bool:
    """Whether this cache's scan runs as the persistent kernel (`SCAN_PERSISTENT`; not the tensor-core path)."""
    return SCAN_PERSISTENT.get(keys.format.value, False) and not (
        keys.format is KeyFormat.MXFP4 and MXFP4_TENSOR_CORES)


def _fits_per_sm(k, warps: int, device) -> int:
    """Programs of compiled kernel k (`warps` warps each) resident on one SM at once: registers (allocated 8 per
    thread at a time), shared memory (+1 KB the driver reserves per block) and warps."""
    k._init_handles()  # loads the binary: n_regs is known from here on
    props = torch.cuda.get_device_properties(device)
    regs = -(-max(1, k.n_regs) // 8) * 8 * 32 * warps
    smem = k.metadata.shared + 1024
    return max(1, min(32, 64 // warps, 65536 // regs, props.shared_memory_per_multiprocessor // smem))


_SCAN_PLAN: dict = {}


def _programs_per_sm(args, meta, fmt: str, device) -> int:
    """`SCAN_PROGRAMS_PER_SM[fmt]`, or (None) how many programs of the compiled persistent scan fit on one SM."""
    if SCAN_PROGRAMS_PER_SM.get(fmt):
        return SCAN_PROGRAMS_PER_SM[fmt]
    key = (fmt, device.index, tuple(sorted(meta.items())))
    if key not in _SCAN_PLAN:
        k = _fp4_topk.index_scan_kernel.warmup(*args, grid=(1,), **meta)
        _SCAN_PLAN[key] = _fits_per_sm(k, meta["num_warps"], device)
    return _SCAN_PLAN[key]


def _persistent_launch(q: torch.Tensor, keys: KeyCacheView, lo: int, hi: int, ws: torch.Tensor, out: torch.Tensor,
                       block_t: int, warps: int, hist_in_scan: bool, mx: torch.Tensor | None = None, group: int = 0):
    """(grid, args, meta) of the persistent scan (`_fp4_topk.index_scan_kernel`): P programs per row, each
    scoring tiles p, p + P, ... with the next tile's loads in flight; all rows' programs one wave."""
    grid, args, meta = _scan_launch(q, keys, lo, hi, ws, out, block_t, warps, 1, hist_in_scan, mx, group)
    n_tiles = out.shape[1] // block_t
    args = args[:10] + (n_tiles,) + args[10:]
    args = args[:3] + args[4:]  # no global-scale pointer (NVFP4 only)
    meta = {k: v for k, v in meta.items() if k not in ("BS", "GS_ENCODE", "ITERS")}
    if SCAN_MAXNREG.get(keys.format.value) and not _interpreting():
        meta["maxnreg"] = SCAN_MAXNREG[keys.format.value]
    if _interpreting():
        P = min(n_tiles, 3)  # several tiles per program, so the stride and the prefetch are exercised
    else:
        sms = torch.cuda.get_device_properties(q.device).multi_processor_count
        P = min(n_tiles, triton.cdiv(_programs_per_sm(args, meta, keys.format.value, q.device) * sms, keys.rows))
    return (keys.rows, P), args, meta


def _scan(q: torch.Tensor, keys: KeyCacheView, lo: int, hi: int, ws: torch.Tensor, n_out: int, block_t: int,
          warps: int, iters: int, hist_in_scan: bool, mx: torch.Tensor | None = None, group: int = 0) -> torch.Tensor:
    """The scan kernel: monotone int16 scores [R, n_out]; the coarse histogram into ws[:, 0:256] if asked;
    group maxima into mx if group > 0. The persistent kernel where it applies (`SCAN_PERSISTENT`)."""
    out = torch.empty(keys.rows, n_out, dtype=torch.int16, device=q.device)
    if _persistent(keys):
        grid, args, meta = _persistent_launch(q, keys, lo, hi, ws, out, block_t, warps, hist_in_scan, mx, group)
        _fp4_topk.index_scan_kernel[grid](*args, **meta)
        return out
    grid, args, meta = _scan_launch(q, keys, lo, hi, ws, out, block_t, warps, iters, hist_in_scan, mx, group)
    _fp4_topk.index_score_kernel[grid](*args, **meta)
    return out


def _coarse_pass(m: torch.Tensor, ws: torch.Tensor) -> None:
    R, n_out = m.shape
    block = 64 if _interpreting() else SELECT_BLOCK
    _fp4_topk.coarse_hist_kernel[(R, triton.cdiv(n_out, block))](m, ws, m.stride(0), ws.stride(0), n_out,
                                                                 BLOCK=block, num_warps=4)


def _scan_tile(keys: KeyCacheView) -> tuple[int, int, int, int]:
    """(block_t, warps, iters, n_out): the scan's tile, tiles per program and the padded score length."""
    D = keys.head_dim
    if D & (D - 1) or D < 32:
        raise ValueError(f"index kernels need a power-of-two head dim >= 32, got {D}")
    if _interpreting():
        block_t, warps, iters = 16, 4, 2
    elif _persistent(keys):  # its programs stride over the tiles: the length only needs to fill whole tiles
        (block_t, warps), iters = SCAN_PERSISTENT_TILE[keys.format.value], 1
    else:
        block_t, warps, iters = SCAN_TILE[keys.format.value]
        sms = torch.cuda.get_device_properties(keys.data.device).multi_processor_count
        while iters > 1 and keys.rows * triton.cdiv(keys.length, block_t * iters) < SCAN_MIN_PROGRAMS_PER_SM * sms:
            iters //= 2
    span = block_t * iters
    return block_t, warps, iters, triton.cdiv(keys.length, span) * span


def index_score_bits(q: torch.Tensor, keys: KeyCacheView, *, lo: int = 0, hi: int | None = None,
                     hist: torch.Tensor | None = None) -> torch.Tensor:
    """The scan alone: monotone int16 bf16 scores [R, L_pad] (L_pad: L rounded up to the tile),
    -32768 outside [lo, hi). `hist` (int32 [R, >= 512], zeroed) receives the high-byte histogram in
    hist[:, 0:256] (inside the scan where the format's place is SCAN, `_coarse_place`, else by a pass over the
    scores)."""
    hi = _check(q, keys, lo, hi)
    block_t, warps, iters, n_out = _scan_tile(keys)
    hist = torch.zeros(keys.rows, 512, dtype=torch.int32, device=q.device) if hist is None else hist
    in_scan = _coarse_place(keys) is CoarseHist.SCAN
    m = _scan(q, keys, lo, hi, hist, n_out, block_t, warps, iters, in_scan)
    if not in_scan:
        _coarse_pass(m, hist)
    return m


def bits_to_bf16(m: torch.Tensor) -> torch.Tensor:
    """Inverse of the kernel's monotone map: int16 m -> the bf16 score (for tests)."""
    return torch.where(m < 0, m ^ 0x7FFF, m).view(torch.bfloat16)


_STREAM_BUFFERS: dict = {}  # (device, stream, what) -> int32 buffer that starts zero; the kernels leave it zero
_RETIRED: list = []  # outgrown buffers stay alive: CUDA graphs captured earlier may still point at them


def _stream_buffer(device, what: str, rows: int, width: int = 1) -> torch.Tensor:
    """A zeroed int32 [rows, width] workspace of this stream, left zero by the kernel that uses it (so no
    memset per call). Per stream: launches on one stream run in order, so two never share it."""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (device.type, device.index, stream, what)
    buf = _STREAM_BUFFERS.get(key)
    if buf is None or buf.shape[0] < rows or buf.shape[1] < width:
        if buf is not None:
            _RETIRED.append(buf)
        old_r, old_w = (0, 0) if buf is None else buf.shape
        buf = torch.zeros(max(rows, 64, old_r), max(width, old_w), dtype=torch.int32, device=device)
        _STREAM_BUFFERS[key] = buf
    return buf[:rows, :width]


def _rerank_meta(n: int, D: int) -> dict:
    """The fused select's constexprs for the two-stage selection in one launch (`index_topk_rerank`)."""
    return {"RERANK": True, "D": D, "BLOCK_C": 16 if _interpreting() else RERANK_IN_SELECT_CHUNK,
            "SEL_BLOCK": triton.next_power_of_2(n), "SEL_SORT": RERANK_IN_SELECT_SORT}


def _no_rerank_args(m: torch.Tensor) -> tuple:
    """Placeholders for the fused select's rerank arguments (unused without RERANK)."""
    return (m, m, m, m, 0, 0, 0, 0, 0, 0)


_MAX_SPINS = 1 << 22  # a barrier that waits longer than this (~tens of ms) gives up: a wrong selection, not a hang


def _coarse_place(keys: KeyCacheView) -> CoarseHist:
    """Where the coarse histogram is built for this key format (`COARSE_HIST_FORMAT`, else `COARSE_HIST`)."""
    return COARSE_HIST_FORMAT.get(keys.format.value, COARSE_HIST)


def _fused_blocks() -> list:
    """The (positions per program, warps) the fused select tries in turn (none when it is off)."""
    if not FUSED_SELECT:
        return []
    return [(64, 4)] if _interpreting() else list(FUSED_BLOCKS)


def _select_ws(device, R: int, n_out: int) -> torch.Tensor:
    """The select's zeroed int32 workspace, wide enough for every block the fused select may take and for the
    unfused passes: this stream's buffer, which the fused select leaves zero (`_radix_select` zeroes it after an
    unfused fallback)."""
    blocks = [b for b, _ in _fused_blocks()] + [64 if _interpreting() else SELECT_BLOCK]
    tiles = max(triton.next_power_of_2(triton.cdiv(n_out, b)) for b in blocks)
    return _stream_buffer(device, "select", R, 516 + tiles)


def _fused_args(m: torch.Tensor, ws: torch.Tensor, n: int, block: int, warps: int, coarse: bool,
                rerank: tuple | None = None):
    """(args, meta, out) of `fused_select_kernel` (see `_radix_select`)."""
    R, n_out = m.shape
    n_tiles = triton.cdiv(n_out, block)
    out = torch.empty(R, n, dtype=torch.int64, device=m.device)
    args = (m, ws, out, m.stride(0), ws.stride(0), out.stride(0), n_out, n, n_tiles)
    meta = {"BLOCK": block, "TILES": triton.next_power_of_2(n_tiles), "COARSE": coarse, "MAX_SPINS": _MAX_SPINS,
            "num_warps": warps}
    if rerank is None:
        return args + _no_rerank_args(m), meta, out
    q2, kb, k_fin = rerank
    sc = torch.empty(R, n, dtype=torch.float32, device=m.device)
    fin = torch.empty(R, k_fin, dtype=torch.int64, device=m.device)
    args += (q2, kb, sc, fin, k_fin, q2.stride(0), kb.stride(0), kb.stride(1), sc.stride(0), fin.stride(0))
    meta.update(_rerank_meta(n, kb.shape[2]))
    return args, meta, fin


_RESIDENT: dict = {}


def _specialisation(args) -> tuple:
    """What Triton specialises a launch on, per argument: a tensor's dtype and 16-byte alignment; an int's
    equality to 1, divisibility by 16 and width. Two launches with equal tuples (and equal constexprs) run the
    same binary."""
    return tuple((a.dtype, a.data_ptr() % 16 == 0) if isinstance(a, torch.Tensor)
                 else (a == 1, a % 16 == 0, -2**31 <= a < 2**31) if isinstance(a, int) else type(a) for a in args)


def _resident_for(args, meta, device) -> int:
    """Programs of this exact `fused_select_kernel` launch (its specialisation: the compiled binary the launch
    will use) that fit on the device at once. Cached per specialisation: the JIT lookup (a launch's worth of
    host time) runs once per new one, not per call."""
    key = (_specialisation(args), tuple(sorted(meta.items())), device.index)
    if key not in _RESIDENT:
        k = _fp4_topk.fused_select_kernel.warmup(*args, grid=(1,), PHASE=0, launch_cooperative_grid=True, **meta)
        _RESIDENT[key] = (_fits_per_sm(k, meta["num_warps"], device)
                          * torch.cuda.get_device_properties(device).multi_processor_count)
    return _RESIDENT[key]


def _run_fused(args, meta, R: int, n_tiles: int) -> None:
    if _interpreting():  # programs run one after another: the phases the barriers separate, in turn
        for phase in (1, 2, 3, 4):
            _fp4_topk.fused_select_kernel[(R, n_tiles)](*args, PHASE=phase, **meta)
    else:
        _fp4_topk.fused_select_kernel[(R, n_tiles)](*args, PHASE=0, launch_cooperative_grid=True, **meta)


def _radix_select(m: torch.Tensor, ws: torch.Tensor, n: int, have_coarse: bool) -> torch.Tensor:
    """Positions [R, n] (ascending) of the n largest m per row, ties to the lower position. ws: `_select_ws`
    (with the coarse histogram in ws[:, 0:256] already if `have_coarse`). The fused select with the first
    of `_fused_blocks` whose programs, in the exact binary this launch runs, are all resident at once (a
    cooperative launch must be); otherwise the unfused passes, after which ws is zeroed again."""
    R, n_out = m.shape
    for block, warps in _fused_blocks():
        args, meta, out = _fused_args(m, ws, n, block, warps, not have_coarse)
        n_tiles = triton.cdiv(n_out, block)
        if _interpreting() or R * n_tiles <= _resident_for(args, meta, m.device):
            _run_fused(args, meta, R, n_tiles)
            return out
    if not have_coarse:
        _coarse_pass(m, ws)
    out = torch.empty(R, n, dtype=torch.int64, device=m.device)
    block = 64 if _interpreting() else SELECT_BLOCK
    n_tiles = triton.cdiv(n_out, block)
    tiles = triton.next_power_of_2(n_tiles)
    common = (m.stride(0), ws.stride(0))
    _fp4_topk.fine_hist_kernel[(R, n_tiles)](m, ws, *common, n_out, n, BLOCK=block, num_warps=4)
    _fp4_topk.tile_count_kernel[(R, n_tiles)](m, ws, *common, n_out, n, BLOCK=block, num_warps=4)
    _fp4_topk.tile_write_kernel[(R, n_tiles)](m, ws, out, *common, out.stride(0), n_out, n, BLOCK=block,
                                              TILES=tiles, num_warps=4)
    ws.zero_()  # the unfused passes leave their counts: the next selection on this stream finds the buffer zero
    return out


def _group_size(n: int, n_out: int, block_t: int) -> int:
    """G of the threshold select: the largest power of two <= block_t with n_out / G >= MAXIMA_PER_N * n (0: none)."""
    most = n_out // (MAXIMA_PER_N * n)
    if most < 1:
        return 0
    return min(block_t, 1 << (most.bit_length() - 1))


def _threshold_select(q: torch.Tensor, keys: KeyCacheView, n: int, lo: int, hi: int, block_t: int, warps: int,
                      iters: int, n_out: int, group: int) -> torch.Tensor:
    """Scan (with group maxima) -> threshold T per row -> compaction + exact select (`SelectMethod.THRESHOLD`)."""
    R, dev = keys.rows, q.device
    M = n_out // group
    mx = torch.empty(R, M, dtype=torch.int16, device=dev)
    interp = _interpreting() and not INTERPRETER_GPU_SIZES
    block, warps_c = (64, 4) if interp else THRESH_BLOCK
    n_tiles = triton.cdiv(n_out, block)
    tiles = triton.next_power_of_2(n_tiles)
    ws = _stream_buffer(dev, "threshold", R, 4 + tiles)
    m = _scan(q, keys, lo, hi, ws, n_out, block_t, warps, iters, False, mx, group)
    bm = min(triton.next_power_of_2(M), 64 if interp else 8192)
    _fp4_topk.maxima_threshold_kernel[(R,)](mx, ws, M, n, mx.stride(0), ws.stride(0), BLOCK=bm, CHUNKED=M > bm,
                                            STEP=THRESH_SEARCH_STEP,
                                            num_warps=4 if bm <= 1024 else (8 if bm <= 4096 else 16))
    cap = triton.next_power_of_2(CAND_PER_N * n)
    cu = torch.empty(R, cap, dtype=torch.int32, device=dev)
    cp = torch.empty(R, cap, dtype=torch.int32, device=dev)
    out = torch.empty(R, n, dtype=torch.int64, device=dev)
    fb = min(cap, 64 if interp else THRESH_REGISTERS)
    args = (m, ws, cu, cp, out, m.stride(0), ws.stride(0), cu.stride(0), out.stride(0), n_out, n, n_tiles, cap)
    meta = {"BLOCK": block, "TILES": tiles, "FB": fb, "CH": 64 if interp else 4096, "STEP": THRESH_SEARCH_STEP,
            "MAX_SPINS": _MAX_SPINS, "num_warps": warps_c}
    if _interpreting():  # programs run one after another: counts first, then the rest
        for phase in (1, 2):
            _fp4_topk.compact_select_kernel[(R, n_tiles)](*args, PHASE=phase, **meta)
    else:
        _fp4_topk.compact_select_kernel[(R, n_tiles)](*args, PHASE=0, **meta)
    return out


def index_topk(q: torch.Tensor, keys: KeyCacheView, n: int, *, lo: int = 0, hi: int | None = None) -> torch.Tensor:
    """The n best positions in [lo, hi) by bf16 index score (ties to the lower position), returned in
    ascending position order: int64 [R, min(n, hi - lo)].

    q: [R, D] float32 (already rotated/quantized as the keys were); keys: `KeyCacheView`. Runs the
    Triton kernels on CUDA (or under TRITON_INTERPRET=1): the scan, then the radix select (one fused
    launch when `FUSED_SELECT` and its programs fit on the device at once)."""
    hi = _check(q, keys, lo, hi)
    n = min(n, hi - lo)
    if not use_triton(q) or n == 0:
        return index_topk_torch(q, keys, n, lo=lo, hi=hi)
    block_t, warps, iters, n_out = _scan_tile(keys)
    group = _group_size(n, n_out, block_t) if SELECT_METHOD is SelectMethod.THRESHOLD else 0
    if group:
        return _threshold_select(q, keys, n, lo, hi, block_t, warps, iters, n_out, group)
    place = _coarse_place(keys)
    ws = _select_ws(q.device, keys.rows, n_out)
    m = _scan(q, keys, lo, hi, ws, n_out, block_t, warps, iters, place is CoarseHist.SCAN)
    if place is CoarseHist.PASS:
        _coarse_pass(m, ws)
    return _radix_select(m, ws, n, place is not CoarseHist.FUSED)


def index_topk_rerank(q_index: torch.Tensor, keys: KeyCacheView, q: torch.Tensor, keys_bf16: torch.Tensor, k: int,
                      n: int, *, lo: int = 0, hi: int | None = None) -> torch.Tensor:
    """Two-stage selection: the n best positions in [lo, hi) by index score (`index_topk(q_index, keys, n)`),
    then the k best of those by float32 q . k over the bf16 keys (`rerank_topk`); int64 [R, min(k, n')]
    ascending, n' = min(n, hi - lo). Equal to those two calls, position for position. With `RERANK_IN_SELECT`
    and the fused select, the rerank runs inside the select's launch (scan + one launch in all)."""
    hi = _check(q_index, keys, lo, hi)
    _check_rerank(q, keys_bf16, torch.empty(keys.rows, 0, dtype=torch.int64))
    n = min(n, hi - lo)
    place = _coarse_place(keys)
    fused_ok = (use_triton(q_index) and n > 0 and RERANK_IN_SELECT and SELECT_METHOD is SelectMethod.RADIX
                and FUSED_SELECT and place is not CoarseHist.PASS and n <= RERANK_IN_SELECT_MAX)
    if fused_ok:
        block_t, warps, iters, n_out = _scan_tile(keys)
        R, dev = keys.rows, q_index.device
        ws = _select_ws(dev, R, n_out)
        in_scan = place is CoarseHist.SCAN
        m = _scan(q_index, keys, lo, hi, ws, n_out, block_t, warps, iters, in_scan)
        for block, warps_s in _fused_blocks():  # the first whose programs (this exact binary) all fit at once
            n_tiles = triton.cdiv(n_out, block)
            args, meta, fin = _fused_args(m, ws, n, block, warps_s, not in_scan, (q, keys_bf16, min(k, n)))
            if _interpreting() or R * n_tiles <= _resident_for(args, meta, dev):
                _run_fused(args, meta, R, n_tiles)
                return fin
        if in_scan:  # no fused select ran to clear the scan's histogram: the next call must find it zero
            ws.zero_()
    return rerank_topk(q, keys_bf16, index_topk(q_index, keys, n, lo=lo, hi=hi), k)


# ----------------------------------------------------------------------------------------------
# stage two: exact rerank


def _check_rerank(q, keys_bf16, cand):
    if keys_bf16.dim() != 3 or keys_bf16.shape[0] != q.shape[0] or keys_bf16.shape[2] != q.shape[1]:
        raise ValueError(f"rerank keys must be [R, L, D] matching q {tuple(q.shape)}, got {tuple(keys_bf16.shape)}")
    if cand.dim() != 2 or cand.shape[0] != q.shape[0]:
        raise ValueError(f"candidates must be [R, n], got {tuple(cand.shape)}")


def rerank_scores_torch(q: torch.Tensor, keys_bf16: torch.Tensor, cand: torch.Tensor) -> torch.Tensor:
    """float32 [R, n]: q . k (float64 dot of the bf16 keys, rounded once); -inf where cand is -1."""
    k = torch.gather(keys_bf16, 1, cand.clamp(min=0).unsqueeze(-1).expand(-1, -1, keys_bf16.shape[2]))
    s = torch.einsum("rd,rnd->rn", q.double(), k.double()).float()
    return torch.where(cand >= 0, s, torch.full_like(s, float("-inf")))


def _final_order(scores: torch.Tensor, cand: torch.Tensor, k: int) -> torch.Tensor:
    key = order_key64(scores, cand.clamp(min=0))
    best = torch.topk(key, min(k, cand.shape[1]), dim=-1, sorted=True).values
    return (0xFFFFFFFF - (best & 0xFFFFFFFF)).sort(dim=-1).values


def rerank_topk_torch(q: torch.Tensor, keys_bf16: torch.Tensor, cand: torch.Tensor, k: int) -> torch.Tensor:
    _check_rerank(q, keys_bf16, cand)
    return _final_order(rerank_scores_torch(q, keys_bf16, cand), cand, k)


def rerank_topk(q: torch.Tensor, keys_bf16: torch.Tensor, cand: torch.Tensor, k: int) -> torch.Tensor:
    """Stage two: the k best of the candidate positions `cand` [R, n] (ascending, as `index_topk`
    returns them; -1 pads) by float32 q . k over the bf16 keys [R, L, D] (gathered, so only n keys are
    read). Ties to the lower position; returned in ascending position order."""
    _check_rerank(q, keys_bf16, cand)
    if not use_triton(q):
        return rerank_topk_torch(q, keys_bf16, cand, k)
    R, n = cand.shape
    D = keys_bf16.shape[2]
    k = min(k, n)
    scores = torch.empty(R, n, dtype=torch.float32, device=q.device)
    chosen = torch.empty(R, k, dtype=torch.int64, device=q.device)
    block_c = 16 if _interpreting() else 64
    block = triton.next_power_of_2(n)
    warps = 4 if block <= 2048 else 8
    if FUSED_RERANK:
        tickets = _stream_buffer(q.device, "tickets", R)
        _fp4_topk.rerank_select_kernel[(R, triton.cdiv(n, block_c))](
            q, keys_bf16, cand, scores, chosen, tickets, n, k, q.stride(0), keys_bf16.stride(0), keys_bf16.stride(1),
            cand.stride(0), scores.stride(0), chosen.stride(0), D=D, BLOCK_C=block_c, BLOCK=block,
            BYTE_RADIX=RERANK_BYTE_RADIX, DIGITS=RERANK_DIGITS, num_warps=warps)
        return chosen
    _fp4_topk.rerank_kernel[(R, triton.cdiv(n, block_c))](q, keys_bf16, cand, scores, n, q.stride(0),
                                                          keys_bf16.stride(0), keys_bf16.stride(1), cand.stride(0),
                                                          scores.stride(0), D=D, BLOCK_C=block_c, num_warps=4)
    _fp4_topk.select_kernel[(R,)](scores, cand, chosen, n, k, scores.stride(0), cand.stride(0), chosen.stride(0),
                                  BLOCK=block, BYTE_RADIX=RERANK_BYTE_RADIX, DIGITS=RERANK_DIGITS, num_warps=warps)
    return chosen

"""The warp-specialised skinny GEMM (`fp4kit.kernels.fp4_ws`): its offline layout on the CPU, the kernel on Hopper.

Gluon kernels have no CPU interpreter, so the kernel tests run only on a CUDA device of compute capability
>= 9.0 (skipped elsewhere with that reason); the pair layout and the scale tables are plain torch and run
everywhere.
"""

import dataclasses

import pytest
import torch

from fp4kit.formats import MXFP4Config, NVFP4Config, quantize
from fp4kit.kernels import fp4_ws
from fp4kit.kernels.fp4_ws import (
    FRAG_OFFSETS,
    WsConfig,
    WsDecode,
    pair_tables,
    relayout_words,
    unpack_words,
    ws_config,
)

HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9
FORMATS = {"nvfp4": NVFP4Config(), "mxfp4": MXFP4Config()}


def _codes(qt):
    N, K = qt.shape
    d = qt.data.view(torch.uint8).reshape(N, K // 2)
    return torch.stack((d & 0xF, d >> 4), dim=-1).reshape(N, K)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("offsets", [tuple(tuple(8 * w + j for j in range(8)) for w in range(8)), FRAG_OFFSETS],
                         ids=["natural", "frag"])
def test_relayout_words_round_trip(fmt, offsets):
    torch.manual_seed(0)
    qt = quantize(torch.randn(48, 512), FORMATS[fmt])
    words = relayout_words(qt, offsets)
    assert words.dtype == torch.int32 and words.shape == (48, 64)
    assert torch.equal(unpack_words(words, offsets), _codes(qt))


def test_frag_offsets_are_a_permutation_of_a_slice():
    assert sorted(e for w in FRAG_OFFSETS for e in w) == list(range(64))


def test_frag_offsets_match_the_wgmma_a_fragment():
    # PTX ISA, wgmma .bf16 A in registers: lane 4 g + tig of a warp holds, for each 16-wide k chunk c,
    # rows g and g + 8 at k = 16 c + 2 tig + {0, 1} and 16 c + 8 + 2 tig + {0, 1}. The kernel gives thread tig
    # the words 2 tig + h (h = 0, 1) of its rows; low nibble J and high nibble J + 4 form a bf16 pair (k, k + 1).
    for tig in range(4):
        held = sorted(FRAG_OFFSETS[2 * tig + h][j] for h in range(2) for j in range(8))
        want = sorted(16 * c + 8 * half + 2 * tig + e for c in range(4) for half in range(2) for e in range(2))
        assert held == want
        for h in range(2):
            w = FRAG_OFFSETS[2 * tig + h]
            for J in range(4):
                assert w[J + 4] == w[J] + 1 and w[J] % 2 == 0  # a bf16 pair: (low half, high half) = (k, k + 1)
                assert w[J] // 16 == 2 * h + J // 2  # pairs 0, 1 use chunk 2h's scale, pairs 2, 3 chunk 2h + 1's
    assert FRAG_OFFSETS[0] == (0, 8, 16, 24, 1, 9, 17, 25)  # hand-written
    assert FRAG_OFFSETS[3] == (34, 42, 50, 58, 35, 43, 51, 59)


def test_relayout_refuses_k_not_multiple_of_64():
    with pytest.raises(ValueError, match="multiple of 64"):
        relayout_words(quantize(torch.randn(4, 32), NVFP4Config()))


def test_natural_offsets_reproduce_the_packing_and_frag_words_golden():
    # relayout with the identity offsets is the packed data itself; a hand-built row checks FRAG's first word
    torch.manual_seed(4)
    qt = quantize(torch.randn(3, 128), NVFP4Config())
    natural = tuple(tuple(8 * w + j for j in range(8)) for w in range(8))
    assert torch.equal(relayout_words(qt, natural), qt.data.view(torch.uint8).reshape(3, -1).view(torch.int32))
    row = quantize(torch.zeros(1, 64), NVFP4Config())
    codes = (torch.arange(64) % 16).to(torch.uint8)  # element e holds code e % 16
    row.data.view(torch.uint8).copy_((codes[0::2] | (codes[1::2] << 4)).reshape(row.data.shape))
    w0 = int(relayout_words(row)[0, 0]) & 0xFFFFFFFF
    # FRAG_OFFSETS[0] = (0, 8, 16, 24, 1, 9, 17, 25): nibbles hold codes 0, 8, 0, 8, 1, 9, 1, 9 from the lowest
    assert w0 == 0x91918080


def test_nvfp4_pair_table_is_e4m3_times_2_117_and_post_restores_the_global_factor():
    torch.manual_seed(1)
    qt = quantize(torch.randn(16, 64), NVFP4Config())
    table, two_mul, post = pair_tables(qt, qt.scale.view(torch.uint8))
    assert not two_mul and table.dtype == torch.int32  # one bf16x2 multiply per weight pair
    codes = torch.arange(256, dtype=torch.uint8)
    want = codes.view(torch.float8_e4m3fn).float()
    lo = (table & 0xFFFF).to(torch.int16).view(torch.bfloat16).float()
    hi = ((table >> 16) & 0xFFFF).to(torch.int16).view(torch.bfloat16).float()
    finite = torch.isfinite(want)
    assert torch.equal(lo[finite], want[finite] * 2.0**117) and torch.equal(hi[finite], want[finite] * 2.0**117)
    assert torch.isnan(lo[~finite]).all()
    assert lo[finite].max() < 2.0**126  # fits bfloat16 (max ~2^128) with room
    # the kernel's weight: (code x 2^-126) x (s x 2^117) = code x s x 2^-9, exact; times post: the twin's weight
    e2m1 = torch.tensor([0.5, 1, 1.5, 2, 3, 4, 6])
    prod = (e2m1[:, None] * 2.0**-126).to(torch.bfloat16).float() * lo[finite][None, :]
    assert torch.equal(prod.to(torch.bfloat16).float(), prod)  # every product exact in bfloat16
    assert prod[prod > 0].min() >= 2.0**-126  # and normal
    eff = qt.config.effective_block_scale(want[finite], qt.global_scale.float().reshape(()))
    assert torch.allclose(want[finite] * 2.0**-9 * post, eff, rtol=2 ** -23, atol=0)


def test_prepare_ws_formats_and_decodes():
    from fp4kit.kernels.fp4_ws import prepare_ws

    mx = quantize(torch.randn(16, 512), MXFP4Config())
    with pytest.raises(ValueError, match="MXFP4 .block 32. with the fragment decode"):
        prepare_ws(mx, WsDecode.FLOAT32)
    w = prepare_ws(mx, WsDecode.FRAG)
    assert w.decode is WsDecode.FRAG and w.post is None
    assert torch.equal(unpack_words(w.words, FRAG_OFFSETS), _codes(mx))
    nv = prepare_ws(quantize(torch.randn(16, 512), NVFP4Config()))  # the default decode
    assert nv.decode is WsDecode.FRAG and nv.post is not None
    with pytest.raises(ValueError, match="multiple of 256"):
        prepare_ws(quantize(torch.randn(16, 64), NVFP4Config()))


def test_mxfp4_pair_table_has_no_post():
    qt = quantize(torch.randn(16, 64), MXFP4Config())
    table, two_mul, post = pair_tables(qt, qt.scale.view(torch.uint8))
    assert post is None and table.dtype == torch.int32


def test_ws_config_rules():
    def base(cfg):  # the tile shape, ring and split, without the layout switches
        return dataclasses.replace(cfg, tiled=False, wide=False, scale_smem=False)

    assert base(ws_config(16, 28672, 4096)) == WsConfig(block_n=128, stages=2, split_k=1)  # the r4 sweep's gate_up
    assert base(ws_config(16, 4096, 14336)) == WsConfig(block_n=128, stages=2, split_k=8)  # down (r9 sweep)
    assert base(ws_config(64, 4096, 14336)) == WsConfig(block_n=64, stages=2, split_k=4, maxnreg=96)
    assert ws_config(16, 6144, 4096).split_k == 4 and ws_config(16, 4096, 4096).split_k == 4
    assert ws_config(16, 64, 256).split_k == 1  # never more splits than K steps
    assert ws_config(16, 4096, 4096).maxnreg == 80 and ws_config(64, 4096, 4096).maxnreg == 96  # no spills at 64
    assert ws_config(64, 28672, 4096).maxnreg == 80  # 128-row tiles: 96 measured slower
    # MXFP4 long K at 1-16 tokens (fp4_ws_h100_mx_sweep1): 128-row tiles, 2 stages, 4 splits; 64 rows above
    assert base(ws_config(16, 4096, 14336, block_size=32)) == WsConfig(block_n=128, block_k=512, stages=2, split_k=4)
    assert base(ws_config(1, 4096, 14336, block_size=32)) == WsConfig(block_n=128, block_k=512, stages=2, split_k=4)
    assert base(ws_config(32, 4096, 14336, block_size=32)) == WsConfig(block_n=64, block_k=512, stages=2, split_k=4)
    mx = ws_config(16, 4096, 4096, block_size=32)  # MXFP4: 512-wide stages, one deep at <= 16 tokens (mx_sweep2)
    assert mx.block_k == 512 and mx.stages == 1 and mx.split_k == 4
    assert ws_config(17, 4096, 4096, block_size=32).stages == 2 and ws_config(16, 4096, 4096).stages == 2
    assert base(ws_config(16, 28672, 4096, block_size=32)) == WsConfig(block_n=128, block_k=512, stages=1, split_k=1)
    # the layout switches (fp4_ws_h100_wide_r1): tiled wide boxes where the K steps divide among the splits,
    # the scale table except on 128-row tiles at > 32 tokens
    for M, N, K, bs in [(16, 28672, 4096, 16), (32, 4096, 14336, 16), (64, 6144, 4096, 16), (16, 4096, 14336, 32)]:
        c = ws_config(M, N, K, block_size=bs)
        assert c.tiled and c.wide and (K // c.block_k) % c.split_k == 0
    assert ws_config(16, 28672, 4096).scale_smem and not ws_config(64, 28672, 4096).scale_smem
    assert ws_config(64, 4096, 4096).scale_smem
    # NVFP4 at 17-32 tokens (fp4_ws_h100_sweep_m32): a 3-stage ring, splits for one wave at 2 programs per SM
    for M in (17, 24, 32):
        assert base(ws_config(M, 6144, 4096)) == WsConfig(block_n=64, stages=3, split_k=2)  # 96 tiles x 2 <= 264
        assert base(ws_config(M, 4096, 4096)) == WsConfig(block_n=64, stages=3, split_k=4)  # 64 x 4 <= 264
        assert base(ws_config(M, 4096, 14336)) == WsConfig(block_n=64, stages=3, split_k=4)
        assert base(ws_config(M, 28672, 4096)) == WsConfig(block_n=128, stages=2, split_k=1)  # gate_up unchanged
        assert ws_config(M, 4096, 4096, block_size=32).stages == 2  # MXFP4 not swept at 32 tokens
        head = ws_config(M, 128256, 4096)  # an output head: 128-wide stages, 6 deep, in the tiled copy's wide boxes
        assert base(head) == WsConfig(block_n=128, block_k=128, stages=6, split_k=1) and head.tiled and head.wide
    assert base(ws_config(16, 128256, 4096)) == WsConfig(block_n=128, stages=2, split_k=1)
    assert ws_config(32, 4096, 4096, sm_count=64).split_k == 2  # 64 tiles x 2 = 2 x 64 SMs
    assert ws_config(32, 4096, 4096).tiled and ws_config(32, 6144, 4096).tiled  # K steps divide the splits
    old = fp4_ws.MID_M_RING
    try:
        fp4_ws.MID_M_RING = False  # the previous rule, for A/B runs
        assert base(ws_config(32, 4096, 14336)) == WsConfig(block_n=128, stages=2, split_k=8)
        assert base(ws_config(32, 6144, 4096)) == WsConfig(block_n=64, stages=2, split_k=4)
    finally:
        fp4_ws.MID_M_RING = old
    odd = ws_config(16, 4096, 256 * 6)  # 6 K steps, 4 splits: the row layout
    assert odd.split_k == 4 and not odd.tiled and not odd.wide
    with pytest.raises(ValueError, match="unsupported"):
        WsConfig(block_n=32)


def test_stage_width_rules():
    """128-wide stages only for NVFP4 with the tiled copy in wide boxes (128-byte rows of scale codes); MXFP4 512."""
    from fp4kit.kernels.fp4_ws import check_stage_width

    check_stage_width(WsConfig(block_k=128, tiled=True, wide=True), 16)
    check_stage_width(WsConfig(block_k=256), 16)
    check_stage_width(WsConfig(block_k=512), 32)
    with pytest.raises(ValueError, match="wide boxes"):
        check_stage_width(WsConfig(block_k=128, tiled=True), 16)
    with pytest.raises(ValueError, match="wide boxes"):
        check_stage_width(WsConfig(block_k=128, tiled=True, wide=True), 32)
    with pytest.raises(ValueError, match="MXFP4 needs block_k % 512"):
        check_stage_width(WsConfig(block_k=256, tiled=True, wide=True), 32)
    with pytest.raises(ValueError, match="unsupported"):
        WsConfig(block_k=192)


@pytest.mark.skipif(not HOPPER, reason="Gluon warp-specialised kernel: needs a CUDA GPU with compute capability >= 9.0")
@pytest.mark.parametrize("fmt,decode", [("nvfp4", WsDecode.FLOAT32), ("nvfp4", WsDecode.FRAG),
                                         ("mxfp4", WsDecode.FRAG)])
@pytest.mark.parametrize("M,N,K,split,bn", [(16, 512, 1024, 1, 64), (3, 384, 2048, 4, 64), (33, 256, 512, 2, 128),
                                            (64, 128, 512, 1, 64), (16, 320, 1536, 1, 128)])
@pytest.mark.parametrize("overlap", [False, True], ids=["mma_wait", "mma_overlap"])
def test_ws_against_float64_reference(fmt, decode, M, N, K, split, bn, overlap, monkeypatch):
    from fp4kit.kernels import fp4_ws
    from fp4kit.kernels.fp4_ws import fp4_ws_matmul, prepare_ws

    monkeypatch.setattr(fp4_ws, "WS_MMA_OVERLAP", overlap)

    torch.manual_seed(2)
    qt = quantize(torch.randn(N, K, device="cuda") * 0.02, FORMATS[fmt])
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    bias = torch.randn(N, device="cuda", dtype=torch.bfloat16)
    bk = 512 if fmt == "mxfp4" else 256
    w = prepare_ws(qt, decode)
    cfg = WsConfig(block_n=bn, block_k=bk, split_k=split)
    y = fp4_ws_matmul(x, w, bias, config=cfg)
    # split K reduces in the kernel (the last split of a tile, in split order) and leaves the tickets at zero:
    # a second call gives the same bits
    assert torch.equal(fp4_ws_matmul(x, w, bias, config=cfg), y)
    exact = (x.double() @ qt.dequantize(torch.float32).double().T) + bias.double()
    twin = (x.float() @ qt.dequantize(torch.bfloat16).float().T + bias.float()).double()
    err = (y.double() - exact).abs().max() / exact.abs().max()
    # bf16 output rounding (2^-9) plus float32 summation; NVFP4 pairs skip the twin's per-weight bf16 rounding
    assert err < 2 ** -8, err
    assert (y.double() - twin).abs().max() / twin.abs().max() < 2 ** -7


def test_tile_rows_golden_and_padding():
    from fp4kit.kernels.fp4_ws import tile_rows

    t = torch.arange(3 * 4).reshape(3, 4)  # N = 3 rows, C = 4 columns; tiles of 2 rows, chunks of 2 columns
    got = tile_rows(t, 2, 2)
    want = torch.tensor([[0, 1], [4, 5],  # tile 0, chunk 0: rows 0, 1
                         [2, 3], [6, 7],  # tile 0, chunk 1
                         [8, 9], [0, 0],  # tile 1, chunk 0: row 2 and a zero pad row
                         [10, 11], [0, 0]])
    assert torch.equal(got, want)
    big = torch.randint(0, 2**31 - 1, (320, 64), dtype=torch.int32)
    tiled = tile_rows(big, 128, 8)
    assert tiled.shape == (3 * 8 * 128, 8) and tiled.is_contiguous()
    for tile, c, r in [(0, 0, 0), (1, 5, 17), (2, 7, 63), (2, 3, 64)]:  # row 2 x 128 + 64 = 320: padding
        row = (tile * 8 + c) * 128 + r
        n = tile * 128 + r
        assert torch.equal(tiled[row], big[n, 8 * c:8 * c + 8] if n < 320 else torch.zeros(8, dtype=torch.int32))
    with pytest.raises(ValueError, match="not a multiple of the chunk"):
        tile_rows(big, 128, 5)


@pytest.mark.skipif(not HOPPER, reason="Gluon warp-specialised kernel: needs a CUDA GPU with compute capability >= 9.0")
@pytest.mark.parametrize("fmt,decode", [("nvfp4", WsDecode.FLOAT32), ("nvfp4", WsDecode.FRAG),
                                         ("mxfp4", WsDecode.FRAG)])
@pytest.mark.parametrize("M,N,K,split,bn", [(16, 512, 1024, 1, 64), (3, 320, 2048, 4, 128), (33, 448, 1536, 2, 64),
                                            (64, 128, 4096, 8, 64)])
@pytest.mark.parametrize("switch", ["tiled", "wide", "scale_smem"])
def test_ws_switches_give_the_same_bits(fmt, decode, M, N, K, split, bn, switch):
    """The tile-by-tile copy changes only where the loader reads each stage from, the shared-memory scale table
    only where the consumer converts the scale codes: the same bits as the default (N not a multiple of the
    tile: padded rows, masked on store); the tiled copy refuses K steps that do not divide among the splits."""
    from fp4kit.kernels.fp4_ws import fp4_ws_matmul, prepare_ws

    torch.manual_seed(6)
    bk = 512 if fmt == "mxfp4" else 256
    if (K // bk) % split:
        split = 1
    qt = quantize(torch.randn(N, K, device="cuda") * 0.02, FORMATS[fmt])
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    bias = torch.randn(N, device="cuda", dtype=torch.bfloat16)
    w = prepare_ws(qt, decode)
    cfg = WsConfig(block_n=bn, block_k=bk, split_k=split)
    want = fp4_ws_matmul(x, w, bias, config=cfg)
    on = {"tiled": True, "wide": True} if switch == "wide" else {switch: True}
    got = fp4_ws_matmul(x, w, bias, config=dataclasses.replace(cfg, **on))
    assert torch.equal(got, want)
    if switch != "scale_smem":
        with pytest.raises(ValueError, match="divisible by split_k"):
            fp4_ws_matmul(x, w, config=WsConfig(block_n=bn, block_k=bk, split_k=5, **on))


@pytest.mark.skipif(not HOPPER, reason="Gluon warp-specialised kernel: needs a CUDA GPU with compute capability >= 9.0")
def test_ws_rejects_bad_input():
    from fp4kit.kernels.fp4_ws import fp4_ws_matmul, prepare_ws

    qt = quantize(torch.randn(128, 256, device="cuda"), NVFP4Config())
    w = prepare_ws(qt)
    with pytest.raises(ValueError, match="bf16"):
        fp4_ws_matmul(torch.randn(4, 256, device="cuda"), w)
    with pytest.raises(ValueError, match="M <= 64"):
        fp4_ws_matmul(torch.randn(65, 256, device="cuda", dtype=torch.bfloat16), w)


def test_ws_beats_gemv_rule():
    """1-2 rows (results/fp4_ws_h100_m1.json, fp4_ws_h100_mx_sweep1.json): NVFP4 wide layers / long K at 1 row and
    everything at 2; MXFP4 heads and long K at 1 row, wide layers / long K at 2; never beyond 2 rows (the GEMV's
    range) or with the switch off."""
    from fp4kit.kernels.fp4_ws import ws_beats_gemv

    llama = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336),
             "head": (128256, 4096)}
    got = {(bs, m): sorted(k for k, (N, K) in llama.items() if ws_beats_gemv(m, N, K, bs))
           for bs in (16, 32) for m in (1, 2, 3)}
    assert got == {(16, 1): ["down", "gate_up", "head"], (16, 2): ["down", "gate_up", "head", "o", "qkv"],
                   (32, 1): ["down", "head"], (32, 2): ["down", "gate_up", "head"], (16, 3): [], (32, 3): []}
    old = fp4_ws.WS_SMALL_M
    try:
        fp4_ws.WS_SMALL_M = 0
        assert not ws_beats_gemv(1, 28672, 4096, 16)
        fp4_ws.WS_SMALL_M = 2
        assert ws_beats_gemv(1, 4096, 4096, 32) and not ws_beats_gemv(3, 4096, 4096, 32)
    finally:
        fp4_ws.WS_SMALL_M = old


def test_auto_path_never_takes_ws_off_hopper_and_path_ws_refuses_clearly():
    from fp4kit.kernels.fp4_gemm import DecodePath, _auto_path, fp4_matmul
    from fp4kit.kernels.fp4_ws import ws_supported

    qt = quantize(torch.randn(64, 512), NVFP4Config())
    x = torch.randn(16, 512, dtype=torch.bfloat16)
    assert not ws_supported(x, qt)  # a CPU tensor
    assert _auto_path(16, qt, x) is DecodePath.SKINNY
    with pytest.raises(ValueError, match="path=WS"):
        fp4_matmul(x, qt, path=DecodePath.WS)


@pytest.mark.skipif(not HOPPER, reason="Gluon warp-specialised kernel: needs a CUDA GPU with compute capability >= 9.0")
@pytest.mark.parametrize("fmt,m,want_ws", [("nvfp4", 1, True), ("nvfp4", 2, True), ("mxfp4", 1, False),
                                           ("mxfp4", 2, True)])
def test_auto_path_at_one_and_two_rows_on_a_wide_layer(fmt, m, want_ws):
    """16384 x 512: AUTO takes the WS kernel where `ws_beats_gemv` says so (bit for bit fp4_ws_matmul), else the
    GEMV; the error against the float64 product stays at the output's bf16 rounding either way."""
    from fp4kit.kernels.fp4_gemm import DecodePath, _auto_path, fp4_matmul
    from fp4kit.kernels.fp4_ws import WsDecode, fp4_ws_matmul, prepare_ws

    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the WS path is sm_90 only")
    torch.manual_seed(5)
    qt = quantize(torch.randn(16384, 512, device="cuda") * 0.02, FORMATS[fmt])
    x = torch.randn(m, 512, device="cuda", dtype=torch.bfloat16)
    assert (_auto_path(m, qt, x) is DecodePath.WS) == want_ws
    y = fp4_matmul(x, qt)
    if want_ws:
        assert torch.equal(y, fp4_ws_matmul(x, prepare_ws(qt, WsDecode.FRAG)))
    ref = x.double() @ qt.dequantize(torch.float64).T
    # the output's bf16 rounding, as in test_ws_against_float64_reference
    assert ((y.double() - ref).abs().max() / ref.abs().max()).item() < 2 ** -8


@pytest.mark.skipif(not HOPPER, reason="Gluon warp-specialised kernel: needs a CUDA GPU with compute capability >= 9.0")
@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
def test_fp4_linear_takes_ws_at_decode_batch_and_under_graph_capture(fmt):
    """AUTO sends M = 3..64 here on an H100; the result is fp4_ws_matmul's on the fragment layout, bit for bit;
    the layout must exist before capture (a clear error otherwise); a captured graph replays the same bits."""
    from fp4kit.kernels import fp4_linear
    from fp4kit.kernels.fp4_gemm import DecodePath, _auto_path, _prepared_for
    from fp4kit.kernels.fp4_ws import WsDecode, fp4_ws_matmul, prepare_ws, ws_supported

    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the WS path is sm_90 only")
    torch.manual_seed(3)
    qt = quantize(torch.randn(384, 1024, device="cuda") * 0.02, FORMATS[fmt])
    x = torch.randn(24, 1024, device="cuda", dtype=torch.bfloat16)
    assert ws_supported(x, qt) and _auto_path(24, qt, x) is DecodePath.WS
    fresh = quantize(torch.randn(384, 1024, device="cuda") * 0.02, FORMATS[fmt])
    _prepared_for(fresh)  # prepared eagerly (its table), but no fragment layout yet
    g = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="fragment layout was not built before CUDA graph capture"):
        with torch.cuda.graph(g):
            fp4_linear(x, fresh)
    y = fp4_linear(x, qt)
    assert torch.equal(y, fp4_ws_matmul(x, prepare_ws(qt, WsDecode.FRAG)))
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = fp4_linear(x, qt)
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, y)


@pytest.mark.skipif(not HOPPER, reason="Gluon warp-specialised kernel: needs a CUDA GPU with compute capability >= 9.0")
@pytest.mark.parametrize("split", [1, 4])
@pytest.mark.parametrize("trigger", [1, 2])
def test_pdl_chain_under_graph_equals_the_serial_chain(split, trigger, monkeypatch):
    """With PDL each launch prefetches its first stages' weights before griddepcontrol.wait and reads x (the
    previous launch's output) only after it: a captured chain of dependent launches, replayed, must give the
    bits of the same chain run eagerly without PDL (split K: the shared workspace and tickets too)."""
    from fp4kit.kernels import fp4_gemm, fp4_ws
    from fp4kit.kernels.fp4_ws import WsDecode, fp4_ws_matmul, prepare_ws

    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("PDL path measured on sm_90 only")
    monkeypatch.setattr(fp4_ws, "WS_PDL_TRIGGER", trigger)
    torch.manual_seed(5)
    ws = [prepare_ws(quantize(torch.randn(512, 512, device="cuda") * 0.05, NVFP4Config()), WsDecode.FRAG)
          for _ in range(3)]
    cfg = WsConfig(split_k=split)
    x = torch.randn(16, 512, device="cuda", dtype=torch.bfloat16)

    def chain(inp):
        for w in ws:
            inp = fp4_ws_matmul(inp, w, config=cfg)
        return inp

    monkeypatch.setattr(fp4_gemm, "PDL", False)
    want = chain(x)
    monkeypatch.setattr(fp4_gemm, "PDL", True)
    assert torch.equal(chain(x), want)  # eager with PDL (compiles the PDL variant)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = chain(x)
    for _ in range(5):
        g.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, want)

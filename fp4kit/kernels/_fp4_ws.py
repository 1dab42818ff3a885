"""Gluon kernel behind `fp4_ws`: a warp-specialised skinny FP4 GEMM (TMA loader warp + decode/wgmma warpgroup).

See `fp4_ws` for the design and the measurements."""
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import tma, mbarrier, fence_async_shared, warpgroup_mma, warpgroup_mma_wait

from ._fp4_bits import e2m1_word_pair_bf16
from ._fp4_gemm import _e2m1_word_pair


@gluon.jit
def _bf16_pair_scaled(words, scale2, J: gl.constexpr, TWO_MUL: gl.constexpr):
    """Nibbles J (low half) and J + 4 (high) of each word placed as bfloat16 (the value times 2^-126,
    `_fp4_bits.e2m1_word_pair_bf16`), multiplied by 2^126 (TWO_MUL) and by the block's bfloat16 scale pair:
    both products exact."""
    h = e2m1_word_pair_bf16(words, J)
    if TWO_MUL:
        asm: gl.constexpr = ("{ .reg .b32 t, c; mov.b32 c, 0x7E807E80; mul.rn.bf16x2 t, $2, c; "
                             "mul.rn.bf16x2 t, t, $3; mov.b32 {$0, $1}, t; }")
    else:
        asm: gl.constexpr = "{ .reg .b32 t; mul.rn.bf16x2 t, $2, $3; mov.b32 {$0, $1}, t; }"
    return gl.inline_asm_elementwise(asm, "=h,=h,r,r", [h, scale2], dtype=(gl.bfloat16, gl.bfloat16),
                                     is_pure=True, pack=1)


@gluon.jit
def _bf16x2_scale(codes, IS_NVFP4: gl.constexpr, TWO_MUL: gl.constexpr):
    """Scale codes -> int32 bf16x2 pairs of the block scale as `fp4_ws.pair_tables` lists them, computed in
    registers: NVFP4 E4M3 x 2^117 (one multiply per weight pair), MXFP4 2^(c - 127) or 2^(c - 1)."""
    if IS_NVFP4:  # E4M3 -> bfloat16 is exact (NaN stays NaN); then x 2^117 (exact: fp4_gemm.NV_SCALE_SHIFT)
        b = codes.to(gl.float8e4nv, bitcast=True).to(gl.bfloat16).to(gl.int16, bitcast=True).to(gl.int32) & 0xFFFF
        return gl.inline_asm_elementwise("{ .reg .b32 c; mov.b32 c, 0x7A007A00; mul.rn.bf16x2 $0, $1, c; }", "=r,r",
                                         [b | (b << 16)], dtype=gl.int32, is_pure=True, pack=1)
    else:
        c = codes.to(gl.int32)
        if TWO_MUL:  # 2^(c - 127); code 0 the subnormal 2^-127, 255 NaN
            b = gl.where(c == 0, 0x0040, gl.where(c == 255, 0x7FC0, c << 7))
        else:  # 2^(c - 1) for the one-multiply decode (every code <= 128)
            b = gl.where(c <= 128, (c + 126) << 7, 0x7FC0)
    return b | (b << 16)


@gluon.jit
def _decode_frag(words, s_lo, s_hi, R: gl.constexpr, TWO_MUL: gl.constexpr):
    """Fragment-layout words [R, 4 (tig), 2 (h)] -> bfloat16 [R, 64] in k order, already in the wgmma A
    operand's register layout (`fp4_ws.FRAG_OFFSETS`: pair J of word (tig, h) holds
    k = 32 h + 16 (J // 2) + 8 (J % 2) + 2 tig + {0, 1}; s_lo scales chunk 2h, s_hi chunk 2h + 1)."""
    l0, h0 = _bf16_pair_scaled(words, s_lo, 0, TWO_MUL)
    l1, h1 = _bf16_pair_scaled(words, s_lo, 1, TWO_MUL)
    l2, h2 = _bf16_pair_scaled(words, s_hi, 2, TWO_MUL)
    l3, h3 = _bf16_pair_scaled(words, s_hi, 3, TWO_MUL)
    u = gl.join(gl.join(gl.join(l0, h0), gl.join(l1, h1)), gl.join(gl.join(l2, h2), gl.join(l3, h3)))
    # [R, tig, h, e, p, c] -> [R, h, c, p, tig, e]: k = 32 h + 16 c + 8 p + 2 tig + e
    return gl.reshape(gl.permute(u, (0, 2, 5, 4, 1, 3)), [R, 64])


@gluon.jit
def _decode_f32(words, scale8, R: gl.constexpr, KW: gl.constexpr):
    """MODE 0: natural-packing words [R, KW] -> bfloat16 [R, 8 KW] in k order, the twin's weights bit for bit
    (float16 placement x 2^-14, times the float32 effective scale x 2^14, one rounding to bf16)."""
    w0, w4 = _e2m1_word_pair(words, 0)
    w1, w5 = _e2m1_word_pair(words, 1)
    w2, w6 = _e2m1_word_pair(words, 2)
    w3, w7 = _e2m1_word_pair(words, 3)
    w0 = (w0 * scale8).to(gl.bfloat16)
    w1 = (w1 * scale8).to(gl.bfloat16)
    w2 = (w2 * scale8).to(gl.bfloat16)
    w3 = (w3 * scale8).to(gl.bfloat16)
    w4 = (w4 * scale8).to(gl.bfloat16)
    w5 = (w5 * scale8).to(gl.bfloat16)
    w6 = (w6 * scale8).to(gl.bfloat16)
    w7 = (w7 * scale8).to(gl.bfloat16)
    b0 = gl.join(gl.join(w0, w4), gl.join(w2, w6))
    b1 = gl.join(gl.join(w1, w5), gl.join(w3, w7))
    return gl.reshape(gl.join(b0, b1), [R, KW * 8])


@gluon.constexpr_function
def _frag_layout(BLOCK_N, num_warps, which):
    """The fragment decode's layouts (threads as in the wgmma A operand: lane = 4 g + tig, warp w: rows 16 w..):
    0: words [BLOCK_N, 8] (column 2 tig + h; registers h, row + 8); 1: the same as [BLOCK_N, 4 (tig), 2 (h)];
    2: NVFP4 scale codes [BLOCK_N, 4] (column 2 h + c; registers c, h, row + 8; the tig lanes read the same
    code); 3: MXFP4 scale codes [BLOCK_N, 2] (column h: one E8M0 code per 32 = two 16-wide chunks)."""
    warps = [16 << i for i in range(num_warps.bit_length() - 1)]
    if which == 1:
        return gl.DistributedLinearLayout([[0, 0, 1], [8, 0, 0]],
                                          [[0, 1, 0], [0, 2, 0], [1, 0, 0], [2, 0, 0], [4, 0, 0]],
                                          [[w, 0, 0] for w in warps], [], [BLOCK_N, 4, 2])
    if which == 0:
        return gl.DistributedLinearLayout([[0, 1], [8, 0]], [[0, 2], [0, 4], [1, 0], [2, 0], [4, 0]],
                                          [[w, 0] for w in warps], [], [BLOCK_N, 8])
    if which == 2:
        return gl.DistributedLinearLayout([[0, 1], [0, 2], [8, 0]], [[0, 0], [0, 0], [1, 0], [2, 0], [4, 0]],
                                          [[w, 0] for w in warps], [], [BLOCK_N, 4])
    return gl.DistributedLinearLayout([[0, 1], [8, 0]], [[0, 0], [0, 0], [1, 0], [2, 0], [4, 0]],
                                      [[w, 0] for w in warps], [], [BLOCK_N, 2])


@gluon.jit
def _gdc_wait():
    # griddepcontrol.wait: the previous kernel in the stream has completed and its writes are visible (PDL)
    gl.inline_asm_elementwise("griddepcontrol.wait; // dummy $0", "=r", [], dtype=gl.int32, is_pure=False, pack=1)


@gluon.jit
def _gdc_launch_dependents():
    gl.inline_asm_elementwise("griddepcontrol.launch_dependents; // dummy $0", "=r", [], dtype=gl.int32,
                              is_pure=False, pack=1)


@gluon.jit
def _load_stage(x_desc, w_desc, s_desc, w_bufs, x_bufs, s_bufs, bar, n0, k, s,
                XSUB: gl.constexpr, BS: gl.constexpr, WEIGHTS: gl.constexpr, X: gl.constexpr,
                TILED: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr, K: gl.constexpr):
    # TILED: words and scale codes re-laid tile by tile (`fp4_ws.tile_rows`), so that a stage's bytes are
    # contiguous: row (tile x K/64 + slice) x BLOCK_N of the words, (tile x K/BLOCK_K + stage) x BLOCK_N of the codes;
    # 1 reads them in the row layout's boxes, 2 (WIDE) in one box of 128-byte rows per stage for each
    if WEIGHTS and TILED == 2:  # WIDE: the stage's words and codes each in one box of 128-byte rows
        CODE_ROWS: gl.constexpr = BLOCK_N * (BLOCK_K // BS) // 128
        tma.async_copy_global_to_shared(s_desc, [(n0 // BLOCK_N * (K // BLOCK_K) + k // BLOCK_K) * CODE_ROWS, 0],
                                        bar, s_bufs.index(s))
        tma.async_copy_global_to_shared(w_desc, [(n0 // BLOCK_N * (K // 64) + k // 64) * (BLOCK_N // 4), 0],
                                        bar, w_bufs.index(s))
    elif WEIGHTS:
        if TILED:
            tma.async_copy_global_to_shared(s_desc, [(n0 // BLOCK_N * (K // BLOCK_K) + k // BLOCK_K) * BLOCK_N, 0],
                                            bar, s_bufs.index(s))
        else:
            tma.async_copy_global_to_shared(s_desc, [n0, k // BS], bar, s_bufs.index(s))
    for j in gl.static_range(XSUB):
        if WEIGHTS and TILED != 2:
            if TILED:
                tma.async_copy_global_to_shared(w_desc, [(n0 // BLOCK_N * (K // 64) + k // 64 + j) * BLOCK_N, 0],
                                                bar, w_bufs.index(s * XSUB + j))
            else:
                tma.async_copy_global_to_shared(w_desc, [n0, (k + 64 * j) // 8], bar, w_bufs.index(s * XSUB + j))
        if X:
            tma.async_copy_global_to_shared(x_desc, [0, k + 64 * j], bar, x_bufs.index(s * XSUB + j))


@gluon.jit
def _loader(x_desc, w_desc, s_desc, w_bufs, x_bufs, s_bufs, ready, empty, n0, k_lo,
            N_STEPS: gl.constexpr, STAGES: gl.constexpr, XSUB: gl.constexpr, BLOCK_K: gl.constexpr,
            BS: gl.constexpr, PDL: gl.constexpr, TILED: gl.constexpr, BLOCK_N: gl.constexpr, K: gl.constexpr):
    NBYTES: gl.constexpr = (XSUB * (w_desc.block_type.nbytes + x_desc.block_type.nbytes) + s_desc.block_type.nbytes
                            if TILED != 2 else
                            w_desc.block_type.nbytes + XSUB * x_desc.block_type.nbytes + s_desc.block_type.nbytes)
    START: gl.constexpr = (STAGES if STAGES < N_STEPS else N_STEPS) if PDL else 0
    if PDL:
        # weights never depend on an earlier kernel: the first stages' weights and scales load while the previous
        # kernel finishes; x (its output) only after griddepcontrol.wait
        for i in gl.static_range(START):
            mbarrier.expect(ready.index(i), NBYTES)
            _load_stage(x_desc, w_desc, s_desc, w_bufs, x_bufs, s_bufs, ready.index(i), n0, k_lo + i * BLOCK_K, i,
                        XSUB, BS, True, False, TILED, BLOCK_N, BLOCK_K, K)
        _gdc_wait()
        for i in gl.static_range(START):
            _load_stage(x_desc, w_desc, s_desc, w_bufs, x_bufs, s_bufs, ready.index(i), n0, k_lo + i * BLOCK_K, i,
                        XSUB, BS, False, True, TILED, BLOCK_N, BLOCK_K, K)
    for i in range(START, N_STEPS):
        s = i % STAGES
        ph = (i // STAGES) & 1
        mbarrier.wait(empty.index(s), ph ^ 1)
        bar = ready.index(s)
        mbarrier.expect(bar, NBYTES)
        _load_stage(x_desc, w_desc, s_desc, w_bufs, x_bufs, s_bufs, bar, n0, k_lo + i * BLOCK_K, s, XSUB, BS, True, True,
                    TILED, BLOCK_N, BLOCK_K, K)


@gluon.jit
def _consumer(w_bufs, x_bufs, s_bufs, sc_bufs, ready, empty, table_ptr,
              N_STEPS: gl.constexpr, STAGES: gl.constexpr, XSUB: gl.constexpr,
              BLOCK_N: gl.constexpr, BLOCK_M: gl.constexpr,
              MODE: gl.constexpr, TWO_MUL: gl.constexpr, IS_NVFP4: gl.constexpr,
              num_warps: gl.constexpr, OVERLAP: gl.constexpr, SCALE_SMEM: gl.constexpr):
    """The default partition: decode + wgmma over this program's K range; returns the float32 [BLOCK_N, BLOCK_M]
    accumulator (the epilogue runs after the warp-specialised region, on all warps)."""
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, BLOCK_M, 16])
    a_l: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
    w_l: gl.constexpr = gl.BlockedLayout([1, 4], [16, 2], [num_warps, 1], [1, 0])
    c_l: gl.constexpr = gl.BlockedLayout([1, 2], [16, 2], [num_warps, 1], [1, 0])
    # MODE 4: fragment layout. Each thread loads the words whose codes it holds in the A operand (rows g and
    # g + 8 of its warp's 16, word columns 2 tig + h) and the scale codes of its rows (broadcast over tig).
    fw_l: gl.constexpr = _frag_layout(BLOCK_N, num_warps, 0)
    f3_l: gl.constexpr = _frag_layout(BLOCK_N, num_warps, 1)
    fc_l: gl.constexpr = _frag_layout(BLOCK_N, num_warps, 2 if IS_NVFP4 else 3)
    acc = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, layout=mma)
    # SCALE_SMEM: the stage's scale codes converted once, cooperatively (each code by one thread instead of by the
    # four tig lanes that share its row, once per slice), into sc_bufs: bf16x2 tables double-buffered by stage parity
    sc_l: gl.constexpr = gl.BlockedLayout([1, XSUB * 2 if IS_NVFP4 else XSUB], [16, 2], [num_warps, 1], [1, 0])
    for i in range(N_STEPS):
        s = i % STAGES
        ph = (i // STAGES) & 1
        mbarrier.wait(ready.index(s), ph)
        if SCALE_SMEM:
            sc = sc_bufs.index(i % 2)
            sc.store(_bf16x2_scale(s_bufs.index(s).load(sc_l), IS_NVFP4, TWO_MUL))
            # the table is complete before any warp reads it; a warp that writes the other buffer next has passed
            # this barrier, so every warp has finished reading it (stage i - 1)
            gl.thread_barrier()
        for j in gl.static_range(XSUB):
            if MODE == 4 and IS_NVFP4 and SCALE_SMEM:
                s4 = sc.slice(4 * j, 4, dim=1).load(fc_l)  # [BLOCK_N, 4] bf16x2 scales: chunk 2 h + c
                t_lo, t_hi = gl.split(gl.reshape(s4, [BLOCK_N, 2, 2]))
                s_lo = gl.convert_layout(t_lo, gl.SliceLayout(1, f3_l), assert_trivial=True)
                s_hi = gl.convert_layout(t_hi, gl.SliceLayout(1, f3_l), assert_trivial=True)
            elif MODE == 4 and SCALE_SMEM:
                s_lo = gl.convert_layout(sc.slice(2 * j, 2, dim=1).load(fc_l), gl.SliceLayout(1, f3_l),
                                         assert_trivial=True)
                s_hi = s_lo
            elif MODE == 4 and IS_NVFP4:
                codes = s_bufs.index(s).slice(4 * j, 4, dim=1).load(fc_l)  # [BLOCK_N, 4]: chunk 2 h + c
                c_lo, c_hi = gl.split(gl.reshape(codes, [BLOCK_N, 2, 2]))  # c = 0 / 1: [BLOCK_N, 2 (h)]
                s_lo = gl.convert_layout(_bf16x2_scale(c_lo, IS_NVFP4, TWO_MUL), gl.SliceLayout(1, f3_l),
                                         assert_trivial=True)
                s_hi = gl.convert_layout(_bf16x2_scale(c_hi, IS_NVFP4, TWO_MUL), gl.SliceLayout(1, f3_l),
                                         assert_trivial=True)
            elif MODE == 4:  # MXFP4: one code per 32 (h), the same scale for both chunks of a word
                codes = s_bufs.index(s).slice(2 * j, 2, dim=1).load(fc_l)  # [BLOCK_N, 2 (h)]
                s_lo = gl.convert_layout(_bf16x2_scale(codes, IS_NVFP4, TWO_MUL), gl.SliceLayout(1, f3_l),
                                         assert_trivial=True)
                s_hi = s_lo
            if MODE == 4:
                words = gl.convert_layout(gl.reshape(w_bufs.index(s * XSUB + j).load(fw_l), [BLOCK_N, 4, 2]), f3_l,
                                          assert_trivial=True)
                s_lo, _ = gl.broadcast(gl.expand_dims(s_lo, 1), words)
                s_hi, _ = gl.broadcast(gl.expand_dims(s_hi, 1), words)
                w = _decode_frag(words, s_lo, s_hi, BLOCK_N, TWO_MUL)
            else:  # MODE 0: the float32 decode, then through shared memory into the wgmma layout
                codes = s_bufs.index(s).slice(4 * j, 4, dim=1).load(c_l)  # [BLOCK_N, 4]: the 4 blocks of this slice
                scale = gl.load(table_ptr + codes.to(gl.int32))
                scale8 = gl.convert_layout(gl.reshape(gl.join(scale, scale), [BLOCK_N, 8]), w_l)
                w = _decode_f32(w_bufs.index(s * XSUB + j).load(w_l), scale8, BLOCK_N, 8)
            a = gl.convert_layout(w, a_l)
            acc = warpgroup_mma(a, x_bufs.index(s * XSUB + j).permute((1, 0)), acc, is_async=True)
            if OVERLAP:  # the next slice decodes while this MMA runs; its A registers stay live until done
                if j == 0:
                    acc, a = warpgroup_mma_wait(num_outstanding=1, deps=(acc, a))
                else:
                    acc, prev, a = warpgroup_mma_wait(num_outstanding=1, deps=(acc, prev, a))
                prev = a
            else:
                acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
        if OVERLAP:
            acc, prev = warpgroup_mma_wait(num_outstanding=0, deps=(acc, prev))
        fence_async_shared()  # order this stage's shared reads before the loader's next TMA writes into it
        mbarrier.arrive(empty.index(s), count=1)
    return (acc,)  # a tuple: warp_specialize flattens the default partition's results


@gluon.jit
def fp4_ws_kernel(x_desc, w_desc, s_desc, table_ptr, post_ptr, bias_ptr, y_ptr, ws_ptr, cnt_ptr, M, N,
                  K: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_K: gl.constexpr,
                  SPLIT_K: gl.constexpr, STAGES: gl.constexpr, num_warps: gl.constexpr, MODE: gl.constexpr = 0,
                  TWO_MUL: gl.constexpr = True, HAS_POST: gl.constexpr = False,
                  IS_NVFP4: gl.constexpr = True, HAS_BIAS: gl.constexpr = False, PDL: gl.constexpr = 0,
                  OVERLAP: gl.constexpr = False, TILED: gl.constexpr = 0, SCALE_SMEM: gl.constexpr = False,
                  GLU: gl.constexpr = False):
    # PDL: 0 off; 1 launch_dependents first thing; 2 after this program's main loop (before the epilogue)
    XSUB: gl.constexpr = BLOCK_K // 64
    N_STEPS: gl.constexpr = ((K + BLOCK_K - 1) // BLOCK_K + SPLIT_K - 1) // SPLIT_K
    if PDL == 1:
        _gdc_launch_dependents()  # the next kernel may start launching (it waits for this one before its reads)
    pid_n = gl.program_id(0)
    pid_k = gl.program_id(1)
    n0 = pid_n * BLOCK_N
    k_lo = pid_k * N_STEPS * BLOCK_K
    NC: gl.constexpr = BLOCK_K // (16 if IS_NVFP4 else 32)
    x_bufs = gl.allocate_shared_memory(x_desc.dtype, [STAGES * XSUB, BLOCK_M, 64], x_desc.layout)
    if TILED == 2:  # WIDE: unswizzled stage buffers filled by one box each, viewed per slice by the consumer
        w_tma = gl.allocate_shared_memory(gl.int32, [STAGES, XSUB * BLOCK_N // 4, 32], w_desc.layout)
        s_tma = gl.allocate_shared_memory(gl.uint8, [STAGES, BLOCK_N * NC // 128, 128], s_desc.layout)
        w_bufs = w_tma._reinterpret(gl.int32, [STAGES * XSUB, BLOCK_N, 8], gl.NVMMASharedLayout(0, 32))
        s_bufs = s_tma._reinterpret(gl.uint8, [STAGES, BLOCK_N, NC], gl.NVMMASharedLayout(0, 8))
    else:
        w_bufs = gl.allocate_shared_memory(gl.int32, [STAGES * XSUB, BLOCK_N, 8], w_desc.layout)
        s_bufs = gl.allocate_shared_memory(gl.uint8, [STAGES, BLOCK_N, NC], s_desc.layout)
        w_tma = w_bufs
        s_tma = s_bufs
    SC: gl.constexpr = SCALE_SMEM and MODE == 4
    if SC:  # the consumer's bf16x2 scale tables, two stages
        sc_bufs = gl.allocate_shared_memory(gl.int32, [2, BLOCK_N, BLOCK_K // (16 if IS_NVFP4 else 32)],
                                            gl.SwizzledSharedLayout(1, 1, 1, order=[1, 0]))
    else:
        sc_bufs = s_bufs
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(ready.index(i), count=1)
        mbarrier.init(empty.index(i), count=1)
    res = gl.warp_specialize([
        (_consumer, (w_bufs, x_bufs, s_bufs, sc_bufs, ready, empty, table_ptr, N_STEPS, STAGES, XSUB, BLOCK_N, BLOCK_M, MODE,
                     TWO_MUL, IS_NVFP4, num_warps, OVERLAP, SC)),
        (_loader, (x_desc, w_desc, s_desc, w_tma, x_bufs, s_tma, ready, empty, n0, k_lo, N_STEPS, STAGES, XSUB, BLOCK_K,
                   16 if IS_NVFP4 else 32, PDL > 0, TILED, BLOCK_N, K)),
    ], [1], [24])
    acc = res[0]
    if PDL == 2:
        _gdc_launch_dependents()
    # epilogue, all warps: y = acc * post (+ bias), with split K through the workspace and a ticket per tile
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, BLOCK_M, 16])
    if HAS_POST:  # the per-tensor factor the pair decodes leave out (NVFP4: 1 / global scale)
        acc = acc * gl.load(post_ptr)
    rows = n0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, mma))
    cols = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, mma))
    off = cols[None, :] * N + rows[:, None]  # y is [M, N]: the tile is stored transposed
    mask = (cols[None, :] < M) & (rows[:, None] < N)
    if SPLIT_K > 1:
        # this split's partial to ws[pid_k]; the last split of the tile to arrive sums the partials in split
        # order (deterministic), writes y and resets the ticket for the next launch (fp4_gemm._splitk_store)
        gl.store(ws_ptr + pid_k * M * N + off, acc, mask=mask)
        gl.thread_barrier()  # every thread's partial is written before the ticket is taken
        ticket = gl.atomic_add(cnt_ptr + pid_n, 1, sem="acq_rel")
        if ticket == SPLIT_K - 1:
            acc = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, layout=mma)
            for sk in range(SPLIT_K):  # a loop, not unrolled: one partial live at a time (registers)
                acc += gl.load(ws_ptr + sk * M * N + off, mask=mask, other=0.0, cache_modifier=".cg")
            if HAS_BIAS:
                acc += gl.load(bias_ptr + rows, mask=rows < N, other=0.0).to(gl.float32)[:, None]
            gl.store(y_ptr + off, acc.to(y_ptr.dtype.element_ty), mask=mask)
            gl.store(cnt_ptr + pid_n, 0)
    elif GLU:  # rows in groups of 8 gate / 8 up (fp4_glu.glu_order(group=8)); no split, no bias (the launcher)
        _glu_epilogue(acc, rows, cols, M, N, y_ptr, BLOCK_N, BLOCK_M)
    else:
        if HAS_BIAS:
            acc += gl.load(bias_ptr + rows, mask=rows < N, other=0.0).to(gl.float32)[:, None]
        gl.store(y_ptr + off, acc.to(y_ptr.dtype.element_ty), mask=mask)


@gluon.jit
def _glu_pairs(t, BLOCK_N: gl.constexpr, BLOCK_M: gl.constexpr):
    """[BLOCK_N, BLOCK_M] over rows [g 8, u 8, g 8, u 8, ...] -> (gate rows, up rows), each [BLOCK_N / 16, 8,
    BLOCK_M]. In the wgmma accumulator a thread holds rows r and r + 8 of each 16 (register bit "+8"), so
    gate i and up i sit in the same thread: the reshape, permute and split move no data."""
    return gl.split(gl.permute(gl.reshape(t, [BLOCK_N // 16, 2, 8, BLOCK_M]), [0, 2, 3, 1]))


@gluon.jit
def _glu_epilogue(acc, rows, cols, M, N, y_ptr, BLOCK_N: gl.constexpr, BLOCK_M: gl.constexpr):
    """y[m, i] = silu(gate_i) * up_i for the tile's pairs, rounded where GEMM + `silu_mul_kernel` round: gate
    and up to y's dtype (the GEMM's output cast), silu in float32 rounded (torch's silu), the product rounded.
    Pair i of interleaved row R (a gate row, R % 16 < 8) is 8 (R // 16) + R % 16; y is [M, N / 2]."""
    dt: gl.constexpr = y_ptr.dtype.element_ty
    zero = rows[:, None] * 0 + cols[None, :] * 0  # int32 [BLOCK_N, BLOCK_M] in the accumulator's layout
    gate, up = _glu_pairs(acc, BLOCK_N, BLOCK_M)
    r_g, r_u = _glu_pairs(rows[:, None] + zero, BLOCK_N, BLOCK_M)
    c_g, c_u = _glu_pairs(cols[None, :] + zero, BLOCK_N, BLOCK_M)
    gf = gate.to(dt).to(gl.float32)
    act = (gf / (1.0 + gl.exp(-gf))).to(dt).to(gl.float32)
    val = (act * up.to(dt).to(gl.float32)).to(dt)
    pair = (r_g // 16) * 8 + r_g % 16
    gl.store(y_ptr + c_g * (N // 2) + pair, val, mask=(c_g < M) & (r_g < N))


def layouts(BLOCK_N, BLOCK_M, BLOCK_K=256, BS=16):
    wl = gl.NVMMASharedLayout.get_default_for([BLOCK_N, 8], gl.int32)
    xl = gl.NVMMASharedLayout.get_default_for([BLOCK_M, 64], gl.bfloat16)
    sl = gl.NVMMASharedLayout.get_default_for([BLOCK_N, BLOCK_K // BS], gl.uint8)
    return wl, xl, sl

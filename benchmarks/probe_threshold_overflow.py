"""Probe for the threshold select's overflow tier on the GPU (issue 10: the "all ties" failure).

On the H100 the overflow tier (`_select_chunked` over the row's int16 scores) wrote nothing for rows
whose tied score is negative, while the interpreter was exact at the same sizes. Part 1 runs its
pieces (`_kth_chunked`, `_select_chunked`) alone on constructed rows, at several chunk widths and
both search steps. Part 2 checks the int16 -> "u = m + 32768" conversion on unmasked lanes (exact
on the H100 in every variant). Part 3 found the cause (H100, Triton 3.6, 2026-11-23): a masked int16
load with `other=-32768` gave -1 in half of the masked lanes (vectorised loads; CH >= 256), so they
counted as u = 32767; `other=0` plus a `where` on the mask is exact. `_load_u` now does that.

    python benchmarks/probe_threshold_overflow.py     (CPU: under TRITON_INTERPRET=1)
"""

import torch
import triton
import triton.language as tl

from fp4kit.kernels._fp4_topk import _kth_chunked, _select_chunked


@triton.jit
def _kth_kernel(m_ptr, t_ptr, count, n, CH: tl.constexpr, STEP: tl.constexpr):
    tl.store(t_ptr, _kth_chunked(m_ptr, count, n, True, CH, STEP))


@triton.jit
def _select_kernel(m_ptr, out_ptr, count, n, CH: tl.constexpr, STEP: tl.constexpr):
    _select_chunked(m_ptr, m_ptr, count, n, out_ptr, True, CH, STEP)


@triton.jit
def _conv_kernel(m_ptr, u_ptr, cnt_ptr, thr_ptr, count, CH: tl.constexpr, VARIANT: tl.constexpr):
    idx = tl.arange(0, CH)
    ok = idx < count
    if VARIANT == 0:  # sign-extend and add (the select's code)
        u = tl.load(m_ptr + idx, mask=ok, other=-32768).to(tl.int32) + 32768
    elif VARIANT == 1:  # the bit pattern: zero-extend, flip the top bit
        u = tl.load(m_ptr + idx, mask=ok, other=-32768).to(tl.uint16, bitcast=True).to(tl.int32) ^ 0x8000
    else:  # sign-extend, then mask to 16 bits and flip the top bit
        u = (tl.load(m_ptr + idx, mask=ok, other=-32768).to(tl.int32) & 0xFFFF) ^ 0x8000
    tl.store(u_ptr + idx, u, mask=ok)
    thr = tl.load(thr_ptr + tl.arange(0, 16))
    cnt = tl.sum(((u[None, :] >= thr[:, None]) & ok[None, :]).to(tl.int32), 1)
    tl.store(cnt_ptr + tl.arange(0, 16), cnt)


@triton.jit
def _loop_count_kernel(m_ptr, cnt_ptr, thr_ptr, count, CH: tl.constexpr, VARIANT: tl.constexpr):
    """cnt[j] = #(u >= thr[j]) over `count` int16 scores read CH at a time in a runtime loop."""
    for j in tl.static_range(4):
        thr = tl.load(thr_ptr + j)
        cnt = tl.zeros([], tl.int32)
        if VARIANT == 0:  # as `_kth_chunked`: runtime loop, default pipelining
            for start in range(0, count, CH):
                idx = start + tl.arange(0, CH)
                u = tl.load(m_ptr + idx, mask=idx < count, other=-32768).to(tl.int32) + 32768
                cnt += tl.sum((u >= thr).to(tl.int32), 0)
        elif VARIANT == 1:  # no software pipelining of the loop
            for start in tl.range(0, count, CH, num_stages=1):
                idx = start + tl.arange(0, CH)
                u = tl.load(m_ptr + idx, mask=idx < count, other=-32768).to(tl.int32) + 32768
                cnt += tl.sum((u >= thr).to(tl.int32), 0)
        elif VARIANT == 2:  # mask in the compare instead of the load's `other`
            for start in range(0, count, CH):
                idx = start + tl.arange(0, CH)
                u = tl.load(m_ptr + idx, mask=idx < count, other=0).to(tl.int32) + 32768
                cnt += tl.sum(((u >= thr) & (idx < count)).to(tl.int32), 0)
        else:  # no loop: one chunk
            idx = tl.arange(0, CH)
            u = tl.load(m_ptr + idx, mask=idx < count, other=-32768).to(tl.int32) + 32768
            cnt += tl.sum((u >= thr).to(tl.int32), 0)
        tl.store(cnt_ptr + j, cnt)


def main():
    dev = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: run under TRITON_INTERPRET=1
    count, n, lo, hi = 128, 6, 3, 50
    print("part 1: the overflow tier's pieces", flush=True)
    for sign in (1, -1):
        m = torch.full((count,), -32768, dtype=torch.int16, device=dev)
        m[lo:hi] = 16000 * sign
        want_t = int(m[lo]) + 32768
        for ch, warps in ((4096, 8), (1024, 4), (256, 4), (64, 4)):
            for step in (4, 1):
                t = torch.full((1,), -1, dtype=torch.int32, device=dev)
                _kth_kernel[(1,)](m, t, count, n, CH=ch, STEP=step, num_warps=warps)
                out = torch.full((n,), -7, dtype=torch.int64, device=dev)
                _select_kernel[(1,)](m, out, count, n, CH=ch, STEP=step, num_warps=warps)
                ok = int(t) == want_t and out.tolist() == list(range(lo, lo + n))
                print(f"sign {sign:+d} CH {ch:4d} step {step}: t {int(t)} (want {want_t}) "
                      f"out {out.tolist()} {'ok' if ok else 'WRONG'}", flush=True)
    print("part 2: int16 -> u conversions", flush=True)
    g = torch.Generator().manual_seed(0)
    count = 100
    m = torch.randint(-32768, 32768, (count,), generator=g).to(torch.int16).to(dev)
    want_u = m.to(torch.int32) + 32768
    thr = torch.arange(16, dtype=torch.int32, device=dev) * 4096
    want_cnt = (want_u[None, :] >= thr[:, None]).sum(1).to(torch.int32)
    for ch, warps in ((4096, 8), (1024, 4), (256, 4), (128, 4)):
        for variant in (0, 1, 2):
            u = torch.empty(count, dtype=torch.int32, device=dev)
            cnt = torch.empty(16, dtype=torch.int32, device=dev)
            _conv_kernel[(1,)](m, u, cnt, thr, count, CH=ch, VARIANT=variant, num_warps=warps)
            print(f"CH {ch:4d} variant {variant}: u {'ok' if torch.equal(u, want_u) else 'WRONG'} "
                  f"({int((u != want_u).sum())} differ), counts {'ok' if torch.equal(cnt, want_cnt) else 'WRONG'} "
                  f"{cnt.tolist() if not torch.equal(cnt, want_cnt) else ''}", flush=True)


def loops():
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    print("part 3: the counting loop", flush=True)
    count = 128
    m = torch.full((count,), -32768, dtype=torch.int16, device=dev)
    m[3:50] = -16000
    thr = torch.tensor([32768, 24576, 16768, 16769], dtype=torch.int32, device=dev)
    want = [0, 0, 47, 0]
    for ch, warps in ((4096, 8), (256, 4)):
        for variant in (0, 1, 2, 3):
            cnt = torch.full((4,), -1, dtype=torch.int32, device=dev)
            _loop_count_kernel[(1,)](m, cnt, thr, count, CH=ch, VARIANT=variant, num_warps=warps)
            print(f"CH {ch:4d} variant {variant}: counts {cnt.tolist()} (want {want}) "
                  f"{'ok' if cnt.tolist() == want else 'WRONG'}", flush=True)


if __name__ == "__main__":
    main()
    loops()
    main()

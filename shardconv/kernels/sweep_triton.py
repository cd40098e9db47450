"""Fused Triton kernels for the data-free scale searches of ``shardconv/sweep.py``.

Each program takes ``BPP`` blocks of 16 elements, one block per lane, and keeps the 16 values of a
block in 16 registers (``w0``..``w15``), so every quantity is a 1-D vector over blocks and the 16
squared errors are added in the reference's fixed order (adjacent pairs first) by plain code.
fp32 arithmetic matches the torch reference operation by operation: ``div_rn`` for the one true
division, launches with ``enable_fp_fusion=False`` (no multiply-add contraction), and e2m1 / e4m3
rounding done with exact add-and-subtract or integer tricks that equal torch's round-to-nearest-even
(tested against the reference on the GPU).

- MSE (FP8 scale sweep): the windowed search of ``sweep.mse_choice_windowed`` (about 20 of the
  126 candidates per block; nothing of size blocks x candidates is ever stored). The blocks it
  cannot settle (well under 1%) are appended to a list through an atomic counter, and a second
  launch (a grid-stride loop over that list) tries all 126 candidates for them: no host
  synchronisation.
- Four-over-six: both candidates of every block in one pass.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import sweep

BLOCKS_PER_PROGRAM = 128
NUM_WARPS = 4
FULL_BPP = 64  # the full search runs on few blocks: small tiles, so they spread over the SMs
FULL_PROGRAMS = 1024
# sweep.py's constants, as Triton reads globals (they must be constexpr): one definition for both
_N = tl.constexpr(sweep.N_CANDIDATES)
_LOW_END = tl.constexpr(sweep.LOW_END)
_BINADE = tl.constexpr(sweep.BINADE)
_AHEAD = tl.constexpr(sweep.WINDOW_AHEAD)
_MARGIN = tl.constexpr(sweep.MARGIN)


@triton.jit
def _sq_err(w, s):
    """fp32 squared error of |w| quantized to e2m1 with scale s (w >= 0, s > 0)."""
    t = tl.math.div_rn(w, s)
    # round t to {0,.5,1,1.5,2,3,4,6}, ties to even: adding 2**22 / 2**23 / 2**24 leaves steps of
    # 0.5 / 1 / 2 below 2 / 4 / 6, and the fp32 add rounds to the nearest step, ties to even
    magic = tl.where(t < 2.0, 4194304.0, tl.where(t < 4.0, 8388608.0, 16777216.0))
    q = (tl.minimum(t, 6.0) + magic) - magic
    d = w - q * s
    return d * d


@triton.jit
def _loss16(w0, w1, w2, w3, w4, w5, w6, w7, w8, w9, w10, w11, w12, w13, w14, w15, s):
    """Sum of the 16 squared errors, adjacent pairs first (= sweep.tree_sum16)."""
    a = (_sq_err(w0, s) + _sq_err(w1, s)) + (_sq_err(w2, s) + _sq_err(w3, s))
    b = (_sq_err(w4, s) + _sq_err(w5, s)) + (_sq_err(w6, s) + _sq_err(w7, s))
    c = (_sq_err(w8, s) + _sq_err(w9, s)) + (_sq_err(w10, s) + _sq_err(w11, s))
    d = (_sq_err(w12, s) + _sq_err(w13, s)) + (_sq_err(w14, s) + _sq_err(w15, s))
    return (a + b) + (c + d)


@triton.jit
def _sumsq16(w0, w1, w2, w3, w4, w5, w6, w7, w8, w9, w10, w11, w12, w13, w14, w15):
    a = (w0 * w0 + w1 * w1) + (w2 * w2 + w3 * w3)
    b = (w4 * w4 + w5 * w5) + (w6 * w6 + w7 * w7)
    c = (w8 * w8 + w9 * w9) + (w10 * w10 + w11 * w11)
    d = (w12 * w12 + w13 * w13) + (w14 * w14 + w15 * w15)
    return (a + b) + (c + d)


@triton.jit
def _max16(w0, w1, w2, w3, w4, w5, w6, w7, w8, w9, w10, w11, w12, w13, w14, w15):
    return tl.maximum(tl.maximum(tl.maximum(tl.maximum(w0, w1), tl.maximum(w2, w3)),
                                 tl.maximum(tl.maximum(w4, w5), tl.maximum(w6, w7))),
                      tl.maximum(tl.maximum(tl.maximum(w8, w9), tl.maximum(w10, w11)),
                                 tl.maximum(tl.maximum(w12, w13), tl.maximum(w14, w15))))


@triton.jit
def _load_abs(base, mask):
    return tl.abs(tl.load(base, mask=mask, other=0.0).to(tl.float32))


@triton.jit
def _load16(x_ptr, blk, mask):
    base = x_ptr + blk * 16
    return (_load_abs(base + 0, mask), _load_abs(base + 1, mask), _load_abs(base + 2, mask),
            _load_abs(base + 3, mask), _load_abs(base + 4, mask), _load_abs(base + 5, mask),
            _load_abs(base + 6, mask), _load_abs(base + 7, mask), _load_abs(base + 8, mask),
            _load_abs(base + 9, mask), _load_abs(base + 10, mask), _load_abs(base + 11, mask),
            _load_abs(base + 12, mask), _load_abs(base + 13, mask), _load_abs(base + 14, mask),
            _load_abs(base + 15, mask))


@triton.jit
def _mse_window_kernel(x_ptr, scale_ptr, six_ptr, exact_ptr, k_ptr, count_ptr, todo_ptr, n_blocks, bpg,
                       BPP: tl.constexpr):
    """Windowed search (sweep.mse_choice_windowed); flagged blocks are appended to todo. Block ``b``
    belongs to group ``b // bpg``, whose 126 candidate scales start at ``scale_ptr + group * 126``;
    every block of a group whose ``exact`` flag is 0 (the doubling argument fails) is flagged."""
    blk = tl.program_id(0).to(tl.int64) * BPP + tl.arange(0, BPP)
    mask = blk < n_blocks
    table = (blk // bpg) * _N
    w0, w1, w2, w3, w4, w5, w6, w7, w8, w9, w10, w11, w12, w13, w14, w15 = _load16(x_ptr, blk, mask)
    m = _max16(w0, w1, w2, w3, w4, w5, w6, w7, w8, w9, w10, w11, w12, w13, w14, w15)
    sumsq = _sumsq16(w0, w1, w2, w3, w4, w5, w6, w7, w8, w9, w10, w11, w12, w13, w14, w15)
    # k0: first candidate with 6 s_k >= m (from there on, doubling a scale never helps)
    lo = tl.zeros([BPP], dtype=tl.int32)
    hi = tl.full([BPP], _N, dtype=tl.int32)
    for _ in tl.static_range(7):
        active = lo < hi
        mid = (lo + hi) // 2
        v = tl.load(six_ptr + table + mid, mask=active, other=0.0)
        lo = tl.where(active & (v < m), mid + 1, lo)
        hi = tl.where(active & (v >= m), mid, hi)
    k0 = lo
    s0 = tl.load(scale_ptr + table + tl.minimum(k0, _N - 1), mask=mask, other=1.0)
    upper = _loss16(w0, w1, w2, w3, w4, w5, w6, w7, w8, w9, w10, w11, w12, w13, w14, w15, s0)
    # k_lo: first candidate below k0 whose clipped max element alone does not exceed upper
    lo = tl.zeros([BPP], dtype=tl.int32)
    hi = k0
    for _ in tl.static_range(7):
        active = lo < hi
        mid = (lo + hi) // 2
        d = m - tl.load(six_ptr + table + mid, mask=active, other=0.0)
        lo = tl.where(active & (d * d > upper), mid + 1, lo)
        hi = tl.where(active & (d * d <= upper), mid, hi)
    k_lo = lo
    k_end = tl.minimum(tl.maximum(k0 + _AHEAD, _LOW_END), _N)
    best = tl.full([BPP], float("inf"), tl.float32)
    best_k = k_lo
    bound = tl.full([BPP], float("inf"), tl.float32)
    n_iter = tl.max(k_end - k_lo, axis=0)
    for i in range(0, n_iter):
        k = k_lo + i
        valid = k < k_end
        s = tl.load(scale_ptr + table + k, mask=valid & mask, other=1.0)
        loss = _loss16(w0, w1, w2, w3, w4, w5, w6, w7, w8, w9, w10, w11, w12, w13, w14, w15, s)
        loss = tl.where(valid, loss, float("inf"))
        better = loss < best
        best = tl.where(better, loss, best)
        best_k = tl.where(better, k, best_k)
        top = valid & (k >= k_end - _BINADE) & (k + _BINADE < _N)
        bound = tl.where(top, tl.minimum(bound, loss * (1.0 - _MARGIN) - _MARGIN * sumsq), bound)
    tl.store(k_ptr + blk, best_k, mask=mask)
    exact = tl.load(exact_ptr + blk // bpg, mask=mask, other=1)
    flagged = mask & ((bound < best) | (exact == 0))
    slot = tl.atomic_add(count_ptr + tl.zeros([BPP], dtype=tl.int32), 1, mask=flagged)
    tl.store(todo_ptr + slot, blk, mask=flagged)


@triton.jit
def _mse_full_kernel(x_ptr, scale_ptr, k_ptr, count_ptr, todo_ptr, bpg, BPP: tl.constexpr):
    """All 126 candidates for the blocks listed in todo (a grid-stride loop over the list)."""
    count = tl.load(count_ptr)
    for start in range(tl.program_id(0) * BPP, count, tl.num_programs(0) * BPP):
        idx = start + tl.arange(0, BPP)
        valid = idx < count
        blk = tl.load(todo_ptr + idx, mask=valid, other=0)
        w0, w1, w2, w3, w4, w5, w6, w7, w8, w9, w10, w11, w12, w13, w14, w15 = _load16(x_ptr, blk, valid)
        best = tl.full([BPP], float("inf"), tl.float32)
        best_k = tl.zeros([BPP], dtype=tl.int32)
        table = (blk // bpg) * _N
        for k in range(0, _N):
            s = tl.load(scale_ptr + table + k, mask=valid, other=1.0)
            loss = _loss16(w0, w1, w2, w3, w4, w5, w6, w7, w8, w9, w10, w11, w12, w13, w14, w15, s)
            better = loss < best
            best = tl.where(better, loss, best)
            best_k = tl.where(better, k, best_k)
        tl.store(k_ptr + blk, best_k, mask=valid)


@triton.jit
def _e4m3_rne(x):
    """x in [0, 448] rounded to the nearest e4m3 value, ties to even (as a .to(float8_e4m3fn))."""
    sub = (x + 16384.0) - 16384.0  # below 2**-6: steps of 2**-9
    bits = x.to(tl.uint32, bitcast=True)
    bits = ((bits + 0x7FFFF + ((bits >> 20) & 1)) >> 20) << 20  # round to 3 mantissa bits, ties to even
    return tl.where(x < 0.015625, sub, bits.to(tl.float32, bitcast=True))


@triton.jit
def _fos_loss(w0, w1, w2, w3, w4, w5, w6, w7, w8, w9, w10, w11, w12, w13, w14, w15, a, up, down, zero_loss):
    x = tl.minimum(tl.math.div_rn(a, 6.0) * up, 448.0)
    s = _e4m3_rne(x) * down
    loss = _loss16(w0, w1, w2, w3, w4, w5, w6, w7, w8, w9, w10, w11, w12, w13, w14, w15,
                   tl.where(s == 0.0, 1.0, s))
    return tl.where(s == 0.0, zero_loss, loss)


@triton.jit
def _four_over_six_kernel(x_ptr, par_ptr, out_ptr, n_blocks, bpg, BPP: tl.constexpr):
    """Block ``b`` belongs to group ``b // bpg``, whose (up, down) factors are at ``par_ptr + 2 * group``."""
    blk = tl.program_id(0).to(tl.int64) * BPP + tl.arange(0, BPP)
    mask = blk < n_blocks
    par = (blk // bpg) * 2
    up = tl.load(par_ptr + par, mask=mask, other=1.0)
    down = tl.load(par_ptr + par + 1, mask=mask, other=1.0)
    w0, w1, w2, w3, w4, w5, w6, w7, w8, w9, w10, w11, w12, w13, w14, w15 = _load16(x_ptr, blk, mask)
    m = _max16(w0, w1, w2, w3, w4, w5, w6, w7, w8, w9, w10, w11, w12, w13, w14, w15)
    zero_loss = _sumsq16(w0, w1, w2, w3, w4, w5, w6, w7, w8, w9, w10, w11, w12, w13, w14, w15)
    a4 = m * 1.5
    loss_6 = _fos_loss(w0, w1, w2, w3, w4, w5, w6, w7, w8, w9, w10, w11, w12, w13, w14, w15,
                       m, up, down, zero_loss)
    loss_4 = _fos_loss(w0, w1, w2, w3, w4, w5, w6, w7, w8, w9, w10, w11, w12, w13, w14, w15,
                       a4, up, down, zero_loss)
    tl.store(out_ptr + blk, tl.where(loss_4 < loss_6, a4, m), mask=mask)


def _grid(n: int, bpp: int):
    return (triton.cdiv(n, bpp),)


def _mse_launch(blocks: torch.Tensor, scales: torch.Tensor, exact: torch.Tensor, bpp: int, num_warps: int):
    """``scales``: [G, 126] candidate scales; ``exact``: [G] bools; ``blocks`` [G * bpg, 16]."""
    x = blocks.contiguous()
    n = x.shape[0]
    bpg = max(1, n // scales.shape[0])
    k = torch.empty(n, dtype=torch.int32, device=x.device)
    count = torch.zeros(1, dtype=torch.int32, device=x.device)
    todo = torch.empty(n, dtype=torch.int64, device=x.device)
    if n:
        _mse_window_kernel[_grid(n, bpp)](x, scales, scales * 6.0, exact.to(torch.int8), k, count, todo, n, bpg,
                                          BPP=bpp, num_warps=num_warps, enable_fp_fusion=False)
    return x, k, count, todo, bpg


def _mse_search(blocks: torch.Tensor, scales: torch.Tensor, exact: torch.Tensor, bpp: int, num_warps: int):
    x, k, count, todo, bpg = _mse_launch(blocks, scales, exact, bpp, num_warps)
    if x.shape[0]:
        grid = (min(triton.cdiv(x.shape[0], FULL_BPP), FULL_PROGRAMS),)
        _mse_full_kernel[grid](x, scales, k, count, todo, bpg, BPP=FULL_BPP, num_warps=2,
                               enable_fp_fusion=False)
    return k.long()


def mse_choice(blocks: torch.Tensor, global_amax: torch.Tensor, *, bpp: int = BLOCKS_PER_PROGRAM,
               num_warps: int = NUM_WARPS) -> torch.Tensor:
    """Candidate index (int64, 0..125) per block of ``blocks [N, 16]`` (CUDA, any float dtype)."""
    scales = sweep.window_scales(global_amax, blocks.device)
    if scales is None:  # only for absurd g (subnormal or overflowing scales)
        return sweep.mse_choice_reference(blocks.float().abs(), global_amax)
    return _mse_search(blocks, scales.reshape(1, -1), torch.ones(1, dtype=torch.bool, device=blocks.device),
                       bpp, num_warps)


def mse_choice_groups(blocks: torch.Tensor, global_amax: torch.Tensor, *, bpp: int = BLOCKS_PER_PROGRAM,
                      num_warps: int = NUM_WARPS) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`mse_choice` for ``G`` groups at once, without a host synchronisation: ``blocks`` are
    ``[G * n, 16]`` (group g's blocks contiguous), ``global_amax`` ``[G]``. Returns the indices and,
    per group, whether they are exact (False only for absurd g, where the caller must redo the group
    with :func:`sweep.mse_choice`: every block of such a group went through the full search)."""
    scales = sweep.candidate_scales_groups(global_amax.to(blocks.device))
    exact = sweep.doubling_holds_groups(scales)
    return _mse_search(blocks, scales, exact, bpp, num_warps), exact


def mse_flagged(blocks: torch.Tensor, global_amax: torch.Tensor, *, bpp: int = BLOCKS_PER_PROGRAM) -> int:
    """How many blocks the windowed pass hands to the full search (tests and the benchmark)."""
    scales = sweep.candidate_scales(global_amax.float().reshape(()).to(blocks.device))
    exact = torch.ones(1, dtype=torch.bool, device=blocks.device)
    return int(_mse_launch(blocks, scales.reshape(1, -1), exact, bpp, NUM_WARPS)[2])


def four_over_six_amax(blocks: torch.Tensor, global_amax: torch.Tensor, *, bpp: int = BLOCKS_PER_PROGRAM,
                       num_warps: int = NUM_WARPS) -> torch.Tensor:
    """Per-block static amax (fp32 ``[N]``): the block max, or 1.5 times it where that wins.
    ``global_amax``: one value, or ``[G]`` for ``G`` groups of ``N / G`` contiguous blocks each."""
    g = global_amax.float().reshape(-1).to(blocks.device)
    params = torch.stack(sweep.four_over_six_factors(g), dim=-1).contiguous()  # [G, 2]
    x = blocks.contiguous()
    n = x.shape[0]
    out = torch.empty(n, dtype=torch.float32, device=x.device)
    if n:
        _four_over_six_kernel[_grid(n, bpp)](x, params, out, n, max(1, n // g.numel()), BPP=bpp,
                                             num_warps=num_warps, enable_fp_fusion=False)
    return out

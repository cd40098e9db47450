"""Data-free weight calibrations that choose each block's static amax (FORMAT.md §2).

- ``mse``: ModelOpt's MSE calibration with the FP8 scale sweep. Candidate ``k`` (the e4m3 value
  ``v_k`` of byte ``k + 1``, 126 of them) has amax ``a_k = g * (v_k / 448)`` and scale
  ``s_k = a_k / 6``; its loss is ``sum((|w| - e2m1(|w| / s_k) * s_k) ** 2)`` in fp32 over the 16
  elements; the first strict minimum wins and the block stores ``a_b = a_k``, so the static export
  formula writes byte ``k + 1``. ``g`` (the fusion group's max |W|) is never changed.
- ``four-over-six``: per block, amax ``m`` (the block max) or ``m * 1.5``, whichever quantizes
  with the lower squared error (tie: ``m``), with block scales normalised by 256 instead of 448
  (``weight_scale_2 = g / 1536``). The error is computed as ModelOpt's calibration does: the
  block scale ``a / 6`` rounded to e4m3 at the 256 normalisation, then the e2m1 round trip.

Everything here is plain torch with one rounding per fp32 operation, so CPU and CUDA choose the same
candidates. The 16 squared errors of a block are added in a fixed order (adjacent pairs first,
:func:`tree_sum16`), which the Triton kernels (``kernels/sweep_triton.py``) repeat.

Two torch implementations of the MSE choice: :func:`mse_choice_reference` tries all 126
candidates (the definition), :func:`mse_choice_windowed` evaluates only the candidates that can win
(below) and flags the blocks where it cannot prove that; :func:`mse_choice` combines them and is
what conversions use on the CPU. On CUDA with Triton, the fused kernel runs the windowed search.

Why a window suffices (all candidates of one tensor share ``g``, hence the scales ``s_k``):

1. Clipped side: for ``6 s_k < m`` the block's max element is written as ``6 s_k``, so the
   computed loss is at least that element's own term ``fl(fl(m - fl(6 s_k))^2)`` (fp32 sums of
   non-negative terms never drop below a term). Once that exceeds the loss ``U`` of a candidate
   already evaluated, the candidate and every smaller one lose: no error margin is needed.
2. Doubled side: ``s_{k+8} = 2 s_k`` exactly for normal e4m3 values (checked per tensor). When
   ``|w| <= 7 s`` for every element, the grid ``{0,1,2,3,4,6} * 2s`` is a subset of
   ``{0,.5,1,1.5,2,3,4,6} * s`` as far as those elements can reach, so the exact loss at ``2s`` is
   never below the exact loss at ``s``. Candidates ``k >= k_end`` are reached from
   ``[k_end - 8, k_end)`` by doubling; they are skipped when that candidate's fp32 loss, less a
   margin far above fp32 rounding (``1e-5`` relative plus ``1e-5 * sum(w^2)``), is still at
   least the best loss found (ties go to the smaller index, which the window holds). Otherwise
   the block is flagged and the reference decides it.
"""

from __future__ import annotations

import os

import torch

from . import numerics as nx

METHODS = ("mse", "four-over-six")
N_CANDIDATES = 126
FOUR_OVER_SIX_NORM = 256.0  # e4m3 value the per-tensor scale maps g / 6 to (448 for the others)
FOUR_OVER_SIX_MULT = 1.5  # the second candidate amax: m * 1.5 (the block's max lands on 4, not 6)
STEP_BLOCKS = 1 << 16  # blocks per torch step: temporaries stay around 4 MB
MARGIN = 1e-5  # relative and sum(w^2)-relative slack of the doubling bound (fp32 error is < 2e-6)
LOW_END = 23  # the window reaches at least this index: [15, 23) is the first binade of normals
BINADE = 8  # candidates per binade (e4m3 has 3 mantissa bits): s_{k+8} = 2 s_k
WINDOW_AHEAD = 2 * BINADE  # the window ends this many candidates past k0
E2M1_MAGNITUDES = torch.tensor(nx.E2M1_VALUES, dtype=torch.float32)


def candidate_values(device=None) -> torch.Tensor:
    """The 126 positive finite e4m3 values (bytes 0x01..0x7E), ascending, as fp32."""
    return torch.arange(1, N_CANDIDATES + 1, dtype=torch.uint8, device=device).view(torch.float8_e4m3fn).float()


def candidate_amax(global_amax: torch.Tensor) -> torch.Tensor:
    """``a_k = g * (v_k / 448)`` in fp32 (the value the static export turns back into byte k+1)."""
    g = global_amax.float().reshape(())
    return nx.true_div(candidate_values(g.device), nx.FP8_MAX) * g


def candidate_scales(global_amax: torch.Tensor) -> torch.Tensor:
    """``s_k = a_k / 6``; a zero scale (g == 0) is replaced by 1.0, as ModelOpt's sweep does."""
    s = nx.true_div(candidate_amax(global_amax), nx.FP4_MAX)
    return torch.where(s == 0, torch.ones_like(s), s)


def tree_sum16(x: torch.Tensor) -> torch.Tensor:
    """Sum over the last dimension (16) in a fixed order: adjacent pairs, then pairs of pairs, ..."""
    while x.shape[-1] > 1:
        x = x[..., 0::2] + x[..., 1::2]
    return x[..., 0]


def e2m1_magnitude(t: torch.Tensor) -> torch.Tensor:
    """t (>= 0) rounded to the e2m1 grid {0, .5, 1, 1.5, 2, 3, 4, 6} (ties to even, saturating)."""
    codes = nx.e2m1_codes(t)  # t >= 0 here: no sign bit
    return E2M1_MAGNITUDES.to(t.device)[codes.long()]


_EXPONENT_BITS = 0x7F800000  # of an fp32


def e2m1_magnitude_fast(t: torch.Tensor) -> torch.Tensor:
    """:func:`e2m1_magnitude` as the kernels compute it (same values for every fp32 t >= 0): adding
    2**22, 2**23 or 2**24 (below 2, 4, above) leaves steps of 0.5, 1 or 2, and the fp32 add rounds to
    the nearest step, ties to even.

    The power of two is the exponent of ``clamp(t, 1, 4)`` (its fp32 bits with the mantissa masked
    off: 1, 2 or 4) times 2**22, three cheap passes where two nested ``where`` took a third of the
    CPU search's time."""
    return _e2m1_fast_(t.clone())


def _e2m1_fast_(t: torch.Tensor) -> torch.Tensor:
    """:func:`e2m1_magnitude_fast` in place on ``t`` (fewer temporaries in the CPU search's loop)."""
    magic = (t.clamp(1.0, 4.0).view(torch.int32) & _EXPONENT_BITS).view(torch.float32).mul_(2.0**22)
    return t.clamp_(max=nx.FP4_MAX).add_(magic).sub_(magic)


def block_loss(absw: torch.Tensor, scale: torch.Tensor, fast: bool = False) -> torch.Tensor:
    """fp32 squared error of each block ``[N, 16]`` quantized with ``scale`` (``[N]`` or scalar)."""
    s = scale.reshape(-1, 1) if scale.dim() else scale
    t = absw / s
    q = _e2m1_fast_(t) if fast else e2m1_magnitude(t)
    d = torch.sub(absw, q.mul_(s), out=q)
    return tree_sum16(d.mul_(d))


def _blocks(weight: torch.Tensor) -> torch.Tensor:
    return weight.reshape(-1, nx.BLOCK)


def _steps(n: int):
    for start in range(0, n, STEP_BLOCKS):
        yield slice(start, min(n, start + STEP_BLOCKS))


# ----------------------------------------------------------------------------------------------
# MSE: FP8 scale sweep
# ----------------------------------------------------------------------------------------------
def mse_choice_reference(absw: torch.Tensor, global_amax: torch.Tensor) -> torch.Tensor:
    """Index (0..125) of the first strict minimum over all 126 candidates, for blocks ``[N, 16]``."""
    absw = absw.float()
    scales = candidate_scales(global_amax.to(absw.device))
    best = torch.full(absw.shape[:1], float("inf"), device=absw.device)
    best_k = torch.zeros(absw.shape[:1], dtype=torch.int64, device=absw.device)
    for k in range(N_CANDIDATES):
        loss = block_loss(absw, scales[k])
        better = loss < best
        best = torch.where(better, loss, best)
        best_k[better] = k
    return best_k


def candidate_scales_groups(global_amax: torch.Tensor) -> torch.Tensor:
    """:func:`candidate_scales` of each of ``G`` global amax, ``[G, 126]`` (the same fp32 operations)."""
    g = global_amax.float().reshape(-1, 1)
    s = nx.true_div(candidate_values(g.device), nx.FP8_MAX) * g
    s = nx.true_div(s, nx.FP4_MAX)
    return torch.where(s == 0, torch.ones_like(s), s)


def doubling_holds_groups(scales: torch.Tensor) -> torch.Tensor:
    """:func:`doubling_holds` per row of ``[G, 126]`` scales, as a device bool ``[G]`` (no host read)."""
    return (torch.isfinite(scales).all(dim=1) & (scales[:, 0] > 2.0**-126)
            & (scales[:, 15:] == scales[:, 15 - BINADE:-BINADE] * 2).all(dim=1))


def doubling_holds(scales: torch.Tensor) -> bool:
    """Whether ``s_{k+8} == 2 s_k`` exactly over the normal candidates (false only for absurd g)."""
    return bool(torch.isfinite(scales).all() and (scales[0] > 2.0**-126)
                and torch.equal(scales[15:], scales[15 - BINADE:-BINADE] * 2))


def window_scales(global_amax: torch.Tensor, device) -> torch.Tensor | None:
    """The candidate scales on ``device`` when the windowed search may be used for them (the
    doubling argument holds), else None: then only the full search is exact. Reads them on the host."""
    scales = candidate_scales(global_amax.float().reshape(()).to(device))
    return scales if doubling_holds(scales) else None


def _first_false(pred, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """First index in [lo, hi] where the monotone (true-then-false) predicate is false (7 halvings)."""
    lo, hi = lo.clone(), hi.clone()
    for _ in range(7):  # ranges hold at most 127 indices
        active = lo < hi
        mid = (lo + hi) // 2
        go = active & pred(mid.clamp(max=N_CANDIDATES - 1))
        lo = torch.where(go, mid + 1, lo)
        hi = torch.where(active & ~go, mid, hi)
    return lo


def mse_choice_windowed(absw: torch.Tensor, global_amax: torch.Tensor,
                        scales: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's choice from a few candidates per block: ``(index, flagged)``.

    Flagged blocks (rare) are those where the window cannot be proven to hold the answer; their
    index is not meaningful. See the module docstring for the argument. Needs
    :func:`doubling_holds` for the tensor's scales; ``scales``, when given, are
    :func:`window_scales`' (not computed again).
    """
    absw = absw.float()
    dev = absw.device
    scales = candidate_scales(global_amax.to(dev)) if scales is None else scales
    six = scales * nx.FP4_MAX
    m = absw.amax(dim=-1)
    w2 = (absw * absw).sum(dim=-1)
    zero = torch.zeros_like(m, dtype=torch.int64)
    k0 = _first_false(lambda k: six[k] < m, zero, torch.full_like(zero, N_CANDIDATES))
    upper = block_loss(absw, scales[k0.clamp(max=N_CANDIDATES - 1)], fast=True)

    def clipped_loses(k):
        d = m - six[k]
        return d * d > upper

    k_lo = _first_false(clipped_loses, zero, k0)
    k_end = (k0 + WINDOW_AHEAD).clamp(min=LOW_END, max=N_CANDIDATES)
    best = torch.full_like(m, float("inf"))
    best_k = k_lo.clone()
    bound = torch.full_like(m, float("inf"))
    for i in range(int((k_end - k_lo).max()) if m.numel() else 0):
        k = k_lo + i
        valid = k < k_end
        loss = block_loss(absw, scales[k.clamp(max=N_CANDIDATES - 1)], fast=True)
        loss = torch.where(valid, loss, torch.full_like(loss, float("inf")))
        better = loss < best
        best = torch.where(better, loss, best)
        best_k = torch.where(better, k, best_k)
        top = valid & (k >= k_end - BINADE) & (k + BINADE < N_CANDIDATES)  # doubling continues past the window
        slack = loss * (1 - MARGIN) - MARGIN * w2
        bound = torch.where(top, torch.minimum(bound, slack), bound)
    return best_k, bound < best


def mse_choice(absw: torch.Tensor, global_amax: torch.Tensor) -> torch.Tensor:
    """The reference's choice (index 0..125 per block), computed through the window when it can."""
    absw = absw.float()
    scales = None if os.environ.get("SHARDCONV_SWEEP") == "reference" else window_scales(global_amax, absw.device)
    if scales is None:
        return mse_choice_reference(absw, global_amax)
    k, flagged = mse_choice_windowed(absw, global_amax, scales)
    if flagged.any():
        idx = flagged.nonzero().squeeze(1)
        k[idx] = mse_choice_reference(absw[idx], global_amax)
    return k


def _per_block(weight: torch.Tensor, global_amax: torch.Tensor, kernel_fn, torch_fn, dtype) -> torch.Tensor:
    """One value per 16-element block of ``weight`` (flat ``[n_blocks]``): ``kernel_fn(kernels, blocks, g)``
    where the Triton kernels serve this weight, else ``torch_fn(|blocks|, g)`` a step of blocks at a time."""
    g = global_amax.float().reshape(()).to(weight.device)
    blocks = _blocks(weight)
    kernel = _kernel(weight)
    if kernel is not None:
        return kernel_fn(kernel, blocks, g)
    out = torch.empty(blocks.shape[0], dtype=dtype, device=weight.device)
    for rows in _steps(blocks.shape[0]):
        out[rows] = torch_fn(blocks[rows].float().abs(), g)
    return out


def _per_block_shape(weight: torch.Tensor) -> tuple[int, ...]:
    return (*weight.shape[:-1], weight.shape[-1] // nx.BLOCK)


def mse_block_amax(weight: torch.Tensor, global_amax: torch.Tensor) -> torch.Tensor:
    """Static per-block amax ``[..., in/16]`` chosen by the FP8 scale sweep (fp32, weight's device)."""
    k = _per_block(weight, global_amax, lambda kt, blocks, g: kt.mse_choice(blocks, g), mse_choice, torch.int64)
    g = global_amax.float().reshape(()).to(weight.device)
    return candidate_amax(g)[k].reshape(_per_block_shape(weight))


# ----------------------------------------------------------------------------------------------
# Four-over-six
# ----------------------------------------------------------------------------------------------
def four_over_six_factors(global_amax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ModelOpt's e4m3 fake quant of block scales at the 256 normalisation, as it computes it:
    ``A = g * (448/256) / 6`` (1 when A <= 2**-24), ``up = 448 / A`` (torch evaluates a number
    over a tensor as ``reciprocal(A) * 448``), ``down = 1 / up``. Element-wise: ``global_amax`` may
    hold one value per group."""
    g = global_amax.float()
    a = nx.true_div(g * (nx.FP8_MAX / FOUR_OVER_SIX_NORM), nx.FP4_MAX)
    a = torch.where(a <= 2.0**-24, torch.ones_like(a), a)
    up = nx.FP8_MAX / a
    return up, 1 / up


def four_over_six_scale(block_amax: torch.Tensor, global_amax: torch.Tensor) -> torch.Tensor:
    """The block scale ``a / 6`` as ModelOpt's calibration sees it: ``(a/6) * up`` clamped to
    448, cast to e4m3, times ``down`` (:func:`four_over_six_factors`). May be 0 for tiny blocks
    (the block then quantizes to zeros)."""
    up, down = four_over_six_factors(global_amax.to(block_amax.device))
    x = (nx.true_div(block_amax.float(), nx.FP4_MAX) * up).clamp(min=-nx.FP8_MAX, max=nx.FP8_MAX)
    return x.to(torch.float8_e4m3fn).float() * down


def four_over_six_loss(absw: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """:func:`block_loss` where a zero scale quantizes the block to zeros."""
    zero = scale == 0
    loss = block_loss(absw, torch.where(zero, torch.ones_like(scale), scale))
    return torch.where(zero, tree_sum16(absw * absw), loss)


def four_over_six_choice(absw: torch.Tensor, global_amax: torch.Tensor) -> torch.Tensor:
    """True where ``m * 1.5`` quantizes the block ``[N, 16]`` with strictly lower error than ``m``."""
    absw = absw.float()
    m = absw.amax(dim=-1)
    loss_6 = four_over_six_loss(absw, four_over_six_scale(m, global_amax))
    loss_4 = four_over_six_loss(absw, four_over_six_scale(m * FOUR_OVER_SIX_MULT, global_amax))
    return loss_4 < loss_6


def four_over_six_amax(absw: torch.Tensor, global_amax: torch.Tensor) -> torch.Tensor:
    """Per block ``[N, 16]`` of |w|: the block max, times 1.5 where that wins."""
    m = absw.amax(dim=-1)
    return torch.where(four_over_six_choice(absw, global_amax), m * FOUR_OVER_SIX_MULT, m)


def four_over_six_block_amax(weight: torch.Tensor, global_amax: torch.Tensor) -> torch.Tensor:
    """Static per-block amax ``[..., in/16]``: the block max, times 1.5 where that wins."""
    out = _per_block(weight, global_amax, lambda kt, blocks, g: kt.four_over_six_amax(blocks, g),
                     four_over_six_amax, torch.float32)
    return out.reshape(_per_block_shape(weight))


def block_amax(weight: torch.Tensor, global_amax: torch.Tensor, method: str) -> torch.Tensor:
    """Static per-block amax of ``weight [..., in]`` under the group's global amax, by method."""
    if method == "mse":
        return mse_block_amax(weight, global_amax)
    if method == "four-over-six":
        return four_over_six_block_amax(weight, global_amax)
    raise ValueError(f"not a sweep method: {method!r}")


def block_amax_groups(weight: torch.Tensor, global_amax: torch.Tensor, method: str) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`block_amax` for ``G`` same-shape groups at once (batch.py): ``weight [G, ..., in]``,
    ``global_amax [G]``; returns the block amax ``[G, ..., in/16]`` and a device bool ``[G]`` that is
    False for a group the kernels could not search exactly (absurd g, mse only: redo it alone). One
    launch per kernel with the Triton kernels, no host synchronisation; elsewhere group by group."""
    n = weight.shape[0]
    kernel = _kernel(weight)
    if kernel is None:
        out = torch.stack([block_amax(weight[i], global_amax[i], method) for i in range(n)])
        return out, torch.ones(n, dtype=torch.bool, device=weight.device)
    g = global_amax.float().reshape(-1).to(weight.device)
    blocks = _blocks(weight)
    if method == "mse":
        k, exact = kernel.mse_choice_groups(blocks, g)
        table = nx.true_div(candidate_values(g.device), nx.FP8_MAX) * g.reshape(-1, 1)  # candidate_amax per group
        group = torch.arange(n, device=weight.device).repeat_interleave(blocks.shape[0] // n)
        out = table[group, k]
    elif method == "four-over-six":
        out, exact = kernel.four_over_six_amax(blocks, g), torch.ones(n, dtype=torch.bool, device=weight.device)
    else:
        raise ValueError(f"not a sweep method: {method!r}")
    return out.reshape(_per_block_shape(weight)), exact


def fp8_norm(method: str) -> float:
    """The e4m3 value ``g / 6`` maps to: 256 for four-over-six, else 448."""
    return FOUR_OVER_SIX_NORM if method == "four-over-six" else nx.FP8_MAX


def _kernel(weight: torch.Tensor):
    """The Triton kernels for a CUDA weight (None on the CPU, without Triton, or when disabled)."""
    if not weight.is_cuda or os.environ.get("SHARDCONV_SWEEP") in ("torch", "reference"):
        return None
    from .kernels import ready, sweep_kernels

    ready()
    return sweep_kernels()

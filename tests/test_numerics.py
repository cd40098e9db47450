"""The NVFP4 reference numerics against FORMAT.md §1, checked independently where possible."""

import pytest
import torch

from shardconv import numerics as nx

E2M1 = torch.tensor(nx.E2M1_VALUES)


def nearest_code(x: torch.Tensor) -> torch.Tensor:
    """Independent reference: index of the nearest e2m1 magnitude (valid away from exact ties)."""
    return (x.abs().double().unsqueeze(-1) - E2M1.double()).abs().argmin(-1).to(torch.uint8)


def test_rounding_boundaries_and_ties():
    x = torch.tensor([0.0, 0.25, 0.2500001, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 5.0001, 6.0, 1e30])
    want = [0, 0, 1, 2, 2, 4, 4, 6, 6, 7, 7, 7]
    assert nx.e2m1_codes(x).tolist() == want
    assert nx.e2m1_codes(-x[1:]).tolist() == [c | 8 for c in want[1:]]


def test_sign_comes_from_unrounded_value():
    x = torch.tensor([-0.1, -0.0, 0.0, -0.25, -0.26])
    assert nx.e2m1_codes(x).tolist() == [0x8, 0x0, 0x0, 0x8, 0x9]


def test_codes_are_nearest_value_off_ties():
    g = torch.Generator().manual_seed(1)
    x = (torch.rand(200_000, generator=g) * 14 - 7).float()
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
    x = x[~torch.isin(x.abs(), ties)]
    codes = nx.e2m1_codes(x)
    assert torch.equal(codes & 7, nearest_code(x))
    assert torch.equal((codes >> 3).bool(), x < 0)


def test_pack_even_element_in_low_nibble_and_roundtrip():
    codes = torch.tensor([[1, 2, 15, 0]], dtype=torch.uint8)
    packed = nx.pack_nibbles(codes)
    assert packed.tolist() == [[0x21, 0x0F]]
    assert torch.equal(nx.unpack_nibbles(packed), codes)


def _weight(rows=64, cols=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.02
    w[3, 17] = 0.9  # outlier
    w[5, 32:48] = 0  # an all-zero block
    return w.bfloat16()


def test_dynamic_scales_formula_and_zero_block():
    w = _weight()
    g = w.abs().max().float()
    s2 = nx.global_scale(g)
    assert s2.dtype == torch.float32 and s2.shape == ()
    assert s2.item() == torch.tensor(g.item() / 2688.0, dtype=torch.float32).item()
    scale = nx.block_scales_dynamic(w, s2)
    assert scale.dtype == torch.float8_e4m3fn and scale.shape == (64, 16)
    assert scale.view(torch.uint8)[5, 2].item() == 0x38  # zero block -> 1.0
    expect = (nx.block_amax(w) / (6.0 * s2)).clamp(min=2**-9).to(torch.float8_e4m3fn)
    expect[5, 2] = 1.0
    assert torch.equal(scale.view(torch.uint8), expect.view(torch.uint8))
    assert scale.float().max().item() == 448.0  # the block holding the global max


def test_static_scales_zero_block_and_max_equivalence():
    w = _weight()
    g = w.abs().max().float()
    static = nx.block_scales_static(nx.block_amax(w), g)
    dynamic = nx.block_scales_dynamic(w, nx.global_scale(g))
    assert static.view(torch.uint8)[5, 2].item() == 0x7E  # zero block -> 448 on the static path
    same = static.view(torch.uint8) == dynamic.view(torch.uint8)
    same[5, 2] = True
    assert same.float().mean().item() > 0.999


def test_quantize_dequantize_error_and_exact_grid_values():
    w = _weight()
    s2 = nx.global_scale(w.abs().max().float())
    scale = nx.block_scales_dynamic(w, s2)
    packed = nx.quantize(w, scale, s2)
    assert packed.shape == (64, 128) and packed.dtype == torch.uint8
    deq = nx.dequantize(packed, scale, s2)
    rel = ((deq - w.float()).norm() / w.float().norm()).item()
    assert rel < 0.12
    # Values that sit exactly on the grid come back exactly.
    grid = (E2M1[torch.randint(0, 8, (4, 64), generator=torch.Generator().manual_seed(2))] *
            torch.tensor([1.0, -1.0]).repeat(32)).reshape(4, 64)
    s = torch.ones(4, 4).to(torch.float8_e4m3fn)
    one = torch.tensor(1.0)
    assert torch.equal(nx.dequantize(nx.quantize(grid, s, one), s, one), grid)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_source_dtypes(dtype):
    w = _weight().to(dtype)
    s2 = nx.global_scale(w.abs().max().float())
    s = nx.block_scales_dynamic(w, s2)
    ref = nx.quantize(w.float(), s, s2)
    assert torch.equal(nx.quantize(w, s, s2), ref)


def test_export_rounding_rules_differ_by_at_most_one_ulp():
    x = torch.rand(100_000, generator=torch.Generator().manual_seed(5)) * 10
    try:
        nx.set_export_rounding("cuda")
        recip = nx.div_scalar(x, 2688.0)
        inv = torch.tensor(1.0) / torch.tensor(2688.0)
        assert torch.equal(recip, x * inv)
    finally:
        nx.set_export_rounding("cpu")
    true = nx.div_scalar(x, 2688.0)
    assert torch.equal(true, (x.double() / 2688.0).float())  # one correctly rounded division
    differ = (recip != true).sum().item()
    assert 0 < differ < x.numel() // 2
    ulps = (recip.view(torch.int32) - true.view(torch.int32)).abs().max().item()
    assert ulps == 1

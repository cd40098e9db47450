"""Data-free MSE (FP8 scale sweep) and four-over-six scales: the torch references against independent
brute force, the windowed search against the reference, parity with ModelOpt 0.47's own exports
(tests/golden/*/{mse,four_over_six}), and the Triton kernels against the reference (GPU only)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import load_checkpoint, run_cli, same_bytes, structured
from shardconv import numerics as nx
from shardconv import sweep

GOLDEN = Path(__file__).parent / "golden"
FAMILIES = ["llama", "qwen3", "qwen3_moe"]
GPU = pytest.mark.gpu


# ----------------------------------------------------------------------------------------------
# test weights
# ----------------------------------------------------------------------------------------------
def weight_sets():
    yield "gauss", torch.randn(96, 256, generator=torch.Generator().manual_seed(0)) * 0.02
    yield "laplace", torch.distributions.Laplace(0.0, 0.02).sample((96, 256))
    yield "structured", structured(96, 256, 1)


# ----------------------------------------------------------------------------------------------
# independent brute force (numpy, candidates and rounding rebuilt from their definitions)
# ----------------------------------------------------------------------------------------------
F32 = np.float32
GRID = np.array(nx.E2M1_VALUES, dtype=np.float64)


def e4m3_table() -> np.ndarray:
    """All 127 non-negative finite e4m3 values by byte (0x00..0x7E), from the bit layout."""
    out = []
    for b in range(127):
        e, m = b >> 3, b & 7
        out.append(m / 8 * 2.0**-6 if e == 0 else (1 + m / 8) * 2.0 ** (e - 7))
    return np.array(out)


def np_e2m1(t: np.ndarray) -> np.ndarray:
    """Nearest grid value (float64 distances are exact for float32 t); ties to the even code."""
    d = np.abs(t[..., None].astype(np.float64) - GRID)
    best = d.min(axis=-1, keepdims=True)
    tie_even = np.where(d == best, np.arange(8) % 2, 9)  # prefer even codes among the nearest
    return GRID[np.argmin(tie_even, axis=-1)].astype(F32)


def np_tree_sum(x: np.ndarray) -> np.ndarray:
    while x.shape[-1] > 1:
        x = x[..., 0::2] + x[..., 1::2]
    return x[..., 0]


def np_loss(absw: np.ndarray, s: np.ndarray) -> np.ndarray:
    s = np.asarray(s, dtype=F32).reshape(-1, 1) if np.ndim(s) else F32(s)
    d = absw - np_e2m1(absw / s) * s
    return np_tree_sum(d * d)


def np_mse_choice(absw: np.ndarray, g: float) -> np.ndarray:
    c = e4m3_table()[1:].astype(F32) / F32(448)
    s = (c * F32(g)) / F32(6)
    losses = np.stack([np_loss(absw, s[k]) for k in range(126)])
    return np.argmin(losses, axis=0)  # the first of equal minima


def np_four_over_six(absw: np.ndarray, g: float) -> np.ndarray:
    """ModelOpt's choice as its calibration computes it (fp8 fake quant of the scale at 256)."""
    a = (F32(g) * F32(1.75)) / F32(6)
    a = F32(1) if a <= 2.0**-24 else a
    up = (F32(1) / a) * F32(448)
    down = F32(1) / up
    table = e4m3_table()
    m = absw.max(axis=-1)
    losses = []
    for amax in (m, m * F32(1.5)):
        x = np.minimum((amax / F32(6)) * up, F32(448)).astype(np.float64)
        d = np.abs(x[:, None] - table)
        best = d.min(axis=1, keepdims=True)
        code = np.argmin(np.where(d == best, np.arange(127) % 2, 9), axis=1)
        s = table[code].astype(F32) * down
        loss = np_loss(absw, np.where(s == 0, F32(1), s))
        losses.append(np.where(s == 0, np_tree_sum(absw * absw), loss))
    return losses[1] < losses[0]


def blocks_of(w: torch.Tensor) -> torch.Tensor:
    return w.reshape(-1, 16).float().abs()


# ----------------------------------------------------------------------------------------------
# CPU: references
# ----------------------------------------------------------------------------------------------
def test_candidates_are_the_126_e4m3_values():
    assert torch.equal(sweep.candidate_values().double(), torch.from_numpy(e4m3_table()[1:]))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_mse_reference_equals_independent_brute_force(dtype):
    for name, w in weight_sets():
        w = w[:24].to(dtype)
        b, g = blocks_of(w), w.abs().max().float()
        ref = sweep.mse_choice_reference(b, g)
        assert np.array_equal(ref.numpy(), np_mse_choice(b.numpy(), float(g))), name
        # and the fp32 procedure finds the real minimum up to fp32 rounding
        s64 = sweep.candidate_scales(g).double()
        b64 = b.double()
        losses = torch.stack([((b64 - sweep.e2m1_magnitude(b / s).double() * s64[k]) ** 2).sum(-1)
                              for k, s in enumerate(sweep.candidate_scales(g))])
        chosen = losses.gather(0, ref[None]).squeeze(0)
        assert bool((chosen <= losses.min(0).values * (1 + 1e-6) + 1e-30).all()), name


def test_mse_zero_block_gets_byte_1_and_export_formula_writes_the_choice():
    w = structured(64, 256, 2)
    g = w.abs().max().float()
    a = sweep.mse_block_amax(w, g)
    codes = nx.block_scales_static(a, g).view(torch.uint8).long()
    assert torch.equal(codes.reshape(-1) - 1, sweep.mse_choice_reference(blocks_of(w), g))
    assert bool((codes[:, 0] == 1).all())  # all-zero blocks: the first candidate
    assert sweep.mse_block_amax(torch.zeros(4, 32), torch.tensor(0.0)).abs().sum() == 0


def test_four_over_six_reference_equals_independent_brute_force():
    for name, w in weight_sets():
        w = w.bfloat16()
        b, g = blocks_of(w), w.abs().max().float()
        assert np.array_equal(sweep.four_over_six_choice(b, g).numpy(), np_four_over_six(b.numpy(), float(g))), name
    w = structured(96, 256, 3)
    choice = sweep.four_over_six_choice(blocks_of(w), w.abs().max().float())
    assert 0.05 < float(choice.float().mean()) < 0.95  # both candidates occur


def test_four_over_six_normalisation():
    g = torch.tensor(3.0)
    assert nx.global_scale(g, 256.0) == torch.tensor(3.0) / torch.tensor(1536.0)
    a = torch.tensor([[3.0, 4.5, 0.0, 1.0]])
    codes = nx.block_scales_static(a, g, 256.0).float()
    assert codes.tolist() == [[256.0, 384.0, 448.0, 88.0]]  # 1.0/6 * 256 / 0.5 = 85.3 -> 88; zero -> 448
    w = torch.randn(8, 64)
    assert same_bytes(nx.block_scales_static(nx.block_amax(w), w.abs().max()),
                      nx.block_scales_static(nx.block_amax(w), w.abs().max(), nx.FP8_MAX))  # default unchanged


# ----------------------------------------------------------------------------------------------
# CPU: the windowed search gives the reference's choice; the kernels' rounding identities
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_windowed_search_equals_reference(dtype):
    flagged = total = 0
    for seed in range(3):
        for name, w in list(weight_sets()) + [("structured-big", structured(256, 512, 10 + seed))]:
            w = (w * (seed + 1)).to(dtype)
            b, g = blocks_of(w), w.abs().max().float()
            k, flag = sweep.mse_choice_windowed(b, g)
            ref = sweep.mse_choice_reference(b, g)
            assert torch.equal(k[~flag], ref[~flag]), name
            assert torch.equal(sweep.mse_choice(b, g), ref), name
            flagged += int(flag.sum())
            total += flag.numel()
    assert flagged < 0.02 * total  # the full search is the exception


def test_doubling_holds_for_ordinary_and_not_for_absurd_global_amax():
    for g in (1e-6, 0.02, 1.0, 300.0, 3e30):
        assert sweep.doubling_holds(sweep.candidate_scales(torch.tensor(g)))
    assert not sweep.doubling_holds(sweep.candidate_scales(torch.tensor(1e-36)))
    w = torch.randn(4, 64) * 1e-37  # subnormal scales: the reference decides every block
    g = w.abs().max().float()
    assert torch.equal(sweep.mse_choice(blocks_of(w), g), sweep.mse_choice_reference(blocks_of(w), g))


def test_kernel_e2m1_rounding_identity():
    """The kernels (and the windowed search) round t to e2m1 as (min(t, 6) + M) - M, M = 2**22, 2**23, 2**24."""
    bounds = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 3.5, 4.0, 5.0, 6.0, 7.0])
    near = torch.cat([torch.nextafter(bounds, torch.tensor(-1.0)), bounds, torch.nextafter(bounds, torch.tensor(9.0))])
    t = torch.cat([near.clamp(min=0), torch.rand(200_000) * 8, torch.rand(1000) * 1e-3,
                   torch.tensor([1e30, float("inf"), 2.0**-149, 3.4e38])])
    assert torch.equal(sweep.e2m1_magnitude_fast(t), sweep.e2m1_magnitude(t))


def test_kernel_e4m3_rounding_identity():
    """The four-over-six kernel rounds x in [0, 448] to e4m3 with integer arithmetic on the fp32 bits."""
    table = torch.from_numpy(e4m3_table()).float()
    mids = (table[1:] + table[:-1]) / 2
    x = torch.cat([table, mids, torch.nextafter(mids, torch.tensor(0.0)), torch.nextafter(mids, torch.tensor(500.0)),
                   torch.rand(200_000) * 448, torch.rand(10_000) * 0.02]).clamp(0, 448)
    sub = (x + 16384.0) - 16384.0
    bits = x.view(torch.int32)
    bits = (bits + 0x7FFFF + ((bits >> 20) & 1)) & -0x100000
    assert torch.equal(torch.where(x < 2.0**-6, sub, bits.view(torch.float32)),
                       x.to(torch.float8_e4m3fn).float())


# ----------------------------------------------------------------------------------------------
# parity with ModelOpt's own exports
# ----------------------------------------------------------------------------------------------
def _source_weight(family: str, name: str) -> torch.Tensor:
    for f in sorted((GOLDEN / family / "source").glob("*.safetensors")):
        with safe_open(str(f), "pt") as s:
            if name in s.keys():
                return s.get_tensor(name)
    raise KeyError(name)


def _loss64(w: torch.Tensor, scale: torch.Tensor, scale_2: torch.Tensor) -> torch.Tensor:
    """float64 squared error of blocks [N, 16] quantized with the exported e4m3 scale bytes."""
    s = scale.float().double() * scale_2.double()
    q = sweep.e2m1_magnitude((w.abs() / s.float()[:, None]).float()).double()
    return ((w.abs().double() - q * s[:, None]) ** 2).sum(-1)


def _convert(family: str, case: str, method: str, tmp_path: Path) -> dict:
    out = tmp_path / f"{family}-{case}"
    rc, err = run_cli("convert", GOLDEN / family / "source", out, "--amax", GOLDEN / family / case / "amax.pt",
                      "--scales", method, "--device", "cpu", "--no-progress")
    assert rc == 0, err
    mine = json.loads((out / "hf_quant_config.json").read_text())["quantization"]
    theirs = json.loads((GOLDEN / family / case / "hf_quant_config.json").read_text())["quantization"]
    assert mine == theirs
    return load_checkpoint(out)


@pytest.mark.parametrize("case,method", [("mse", "mse"), ("four_over_six", "four-over-six")])
def test_matches_modelopt_export(case, method, tmp_path):
    """Byte parity, tensor by tensor, with ModelOpt's mse / four-over-six export. A block may choose
    another candidate only at an fp32 near-tie (ModelOpt's CPU sweep rounds its scales and sums its
    16 errors in another order): then both choices' float64 errors agree within 1e-6 relative, at
    most 1 block in 10,000 differs, and only those blocks' bytes differ."""
    n_blocks, differing = 0, []
    for family in FAMILIES:
        got, want = _convert(family, case, method, tmp_path), load_file(str(GOLDEN / family / case / "model.safetensors"))
        assert sorted(got) == sorted(want)
        for name in want:
            if name.endswith(".weight_scale"):
                n_blocks += want[name].numel()
                module = name[: -len(".weight_scale")]
                diff = (got[name].view(torch.uint8) != want[name].view(torch.uint8)).reshape(-1)
                if diff.any():
                    w = _source_weight(family, module + ".weight").reshape(-1, 16)
                    s2 = want[module + ".weight_scale_2"]
                    assert same_bytes(got[module + ".weight_scale_2"], s2)
                    mine = _loss64(w[diff], got[name].reshape(-1)[diff], s2)
                    theirs = _loss64(w[diff], want[name].reshape(-1)[diff], s2)
                    assert bool(((mine - theirs).abs() <= 1e-6 * theirs).all()), (name, mine, theirs)
                    differing.append((family, name, int(diff.sum())))
                packed = (got[module + ".weight"] != want[module + ".weight"]).reshape(-1, 8).any(-1)
                assert not bool((packed & ~diff).any()), name  # every other block's codes are identical
            elif not name.endswith(".weight") or (name[: -len(".weight")] + ".weight_scale") not in want:
                assert same_bytes(got[name], want[name]), name
    assert sum(n for *_, n in differing) * 10_000 <= n_blocks, differing


def test_modelopt_mse_amax_file_alone_reproduces_its_export(tmp_path):
    """The file's own per-block amax (what ModelOpt's sweep chose) through the static path: exact."""
    for family in FAMILIES:
        gold = GOLDEN / family / "mse"
        rc, err = run_cli("convert", GOLDEN / family / "source", tmp_path / family, "--amax", gold / "amax.pt",
                          "--device", "cpu", "--no-progress")
        assert rc == 0, err
        got, want = load_checkpoint(tmp_path / family), load_file(str(gold / "model.safetensors"))
        assert [n for n in want if not same_bytes(got[n], want[n])] == []


def test_sweep_without_amax_is_weight_only_with_the_same_weights(tmp_path):
    src = GOLDEN / "llama" / "source"
    for method in ("mse", "four-over-six"):
        assert run_cli("convert", src, tmp_path / method, "--scales", method, "--device", "cpu", "--no-progress")[0] == 0
        assert run_cli("convert", src, tmp_path / f"{method}-a4", "--scales", method, "--amax",
                       GOLDEN / "llama" / "max_w4a4" / "amax.pt", "--device", "cpu", "--no-progress")[0] == 0
        a, b = load_checkpoint(tmp_path / method), load_checkpoint(tmp_path / f"{method}-a4")
        assert json.loads((tmp_path / method / "hf_quant_config.json").read_text())["quantization"]["quant_algo"] == "W4A16_NVFP4"
        assert sorted(a) == sorted(n for n in b if not n.endswith("input_scale"))
        assert all(same_bytes(a[n], b[n]) for n in a)


# ----------------------------------------------------------------------------------------------
# GPU: the Triton kernels choose exactly as the reference
# ----------------------------------------------------------------------------------------------
def _gpu_cases():
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for seed in range(2):
            yield f"{dtype}-structured-{seed}", structured(512, 1024, 20 + seed).to(dtype)
            yield f"{dtype}-gauss-{seed}", (torch.randn(256, 2048, generator=torch.Generator().manual_seed(seed)) * 0.02).to(dtype)
        yield f"{dtype}-laplace", torch.distributions.Laplace(0.0, 0.01).sample((256, 2048)).to(dtype)
        yield f"{dtype}-rows", (torch.randn(64, 4096) * torch.logspace(-6, 2, 64)[:, None]).to(dtype)


@GPU
def test_kernels_equal_reference():
    from shardconv.kernels import sweep_kernels

    kt = sweep_kernels()
    assert kt is not None, "triton did not import"
    for name, w in _gpu_cases():
        wc = w.cuda()
        b, g = wc.reshape(-1, 16), wc.abs().max().float()
        ref = sweep.mse_choice_reference(b.float().abs(), g)
        k = kt.mse_choice(b, g)
        assert torch.equal(k, ref), (name, int((k != ref).sum()), kt.mse_flagged(b, g))
        assert torch.equal(ref.cpu(), sweep.mse_choice_reference(blocks_of(w), g.cpu())), name  # CPU == CUDA
        m = b.float().abs().amax(-1)
        fos = torch.where(sweep.four_over_six_choice(b.float().abs(), g), m * 1.5, m)
        got = kt.four_over_six_amax(b, g)
        assert torch.equal(got, fos), (name, int((got != fos).sum()))
        assert torch.equal(sweep.four_over_six_choice(blocks_of(w), g.cpu()), (fos != m).cpu()), name


@GPU
@pytest.mark.parametrize("method", ["mse", "four-over-six"])
def test_conversion_cuda_equals_cpu(method, tmp_path):
    from shardconv.synth import write_checkpoint

    src = tmp_path / "src"
    write_checkpoint(src, family="qwen3_moe", weights="structured", num_layers=2, shard_size=200_000)
    for dev in ("cpu", "cuda"):
        assert run_cli("convert", src, tmp_path / dev, "--scales", method, "--device", dev, "--no-progress")[0] == 0
    a, b = load_checkpoint(tmp_path / "cpu"), load_checkpoint(tmp_path / "cuda")
    assert a.keys() == b.keys()
    assert [k for k in a if not same_bytes(a[k], b[k])] == []


_INTERPRETED = """
import torch
from shardconv import sweep
from shardconv.kernels import sweep_kernels

kt = sweep_kernels()
assert kt is not None
sweep._kernel = lambda weight: kt  # the conversions' dispatch, sent to the (interpreted) kernels
gen = torch.Generator().manual_seed(3)
for shape in [(24, 64), (2, 8, 32)]:
    w = torch.randn(*shape, generator=gen) * torch.rand(*shape[:-1], 1, generator=gen) * 0.05
    w.view(-1)[::97] *= 40
    w.reshape(-1, 16)[1] = 0  # an all-zero block
    w = w.bfloat16()
    g = w.abs().max().float()
    absw = w.reshape(-1, 16).float().abs()
    want = sweep.candidate_amax(g)[sweep.mse_choice_reference(absw, g)].reshape(*shape[:-1], shape[-1] // 16)
    assert torch.equal(sweep.block_amax(w, g, "mse"), want), shape
    want = sweep.four_over_six_amax(absw, g).reshape(*shape[:-1], shape[-1] // 16)
    assert torch.equal(sweep.block_amax(w, g, "four-over-six"), want), shape
print("ok")
"""


def test_kernels_in_tritons_interpreter_equal_the_reference():
    """The Triton kernels through the dispatch conversions use, run by Triton's CPU interpreter: a kernel
    check for machines without a GPU (CI has no Triton: the CPU torch build does not bring it; on a
    GPU, test_kernels_equal_reference runs the compiled kernels)."""
    pytest.importorskip("triton")
    import os
    import subprocess
    import sys

    env = dict(os.environ, TRITON_INTERPRET="1")  # read when the kernels are defined: a fresh process
    run = subprocess.run([sys.executable, "-c", _INTERPRETED], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-3000:]

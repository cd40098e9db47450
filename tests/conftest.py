import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from shardconv import numerics, sweep
from shardconv.cli import main

GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture
def models_decide(monkeypatch):
    """No checkpoint is planned from its family's layout (layouts.py): the model, or the helper
    process, gives every answer, for tests of that path."""
    monkeypatch.setenv("SHARDCONV_LAYOUTS", "0")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(GPU)
        if "slow" in item.keywords and not os.environ.get("SHARDCONV_SLOW"):
            item.add_marker(pytest.mark.skip(reason="multi-GB run; set SHARDCONV_SLOW=1"))


def structured(rows: int, cols: int, seed: int) -> torch.Tensor:
    """Test weights for the numerics: per-row scales, rare 40x outliers, and the edge cases of a block
    (zero, tiny, a single element, all equal, exactly on a candidate scale's grid: exact ties)."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=gen) * torch.rand(rows, 1, generator=gen) * 0.05
    idx = torch.randint(0, rows * cols, (rows * cols // 500,), generator=gen)
    w.view(-1)[idx] *= 40
    w[:, :16] = 0  # zero blocks
    w[0::7, 16:32] = torch.randn(16, generator=gen) * 1e-7  # tiny blocks
    w[1::7, 32:48] = 0
    w[1::7, 40] = 0.03  # one element
    g = w.abs().max()
    grid = torch.tensor(numerics.E2M1_VALUES)
    for r in range(2, rows, 7):  # exactly on a candidate's grid: exact ties between candidates
        s = sweep.candidate_scales(g)[int(torch.randint(40, 120, (1,), generator=gen))]
        w[r, 48:64] = grid[torch.randint(0, 8, (16,), generator=gen)] * s
    w[3::7, 64:80] = w[3::7, 64:65]  # all elements equal
    return w


def run_cli(*args) -> tuple[int, str]:
    """Run ``shardconv`` in-process; returns (exit status, stderr text)."""
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = main([str(a) for a in args])
    return rc, err.getvalue()


def load_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint folder, through the index (the way loaders find them)."""
    path = Path(path)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    out = {}
    for shard in sorted(set(index["weight_map"].values())):
        with safe_open(str(path / shard), "pt") as f:
            for name in f.keys():
                assert index["weight_map"][name] == shard
                out[name] = f.get_tensor(name)
    assert set(out) == set(index["weight_map"])
    return out


def tree_digest(path: Path) -> dict[str, str]:
    """SHA-256 of every file under ``path`` (to prove SRC is never written)."""
    path = Path(path)
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8)
    )


def lazy_outputs(root: Path, how):
    """Named conversions made once, on first use, under ``root``: ``how(name) -> (src, args)``."""
    done: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in done:
            src, args = how(name)
            rc, err = run_cli("convert", src, root / name, *args)
            assert rc == 0, err
            done[name] = root / name
        return done[name]

    return get


def private_copy(get, tmp_path: Path):
    """A private copy of a ``lazy_outputs`` output, to damage."""
    import shutil

    return lambda name: Path(shutil.copytree(get(name), tmp_path / name))


def quantize_on_cuda_without_sync(members, weights, method="max"):
    """``quantize_group`` of one unit on CUDA with synchronisation reported as an error (the pipeline's
    call: ``check=False``, results left on the device), and the CPU reference of the same weights."""
    from shardconv.quantize import quantize_group

    cuda = [w.cuda() for w in weights]
    want = quantize_group(members, [w.cpu() for w in weights], method, "cpu")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = quantize_group(members, cuda, method, "cuda", to_cpu=False, check=False, chunk=4096)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    return want, got

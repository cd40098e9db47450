import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from shardconv.cli import main

GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(GPU)
        if "slow" in item.keywords and not os.environ.get("SHARDCONV_SLOW"):
            item.add_marker(pytest.mark.skip(reason="multi-GB run; set SHARDCONV_SLOW=1"))


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

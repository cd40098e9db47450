"""The CUDA path against the CPU reference: identical bytes (run on a GPU machine; skipped elsewhere)."""

import pytest
import torch

from conftest import load_checkpoint, quantize_on_cuda_without_sync, run_cli, same_bytes, structured
from shardconv import numerics as nx
from shardconv.synth import write_checkpoint

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_numerics_cuda_equals_cpu(dtype, seed):
    w = structured(512, 1024, seed).to(dtype)
    g = w.abs().max().float()
    s2 = nx.global_scale(g)
    cpu = (nx.block_scales_dynamic(w, s2), nx.block_scales_static(nx.block_amax(w) * 0.8, g))
    wc = w.cuda()
    gpu = (nx.block_scales_dynamic(wc, s2.cuda()), nx.block_scales_static(nx.block_amax(wc) * 0.8, g.cuda()))
    for a, b in zip(cpu, gpu):
        assert same_bytes(a, b.cpu())
        assert same_bytes(nx.quantize(w, a, s2), nx.quantize(wc, b, s2.cuda()).cpu())


@pytest.mark.parametrize("family", ["llama", "qwen3_moe"])
def test_conversion_cuda_equals_cpu(family, tmp_path):
    src = tmp_path / "src"
    write_checkpoint(src, family=family, weights="structured", num_layers=2, shard_size=200_000)
    assert run_cli("convert", src, tmp_path / "cpu", "--device", "cpu", "--no-progress")[0] == 0
    assert run_cli("convert", src, tmp_path / "gpu", "--device", "cuda", "--no-progress")[0] == 0
    a, b = load_checkpoint(tmp_path / "cpu"), load_checkpoint(tmp_path / "gpu")
    assert a.keys() == b.keys()
    assert all(same_bytes(a[k], b[k]) for k in a)


def test_export_rounding_cuda_rule_is_what_cuda_does_and_cpu_rule_holds_on_cuda():
    x = torch.rand(1_000_000, generator=torch.Generator().manual_seed(6)) * 10
    native_cuda = (x.cuda() / 2688.0).cpu()  # ATen multiplies by the reciprocal here
    native_cpu = x / 2688.0
    try:
        nx.set_export_rounding("cuda")
        assert torch.equal(nx.div_scalar(x, 2688.0), native_cuda)
        assert torch.equal(nx.div_scalar(x.cuda(), 2688.0).cpu(), native_cuda)
    finally:
        nx.set_export_rounding("cpu")
    assert torch.equal(nx.div_scalar(x.cuda(), 2688.0).cpu(), native_cpu)


def test_max_quantization_of_a_group_never_waits_for_the_gpu(tmp_path):
    """The main thread issues a group's kernels and moves on: nothing in the ``max`` path may block on
    the stream (a scalar copied from the host, a boolean-mask assignment, ``.item()``)."""
    from shardconv.formats import get_format
    from shardconv.planning import build_plan
    from shardconv.safetensors_io import read_into
    from shardconv.source import open_source

    src = tmp_path / "src"
    write_checkpoint(src, family="llama", weights="structured", num_layers=1)
    plan = build_plan(open_source(src), get_format("modelopt"), scales="max")
    unit = max(plan.units, key=lambda u: len(u.members))
    want, got = quantize_on_cuda_without_sync(unit.members, [read_into(m.weight) for m in unit.members])
    for a, b in zip(want, got):
        assert same_bytes(a.packed, b.packed.cpu()) and same_bytes(a.scale, b.scale.cpu())


@pytest.mark.parametrize("scales", ["max", "mse", "four-over-six"])
def test_moe_conversion_batched_on_cuda_equals_cpu(scales, tmp_path, monkeypatch):
    """The pipeline quantizes a MoE layer's experts as batches on CUDA (batch.py): same bytes as the
    CPU, and as one group at a time (SHARDCONV_BATCH=0)."""
    src = tmp_path / "src"
    write_checkpoint(src, family="qwen3_moe", weights="structured", num_layers=2, num_experts=16, shard_size=300_000)
    args = ("--scales", scales, "--no-progress")
    assert run_cli("convert", src, tmp_path / "cpu", "--device", "cpu", *args)[0] == 0
    assert run_cli("convert", src, tmp_path / "gpu", "--device", "cuda", *args)[0] == 0
    monkeypatch.setenv("SHARDCONV_BATCH", "0")
    assert run_cli("convert", src, tmp_path / "one", "--device", "cuda", *args)[0] == 0
    a, b, c = (load_checkpoint(tmp_path / d) for d in ("cpu", "gpu", "one"))
    assert a.keys() == b.keys() == c.keys()
    assert all(same_bytes(a[k], b[k]) and same_bytes(a[k], c[k]) for k in a)


@pytest.mark.parametrize("scales", ["max", "mse", "four-over-six"])
def test_batches_replayed_from_cuda_graphs_write_the_cpu_bytes(scales, tmp_path, monkeypatch):
    """Many batches of one size (a small host budget: 5 groups each) are replayed from CUDA graphs
    (graphs.py); the bytes are the CPU's and the eager batches' (SHARDCONV_GRAPHS=0)."""
    from shardconv import pipeline

    src = tmp_path / "src"
    write_checkpoint(src, family="qwen3_moe", weights="structured", num_layers=2, num_experts=32,
                     hidden_size=128, moe_intermediate_size=96, shard_size=300_000)
    replays = []
    real = pipeline.Converter.run

    def run(self):
        real(self)
        replays.append(self.graphs.replays if self.graphs is not None else 0)

    monkeypatch.setattr(pipeline.Converter, "run", run)
    args = ("--scales", scales, "--no-progress", "--host-buffer", "1MiB")
    assert run_cli("convert", src, tmp_path / "cpu", "--device", "cpu", *args)[0] == 0
    assert run_cli("convert", src, tmp_path / "gpu", "--device", "cuda", *args)[0] == 0
    monkeypatch.setenv("SHARDCONV_GRAPHS", "0")
    assert run_cli("convert", src, tmp_path / "eager", "--device", "cuda", *args)[0] == 0
    assert replays[0] == 0 and replays[1] >= 8 and replays[2] == 0
    a, b, c = (load_checkpoint(tmp_path / d) for d in ("cpu", "gpu", "eager"))
    assert a.keys() == b.keys() == c.keys()
    assert all(same_bytes(a[k], b[k]) and same_bytes(a[k], c[k]) for k in a)


def test_max_quantization_of_a_batch_never_waits_for_the_gpu(tmp_path):
    from shardconv.batch import quantize_batch, structure
    from shardconv.formats import get_format
    from shardconv.planning import build_plan
    from shardconv.quantize import quantize_group
    from shardconv.safetensors_io import read_into
    from shardconv.source import open_source

    src = tmp_path / "src"
    write_checkpoint(src, family="qwen3_moe", weights="structured", num_layers=1, num_experts=8)
    plan = build_plan(open_source(src), get_format("modelopt"), scales="max")
    units = [u for u in plan.units if u.members and ".experts." in u.members[0].module and len(u.members) == 2]
    assert len({structure(u.members) for u in units}) == 1 and len(units) == 8
    weights = [[read_into(m.weight).cuda() for m in u.members] for u in units]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = quantize_batch([u.members for u in units], weights, "max", "cuda", chunk=4096)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    for u, w, res in zip(units, weights, got):
        want = quantize_group(u.members, [x.cpu() for x in w], "max", "cpu")
        for a, b in zip(want, res):
            assert same_bytes(a.packed, b.packed.cpu()) and same_bytes(a.scale, b.scale.cpu())
            assert same_bytes(a.scale_2, b.scale_2.cpu()) and bool(b.ok.cpu())


def test_batch_larger_than_the_output_pool_does_not_hang(tmp_path, monkeypatch):
    """DeepSeek-V3's layout on CUDA: output slabs sized for the dense layer-0 MLP are few, and a batch
    of small experts has more members than the pool has slabs. Each group must go to a writer before
    the next takes buffers (pipeline._downloads); taking them all first waited for ever on the H200
    (before slabs were carved into several buffers; the CPU simulation in test_buffer_pool.py keeps
    one expert per slab, the case that hung). The run must finish, in the same bytes as the CPU's."""
    import threading

    from shardconv import pipeline

    src = tmp_path / "src"
    write_checkpoint(src, family="deepseek_v3", weights="structured", num_layers=2, num_experts=32,
                     hidden_size=256, intermediate_size=4096, moe_intermediate_size=64, shard_size=2_000_000)
    seen = {"members": 0, "pool": None}
    real = pipeline.Converter._downloads

    def recording(self, batch, *rest):
        seen["pool"] = self.outputs.count
        seen["members"] = max(seen["members"], sum(len(u.members) for u in batch))
        return real(self, batch, *rest)

    monkeypatch.setattr(pipeline.Converter, "_downloads", recording)
    args = ("--scales", "max", "--no-progress", "--host-buffer", "4MiB")
    assert run_cli("convert", src, tmp_path / "cpu", "--device", "cpu", *args)[0] == 0
    result = []
    t = threading.Thread(target=lambda: result.append(run_cli("convert", src, tmp_path / "gpu", "--device", "cuda",
                                                              *args)[0]), daemon=True)
    t.start()
    t.join(300)
    assert not t.is_alive(), "the CUDA conversion hung"
    assert result == [0]
    assert seen["members"] > seen["pool"], seen  # a batch has more members than the pool has slabs
    a, b = load_checkpoint(tmp_path / "cpu"), load_checkpoint(tmp_path / "gpu")
    assert a.keys() == b.keys() and all(same_bytes(a[k], b[k]) for k in a)

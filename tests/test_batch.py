"""Same-shape groups quantized as one batch (batch.py) give the bytes of one group at a time."""

import pytest
import torch

from conftest import GPU
from shardconv.amax import load_amax
from shardconv.batch import quantize_batch, structure
from shardconv.formats import get_format
from shardconv.planning import build_plan
from shardconv.quantize import quantize_group
from shardconv.safetensors_io import read_into
from shardconv.source import open_source
from shardconv.synth import write_checkpoint
from test_amax import make_amax, weights


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    root = tmp_path_factory.mktemp("batch")
    src = write_checkpoint(root / "src", family="qwen3_moe", weights="structured", num_layers=2, num_experts=6,
                           hidden_size=128, moe_intermediate_size=96, shard_size=400_000)
    w = weights(src)
    torch.save(make_amax(w, kv=False), root / "static.pt")
    torch.save(make_amax(w, static=False, kv=False), root / "dynamic.pt")
    return src, root


def batches(plan):
    """Units grouped by structure, in plan order (as the pipeline batches consecutive units)."""
    out: dict = {}
    for u in plan.units:
        if u.members:
            out.setdefault(structure(u.members), []).append(u)
    return [us for key, us in out.items() if key is not None and len(us) > 1]


def same(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.reshape(-1).view(torch.uint8),
                                                                     b.reshape(-1).view(torch.uint8))


def check(plan, method, device="cpu", mutate=None):
    seen, flags = 0, []
    for units in batches(plan):
        groups = [u.members for u in units]
        ws = [[read_into(m.weight).clone() for m in ms] for ms in groups]
        if mutate:
            mutate(ws)
        got = quantize_batch(groups, [[w.to(device) for w in g] for g in ws], method, device, chunk=4096)
        flags.append([all(bool(q.ok) for q in res) for res in got])
        for ms, w, res in zip(groups, ws, got):
            want = quantize_group(ms, w, method, "cpu", check=False)
            for q, r in zip(res, want):
                for field in ("packed", "scale", "scale_2", "input_scale"):
                    a, b = getattr(q, field), getattr(r, field)
                    assert (a is None) == (b is None)
                    if a is not None:
                        assert same(a.cpu(), b.cpu()), (ms[0].module, field)
                assert bool(q.ok) == bool(r.ok), ms[0].module
            seen += 1
    assert seen >= 12  # experts of both layers, in batches
    return flags


@pytest.mark.parametrize("method", ["max", "mse", "four-over-six"])
def test_batch_equals_one_group_at_a_time(moe, method):
    src, _ = moe
    plan = build_plan(open_source(str(src)), get_format("modelopt"), scales=method)
    check(plan, method)


@pytest.mark.parametrize("kind", ["static", "dynamic"])
def test_batch_with_saved_amax(moe, kind):
    src, root = moe
    plan = build_plan(open_source(str(src)), get_format("modelopt"), amax=load_amax(root / f"{kind}.pt"),
                      scales="amax")
    check(plan, "amax")


def test_batch_flags_a_bad_group_alone(moe):
    """A NaN in one expert and an all-zero expert: only the NaN group is flagged; the zero one is valid."""
    src, _ = moe
    plan = build_plan(open_source(str(src)), get_format("modelopt"), scales="max")

    def poison(ws):
        if len(ws) < 3:
            return
        ws[1][0][3, 5] = float("nan")
        for w in ws[2]:
            w.zero_()
    flags = check(plan, "max", mutate=poison)
    poisoned = [f for f in flags if len(f) >= 3]
    assert poisoned and all(f[1] is False and f[2] is True and f[0] is True for f in poisoned)
    assert all(all(f) for f in flags if len(f) < 3)


@pytest.mark.parametrize("method", ["max", "mse", "amax"])
def test_a_member_quantized_to_all_zeros_is_flagged_alone(moe, method):
    """An expert whose up_proj is 1e-9 of its gate_proj: under the group's one weight_scale_2 every FP4 code
    of up_proj is 0, so it would be written as zeros. The batch flags that group alone, as
    quantize_group does (check's own comparison), and the CPU reference the pipeline then runs refuses it
    with one line (it was written as zeros with exit 0 before stop 21)."""
    from shardconv.errors import QuantizationError
    from shardconv.quantize import redo_on_cpu

    src, root = moe
    amax = load_amax(root / "static.pt") if method == "amax" else None
    plan = build_plan(open_source(str(src)), get_format("modelopt"), scales=method, amax=amax)
    shrunk = []

    def shrink(ws):
        if len(ws) > 3 and len(ws[3]) == 2:  # a gate/up batch
            ws[3][1].mul_(1e-9)
            shrunk.append(ws[3])
    flags = check(plan, method, mutate=shrink)
    assert shrunk and all(f[3] is False and all(f[:3]) and all(f[4:]) for f in flags if len(f) > 3 and f[3] is False)
    assert sum(1 for f in flags if False in f) == len(shrunk)
    units = [us for us in batches(plan) if len(us[0].members) == 2][0]
    with pytest.raises(QuantizationError, match="every value quantizes to 0"):
        redo_on_cpu(units[3].members, shrunk[0], method)


@GPU
@pytest.mark.gpu
@pytest.mark.parametrize("method", ["max", "mse", "four-over-six"])
def test_batch_on_cuda_equals_the_cpu(moe, method):
    src, _ = moe
    plan = build_plan(open_source(str(src)), get_format("modelopt"), scales=method)
    check(plan, method, device="cuda")


@GPU
@pytest.mark.gpu
def test_batched_mse_flags_a_group_it_cannot_search_exactly(moe):
    """A group whose global amax makes some candidate scales subnormal (the window's doubling
    argument fails) is flagged in the batch, and the CPU reference, which the pipeline then runs
    (redo_on_cpu), quantizes it; the other groups of the batch are exact and equal the CPU's."""
    from shardconv.quantize import redo_on_cpu

    src, _ = moe
    plan = build_plan(open_source(str(src)), get_format("modelopt"), scales="mse")
    units = batches(plan)[0]
    groups = [u.members for u in units]
    ws = [[read_into(m.weight).clone() for m in ms] for ms in groups]
    top = max(float(w.float().abs().max()) for w in ws[1])
    for w in ws[1]:  # g = 1e-33: scale_2 is still a normal fp32, the smallest candidate scales are not
        w.copy_((w.float() * (1e-33 / top)).to(w.dtype))
    got = quantize_batch(groups, [[w.cuda() for w in g] for g in ws], "mse", "cuda", chunk=4096)
    flags = [all(bool(q.ok) for q in res) for res in got]
    assert flags[1] is False and all(f for i, f in enumerate(flags) if i != 1)
    redone = redo_on_cpu(groups[1], ws[1], "mse")
    for q, r in zip(redone, quantize_group(groups[1], ws[1], "mse", "cpu")):
        assert same(q.packed, r.packed) and same(q.scale, r.scale)
    for ms, w, res in list(zip(groups, ws, got))[2:]:
        for q, r in zip(res, quantize_group(ms, w, "mse", "cpu")):
            assert same(q.packed.cpu(), r.packed) and same(q.scale.cpu(), r.scale)


@GPU
@pytest.mark.gpu
@pytest.mark.parametrize("method", ["mse", "four-over-six"])
def test_one_group_on_cuda_searches_without_waiting_and_flags_what_is_not_exact(moe, method):
    """quantize_group on the device (check=False, as the pipeline runs a dense layer) searches each row
    chunk with the batched kernels (scales.block_scales_flagged, no host read): bytes equal the CPU's,
    and a group of absurd g is flagged, not written from an inexact search."""
    src, _ = moe
    plan = build_plan(open_source(str(src)), get_format("modelopt"), scales=method)
    members = batches(plan)[0][0].members
    ws = [read_into(m.weight).clone() for m in members]
    got = quantize_group(members, [w.cuda() for w in ws], method, "cuda", to_cpu=False, chunk=4096, check=False)
    assert all(bool(q.ok) for q in got)
    for q, r in zip(got, quantize_group(members, ws, method, "cpu")):
        assert same(q.packed.cpu(), r.packed) and same(q.scale.cpu(), r.scale)
    top = max(float(w.float().abs().max()) for w in ws)
    tiny = [(w.float() * (1e-33 / top)).to(w.dtype) for w in ws]
    flagged = quantize_group(members, [w.cuda() for w in tiny], method, "cuda", to_cpu=False, chunk=4096,
                             check=False)
    assert [bool(q.ok) for q in flagged] == [method != "mse"] * len(members)  # four-over-six has no window


def test_group_tables_equal_the_per_group_ones():
    from shardconv import sweep

    g = torch.tensor([0.5, 3.0, 1e-33, 0.0, 7.25e4])
    table = sweep.candidate_scales_groups(g)
    exact = sweep.doubling_holds_groups(table)
    for i in range(len(g)):
        one = sweep.candidate_scales(g[i])
        assert same(table[i], one)
        assert bool(exact[i]) == sweep.doubling_holds(one)
    assert not bool(exact[2]) and bool(exact[0])
    up, down = sweep.four_over_six_factors(g)
    for i in range(len(g)):
        u, d = sweep.four_over_six_factors(g[i])
        assert same(up[i], u) and same(down[i], d)


def test_structure_keeps_apart_what_cannot_share_a_launch(moe):
    from dataclasses import replace

    src, _ = moe
    plan = build_plan(open_source(str(src)), get_format("modelopt"), scales="max")
    by = {u.members[0].module: u.members for u in plan.units if u.members}
    experts = [ms for name, ms in by.items() if ".experts." in name and name.endswith("gate_proj")]
    assert len({structure(ms) for ms in experts}) == 1  # every expert's gate/up, both layers
    assert structure(by["model.layers.0.self_attn.q_proj"]) != structure(experts[0])
    down = [ms for name, ms in by.items() if name.endswith("experts.0.down_proj")][0]
    assert structure(down) != structure(experts[0])
    assert structure([replace(down[0], stacked=True)]) is None

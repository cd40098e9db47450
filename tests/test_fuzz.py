"""Fuzzing real shard headers: every mutated checkpoint ends in a clean ShardconvError or a correct result.

Seeded and fast. Thousands of header-only cases go through ``read_header`` and ``open_source`` +
``build_plan`` + the ``--dry-run`` report; a smaller number run whole conversions, whose outputs must
then pass ``shardconv verify --source``. Any other exception, or a case running past its time limit
(a hang, or a size computation that blows up), fails the test with the seed and mutation to replay.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import struct
from contextlib import contextmanager
from pathlib import Path

import pytest

from conftest import run_cli
from shardconv.report import describe
from shardconv.errors import ShardconvError
from shardconv.formats import get_format
from shardconv.planning import build_plan
from shardconv.safetensors_io import DTYPES, read_header
from shardconv.source import open_source
from shardconv.synth import write_checkpoint

SEED = int(os.environ.get("SHARDCONV_FUZZ_SEED", "20240606"))
HEADER_CASES = int(os.environ.get("SHARDCONV_FUZZ_CASES", "3000"))
CONVERT_CASES = int(os.environ.get("SHARDCONV_FUZZ_CONVERSIONS", "200"))
CASE_SECONDS = 5.0

_ODD_VALUES = [None, True, False, 0, -1, 1.5, float("inf"), "", "x", [], {}, [1, 2], {"a": 1}, 2**64, -(2**63),
               2**48, 2**47, 10**30]


class Hang(Exception):
    pass


@contextmanager
def time_limit(seconds: float):
    def on_alarm(signum, frame):
        raise Hang(f"no result after {seconds} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def split(data: bytes):
    (hlen,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + hlen]), data[8 + hlen :]


def join(header, body: bytes, pad: bool = True) -> bytes:
    raw = header if isinstance(header, (bytes, bytearray)) else json.dumps(header).encode()
    if pad:
        raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + body


def _odd(rng: random.Random):
    return json.loads(json.dumps(rng.choice(_ODD_VALUES)))  # a fresh copy: entries are mutated in place


def mutate_entry(rng: random.Random, entry: dict, header: dict, other_names: list[str]) -> str:
    """Change one field of a tensor entry in place; returns what was done."""
    field = rng.choice(["dtype", "shape", "data_offsets", "drop", "whole"])
    if field == "drop":
        key = rng.choice(["dtype", "shape", "data_offsets"])
        entry.pop(key, None)
        return f"drop {key}"
    if field == "whole":
        return "entry=" + repr(entry.clear() or _odd(rng))  # caller replaces
    if field == "dtype":
        entry["dtype"] = rng.choice(list(DTYPES) + ["F4", "bf16", "F8_E8M0", "", None, 3, ["F32"]])
        return f"dtype={entry['dtype']!r}"
    if field == "shape":
        shape = entry.get("shape")
        shape = [d for d in shape if type(d) is int] if isinstance(shape, list) else []
        shape = shape or [1]
        how = rng.randrange(12)
        if how == 0:
            shape = [2**40, 2**40]
        elif how == 1:
            shape = [rng.choice([2**47, 2**48 - 1, 2**63, 10**20])] * rng.randint(1, 6)
        elif how == 2:
            shape = shape[::-1]
        elif how == 3:
            shape = shape + [1]
        elif how == 4:
            shape = [0] + shape
        elif how == 5:
            shape = []
        elif how == 6 and shape:
            i = rng.randrange(len(shape))
            shape[i] = _odd(rng)
        elif how == 7 and shape:
            i = rng.randrange(len(shape))
            shape[i] = max(0, shape[i] + rng.choice([-1, 1, 16, -16])) if isinstance(shape[i], int) else 1
        elif how == 8:
            shape = [1] * rng.choice([100, 10_000])
        elif how == 9:
            shape = [2**47] * rng.choice([64, 4096]) + [0]  # numel 0: the product must not be computed
        elif how == 10 and len(shape) == 2 and shape[0] % 2 == 0:
            shape = [shape[0] // 2, shape[1] * 2]  # same bytes, other layout: a valid checkpoint
        else:
            shape = _odd(rng)
        entry["shape"] = shape
        return f"shape={str(shape)[:60]}"
    off = entry.get("data_offsets")
    off = [o for o in off if type(o) is int] if isinstance(off, list) else []
    off = off if len(off) >= 2 else [0, 0]
    how = rng.randrange(10)
    if how == 0:
        off = off[::-1]
    elif how == 1:
        off = [off[0] + 2, off[1] + 2]
    elif how == 2:
        off = [max(0, off[0] - 2), max(0, off[1] - 2)]
    elif how == 3:
        off = [off[0], off[1] + rng.choice([1, 2**40, 2**64])]
    elif how == 4:
        off = [0, off[1] - off[0]]  # overlaps the first tensor
    elif how == 5:
        off = off[:1]
    elif how == 6:
        off = off + [off[-1]]
    elif how == 7:
        off = [-off[1], off[0]]
    elif how == 8:
        off = [_odd(rng), _odd(rng)]
    else:
        off = _odd(rng)
    entry["data_offsets"] = off
    return f"data_offsets={str(off)[:60]}"


def mutate_shard(rng: random.Random, data: bytes, other_names: list[str]) -> tuple[bytes, str]:
    """One random mutation of a shard's bytes (header-focused); returns (new bytes, description)."""
    header, body = split(data)
    hlen = len(data) - len(body) - 8
    if not isinstance(header, dict) or not any(n != "__metadata__" for n in header):
        n = rng.randrange(len(data) + 1)  # mutated already in this case
        return data[:n], f"truncate to {n}"
    kind = rng.randrange(16)
    if kind == 0:  # flip bytes inside the header JSON
        b = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            b[rng.randrange(8, 8 + hlen)] = rng.randrange(256)
        return bytes(b), "flip header bytes"
    if kind == 1:  # the length prefix
        n = rng.choice([0, 1, 7, hlen - 1, hlen + 1, hlen + 8, len(data), len(data) - 8, 2**64 - 1, 2**63,
                        100 * 2**20 + 1, rng.randrange(2**32)])
        return struct.pack("<Q", n % 2**64) + data[8:], f"hlen={n}"
    if kind == 2:  # truncate anywhere
        n = rng.choice([0, 3, 8, 9, 8 + hlen // 2, 8 + hlen, len(data) - 1, rng.randrange(len(data))])
        return data[:n], f"truncate to {n}"
    if kind == 3:  # garbage appended (refused, as the safetensors library refuses bytes no tensor covers)
        return data + os.urandom(rng.randint(1, 64)), "append garbage"
    if kind == 4:  # top level not an object / metadata odd
        if rng.random() < 0.5:
            return join(json.dumps(_odd(rng)).encode(), body), "top level not an object"
        header["__metadata__"] = rng.choice([_odd(rng), {"format": "pt", "x": {"nested": [1]}}, {"k": None}])
        return join(header, body), f"__metadata__={header['__metadata__']!r}"
    if kind == 5:  # duplicate entry under another name (overlaps), or a name from another shard
        name = rng.choice([n for n in header if n != "__metadata__"])
        new = rng.choice(other_names) if other_names and rng.random() < 0.5 else name + ".copy"
        header[new] = json.loads(json.dumps(header[name]))
        return join(header, body), f"duplicate {name} as {new}"
    if kind == 6:  # duplicate JSON key (json.loads would keep only the last)
        name = next(n for n in header if n != "__metadata__")
        raw = json.dumps(header).encode()
        dup = json.dumps({name: header[name]})[1:-1].encode()
        return join(raw[:-1] + b"," + dup + b"}", body), f"duplicate JSON key {name}"
    if kind == 7:  # deep nesting
        depth = rng.choice([1000, 100_000])
        raw = b'{"x": ' + b"[" * depth + b"]" * depth + b"}"
        return join(raw, body), f"nesting depth {depth}"
    if kind == 8:  # integer literal too long for int()
        raw = json.dumps(header).encode().replace(b'"shape": [', b'"shape": [' + b"9" * 5000 + b", ", 1)
        return join(raw, body), "5000-digit integer"
    if kind == 9:  # rename a tensor
        name = rng.choice([n for n in header if n != "__metadata__"])
        new = rng.choice(["", "__metadata__", name + ".weight", "lm_head.weight", "a" * 10_000, "x\u0000y",
                          "../../etc/passwd", name.replace(".weight", ".weight_scale_2"),
                          name.replace(".weight", ".weight_packed"), name.replace(".weight", ".weight_scale_inv")])
        header[new] = header.pop(name)
        return join(header, body), f"rename {name} to {new[:40]!r}"
    if kind == 10:  # non-UTF-8 / control bytes in the header
        raw = bytearray(json.dumps(header).encode())
        raw[rng.randrange(len(raw))] = rng.choice([0x00, 0x80, 0xFF, 0xC3])
        return join(bytes(raw), body), "bad byte in header"
    if kind == 11:  # no padding / odd header length
        return join(header, body, pad=False), "unpadded header"
    # 12..15: field mutations of one or two entries
    desc = []
    for _ in range(rng.randint(1, 2)):
        name = rng.choice([n for n in header if n != "__metadata__"])
        if not isinstance(header[name], dict):
            header[name] = {}
        what = mutate_entry(rng, header[name], header, other_names)
        if what.startswith("entry="):
            header[name] = _odd(rng)
            what = f"entry={header[name]!r}"
        desc.append(f"{name}: {what}")
    return join(header, body), "; ".join(desc)


def mutate_config(rng: random.Random, config) -> str:
    """Odd values in the config.json fields that planning reads."""
    if not isinstance(config, dict):
        return "config=" + json.dumps(config)
    key = rng.choice(["model_type", "num_hidden_layers", "num_nextn_predict_layers", "architectures",
                      "quantization_config", "text_config", "tie_word_embeddings", "torch_dtype"])
    value = rng.choice([_odd(rng), {"quant_method": _odd(rng)}, {"quant_method": "fp8", "weight_block_size": _odd(rng)},
                        [_odd(rng)],
                        {"model_type": _odd(rng)}, "gpt_oss", 0, 1])
    config[key] = value
    return f"config {key}={str(value)[:40]}"


def mutate_index(rng: random.Random, index, names: list[str]) -> str:
    if not (isinstance(index, dict) and isinstance(index.get("weight_map"), dict) and index["weight_map"]):
        return "index=" + json.dumps(index)  # mutated already in this case
    wm = index["weight_map"]
    key = rng.choice(list(wm))
    how = rng.randrange(9)
    if how == 0:
        wm[key] = rng.choice([None, 3, ["a"], {"b": 1}, True])
    elif how == 1:
        wm[key] = rng.choice(["../x.safetensors", "/etc/passwd", "", "a\u0000b", ".", "sub/../" + wm[key],
                              "./" + wm[key], "missing.safetensors"])
    elif how == 2:
        wm[key] = rng.choice(names)
    elif how == 3:
        del wm[key]
    elif how == 4:
        wm["not.a.tensor"] = rng.choice(names)
    elif how == 5:
        index["weight_map"] = rng.choice([None, [], "x", 1])
    elif how == 6:
        index.clear()
    elif how == 7:
        return "index=" + json.dumps(rng.choice([[], "x", None, 1]))
    else:
        index["metadata"] = _odd(rng)
    return f"index {how} on {key}"


FAMILIES = {
    # tiny, 8 shards each; qwen3_moe: per-expert Linears and fusion groups across shards;
    # gpt_oss: stacked [E, in, out] experts, biases, sinks
    "qwen3_moe": dict(moe_intermediate_size=32, num_experts=2),
    "gpt_oss": dict(num_experts=2),
}


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    out = []
    for family, extra in FAMILIES.items():
        src = root / family
        write_checkpoint(src, family=family, num_layers=1, hidden_size=64, intermediate_size=64, vocab_size=64,
                         num_heads=2, num_kv_heads=1, head_dim=32, shard_size=12_000, weights="structured", **extra)
        assert len(list(src.glob("model-*.safetensors"))) >= 3
        out.append(src)
    return out


def _tensor_names(path: Path) -> list[str]:
    try:
        return [n for n in split(path.read_bytes())[0] if n != "__metadata__"]
    except Exception:  # mutated already in this case
        return []


def _check_header_invariants(path: Path, tensors) -> None:
    """What read_header accepted must be safe to read: each tensor's raw data_offsets span exactly its
    dtype and shape, inside the file's data section, with no overlaps."""
    data = path.read_bytes()
    raw, body = split(data)
    data_start = len(data) - len(body)
    spans = []
    for name, t in tensors.items():
        entry = raw[name]
        begin, end = entry["data_offsets"]
        n = DTYPES[entry["dtype"]][1]
        for d in entry["shape"]:
            n *= d
        assert end - begin == n, name
        assert (t.dtype, t.shape, t.offset, t.nbytes) == (entry["dtype"], tuple(entry["shape"]), data_start + begin, n)
        assert 0 <= begin and end <= len(body), name
        spans.append((begin, end))
    spans.sort()
    assert all(b0 <= a1 for (_, b0), (a1, _) in zip(spans, spans[1:]))
    # and every data byte belongs to a tensor (no gap, no tail), as the safetensors library requires
    assert all(b0 == a1 for (_, b0), (a1, _) in zip(spans, spans[1:]))
    assert (spans[0][0] if spans else 0) == 0 and (spans[-1][1] if spans else 0) == len(body)


def benign_mutation(rng: random.Random, work: Path) -> str:
    """A change that leaves a valid checkpoint: the conversion must succeed and verify."""
    shards = sorted(work.glob("model-*.safetensors"))
    target = rng.choice(shards)
    header, body = split(target.read_bytes())
    names = [n for n in header if n != "__metadata__"]
    idx_path = work / "model.safetensors.index.json"
    index = json.loads(idx_path.read_text())
    kind = rng.randrange(7)
    if kind == 0:
        header["__metadata__"] = rng.choice([{}, {"format": "pt", "x": "y"}, None])
        what = "metadata"
    elif kind == 1:
        target.write_bytes(join(header, body, pad=False))
        return f"{target.name}: unpadded header"
    elif kind == 2:  # same bytes, other layout, of a tensor the model does not know (reshaping one of the
        # model's is no longer benign: transformers would refuse it, and linears.py refuses it since stop 21)
        new = f"model.layers.0.extra{rng.randrange(100)}.weight"
        raw = b"".join(struct.pack("<f", rng.gauss(0.0, 0.02))[2:] for _ in range(16 * 16))
        shape = rng.choice([[8, 32], [32, 8], [256]])
        header[new] = {"dtype": "BF16", "shape": shape, "data_offsets": [len(body), len(body) + len(raw)]}
        body += raw
        index["weight_map"][new] = target.name
        what = f"extra tensor {new} shape {shape}"
    elif kind == 3:  # another 2-byte float type
        name = rng.choice([n for n in names if header[n]["dtype"] == "BF16"] or names)
        if header[name]["dtype"] == "BF16":
            header[name]["dtype"] = "F16"
        what = f"{name} as F16"
    elif kind == 4:  # an extra tensor the model does not know, index updated (renaming one of the model's
        # tensors is no longer benign: the model would miss it, and linears.py refuses that)
        new = f"model.layers.0.extra{rng.randrange(100)}.weight"
        raw = b"".join(struct.pack("<f", rng.gauss(0.0, 0.02))[2:] for _ in range(16 * 16))  # bf16: high halves
        header[new] = {"dtype": "BF16", "shape": [16, 16], "data_offsets": [len(body), len(body) + len(raw)]}
        body += raw
        index["weight_map"][new] = target.name
        what = f"extra tensor {new}"
    elif kind == 5 and len(names) > 1:  # index entry gone (the header is the truth), the shard still indexed
        # (a shard's only entry gone unlists the shard: its tensor is missing, and linears.py refuses that)
        index["weight_map"].pop(rng.choice(names))
        what = "index entry removed"
    else:  # shards as symlinks (the hub cache's layout)
        store = work.parent / (work.name + "-blobs")
        store.mkdir(exist_ok=True)
        for shard in shards:
            blob = store / shard.name
            shutil.move(str(shard), blob)
            shard.symlink_to(blob)
        return "shards symlinked"
    target.write_bytes(join(header, body))
    idx_path.write_text(json.dumps(index))
    return f"{target.name}: {what}"


_PRISTINE: dict[Path, dict[str, bytes]] = {}


def _restore(base: Path, work: Path) -> None:
    """``work`` as a copy of ``base``; only files a previous case changed are rewritten."""
    if base not in _PRISTINE:
        _PRISTINE[base] = {p.name: p.read_bytes() for p in base.iterdir() if p.is_file()}
    pristine = _PRISTINE[base]
    if not work.exists():
        shutil.copytree(base, work)
    for name, data in pristine.items():
        p = work / name
        if p.is_symlink():
            p.unlink()
        if not p.is_file() or p.stat().st_size != len(data) or p.read_bytes() != data:
            p.write_bytes(data)
    for p in work.iterdir():
        if p.name not in pristine:
            shutil.rmtree(p) if p.is_dir() else p.unlink()


def _make_case(rng: random.Random, base: Path, work: Path) -> tuple[str, Path]:
    """``work`` as a copy of ``base`` with one or two mutations; returns (description, mutated shard or None)."""
    _restore(base, work)
    shards = sorted(work.glob("model-*.safetensors"))
    descs = []
    target = None
    for _ in range(rng.choice([1, 1, 1, 2])):
        if rng.random() < 0.05:
            cfg_path = work / "config.json"
            try:
                config = json.loads(cfg_path.read_text())
            except ValueError:
                config = None
            what = mutate_config(rng, config)
            cfg_path.write_text(what[len("config="):] if what.startswith("config=") else json.dumps(config))
            descs.append(what)
            continue
        if rng.random() < 0.12:
            idx_path = work / "model.safetensors.index.json"
            index = json.loads(idx_path.read_text())
            what = mutate_index(rng, index, [s.name for s in shards])
            if what.startswith("index="):
                idx_path.write_text(what[len("index="):])
            else:
                idx_path.write_text(json.dumps(index))
            descs.append(what)
            continue
        target = rng.choice(shards)
        others = [n for s in shards if s != target for n in _tensor_names(s)]
        data = target.read_bytes()
        try:
            split(data)
        except Exception:  # already mutated beyond parsing: corrupt it further at the byte level
            data, what = data[: rng.randrange(len(data) + 1)], "truncate again"
        else:
            data, what = mutate_shard(rng, data, others)
        target.write_bytes(data)
        descs.append(f"{target.name}: {what}")
    return " | ".join(descs), target


@pytest.mark.heavy
def test_fuzz_headers_and_plans(bases, tmp_path):
    """Thousands of mutated checkpoints: read_header, open_source, build_plan and the dry-run report."""
    rng = random.Random(SEED)
    fmts = [get_format("modelopt"), get_format("compressed-tensors")]
    outcomes = {"ok": 0, "error": 0}
    for case in range(HEADER_CASES):
        base = bases[case % len(bases)]
        work = tmp_path / base.name
        desc, target = _make_case(rng, base, work)
        try:
            with time_limit(CASE_SECONDS):
                if target is not None and target.exists():
                    try:
                        tensors, _ = read_header(target)
                    except ShardconvError:
                        pass
                    else:
                        _check_header_invariants(target, tensors)
                try:
                    source = open_source(str(work))
                    plan = build_plan(source, fmts[case // len(bases) % 2])
                    lines = describe(plan)
                    assert lines and plan.units
                    outcomes["ok"] += 1
                except ShardconvError as e:
                    assert str(e) and "\n" not in str(e)
                    outcomes["error"] += 1
        except (ShardconvError, AssertionError):
            raise
        except BaseException as e:
            raise AssertionError(f"seed {SEED} case {case} ({desc}): {type(e).__name__}: {e}") from e
    # the mutations must reach both sides: refusals and still-valid checkpoints
    assert outcomes["ok"] > HEADER_CASES // 50 and outcomes["error"] > HEADER_CASES // 2, outcomes


@pytest.mark.heavy
def test_fuzz_conversions(bases, tmp_path):
    """Whole conversions of mutated checkpoints: exit 0 with an output that verifies against the
    (mutated) source, or exit 2 with one line and no finished-looking DST. Half the cases use
    mutations that keep the checkpoint valid, so conversions actually run."""
    rng = random.Random(SEED + 1)
    converted = 0
    for case in range(CONVERT_CASES):
        base = bases[case % len(bases)]
        work = tmp_path / base.name
        if case % 4 < 2:
            _restore(base, work)
            desc = benign_mutation(rng, work)
        else:
            desc, _ = _make_case(rng, base, work)
        dst = tmp_path / f"out{case}"
        fmt = rng.choice(["modelopt", "compressed-tensors"])
        try:
            with time_limit(30):
                rc, err = run_cli("convert", work, dst, "--device", "cpu", "--no-progress", "--format", fmt)
                if case % 4 < 2:
                    assert rc == 0, err
                if rc == 0:
                    converted += 1
                    rc_v, err_v = run_cli("verify", dst, "--source", work)
                    assert rc_v == 0, f"output does not verify: {err_v}"
                else:
                    assert rc == 2 and err.startswith("shardconv: error: ") and err.count("\n") == 1, err
                    assert not (dst / "model.safetensors.index.json").exists()
                    assert not dst.exists() or not list(dst.glob("*.safetensors"))
        except BaseException as e:
            raise AssertionError(f"seed {SEED + 1} case {case} ({desc}, {fmt}): {type(e).__name__}: {e}") from e
        shutil.rmtree(dst, ignore_errors=True)
    assert converted >= CONVERT_CASES // 2

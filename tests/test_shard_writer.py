"""The output shard writer: planned layout (input order when aligned, else widest dtype first), files that
safetensors reads back, and a digest (SHA-256 over the SHA-256s of fixed-size pieces) computed while
writing that equals the finished file's, whatever the order and threads of the writes."""

import hashlib
import random
import threading

import pytest
import torch
from safetensors import safe_open

from shardconv.digest import shard_digest
from shardconv.safetensors_io import DTYPE_NAMES, DTYPES, TensorInfo
from shardconv.shard_writer import PlannedTensor, ShardWriter, layout


def planned(specs):
    return [PlannedTensor(f"t{i}", DTYPE_NAMES[dtype], shape) for i, (dtype, shape) in enumerate(specs)]


ALIGNED = [(torch.uint8, (64, 32)), (torch.float8_e4m3fn, (64, 4)), (torch.float32, ()), (torch.float32, ()),
           (torch.bfloat16, (64,)), (torch.uint8, (8, 8))]
MISALIGNED = [(torch.uint8, (3, 5)), (torch.float32, ()), (torch.bfloat16, (7,)), (torch.float8_e4m3fn, (1, 3))]


def test_layout_keeps_input_order_when_aligned():
    ts = planned(ALIGNED)
    layout(ts)
    assert [t.offset for t in ts] == sorted(t.offset for t in ts)  # front to back in the given order


def test_layout_sorts_by_width_when_input_order_would_misalign():
    ts = planned(MISALIGNED)
    layout(ts)
    assert all(t.offset % DTYPES[t.dtype][1] == 0 for t in ts)
    assert [t.dtype for t in sorted(ts, key=lambda t: t.offset)] == ["F32", "BF16", "U8", "F8_E4M3"]


def values(spec, seed):
    dtype, shape = spec
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * 3).to(dtype) if dtype != torch.uint8 else torch.randint(
        0, 256, shape, dtype=torch.uint8, generator=g)


def piecewise_sha256(data: bytes, piece: int) -> str:
    """The digest written out by hand: SHA-256 of the concatenated SHA-256s of each piece."""
    parts = [hashlib.sha256(data[i : i + piece]).digest() for i in range(0, len(data), piece)]
    return hashlib.sha256(b"".join(parts)).hexdigest()


@pytest.mark.parametrize("specs", [ALIGNED, MISALIGNED], ids=["input-order", "width-order"])
@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("piece", [64, 1000, None], ids=["piece64", "piece1000", "default-piece"])
def test_hash_while_writing_equals_the_files_in_any_order(specs, seed, piece, tmp_path, monkeypatch):
    if piece:
        monkeypatch.setattr(ShardWriter, "piece", piece)
    rng = random.Random(seed)
    ts = planned(specs)
    data = {t.name: values(s, seed * 100 + i) for i, (t, s) in enumerate(zip(ts, specs))}
    source = tmp_path / "source.bin"  # some tensors arrive by copy_from, as kept tensors do
    raw = b"".join(data[t.name].reshape(-1).view(torch.uint8).numpy().tobytes() for t in ts)
    source.write_bytes(b"pad" + raw)
    infos, pos = {}, 3
    for t in ts:
        infos[t.name] = TensorInfo(t.name, source, t.dtype, t.shape, pos, t.nbytes)
        pos += t.nbytes
    w = ShardWriter(tmp_path / "shard.safetensors", ts, {"format": "pt"})
    order = [t.name for t in ts]
    rng.shuffle(order)

    def put(name):
        if rng.random() < 0.4:  # through a buffer of one widest element (several reads), or a fresh one
            w.copy_from(name, infos[name], memoryview(bytearray(rng.choice([8, 64]))) if rng.random() < 0.5 else None)
        else:
            w.write(name, data[name])

    threads = [threading.Thread(target=put, args=(n,)) for n in order]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    w.finish()
    written = (tmp_path / "shard.safetensors").read_bytes()
    assert w.digest == piecewise_sha256(written, piece or ShardWriter.piece)
    assert w.digest == shard_digest(tmp_path / "shard.safetensors", threads=3, piece=piece)
    with safe_open(str(tmp_path / "shard.safetensors"), "pt") as f:
        for name, want in data.items():
            got = f.get_tensor(name)
            assert got.dtype == want.dtype and torch.equal(got.reshape(-1).view(torch.uint8), want.reshape(-1).view(torch.uint8))


def test_unfinished_shard_has_no_hash_and_finish_refuses(tmp_path):
    ts = planned(ALIGNED)
    w = ShardWriter(tmp_path / "s.safetensors", ts)
    w.write("t0", values(ALIGNED[0], 0))
    with pytest.raises(RuntimeError, match="never written"):
        w.finish()
    assert w.digest is None
    w.abort()
    assert not list(tmp_path.iterdir())


def test_a_tensor_copied_in_pieces_on_threads_completes_once(tmp_path):
    data = torch.arange(10_000, dtype=torch.int16)
    raw = data.view(torch.uint8).numpy().tobytes()
    (tmp_path / "src.bin").write_bytes(b"x" * 5 + raw)
    info = TensorInfo("t0", tmp_path / "src.bin", "I16", (10_000,), 5, len(raw))
    w = ShardWriter(tmp_path / "s.safetensors", [PlannedTensor("t0", "I16", (10_000,))])
    cuts = [0, 2, 778, 7000, 7002, len(raw)]  # whole 2-byte elements (a split one is refused: below)
    done = []
    threads = [threading.Thread(target=lambda a=a, b=b: done.append(w.copy_from("t0", info, memoryview(bytearray(100)), a, b)))
               for a, b in zip(cuts, cuts[1:])]
    random.Random(0).shuffle(threads)
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert sorted(done) == [False] * 4 + [True]
    w.finish()
    with safe_open(str(tmp_path / "s.safetensors"), "pt") as f:
        assert torch.equal(f.get_tensor("t0"), data)


FLOATS = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
          "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


@pytest.mark.parametrize("name", sorted(FLOATS))
def test_kept_tensor_check_finds_the_first_nonfinite_value_anywhere(name, monkeypatch):
    """The kept-tensor check (numpy, in slices) refuses exactly what torch.isfinite calls NaN/Inf, at any
    place (first or last element, either side of a slice boundary) and names the first flat index;
    every finite bit pattern passes."""
    from shardconv import safetensors_io
    from shardconv.errors import SourceError
    from shardconv.safetensors_io import check_finite_bytes

    monkeypatch.setattr(safetensors_io, "_FINITE_SLICE", 64)  # many slices on a small tensor
    dtype = FLOATS[name]
    size = torch.empty((), dtype=dtype).element_size()
    every = torch.arange(2 ** (8 * min(size, 2)), dtype=torch.int64)  # every bit pattern of the low 16 bits
    raw = every.to(torch.int16 if size == 2 else torch.uint8 if size == 1 else torch.int64)
    if size >= 4:  # wide types: patterns in the top bits, where sign and exponent live
        raw = (every << (8 * size - 16)).to(torch.int32 if size == 4 else torch.int64)
    elems = raw.view(dtype)
    finite = torch.isfinite(elems.float() if size == 1 else elems)
    info = TensorInfo(name="t", dtype=name, shape=(len(elems),), offset=0, nbytes=len(elems) * size, path="f")
    good = elems[finite].contiguous()
    check_finite_bytes(info, memoryview(good.view(torch.uint8).numpy()), 0)  # all finite patterns pass
    bad = elems[~finite]
    assert len(bad) > 0
    for place in (0, 63 // size, 64 // size, len(good) - 1):
        t = good.clone()
        t[place] = bad[place % len(bad)]
        t[-1] = bad[-1]  # a later one too: the first is named
        with pytest.raises(SourceError, match=rf"tensor 't' holds NaN/Inf \(first at flat index {place + 7}\)"):
            check_finite_bytes(info, memoryview(t.view(torch.uint8).numpy()), 7 * size)


def test_piece_hash_mapped_and_read_agree(tmp_path, monkeypatch):
    """A piece is hashed through a mapping of the file, or read where the file system cannot map it:
    the same SHA-256 either way, at page-aligned and unaligned starts; page-aligned spans really are
    mapped (else the faster path could be lost without a test failing)."""
    import mmap
    import os

    from shardconv import digest

    data = random.Random(3).randbytes(3 * mmap.PAGESIZE + 123)
    path = tmp_path / "f"
    path.write_bytes(data)
    maps = []
    real_mmap = digest.mmap.mmap
    monkeypatch.setattr(digest.mmap, "mmap", lambda *a, **k: (maps.append(k.get("offset")), real_mmap(*a, **k))[1])
    fd = os.open(path, os.O_RDONLY)
    try:
        spans = [(0, len(data)), (mmap.PAGESIZE, 2 * mmap.PAGESIZE + 5), (7, 100), (5, 5)]
        mapped = [digest.piece_sha256(fd, a, b, mapped=True) for a, b in spans]
        assert 0 in maps and mmap.PAGESIZE in maps  # the aligned spans went through a mapping

        def unmappable(*args, **kwargs):
            raise OSError("no mmap here")

        monkeypatch.setattr(digest.mmap, "mmap", unmappable)
        monkeypatch.setattr(digest, "READ_BACK", 1000)  # several reads per piece
        read = [digest.piece_sha256(fd, a, b, mapped=True) for a, b in spans]
    finally:
        os.close(fd)
        digest._local.__dict__.pop("buffer", None)  # the 1000-byte buffer stays with this test
    assert mapped == read == [hashlib.sha256(data[a:b]).digest() for a, b in spans]


def test_digests_of_files_others_may_change_are_read_not_mapped(tmp_path, monkeypatch):
    """Resume and verify hash DST files another program may truncate meanwhile: through a mapping
    that kills the process with SIGBUS; read, it is an error naming the file. Only the writer's own
    just-written shard is mapped."""
    from shardconv import digest

    def no_mapping(*args, **kwargs):
        raise AssertionError("mapped a file others may change")

    path = tmp_path / "f"
    path.write_bytes(random.Random(4).randbytes(3 * 4096))
    monkeypatch.setattr(digest.mmap, "mmap", no_mapping)
    assert digest.shard_digest(path, piece=4096) == digest.combine_digests(
        [hashlib.sha256(path.read_bytes()[i:i + 4096]).digest() for i in range(0, 3 * 4096, 4096)])


def test_a_copy_piece_that_splits_an_element_is_refused(tmp_path):
    """An element split between two pieces would be checked for NaN/Inf by neither: such a piece (or a
    buffer smaller than one element) is a caller's bug, refused, never copied unchecked."""
    import torch

    from shardconv.safetensors_io import TensorInfo
    from shardconv.shard_writer import PlannedTensor, ShardWriter

    src = tmp_path / "src.bin"
    src.write_bytes(torch.tensor([1.0, float("nan"), 3.0], dtype=torch.float32).numpy().tobytes())
    info = TensorInfo(name="t", path=src, dtype="F32", shape=(3,), offset=0, nbytes=12)
    w = ShardWriter(tmp_path / "out.safetensors", [PlannedTensor("t", "F32", (3,))], {})
    for start, stop, buf in ((0, 6, None), (2, 12, None), (0, 12, memoryview(bytearray(3)))):
        with pytest.raises(RuntimeError, match="whole 4-byte elements"):
            w.copy_from("t", info, buf, start, stop)
    with pytest.raises(Exception, match="NaN"):  # whole pieces: the NaN is found
        w.copy_from("t", info, memoryview(bytearray(8)), 0, 12)
    w.abort()

"""A hostile or careless DST: nothing outside DST is ever written, and DST holds one run's files.

One section per guarantee (destination.py): identity of SRC and DST by (dev, ino); no write through a
symbolic link; --overwrite replaces the previous output whole; SRC's other files are regular files of
bounded size; one run at a time (the lock); messages that say what is wrong.
"""

import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

from conftest import load_checkpoint, run_cli, tree_digest
from shardconv import output_shards, pipeline, shard_writer
from shardconv.synth import write_checkpoint

ARGS = ("--device", "cpu", "--scales", "max", "--max-shard-size", "120KB", "--no-progress")
LOCK = ".shardconv.lock"
JOURNAL = ".shardconv-journal.json"


@pytest.fixture()
def src(tmp_path):
    path = tmp_path / "src"
    write_checkpoint(path, family="llama", num_layers=2, shard_size=100_000, hidden_size=128, intermediate_size=256)
    (path / "tokenizer.json").write_text('{"model": "src"}')
    return path


@pytest.fixture()
def outside(tmp_path):
    """Files outside DST that a planted link points to: their bytes and modification times."""
    folder = tmp_path / "outside"
    folder.mkdir()
    for i in range(10):
        (folder / f"victim{i}").write_text(f"precious {i}\n")
    return folder


def stamps(folder):
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns, p.stat().st_ino) for p in sorted(folder.iterdir())}


def refused(src, dst, *needles, args=ARGS):
    before = tree_digest(src)
    rc, err = run_cli("convert", src, dst, *args)
    assert rc == 2, err
    assert err.startswith("shardconv: error: ") and err.count("\n") == 1, err
    for n in needles:
        assert str(n) in err, (n, err)
    assert tree_digest(src) == before
    return err


def no_links(dst):
    return [str(p) for p in dst.rglob("*") if p.is_symlink()]


# -- 1. SRC and DST compared by identity ----------------------------------------------------------


def test_dst_through_a_symlink_into_src_is_refused(src, tmp_path):
    (src / "sub").mkdir()
    (tmp_path / "to-sub").symlink_to(src / "sub")
    (tmp_path / "to-src").symlink_to(src)
    refused(src, tmp_path / "to-sub" / "out", "inside SRC")
    refused(src, tmp_path / "to-sub", "inside SRC")  # exists: an empty folder of SRC
    refused(src, tmp_path / "to-src" / "a" / "b", "inside SRC")
    assert not (src / "sub" / "out").exists() and not (src / "a").exists()
    (tmp_path / "up").symlink_to(tmp_path)
    refused(src, tmp_path / "up", "contains SRC")


def test_dst_in_a_folder_src_links_to_is_refused(src, tmp_path):
    """SRC/ext -> elsewhere: writing under elsewhere changes what SRC holds (the old path check missed it)."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (src / "ext").symlink_to(elsewhere)
    refused(src, elsewhere / "out", "inside SRC", "ext")
    assert list(elsewhere.iterdir()) == []


def _unshare_mount_works():
    if not shutil.which("unshare"):
        return False
    probe = subprocess.run(["unshare", "-m", "sh", "-c", "mount --bind / /mnt"], capture_output=True)
    return probe.returncode == 0


def _convert_with_bind_mount(what, where, src, dst, *extra):
    """``shardconv convert SRC DST`` in a private mount namespace where ``what`` is bind-mounted at ``where``."""
    script = (f'mount --bind "{what}" "{where}" && exec "{sys.executable}" -m shardconv convert "{src}" "{dst}" '
              + " ".join([*extra, *ARGS]))
    return subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=os.getcwd()))


def test_dst_inside_src_through_a_bind_mount_is_refused(src, tmp_path):
    """A bind mount of a folder of SRC elsewhere, in a private mount namespace (gone with the process)."""
    if not _unshare_mount_works():
        pytest.skip("mount --bind is not permitted here (needs root or user namespaces)")
    (src / "sub").mkdir()
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    before = tree_digest(src)
    p = _convert_with_bind_mount(src / "sub", mnt, src, mnt / "out")
    assert p.returncode == 2 and "inside SRC" in p.stderr and p.stderr.count("\n") == 1, p.stderr
    assert tree_digest(src) == before and list((src / "sub").iterdir()) == []


def test_overwrite_never_empties_src_bind_mounted_inside_dst(src, tmp_path):
    """--overwrite removes DST's old entries; a bind mount of SRC among them is refused, not emptied."""
    if not _unshare_mount_works():
        pytest.skip("mount --bind is not permitted here (needs root or user namespaces)")
    dst = tmp_path / "dst"
    assert run_cli("convert", src, dst, *ARGS)[0] == 0
    (dst / "mnt").mkdir()
    before = tree_digest(src)
    p = _convert_with_bind_mount(src, dst / "mnt", src, dst, "--overwrite")
    assert p.returncode == 2 and "mount point" in p.stderr and p.stderr.count("\n") == 1, p.stderr
    assert tree_digest(src) == before
    assert (dst / "model.safetensors.index.json").exists()  # checked before anything was removed


# -- 2. never write through a symbolic link in DST ------------------------------------------------


def plant(dst, outside, names):
    for i, name in enumerate(names):
        p = dst / name
        if p.is_symlink() or p.exists():
            p.unlink()
        p.symlink_to(outside / f"victim{i}")


def test_overwrite_replaces_links_never_writes_through_them(src, tmp_path, outside):
    dst = tmp_path / "dst"
    assert run_cli("convert", src, dst, *ARGS)[0] == 0
    reference = tree_digest(dst)
    shards = sorted(p.name for p in dst.glob("model-*.safetensors"))
    before = stamps(outside)
    plant(dst, outside, ["config.json", "model.safetensors.index.json", shards[0], shards[1] + ".partial",
                         "tokenizer.json", "config.json.partial", JOURNAL + ".partial", "hf_quant_config.json"])
    (dst / "generation_config.json").unlink()
    os.link(outside / "victim9", dst / "generation_config.json")  # a hard link: written in place, it changes too
    before = stamps(outside)
    rc, err = run_cli("convert", src, dst, *ARGS, "--overwrite")
    assert rc == 0, err
    assert stamps(outside) == before
    assert no_links(dst) == []
    assert {k: v for k, v in tree_digest(dst).items() if k != JOURNAL} == \
        {k: v for k, v in reference.items() if k != JOURNAL}


def test_resume_replaces_links_never_writes_through_them(src, tmp_path, outside, monkeypatch):
    reference = tmp_path / "reference"
    assert run_cli("convert", src, reference, *ARGS)[0] == 0
    dst = tmp_path / "dst"
    real = output_shards.Shards._done

    def full_after_one(self, shard, n):
        real(self, shard, n)
        if self.remaining[shard] == 0:
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(output_shards.Shards, "_done", full_after_one)
    assert run_cli("convert", src, dst, *ARGS)[0] == 2
    monkeypatch.setattr(output_shards.Shards, "_done", real)
    finished = json.loads((dst / JOURNAL).read_text())["shards"]
    todo = sorted(p.name for p in reference.glob("model-*.safetensors") if p.name not in finished)
    assert finished and len(todo) >= 2  # another writer may finish a shard before the failure stops it
    before = stamps(outside)
    plant(dst, outside, ["config.json", "model.safetensors.index.json", todo[0], todo[1] + ".partial",
                         "tokenizer.json", "config.json.partial", JOURNAL + ".partial", "generation_config.json"])
    (dst / "stale-dir").symlink_to(outside, target_is_directory=True)
    (dst / "tokenizer_config.json").unlink(missing_ok=True)
    os.link(outside / "victim9", dst / "tokenizer_config.json")
    before = stamps(outside)
    rc, err = run_cli("convert", src, dst, *ARGS)
    assert rc == 0, err
    assert stamps(outside) == before
    assert no_links(dst) == []
    assert {k: v for k, v in tree_digest(dst).items() if k != JOURNAL} == \
        {k: v for k, v in tree_digest(reference).items() if k != JOURNAL}


def test_a_linked_journal_is_not_trusted(src, tmp_path, outside):
    dst = tmp_path / "dst"
    assert run_cli("convert", src, dst, *ARGS)[0] == 0
    shutil.copy(dst / JOURNAL, outside / "journal")
    (dst / JOURNAL).unlink()
    (dst / JOURNAL).symlink_to(outside / "journal")
    before = stamps(outside)
    refused(src, dst, "not empty")
    assert run_cli("convert", src, dst, *ARGS, "--overwrite")[0] == 0
    assert stamps(outside) == before and no_links(dst) == []


# -- 3. --overwrite replaces the previous output whole --------------------------------------------


def test_overwrite_leaves_no_file_of_the_previous_model(src, tmp_path):
    other = tmp_path / "other"
    write_checkpoint(other, family="qwen3", num_layers=1, shard_size=60_000, hidden_size=128, intermediate_size=256)
    (other / "modeling_other.py").write_text("# remote code of another model\n")
    (other / "extra").mkdir()
    (other / "extra" / "vocab.txt").write_text("a b c")
    dst = tmp_path / "dst"
    assert run_cli("convert", other, dst, *ARGS)[0] == 0
    (dst / "model-00099-of-00099.safetensors").write_bytes(b"stale")
    (dst / "leftover.partial").write_bytes(b"stale")
    fresh = tmp_path / "fresh"
    assert run_cli("convert", src, fresh, *ARGS)[0] == 0
    rc, err = run_cli("convert", src, dst, *ARGS, "--overwrite")
    assert rc == 0, err
    assert sorted(tree_digest(dst)) == sorted(tree_digest(fresh))  # same names: nothing of the other model
    assert not (dst / "extra").exists() and not (dst / LOCK).exists()
    load_checkpoint(dst)


def test_overwrite_refuses_a_folder_that_is_no_checkpoint(src, tmp_path):
    home = tmp_path / "home"
    (home / "documents").mkdir(parents=True)
    (home / "documents" / "thesis.tex").write_text("years of work")
    (home / ".bashrc").write_text("alias ll='ls -l'")
    (home / "notes.json").write_text("{}")
    before = tree_digest(home)
    refused(src, home, "not a checkpoint", "--overwrite", args=(*ARGS, "--overwrite"))
    assert tree_digest(home) == before and not (home / LOCK).exists()


# -- 4. SRC's other files: regular files only, of bounded size ------------------------------------


def run_sub(src, dst, *extra, timeout=240):
    """In a subprocess with a time limit: a FIFO opened for reading would block forever."""
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    return subprocess.run([sys.executable, "-m", "shardconv", "convert", str(src), str(dst), *ARGS, *extra],
                          capture_output=True, text=True, timeout=timeout, env=env)


@pytest.mark.parametrize("kind", ["fifo", "link-to-fifo", "socket", "link-to-device", "dangling-link"])
def test_special_extra_files_are_refused_before_anything_is_written(src, tmp_path, kind):
    path = src / "chat_template.jinja"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "link-to-fifo":
        os.mkfifo(tmp_path / "pipe")
        path.symlink_to(tmp_path / "pipe")
    elif kind == "socket":
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(str(path))
    elif kind == "link-to-device":
        path.symlink_to("/dev/null")  # not /dev/zero: a regression must fail the test, not fill the disk
    else:
        path.symlink_to(tmp_path / "gone")
    dst = tmp_path / "dst"
    p = run_sub(src, dst)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and str(path) in p.stderr, p.stderr
    word = {"fifo": "a FIFO", "link-to-fifo": "a FIFO (through a symbolic link)", "socket": "a socket",
            "link-to-device": "a character device", "dangling-link": "does not exist"}[kind]
    assert word in p.stderr, p.stderr
    assert not dst.exists()  # refused at check time, not after the shards


def test_extra_file_linked_to_a_regular_file_is_copied_as_a_file(src, tmp_path):
    blob = tmp_path / "blobs" / "abc123"
    blob.parent.mkdir()
    blob.write_text("{}")
    (src / "tokenizer.json").unlink()
    (src / "tokenizer.json").symlink_to(blob)  # a hub snapshot links into the blob cache
    dst = tmp_path / "dst"
    assert run_cli("convert", src, dst, *ARGS)[0] == 0
    assert not (dst / "tokenizer.json").is_symlink() and (dst / "tokenizer.json").read_text() == "{}"


def test_extra_files_over_the_size_cap_are_refused(src, tmp_path):
    (src / "tokenizer.json").write_bytes(b"x" * 3000)
    dst = tmp_path / "dst"
    refused(src, dst, "tokenizer.json", "--max-extra-size", args=(*ARGS, "--max-extra-size", "2KB"))
    assert not dst.exists()
    assert run_cli("convert", src, dst, *ARGS, "--max-extra-size", "4KB")[0] == 0


def test_max_extra_size_default_is_one_gib():
    from shardconv import destination
    from shardconv.cli_args import build_parser

    assert build_parser().parse_args(["convert", "S"]).max_extra_size == destination.DEFAULT_MAX_EXTRA == 2**30


# -- 5. one run at a time -------------------------------------------------------------------------


HOLD = ("import sys, time; from pathlib import Path; from shardconv.destination import DstLock; "
        "DstLock(Path(sys.argv[1])).acquire(); print('held', flush=True); time.sleep(600)")


def test_a_second_run_is_refused_at_once_and_a_killed_holder_frees_dst(src, tmp_path):
    dst = tmp_path / "dst"
    dst.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(dst)], stdout=subprocess.PIPE, text=True,
                              env=dict(os.environ, PYTHONPATH=os.getcwd()))
    try:
        assert holder.stdout.readline().strip() == "held"
        t0 = time.monotonic()
        err = refused(src, dst, "another shardconv run", f"pid {holder.pid}")
        assert time.monotonic() - t0 < 30, err
        assert sorted(os.listdir(dst)) == [LOCK]  # nothing written: not even the journal
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (dst / LOCK).exists()  # a crash leaves the file; flock died with the process
    rc, err = run_cli("convert", src, dst, *ARGS)
    assert rc == 0, err
    assert not (dst / LOCK).exists()  # released and removed at the end


def test_lock_is_held_during_the_run(src, tmp_path, monkeypatch):
    """While a conversion writes, another lock attempt on its DST fails."""
    from shardconv.destination import DstLock
    from shardconv.errors import ShardconvError

    dst = tmp_path / "dst"
    seen = []
    real = pipeline.Converter.run

    def run_and_probe(self):
        with pytest.raises(ShardconvError, match="another shardconv run"):
            DstLock(dst).acquire()
        seen.append(True)
        return real(self)

    monkeypatch.setattr(pipeline.Converter, "run", run_and_probe)
    assert run_cli("convert", src, dst, *ARGS)[0] == 0 and seen


# -- 6. messages that say what is wrong -----------------------------------------------------------


def test_dst_that_is_not_a_folder(src, tmp_path):
    os.mkfifo(tmp_path / "fifo")
    refused(src, tmp_path / "fifo", "exists and is not a folder")
    (tmp_path / "file").write_text("x")
    refused(src, tmp_path / "file", "exists and is not a folder")
    refused(src, tmp_path / "file" / "out", str(tmp_path / "file"), "exists and is not a folder")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    refused(src, tmp_path / "dangling", "symbolic link", "does not exist")
    assert (tmp_path / "file").read_text() == "x" and not (tmp_path / "nowhere").exists()


def test_disk_full_names_the_file_and_the_space_needed(src, tmp_path, monkeypatch):
    dst = tmp_path / "dst"
    real = os.pwrite
    calls = {"n": 0}

    def pwrite(fd, data, pos):
        if os.readlink(f"/proc/self/fd/{fd}").endswith(".partial"):
            calls["n"] += 1
            if calls["n"] > 12:
                raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data, pos)

    monkeypatch.setattr(shard_writer.os, "pwrite", pwrite)
    rc, err = run_cli("convert", src, dst, *ARGS)
    monkeypatch.setattr(shard_writer.os, "pwrite", real)
    assert rc == 2 and err.count("\n") == 1, err
    assert ".safetensors.partial" in err and "No space left on device" in err, err
    assert "the rest of this conversion needs" in err and "free" in err, err
    assert not list(dst.glob("*.partial")) and not (dst / LOCK).exists()


def test_disk_full_at_the_journal_says_so_and_leaves_no_folder(src, tmp_path, monkeypatch):
    from shardconv import journal

    def full(path, obj, indent=2):
        raise OSError(errno.ENOSPC, "No space left on device", str(path) + ".partial")

    monkeypatch.setattr(journal, "write_json", full)
    dst = tmp_path / "new" / "dst"
    refused(src, dst, JOURNAL + ".partial", "No space left on device", "needs", "free")
    assert not dst.exists()

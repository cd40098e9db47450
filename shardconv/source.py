"""The input checkpoint: where it is, its config, its shards and every tensor header, read once.

Only headers are read here; tensor data is read later, one fusion group at a time.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from .errors import SourceError
from .files import INDEX_NAME, indexed_shard_names, stays_inside, unindexed_shards
from .safetensors_io import TensorInfo, _short, read_header

# What a conversion needs from a hub repo: weights, configs, tokenizer, chat template, remote code.
HUB_PATTERNS = ["*.safetensors", "*.json", "*.txt", "*.model", "*.tiktoken", "*.jinja", "*.py", "*.md"]


@dataclass
class Source:
    """A resolved input checkpoint: folder, parsed config, shard files and all tensor infos in file order."""

    root: Path
    config: dict
    shards: list[Path]
    tensors: dict[str, TensorInfo] = field(default_factory=dict)
    name: str = ""  # the model's name: the folder's, or the repo's for a hub id (not the snapshot hash)
    revision: str | None = None  # a hub id's commit (the snapshot converted)

    def __post_init__(self):
        self.name = self.name or self.root.name

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())


def _check(test, path: Path) -> bool:
    """``path.is_file()`` and friends, False where the name itself is unusable (too long, NUL byte)."""
    try:
        return test(path)
    except (OSError, ValueError):
        return False


def resolve(src: str, revision: str | None = None) -> Path:
    """A local folder as is; otherwise a hub repo id fetched with huggingface_hub (cache first), at
    ``revision`` (a branch, tag or commit; default the main branch)."""
    path = Path(src).expanduser()
    if _check(Path.is_dir, path):
        if revision is not None:
            raise SourceError(f"{src}: --revision {revision} applies to hub repo ids, not to a local folder")
        return path.resolve()
    if _check(Path.exists, path):
        raise SourceError(f"{src}: not a folder (SRC must be a checkpoint folder or a hub repo id)")
    if src.count("/") != 1 or src.startswith((".", "/", "~")):
        raise SourceError(f"{src}: no such folder")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:  # pragma: no cover - a declared dependency
        raise SourceError(f"{src}: not a folder, and huggingface_hub is not installed") from None
    try:
        return Path(snapshot_download(src, allow_patterns=HUB_PATTERNS, local_files_only=True, revision=revision))
    except Exception:
        pass
    try:
        return Path(snapshot_download(src, allow_patterns=HUB_PATTERNS, revision=revision))
    except Exception as e:
        raise SourceError(f"{src}: not a local folder and could not be fetched from the hub: {e}") from None


def _inside(root: Path, name: str) -> Path:
    """The shard path named by the index; refuses names that leave SRC (symlinked files are fine)."""
    if not stays_inside(name):
        raise SourceError(f"{root / INDEX_NAME}: shard name {_short(name)} points outside SRC")
    return root / name


# config.json fields that planning reads, and the JSON types a Hugging Face config gives them
_CONFIG_TYPES = {
    "model_type": (str,),
    "architectures": (list,),
    "num_hidden_layers": (int,),
    "num_nextn_predict_layers": (int,),
    "quantization_config": (dict,),
    "tie_word_embeddings": (bool,),
    "text_config": (dict,),
    "language_config": (dict,),
    "llm_config": (dict,),
}


def _check_config(cfg_path: Path, config: dict, where: str = "") -> None:
    """Refuse, with one line, a config.json whose planning fields have impossible types."""
    for key, types in _CONFIG_TYPES.items():
        value = config.get(key)
        if value is None:
            continue
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types) or (
                key == "architectures" and not all(isinstance(a, str) for a in value)):
            raise SourceError(f"{cfg_path}: {where}{key} is {_short(value)}, not a {types[0].__name__}"
                                 + (" of strings" if key == "architectures" else ""))
        if isinstance(value, int) and value < 0:
            raise SourceError(f"{cfg_path}: {where}{key} is negative ({value})")
    if not where:
        for key in ("text_config", "language_config", "llm_config"):
            if isinstance(config.get(key), dict):
                _check_config(cfg_path, config[key], f"{key}.")


_NUMBERED = re.compile(r"^(?P<stem>.+)-(?P<i>\d+)-of-(?P<n>\d+)\.safetensors$")


def _check_numbered(root: Path, shards: list[Path], index_path: Path | None) -> None:
    """Shards named ``<stem>-0000i-of-0000N.safetensors`` promise N of them: every one must be there,
    and, with an index, be listed by it (a shard on disk that the index never names is a set the
    index does not describe)."""
    series: dict[tuple[str, str, int], set[int]] = {}
    for shard in shards:
        m = _NUMBERED.match(shard.name)
        if m:
            series.setdefault((str(shard.parent), m["stem"], len(m["i"]), int(m["n"])), set()).add(int(m["i"]))
    for (parent, stem, width, n), present in sorted(series.items()):
        if n > 100_000 or max(present) > n or 0 in present:
            bad = max(present) if max(present) > n else 0
            raise SourceError(f"{Path(parent) / f'{stem}-{bad:0{width}d}-of-{n:0{width}d}.safetensors'}: "
                                 f"shard number outside 1..{n}")
        for i in range(1, n + 1):
            if i in present:
                continue
            name = f"{stem}-{i:0{width}d}-of-{n:0{width}d}.safetensors"
            path = Path(parent) / name
            if index_path is not None and _check(Path.exists, path):
                raise SourceError(f"{index_path}: lists no tensor in {name}, which is on disk: the index does not "
                                     "describe this checkpoint's shards")
            raise SourceError(f"{path}: missing: {len(present)} of the {n} shards named {stem}-*-of-{n:0{width}d} "
                                 "are there, and a checkpoint is converted whole or not at all")


def open_source(src: str, revision: str | None = None) -> Source:
    """Resolve SRC, read config.json, find the shards and read every header (no tensor data)."""
    root = resolve(src, revision)
    hub = not _check(Path.is_dir, Path(src).expanduser())
    # a hub snapshot lives in .../models--org--name/snapshots/<commit>: name the model, not the hash
    model_name = src.rstrip("/").rsplit("/", 1)[-1] if hub else root.name
    commit = root.name if hub else None
    cfg_path = root / "config.json"
    if not cfg_path.is_file():
        if _check(Path.exists, cfg_path):
            raise SourceError(f"{cfg_path}: not a regular file")
        raise SourceError(f"{cfg_path}: not found (SRC must be a Hugging Face checkpoint folder)")
    try:
        config = json.loads(cfg_path.read_text())
    except (UnicodeDecodeError, ValueError) as e:  # JSONDecodeError, and int literals too long to convert
        raise SourceError(f"{cfg_path}: not valid JSON: {e}") from None
    except RecursionError:
        raise SourceError(f"{cfg_path}: not valid JSON: nested too deeply") from None
    except OSError as e:
        raise SourceError(f"{cfg_path}: cannot read: {e.strerror or e}") from None
    if not isinstance(config, dict):
        raise SourceError(f"{cfg_path}: not a JSON object")
    _check_config(cfg_path, config)

    index_path = root / INDEX_NAME
    weight_map: dict[str, str] | None = None
    if _check(Path.exists, index_path) and not index_path.is_file():
        raise SourceError(f"{index_path}: not a regular file")
    if index_path.is_file():
        try:
            index = json.loads(index_path.read_text())
            weight_map = index["weight_map"]
        except Exception:
            weight_map = None
        if not isinstance(weight_map, dict):
            raise SourceError(f"{index_path}: not a valid index (needs a 'weight_map' object)")
        for tensor, shard_name in weight_map.items():
            if not isinstance(shard_name, str):
                raise SourceError(f"{index_path}: tensor {_short(tensor)} has shard name {_short(shard_name)}, not a string")
            _inside(root, shard_name)
        # "a.safetensors" and "./a.safetensors" name one shard: read it once
        weight_map = {t: os.path.normpath(s) for t, s in weight_map.items()}
        names = indexed_shard_names(weight_map.values())
        shards = [root / n for n in names]
        for name, shard in zip(names, shards):
            if not _check(Path.is_file, shard):
                tensor = next(t for t, s in weight_map.items() if s == name)
                what = "is not a regular file" if _check(Path.exists, shard) else "does not exist"
                raise SourceError(f"{index_path}: tensor {_short(tensor)} is in {_short(name)}, which {what}")
    else:
        shards = unindexed_shards(root)
    if not shards:
        raise SourceError(f"{root}: no .safetensors files (only safetensors checkpoints are supported)")
    _check_numbered(root, shards, index_path if weight_map is not None else None)

    tensors: dict[str, TensorInfo] = {}
    for shard in shards:
        infos, _ = read_header(shard)
        for name, info in sorted(infos.items(), key=lambda kv: kv[1].offset):
            if name in tensors:
                raise SourceError(f"{shard}: tensor {_short(name)} is also in {tensors[name].path.name}")
            if weight_map is not None and weight_map.get(name) != str(shard.relative_to(root)):
                # The header is the truth; a stale index entry is only worth a refusal if it points elsewhere.
                if name in weight_map:
                    raise SourceError(
                        f"{index_path}: tensor {_short(name)} is listed in {_short(weight_map[name])} but stored in {shard.name}"
                    )
            tensors[name] = info
    if weight_map is not None:
        missing = [n for n in weight_map if n not in tensors]
        if missing:
            raise SourceError(
                f"{index_path}: tensor {_short(missing[0])} is listed but not in {_short(weight_map[missing[0]])}"
            )
    return Source(root=root, config=config, shards=shards, tensors=tensors, name=model_name, revision=commit)

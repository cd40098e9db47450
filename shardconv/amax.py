"""Saved amax files: ModelOpt quantizer buffers from a calibration run, read without executing code.

Accepted: a torch file (``torch.load(weights_only=True)``, so a pickle carrying code is refused) or
a safetensors file, holding ModelOpt's state-dict keys (FORMAT.md §7). Extra keys (weights, other
buffers) are ignored. transformers-5 fused-expert quantizers
(``experts.gate_up_proj_weight_quantizers.{e}``) are split back into the per-expert modules that
checkpoints store on disk; BMM-style stacks (GPT-OSS ``experts.gate_up_proj_weight_quantizer``) are
kept under the stacked tensor's name.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import AmaxError

_KEY = re.compile(r"^(?P<module>.+)\.(?P<quantizer>[A-Za-z0-9_]*quantizers?(?:\.\d+)?)\.(?P<buffer>_amax|_global_amax)$")
_FUSED = re.compile(r"^(?P<proj>gate_up_proj|down_proj)_(?P<kind>weight|input)_quantizers?(?:\.(?P<expert>\d+))?$")


@dataclass
class ModuleAmax:
    """What calibration saved for one Linear module (all fp32, on the CPU)."""

    weight: torch.Tensor | None = None  # dynamic: per-tensor amax (0-d); static: per-block amax, flat
    global_amax: torch.Tensor | None = None  # static only: the per-tensor amax the block scales are relative to
    input: torch.Tensor | None = None  # activation amax (W4A4)
    # an uncalibrated expert's weight amax, made from its weights when it is quantized (uncalibrated.py):
    # "static" (per-block max, as the file's other experts) or "dynamic" (per-tensor max); weight is None
    from_weights: str | None = None

    @property
    def static(self) -> bool:
        return self.global_amax is not None


class AmaxFile:
    """Amax entries by module name, with the aliases checkpoints use on disk."""

    def __init__(self, path: Path, modules: dict[str, ModuleAmax], kv: dict[str, dict[str, torch.Tensor]],
                 keys: dict[str, str] | None = None):
        self.path = Path(path)
        self.modules = modules
        self.kv = kv  # attention module -> {"k": amax, "v": amax}
        self.keys = keys or {}  # module (or attention) -> one of the file's keys for it, for messages

    def key(self, module: str) -> str:
        """A key of the file that fed ``module``'s entry, as the user would find it in the file."""
        return self.keys.get(module, module)

    def unknown(self, known: set[str]) -> str | None:
        """The first of the file's modules (and attention modules) that ``known`` lacks under every alias."""
        for module in sorted([*self.modules, *self.kv]):
            if not any(name in known for name in _reverse_aliases(module)):
                return module
        return None

    @property
    def has_weight_amax(self) -> bool:
        return any(m.weight is not None for m in self.modules.values())

    @property
    def has_input_amax(self) -> bool:
        return any(m.input is not None for m in self.modules.values())

    def get(self, module: str) -> ModuleAmax | None:
        for name in _aliases(module):
            if name in self.modules:
                return self.modules[name]
        return None

    def kv_for(self, attention: str) -> dict[str, torch.Tensor] | None:
        return self.kv.get(attention)


def _aliases(module: str) -> list[str]:
    """Names the same module may carry in a calibrated transformers-5 model."""
    names = [module]
    m = re.match(r"^(.*)\.block_sparse_moe\.(.*)$", module)
    if m:
        names.append(f"{m.group(1)}.mlp.{m.group(2)}")
    renames = {".w1": ".gate_proj", ".w3": ".up_proj", ".w2": ".down_proj"}
    for name in list(names):
        for old, new in renames.items():
            if name.endswith(old) and ".experts." in name:
                names.append(name[: -len(old)] + new)
    return names


def _reverse_aliases(module: str) -> list[str]:
    """Names a calibrated transformers-5 module may carry on disk (the inverse of :func:`_aliases`)."""
    names = [module]
    for new, old in ((".gate_proj", ".w1"), (".up_proj", ".w3"), (".down_proj", ".w2")):
        if module.endswith(new) and ".experts." in module:
            names.append(module[: -len(new)] + old)
    fused = re.match(r"^(.*\.experts)\.(gate_up_proj|down_proj)$", module)
    if fused:  # a fused-expert quantizer of experts stored one module each on disk
        names.append(fused.group(1))
    for name in list(names):
        m = re.match(r"^(.*)\.mlp\.(experts(?:\..*)?|gate)$", name)
        if m:
            names.append(f"{m.group(1)}.block_sparse_moe.{m.group(2)}")
    return names


def _load_raw(path: Path) -> dict[str, torch.Tensor]:
    if not path.exists():
        raise AmaxError(f"{path}: amax file not found")
    if not path.is_file():
        raise AmaxError(f"{path}: amax file is not a regular file")
    with open(path, "rb") as f:
        magic = f.read(8)
    if path.suffix == ".safetensors" or (len(magic) == 8 and not magic.startswith((b"PK", b"\x80"))):
        try:
            from safetensors.torch import load_file

            return load_file(str(path))
        except Exception as e:
            if path.suffix == ".safetensors":
                raise AmaxError(f"{path}: not a readable safetensors amax file: {e}") from None
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise AmaxError(
            f"{path}: not a loadable amax file (torch.load with weights_only=True refused it: {first})"
        ) from None
    if isinstance(raw, dict) and "state_dict" in raw and isinstance(raw["state_dict"], dict):
        raw = raw["state_dict"]
    if not isinstance(raw, dict):
        raise AmaxError(f"{path}: amax file must hold a dict of tensors, found {type(raw).__name__}")
    return raw


def load_amax(path: str | Path) -> AmaxFile:
    """Read an amax file and sort its entries per module."""
    path = Path(path)
    raw = _load_raw(path)
    modules: dict[str, ModuleAmax] = {}
    kv: dict[str, dict[str, torch.Tensor]] = {}
    fused: list[tuple[str, str, str, int | None, str, torch.Tensor]] = []
    keys: dict[str, str] = {}  # module -> a key of the file, for messages
    for key, value in raw.items():
        if not isinstance(key, str):
            continue
        m = _KEY.match(key)
        if not m:
            continue
        if not isinstance(value, torch.Tensor):
            raise AmaxError(f"{path}: entry {key!r} is not a tensor")
        if value.layout != torch.strided or value.is_meta or value.numel() == 0 or \
                not (value.is_floating_point() or value.dtype in (torch.int32, torch.int64)):
            what = ("sparse" if value.layout != torch.strided else "a meta tensor (no data)" if value.is_meta
                    else "empty" if value.numel() == 0 else f"of dtype {value.dtype}")
            raise AmaxError(f"{path}: entry {key!r} is {what}; amax entries are dense float tensors")
        value = value.detach().float().cpu()
        if not torch.isfinite(value).all() or (value < 0).any():
            raise AmaxError(f"{path}: entry {key!r} holds NaN, Inf or negative amax values")
        module, quantizer, buffer = m["module"], m["quantizer"], m["buffer"]
        if (buffer == "_global_amax" or "input" in quantizer or "bmm" in quantizer) and value.numel() != 1:
            raise AmaxError(f"{path}: entry {key!r} has shape {list(value.shape)}; it must be a single "
                                 "per-tensor value")
        keys.setdefault(module, key)
        f = _FUSED.match(quantizer)
        if f:
            expert = int(f["expert"]) if f["expert"] is not None else None
            fused.append((module, f["proj"], f["kind"], expert, buffer, value))
            continue
        if quantizer in ("k_bmm_quantizer", "v_bmm_quantizer") and buffer == "_amax":
            kv.setdefault(module, {})[quantizer[0]] = value.reshape(-1).amax()
            continue
        entry = modules.setdefault(module, ModuleAmax())
        if quantizer == "weight_quantizer":
            if buffer == "_amax":
                entry.weight = value
            else:
                entry.global_amax = value.reshape(())
        elif quantizer == "input_quantizer" and buffer == "_amax":
            entry.input = value.reshape(-1).amax()
    # transformers-5 fused experts: per-expert weight quantizers over [2I, H] (gate rows first),
    # one input quantizer per projection shared by all experts.
    shared_inputs = {(mod, proj): v for mod, proj, kind, e, buf, v in fused if kind == "input" and buf == "_amax"}
    # BMM-style stacks (GPT-OSS, Llama-4: ``experts.gate_up_proj [E, in, out]`` on disk): one weight
    # quantizer per projection covers every expert; static block amax are over the transpose,
    # ``[E, out, in/16]``. Planned under the stacked tensor's name.
    for module, proj, kind, expert, buffer, value in fused:
        if expert is not None:
            continue
        entry = modules.setdefault(f"{module}.{proj}", ModuleAmax())
        keys.setdefault(f"{module}.{proj}", f"{module}.{proj}_{kind}_quantizer.{buffer}")
        if kind == "input":
            if buffer == "_amax":
                entry.input = value.reshape(-1).amax()
        elif buffer == "_global_amax":
            entry.global_amax = value.reshape(())
        else:
            entry.weight = value.reshape(()) if value.numel() == 1 else value
    for module, proj, kind, expert, buffer, value in fused:
        if kind != "weight" or expert is None:
            continue
        halves = ("gate_proj", "up_proj") if proj == "gate_up_proj" else ("down_proj",)
        for i, half in enumerate(halves):
            entry = modules.setdefault(f"{module}.{expert}.{half}", ModuleAmax())
            keys.setdefault(f"{module}.{expert}.{half}", f"{module}.{proj}_weight_quantizers.{expert}.{buffer}")
            if buffer == "_global_amax":
                entry.global_amax = value.reshape(())
            elif value.numel() == 1:
                entry.weight = value.reshape(())
            else:
                flat = value.reshape(-1)
                if flat.numel() % len(halves):
                    raise AmaxError(f"{path}: {module}.{proj} expert {expert}: odd number of block amax values")
                n = flat.numel() // len(halves)
                entry.weight = flat[i * n : (i + 1) * n]
            if (module, proj) in shared_inputs:
                entry.input = shared_inputs[(module, proj)].reshape(-1).amax()
    if not modules and not kv:
        raise AmaxError(f"{path}: no ModelOpt quantizer amax entries ('...quantizer._amax') found")
    return AmaxFile(path, modules, kv, keys)

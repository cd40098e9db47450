"""Mixed-precision recipes: which format each quantizable Linear gets (``nvfp4``, ``fp8`` or ``keep``).

Real NVFP4 releases quantize the MoE experts to NVFP4 and keep attention and dense layers in FP8
(ModelOpt's MIXED_PRECISION checkpoints). A recipe names a default per module kind; ``--format-for
PATTERN=FORMAT`` rules (globs over module names, as ``--exclude``) override it, the last match winning (a plain name also covers its subtree, as for ``--exclude``).
Modules the default exclusions keep (lm_head, embeddings, routers, towers, MTP) stay kept whatever
the rules say: those rules only choose among quantized formats.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field

from .errors import OptionError

FORMATS = ("nvfp4", "fp8", "keep")
RECIPES = {
    # every Linear under an ``experts`` module (per-expert or a stacked tensor) NVFP4, the rest FP8
    "nvfp4-experts-fp8": {"experts": "nvfp4", "other": "fp8"},
    "nvfp4": {"experts": "nvfp4", "other": "nvfp4"},  # the default: everything NVFP4
}
_EXPERT = re.compile(r"(^|\.)experts(\.|$)")


def expert_parent(module: str) -> str | None:
    """The ``...experts`` module holding an expert Linear (or a stacked expert tensor), or None."""
    parts = module.split(".")
    for i in range(len(parts) - 1, -1, -1):
        if parts[i] == "experts":
            return ".".join(parts[: i + 1])
    return None


@dataclass(frozen=True)
class Recipe:
    name: str = "nvfp4"
    rules: tuple[tuple[str, str], ...] = field(default_factory=tuple)  # (pattern, format), in order

    @property
    def is_default(self) -> bool:
        return self.name == "nvfp4" and not self.rules

    def describe(self) -> str:
        return " ".join([self.name, *(f"{p}={f}" for p, f in self.rules)])

    def target(self, module: str) -> str:
        """``nvfp4``, ``fp8`` or ``keep`` for a quantizable module (stacked experts: the tensor name)."""
        kinds = RECIPES[self.name]
        fmt = kinds["experts"] if _EXPERT.search(module) else kinds["other"]
        for pattern, rule in self.rules:
            if fnmatch.fnmatchcase(module, pattern) or fnmatch.fnmatchcase(module, pattern + ".*"):
                fmt = rule
        return fmt


def parse(name: str | None, rules: list[str] | tuple[str, ...] = ()) -> Recipe:
    """A Recipe from ``--recipe NAME`` and ``--format-for PATTERN=FORMAT`` strings (OptionError if bad)."""
    name = name or "nvfp4"
    if name not in RECIPES:
        raise OptionError(f"--recipe {name}: unknown (choose from {', '.join(RECIPES)})")
    parsed = []
    for rule in rules:
        pattern, sep, fmt = str(rule).rpartition("=")
        if not sep or not pattern or fmt not in FORMATS:
            raise OptionError(f"--format-for {rule!r}: expected PATTERN=FORMAT with FORMAT one of {', '.join(FORMATS)}")
        parsed.append((pattern, fmt))
    return Recipe(name, tuple(parsed))

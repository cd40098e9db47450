"""Mixed precision in a plan: apply a recipe to the planned members, refuse what engines cannot load,
and say what ModelOpt's MIXED_PRECISION config lists for each module.

Rules (README, Mixed precision):
- a fusion group (q/k/v, gate/up, w1/w3) gets one format: engines run it as one GEMM;
- every expert of one MoE layer gets one format: engines run the layer as one fused-MoE kernel;
- FP8 layers need static activation scales (an --amax file with input_quantizer amax): vLLM's
  ModelOpt FP8 layers are W8A8 with a static ``input_scale`` and load a placeholder when it is missing;
- stacked ([E, in, out]) experts have NVFP4 layouts only;
- a recipe that quantizes nothing to NVFP4 is refused (no NVFP4 checkpoint would result).
"""

from __future__ import annotations

from .errors import OptionError
from .numerics import BLOCK
from .recipes import Recipe, expert_parent


def member_outputs(fmt, m, w4a4: bool) -> list:
    """The tensors (PlannedTensor) a quantized member becomes in ``fmt``: FP8 members the per-tensor FP8
    layout, the others NVFP4's."""
    if m.target == "fp8":
        return fmt.fp8_outputs(m.module, m.out_features, m.in_features, w4a4)
    return fmt.quantized_outputs(m.module, m.out_features, m.in_features, w4a4, experts=m.experts)


def quantized_layers(plan) -> dict[str, dict]:
    """MIXED_PRECISION's ``quantized_layers``: per module (experts: per ``...experts`` module) its
    quant_algo, in the model's module order (:func:`module_order`)."""
    out: dict[str, dict] = {}
    for m in sorted(plan.quantized, key=lambda m: module_order(m.module)):
        algo = {"quant_algo": "FP8"} if m.target == "fp8" else {"quant_algo": plan.nvfp4_algo, "group_size": BLOCK}
        out.setdefault(layer_key(m.module), algo)
    return out


def layer_key(module: str) -> str:
    """The ``quantized_layers`` key of a quantized module: per-expert Linears (and stacked expert
    tensors) are listed under their ``...experts`` module, as ModelOpt 0.47 writes a fused-experts
    model; other modules by name."""
    return expert_parent(module) or module


# Where a module sits among its siblings in a Hugging Face decoder (attention before the MLP; q, k, v, o;
# gate, up, down): ModelOpt lists quantized_layers in the model's module order and numbers config_groups
# by first appearance, which only this order reproduces from names alone (engines read neither order).
_SIBLING_RANK = {name: i for i, name in enumerate((
    "embed_tokens", "self_attn", "attn", "attention", "linear_attn", "mlp", "block_sparse_moe", "feed_forward",
    "q_proj", "q_a_proj", "q_b_proj", "k_proj", "kv_a_proj_with_mqa", "kv_b_proj", "v_proj", "o_proj",
    "gate", "gate_proj", "w1", "up_proj", "w3", "down_proj", "w2", "experts", "shared_expert", "shared_experts"))}


def module_order(name: str) -> tuple:
    """Sort key putting module names in a decoder's module order (layers by number)."""
    return tuple((0, int(p), "") if p.isdigit() else (1, _SIBLING_RANK.get(p, len(_SIBLING_RANK)), p)
                 for p in name.split("."))


def apply(recipe: Recipe, groups: dict[str, list], excluded: dict[str, str], w4a4: bool,
          has_amax: bool) -> None:
    """Set ``member.target`` for every member of ``groups`` (key -> members); members the recipe keeps
    move to ``excluded`` (their group leaves ``groups``). Raises OptionError for a recipe engines
    could not load."""
    by_expert_layer: dict[str, set[str]] = {}
    for key in list(groups):
        members = groups[key]
        targets = {m.module: recipe.target(m.module) for m in members}
        if len(set(targets.values())) > 1:
            desc = ", ".join(f"{mod}={t}" for mod, t in sorted(targets.items()))
            raise OptionError(f"--format-for: fusion group {key} would mix formats ({desc}); engines run it as "
                              "one GEMM, so give its members one format")
        target = next(iter(targets.values()))
        for m in members:
            parent = expert_parent(m.module)
            if parent is not None:
                by_expert_layer.setdefault(parent, set()).add(target)
            if m.stacked and target == "fp8":
                raise OptionError(f"--format-for: {m.module} is a stacked [E, in, out] expert tensor; it has no "
                                  "FP8 layout here (nvfp4 or keep)")
            m.target = target
        if target == "keep":
            for m in groups.pop(key):
                excluded[m.module.rpartition(".")[0] if m.stacked else m.module] = \
                    f"--recipe {recipe.describe()}: keep"
    for parent, targets in sorted(by_expert_layer.items()):
        if len(targets) > 1:
            raise OptionError(f"--format-for: the experts of {parent} would get formats {sorted(targets)}; "
                              "engines run a MoE layer as one kernel, so give all its experts one format")
    members = [m for ms in groups.values() for m in ms]
    fp8 = [m for m in members if m.target == "fp8"]
    if fp8:  # MIXED_PRECISION lists a MoE layer as one ...experts entry: it covers every expert in it
        for mod, why in sorted(excluded.items()):
            parent = expert_parent(mod)
            if parent is not None and by_expert_layer.get(parent, {"keep"}) != {"keep"}:
                raise OptionError(f"--recipe {recipe.describe()}: {mod} is kept ({why}) but the other experts of "
                                  f"{parent} are quantized; the MIXED_PRECISION config names a MoE layer as one "
                                  "entry, so engines would load it as quantized: keep all of its experts or none")
    if fp8 and not any(m.target == "nvfp4" for m in members):
        raise OptionError(f"--recipe {recipe.describe()}: no module would be NVFP4 (a dense model has no experts?); "
                          "nothing here makes an NVFP4 checkpoint")
    if fp8 and not w4a4:
        why = ("the --amax file has no input_quantizer amax" if has_amax else "no --amax file is given")
        raise OptionError(f"--recipe {recipe.describe()}: FP8 layers (e.g. {fp8[0].module}) need static input "
                          f"scales from calibration, but {why}; engines (vLLM) load FP8 layers as W8A8 and would "
                          "use a placeholder input_scale")

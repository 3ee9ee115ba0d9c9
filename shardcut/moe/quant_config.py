"""Quantization configs that name modules: drop pruned experts, renumber kept ones.

Handles, wherever they sit (top level or inside `text_config`): compressed-tensors `ignore`
and `config_groups.*.targets` (exact names and `re:` regexes), `modules_to_not_convert`,
`llm_int8_skip_modules`, `exclude_modules`, GPTQModel `dynamic` (keys `+:regex` / `-:regex`),
ModelOpt `quantized_layers` (keys are module names), and the same keys in ModelOpt's legacy
`hf_quant_config.json`. A regex that names a specific expert is renumbered when its layer and
expert are literal; one that cannot be renumbered mechanically is an error that says so.
Afterwards, expert 0 of every layer must carry the layer's scheme (vLLM reads a MoE layer's
scheme from expert 0): a layer whose kept experts are partly excluded is refused.
"""

from __future__ import annotations

import copy
import re
from collections import defaultdict

from shardcut.format.errors import ShardcutError
from shardcut.moe.model import ModelInfo

_LIST_KEYS = ("ignore", "modules_to_not_convert", "llm_int8_skip_modules", "exclude_modules", "ignored_layers")
_DICT_KEYS = ("dynamic", "quantized_layers")
_DROP = object()


class _Renamer:
    def __init__(self, info: ModelInfo, keep: dict[str, list[int]]) -> None:
        self.info = info
        self.keep = keep
        # (layer key, module inside the expert) -> new ids of the experts excluded from quantization
        self.excluded: dict[tuple[str, str], set[int]] = defaultdict(set)

    def name(self, name: str, excluded_list: bool = False) -> object:
        """New module name, `_DROP` for a pruned expert, or the name unchanged."""
        expert = self.info.expert_of(name)  # ERNIE-VL: the vision half's ids follow the text half's
        if expert is None:
            return name
        new = self.info.new_expert_id(expert.layer, expert.expert, self.keep)
        if new is None:
            return _DROP
        if excluded_list:
            self.excluded[(expert.layer.key, expert.suffix)].add(new)
        return self.info.expert_name(expert.layer, new, expert.suffix)

    def regex(self, pattern: str, where: str, excluded_list: bool = False):
        """Renumber a regex naming one expert literally; refuse one that names experts otherwise."""
        head = "^" if pattern.startswith("^") else ""
        tail = "$" if pattern.endswith("$") and not pattern.endswith("\\$") else ""
        body = pattern[len(head) : len(pattern) - len(tail)]
        plain = body.replace("\\.", ".")
        if re.fullmatch(r"[\w.]+", plain):  # a literal module name written as a regex
            new = self.name(plain, excluded_list)
            if new is _DROP or new == plain:
                return new if new is _DROP else pattern
            new_id = re.search(r"experts\.(\d+)", new[len(plain.split("experts.")[0]) :]).group(1)
            # Change only the expert index, keeping the pattern's own spelling (escapes, anchors).
            body = re.sub(r"(experts(?:\\\.|\.))\d+", lambda m: m.group(1) + new_id, body, count=1)
            return head + body + tail
        if re.search(r"experts(\\\.|\.)[(\[]?\d", pattern):
            raise ShardcutError(
                f"quantization_config {where}: regex {pattern!r} names expert ids in a way that cannot be "
                "renumbered mechanically; rewrite it with explicit module names"
            )
        return pattern


def _entry(renamer: _Renamer, value: str, where: str, excluded_list: bool):
    if not isinstance(value, str):
        return value
    for prefix in ("re:", "+:", "-:"):
        if value.startswith(prefix):
            new = renamer.regex(value[len(prefix) :], where, excluded_list)
            return new if new is _DROP else prefix + new
    if "*" in value or "?" in value or "[" in value:  # fnmatch wildcard (ModelOpt exclude_modules)
        if re.search(r"experts\.\d", value):
            raise ShardcutError(
                f"quantization_config {where}: wildcard {value!r} names expert ids; "
                "rewrite it with explicit module names"
            )
        return value
    return renamer.name(value, excluded_list)


def rewrite_quant_section(section: dict, renamer: _Renamer, where: str) -> dict:
    section = copy.deepcopy(section)
    for key in _LIST_KEYS:
        if isinstance(section.get(key), list):
            out = [_entry(renamer, v, f"{where}.{key}", excluded_list=True) for v in section[key]]
            section[key] = [v for v in out if v is not _DROP]
    for key in _DICT_KEYS:
        if isinstance(section.get(key), dict):
            new = {}
            for k, v in section[key].items():
                nk = _entry(renamer, k, f"{where}.{key}", excluded_list=k.startswith("-:"))
                if nk is not _DROP:
                    new[nk] = v
            section[key] = new
    for name, group in (section.get("config_groups") or {}).items():
        if isinstance(group, dict) and isinstance(group.get("targets"), list):
            out = [_entry(renamer, v, f"{where}.config_groups.{name}.targets", False) for v in group["targets"]]
            group["targets"] = [v for v in out if v is not _DROP]
    return section


def rewrite_quantization(
    config: dict, info: ModelInfo, keep: dict[str, list[int]], side_file: dict | None = None
) -> tuple[dict, dict | None]:
    """Return (config, hf_quant_config) with expert module names dropped/renumbered.

    Example:
        >>> cfg, _ = rewrite_quantization(cfg, info, {"3": [0, 2]})
        >>> cfg["quantization_config"]["ignore"]   # "…experts.2.down_proj" became "…experts.1.down_proj"
    """
    renamer = _Renamer(info, keep)
    config = copy.deepcopy(config)
    for node, where in (
        (config, "quantization_config"),
        (config.get("text_config"), "text_config.quantization_config"),
    ):
        if isinstance(node, dict) and isinstance(node.get("quantization_config"), dict):
            node["quantization_config"] = rewrite_quant_section(node["quantization_config"], renamer, where)
    if side_file is not None:
        side_file = copy.deepcopy(side_file)
        if isinstance(side_file.get("quantization"), dict):
            side_file["quantization"] = rewrite_quant_section(
                side_file["quantization"], renamer, "hf_quant_config.json"
            )
    for (layer_key, module), ids in renamer.excluded.items():
        if 0 < len(ids) < len(keep[layer_key]):
            raise ShardcutError(
                f"layer {layer_key}: experts {sorted(ids)[:5]} ({module or 'whole expert'}) are excluded "
                "from quantization but the others are not; "
                "vLLM reads a MoE layer's scheme from expert 0, so a layer's experts must share one scheme"
            )
    return config, side_file

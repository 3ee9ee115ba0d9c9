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
from shardcut.moe.model import ExpertTensor, ModelInfo

_LIST_KEYS = ("ignore", "modules_to_not_convert", "llm_int8_skip_modules", "exclude_modules", "ignored_layers")
_DICT_KEYS = ("dynamic", "quantized_layers")


class _Dropped:
    """What a pruned expert's entry becomes: left out of its list or dict."""


_DROP = _Dropped()


class _Renamer:
    def __init__(self, info: ModelInfo, keep: dict[str, list[int]]) -> None:
        self.info = info
        self.keep = keep
        # (layer key, module inside the expert) -> new ids of the experts excluded from quantization
        self.excluded: dict[tuple[str, str], set[int]] = defaultdict(set)

    def _renumbered(self, name: str, excluded_list: bool) -> tuple[ExpertTensor, int | None] | None:
        """(The expert module `name` belongs to, its new ModuleList id or None when pruned);
        None when `name` is no expert's. ERNIE-VL: the vision half's new ids follow the text half's."""
        expert = self.info.expert_of(name)
        if expert is None:
            return None
        new = self.info.new_expert_id(expert.layer, expert.expert, self.keep)
        if new is not None and excluded_list:
            self.excluded[(expert.layer.key, expert.suffix)].add(new)
        return expert, new

    def name(self, name: str, excluded_list: bool = False) -> str | _Dropped:
        """New module name, `_DROP` for a pruned expert, or the name unchanged."""
        found = self._renumbered(name, excluded_list)
        if found is None:
            return name
        expert, new = found
        return _DROP if new is None else self.info.expert_name(expert.layer, new, expert.suffix)

    def regex(self, pattern: str, where: str, excluded_list: bool = False) -> str | _Dropped:
        """Renumber a regex naming one expert literally; refuse one that names experts otherwise."""
        head = "^" if pattern.startswith("^") else ""
        tail = "$" if pattern.endswith("$") and not pattern.endswith("\\$") else ""
        body = pattern[len(head) : len(pattern) - len(tail)]
        plain = body.replace("\\.", ".")
        if re.fullmatch(r"[\w.]+", plain):  # a literal module name written as a regex
            found = self._renumbered(plain, excluded_list)
            if found is None:
                return pattern
            new_id = found[1]
            if new_id is None:
                return _DROP
            # Change only the expert index, keeping the pattern's own spelling (escapes, anchors).
            body = re.sub(r"(experts(?:\\\.|\.))\d+", lambda m: m.group(1) + str(new_id), body, count=1)
            return head + body + tail
        if re.search(r"experts(\\\.|\.)[(\[]?\d", pattern):
            raise ShardcutError(
                f"quantization_config {where}: regex {pattern!r} names expert ids in a way that cannot be "
                "renumbered mechanically; rewrite it with explicit module names"
            )
        return pattern


def _entry(renamer: _Renamer, value: object, where: str, excluded_list: bool) -> object:
    if not isinstance(value, str):
        return value
    for prefix in ("re:", "+:", "-:"):
        if value.startswith(prefix):
            new = renamer.regex(value[len(prefix) :], where, excluded_list)
            return new if isinstance(new, _Dropped) else prefix + new
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

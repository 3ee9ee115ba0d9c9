"""Each entry of the architecture table is consistent with itself: what one field names, another
field or the layout it describes must hold. (Whether an entry is right about its family is
tests/test_families.py's job, on tiny real models.)"""

from __future__ import annotations

import dataclasses
import re
from collections import Counter

import pytest

from shardcut.moe.architectures import ARCHITECTURES, Architecture, Calibration, DerivedSet, Stack
from shardcut.plans.keys import is_plan_key

_NAME = re.compile(r"[A-Za-z_][\w]*(?:\.[A-Za-z_\d][\w]*)*")  # a dotted tensor or module path
_SCORINGS = {"softmax", "sigmoid", "sqrtsoftplus"}
_ENTRIES = {a.name: a for a in ARCHITECTURES}


def test_names_and_model_types_are_unique():
    assert len(_ENTRIES) == len(ARCHITECTURES)
    types = Counter(mt for a in ARCHITECTURES for mt in a.model_types)
    assert [mt for mt, n in types.items() if n > 1] == []  # find_architecture would pick one silently


def test_entries_take_named_fields_only():
    for cls in (Architecture, Stack, Calibration, DerivedSet):
        assert all(f.kw_only for f in dataclasses.fields(cls)), cls.__name__
    with pytest.raises(TypeError):
        Stack(("model.layers",), "mlp.experts", ("mlp.gate.weight",))  # type: ignore[misc]


def _paths(*groups: tuple[str, ...]) -> list[str]:
    return [p for g in groups for p in g]


@pytest.mark.parametrize("name", list(_ENTRIES))
def test_entry_is_consistent(name):
    a = _ENTRIES[name]
    assert a.model_types and all(re.fullmatch(r"[a-z][a-z0-9_]*", mt) for mt in a.model_types)
    for keys in (a.expert_keys, a.top_k_keys, a.layer_count_keys):
        assert keys and len(set(keys)) == len(keys) and all(re.fullmatch(r"\w+", k) for k in keys), keys
    assert all(re.fullmatch(r"\w+", k) for k in a.config_path)
    assert a.scoring in _SCORINGS
    assert a.top_k_exact is None or a.top_k_exact >= 1
    if a.group_keys is not None:
        assert len(a.group_keys) == 2
        for spelling in a.group_keys:
            assert all(re.fullmatch(r"\w+", k) for k in ((spelling,) if isinstance(spelling, str) else spelling))
    else:
        assert a.grouped_when is None, "grouped_when without group_keys"
    assert a.unsupported is None or (a.unsupported.strip() and "\n" not in a.unsupported)

    # the rule is total on a config that sets only the layer count: no KeyError, a bool per layer
    assert all(isinstance(a.moe_rule({"num_hidden_layers": 4}, i), bool) for i in range(4))

    assert a.stacks
    prefixes = [s.plan_prefix for s in a.stacks]
    assert len(set(prefixes)) == len(prefixes), "two stacks would make the same plan keys"
    for s in a.stacks:
        _check_stack(a, s)

    # stacks sharing a layer are the halves of one ModuleList (ERNIE-VL): distinct blocks, one path
    by_prefixes: dict[tuple[str, ...], list[Stack]] = {}
    for s in a.stacks:
        by_prefixes.setdefault(s.layer_prefixes, []).append(s)
    for shared in by_prefixes.values():
        assert sorted(s.expert_block for s in shared) == list(range(len(shared)))
        assert len({s.experts for s in shared}) == 1
        assert len({s.block_cols for s in shared}) == 1
        assert len(shared) > 1 or not shared[0].block_cols

    # the selection bias is a tensor the stacks slice
    sliced = {r for s in a.stacks for r in _paths(s.expert_rows, s.expert_cols, s.block_cols)}
    assert a.selection_bias is None or a.selection_bias in sliced, a.selection_bias

    # calibration facts name this entry's model types and stacks
    assert {mt for mt, _ in a.calibration_by_type} <= set(a.model_types)
    assert len(a.calibration_by_type) == len(dict(a.calibration_by_type))
    for cal in (a.calibration, *(c for _, c in a.calibration_by_type)):
        for stack_prefix in cal.text_only_stacks:
            assert stack_prefix in prefixes and stack_prefix, (stack_prefix, prefixes)
        assert cal.experts_module is None or _NAME.fullmatch(cal.experts_module)
        assert cal.unsupported is None or (cal.unsupported.strip() and "\n" not in cal.unsupported)

    # a derived weight set is a folder of the repository whose layer pattern reads the plan key back
    assert len({d.folder for d in a.derived_sets}) == len(a.derived_sets)
    for d in a.derived_sets:
        assert re.fullmatch(r"\w+", d.folder) and d.weights and re.fullmatch(r"\w+", d.count_key)
        assert all(w.endswith(".safetensors") and "/" not in w for w in d.weights)
        assert re.compile(d.layer).groups == 1, d.layer  # the group is the layer index
        assert d.expert_rows and all(_NAME.fullmatch(r) for r in d.expert_rows) and d.why.strip()


def _check_stack(a: Architecture, s: Stack) -> None:
    assert s.layer_prefixes and len(set(s.layer_prefixes)) == len(s.layer_prefixes)
    assert all(_NAME.fullmatch(p) for p in s.layer_prefixes), s.layer_prefixes
    # the patterns ModelInfo builds from the prefixes compile and read the layer index back
    alt = "|".join(re.escape(p) for p in s.layer_prefixes)
    pattern = re.compile(rf"^(?:{alt})\.(\d+)\.(.+)$")
    for p in s.layer_prefixes:
        m = pattern.match(f"{p}.7.{s.marker}")
        assert m and m.groups() == ("7", s.marker)
    assert s.experts is None or _NAME.fullmatch(s.experts)
    rel = _paths(s.expert_rows, s.expert_cols, s.block_cols)
    assert rel or s.fused, "a stack needs a marker"
    assert s.marker == (s.expert_rows + s.expert_cols)[0]
    assert all(_NAME.fullmatch(r) for r in rel + list(s.fused)), rel
    assert len(set(rel)) == len(rel), "a tensor sliced along two axes"
    for f in s.fused:  # a fused module's tensors are named `{f}.…`: no row or column is one of them
        assert not any(r.startswith(f + ".") for r in rel), f
        assert not (s.experts and f.startswith(s.experts + ".")), f"{f} is inside experts: fused already"
    if s.experts:
        assert not any(r.startswith(s.experts + ".") for r in rel), "a row inside experts is shadowed"
    assert is_plan_key(f"{s.plan_prefix}0"), s.plan_prefix
    assert s.follows_rule or s.plan_prefix, "a stack outside the layer rule needs its own plan keys"
    assert s.config_path is None or (s.config_path and all(re.fullmatch(r"\w+", k) for k in s.config_path))
    assert s.zero_experts_key is None or re.fullmatch(r"\w+", s.zero_experts_key)
    for tensor, reason in s.unprunable:
        assert _NAME.fullmatch(tensor) and tensor not in rel and reason.strip()


def test_config_aliases_are_model_types_transformers_knows():
    pytest.importorskip("transformers")
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    aliases = {
        c.config_alias
        for a in ARCHITECTURES
        for c in (a.calibration, *(c for _, c in a.calibration_by_type))
        if c.config_alias
    }
    assert aliases and aliases <= set(CONFIG_MAPPING_NAMES), aliases - set(CONFIG_MAPPING_NAMES)


@pytest.mark.parametrize("arch", ARCHITECTURES, ids=lambda a: a.name)
def test_the_oracle_reads_each_entrys_routers_and_layers_from_the_table(arch: Architecture):
    from shardcut.moe import oracle

    for s in arch.stacks:
        assert s.router_weights, f"{arch.name}: a stack without a router weight cannot be masked"
        for prefix in s.layer_prefixes:
            # transformers may rename the block (Mixtral's `block_sparse_moe` is `mlp` in v5): the
            # router's path inside it is what the oracle matches
            for block in {s.block, "mlp"}:
                at = f"{prefix}.3.{block}." if block else f"{prefix}.3."
                for router in s.router_weights:
                    assert oracle._layer_key(at + router) == "3"
                    assert oracle._ROUTER.search(at + router), at + router
                    assert not oracle._BIAS.search(at + router)
                for bias in s.selection_biases:
                    assert oracle._BIAS.search(at + bias) and not oracle._ROUTER.search(at + bias)
        for name in s.expert_rows + s.expert_cols:  # per-expert scales are neither
            if "bias" not in name and "weight" not in name:
                assert not oracle._BIAS.search(name) and not oracle._ROUTER.search(name), name

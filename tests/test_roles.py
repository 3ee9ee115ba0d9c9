"""Tensor roles: `ModelInfo.classify` gives every tensor of every family one of the closed set of
role types, and the role agrees with the layout facts of tests/fixtures/families.py (derived from
transformers' own tensor names, never from shardcut's table)."""

from __future__ import annotations

import pytest
from fixtures.families import FAMILY_NAMES

from shardcut.format.checkpoint import open_checkpoint
from shardcut.moe.model import Copied, ExpertAxisSlice, ExpertTensor, describe
from shardcut.moe.parameters import tensor_group


def _expected(fam, name: str, ndim: int) -> tuple:
    """What the fixture's facts say tensor `name` is: ("copy",), ("expert", key, id, suffix) or
    ("slice", key, axis, blocks, is_router, row keys)."""
    for key, prefix in fam.moe_layers.items():
        if not name.startswith(prefix):
            continue
        rel = name[len(prefix) :]
        halves = fam.halves(key)
        n = fam.experts_of(key)
        rows, cols = fam.tensors_of(key)
        in_experts = ("." + rel).find(".experts.") >= 0  # inside an `experts` module (DBRX's is fused only)
        if rel in rows or rel in cols:
            axis = 0 if rel in rows else 1
            # router rows, biases and scales are at most 2-D and outside the experts module;
            # fused expert weights are 3-D or inside it (DBRX's [E·F, H], gpt-oss's biases)
            return ("slice", key, axis, n + fam.zero_experts, ndim <= 2 and not in_experts, ())
        if rel in fam.block_cols:
            return ("slice", halves[0], 1, n, True, tuple(halves))
        if fam.experts and rel.startswith(fam.experts + "."):
            head, _, suffix = rel[len(fam.experts) + 1 :].partition(".")
            if head.isdigit():
                e = int(head)
                return ("expert", halves[e // n], e % n, suffix)
            return ("slice", key, 0, n, False, ())  # a fused tensor inside the experts module
    return ("copy",)


def _got(role) -> tuple:
    match role:
        case Copied():
            return ("copy",)
        case ExpertTensor(layer=layer, expert=expert, suffix=suffix):
            return ("expert", layer.key, expert, suffix)
        case ExpertAxisSlice():
            return ("slice", role.layer.key, role.axis, role.blocks, role.is_router, tuple(r.key for r in role.rows))
    raise AssertionError(f"not a role: {role!r}")


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_every_tensor_has_the_role_the_layout_facts_say(families, name):
    b = families(name)
    ckpt = open_checkpoint(b.source)
    info = describe(ckpt)
    seen = set()
    for tensor, (_, t) in ckpt.tensors.items():
        role = info.classify(tensor)
        want = _expected(b.family, tensor, len(t.shape))
        assert _got(role) == want, tensor
        group = {"copy": "other", "expert": "expert"}.get(want[0]) or ("router" if want[4] else "expert")
        assert tensor_group(role) == group, tensor  # inspect's and push's tensor groups
        seen.add(type(role))
    assert ExpertAxisSlice in seen  # every family has a router


def test_expert_of_reads_module_names_and_never_raises(families):
    b = families("ernie4_5_vl_moe")  # two halves share one ModuleList: vision ids follow the text ids
    info = describe(open_checkpoint(b.source))
    prefix = b.family.moe_layers["1"]
    n = b.family.experts_of("1")
    text = info.expert_of(f"{prefix}mlp.experts.2.up_proj")
    vision = info.expert_of(f"{prefix}mlp.experts.{n + 2}")
    assert (text.layer.key, text.expert, text.suffix) == ("1", 2, "up_proj")
    assert (vision.layer.key, vision.expert, vision.suffix) == ("vision.1", 2, "")
    first = b.keep["vision.1"][0]  # the first kept vision expert follows every kept text expert
    new = info.new_expert_id(vision.layer, first, b.keep)
    assert info.expert_name(vision.layer, new, "") == f"{prefix}mlp.experts.{len(b.keep['1'])}"
    assert info.expert_of(f"{prefix}mlp.experts") is None  # the ModuleList itself names no expert
    assert info.expert_of("lm_head") is None
    assert info.expert_of("model.layers.0.mlp.experts.3.up_proj") is None  # a dense layer

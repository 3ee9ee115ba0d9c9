"""The architecture table: one declarative entry per MoE family.

An entry says where a family's MoE layers live in tensor names, which tensors of a layer carry
one row (or column) per expert, where the per-expert ModuleList (or fused expert tensors) sits,
which config keys hold the expert count and top-k, and which layers the config makes MoE.
Nothing else in shardcut knows a family by name: the rewriter, the planner, `inspect` and
`verify` all read this table. Facts: ../shared/reference/moe-checkpoint-formats.md, tables A and B.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

# ---------------------------------------------------------------------------------------------
# Which decoder layers a config makes MoE (Table B). Each rule takes the text config and a
# layer index below num_hidden_layers. Layers at num_hidden_layers + i are MTP layers.

MoeRule = Callable[[dict, int], bool]


def every_layer(cfg: dict, layer: int) -> bool:
    return True


def qwen_sparse_step(cfg: dict, layer: int) -> bool:
    step = cfg.get("decoder_sparse_step") or 1
    return layer not in (cfg.get("mlp_only_layers") or []) and (layer + 1) % step == 0


def first_k_dense(cfg: dict, layer: int) -> bool:
    freq = cfg.get("moe_layer_freq") or 1
    return layer >= (cfg.get("first_k_dense_replace") or 0) and layer % freq == 0


def ernie_interval(cfg: dict, layer: int) -> bool:
    start = cfg.get("moe_layer_start_index", 0)
    end = cfg.get("moe_layer_end_index", -1)
    end = cfg["num_hidden_layers"] - 1 if end in (-1, None) else end
    return (layer + 1) % (cfg.get("moe_layer_interval") or 1) == 0 and start <= layer <= end


def llama4_moe_layers(cfg: dict, layer: int) -> bool:
    if cfg.get("moe_layers") is not None:
        return layer in cfg["moe_layers"]
    step = cfg.get("interleave_moe_layer_step") or 1
    return (layer + 1) % step == 0


# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Stack:
    """A run of decoder layers that contain MoE blocks, e.g. `model.layers.{L}`.

    layer_prefixes: spellings of the layer list in tensor names (first match wins).
    experts: the per-expert ModuleList path inside a layer (`{experts}.{e}.…` are per-expert
        tensors; any other tensor directly under it is a fused `[E, …]` tensor).
    expert_rows: tensors of a layer sliced along dim 0 (router rows, selection/logit biases,
        fused tensors outside `experts`). Absent ones are fine; the first must exist in every
        MoE layer (it marks the layer as MoE).
    expert_cols: tensors sliced along dim 1 (ERNIE's `[1, E]` selection bias).
    plan_prefix: prefix of this stack's plan keys (`"mtp."` makes `mtp.0`).
    follows_rule: False for stacks that are MoE wherever present (Qwen3-Next `mtp.layers`).
    """

    layer_prefixes: tuple[str, ...]
    experts: str | None
    expert_rows: tuple[str, ...]
    expert_cols: tuple[str, ...] = ()
    plan_prefix: str = ""
    follows_rule: bool = True


@dataclass(frozen=True)
class Architecture:
    """One MoE family.

    config_path: sub-config holding the counts when present (`text_config`), else top level.
    expert_keys: every spelling of the routed-expert count; all present ones are rewritten.
    top_k_keys: spellings of top-k. group_keys: (n_group, topk_group) for grouped routing.
    grouped_when: config `topk_method` values under which n_group applies (None: always).
    scoring: how the router turns logits into gates (`softmax` or `sigmoid`), for reports.
    top_k_exact: engines assert top-k equals this (PhiMoE in vLLM needs 2).
    """

    name: str
    model_types: tuple[str, ...]
    stacks: tuple[Stack, ...]
    expert_keys: tuple[str, ...]
    top_k_keys: tuple[str, ...] = ("num_experts_per_tok",)
    moe_rule: MoeRule = every_layer
    config_path: tuple[str, ...] = ()
    group_keys: tuple[str, str] | None = None
    grouped_when: tuple[str, ...] | None = None
    scoring: str = "softmax"
    selection_bias: str | None = None
    top_k_exact: int | None = None
    notes: tuple[str, ...] = field(default=())


def _qwen_layers(prefixes: tuple[str, ...] = ("model.layers",)) -> Stack:
    return Stack(prefixes, "mlp.experts", ("mlp.gate.weight",))


def _deepseek_layers(prefixes: tuple[str, ...] = ("model.layers",)) -> Stack:
    return Stack(prefixes, "mlp.experts", ("mlp.gate.weight", "mlp.gate.e_score_correction_bias"))


_MIXTRAL = Stack(("model.layers",), "block_sparse_moe.experts", ("block_sparse_moe.gate.weight",))
_QWEN_KEYS = ("num_experts", "num_local_experts")
_DEEPSEEK_KEYS = ("n_routed_experts", "num_local_experts", "num_experts")
_GROUPS = ("n_group", "topk_group")

ARCHITECTURES: tuple[Architecture, ...] = (
    Architecture("qwen3_moe", ("qwen3_moe",), (_qwen_layers(),), _QWEN_KEYS, moe_rule=qwen_sparse_step),
    Architecture("qwen2_moe", ("qwen2_moe",), (_qwen_layers(),), _QWEN_KEYS, moe_rule=qwen_sparse_step),
    Architecture("olmoe", ("olmoe",), (_qwen_layers(),), _QWEN_KEYS),
    Architecture(
        "qwen3_next",
        ("qwen3_next",),
        (_qwen_layers(), Stack(("mtp.layers",), "mlp.experts", ("mlp.gate.weight",), plan_prefix="mtp.", follows_rule=False)),
        _QWEN_KEYS,
        moe_rule=qwen_sparse_step,
    ),
    Architecture("mixtral", ("mixtral",), (_MIXTRAL,), ("num_local_experts", "num_experts")),
    Architecture("phimoe", ("phimoe",), (_MIXTRAL,), ("num_local_experts", "num_experts"), top_k_exact=2,
                 notes=("vLLM's PhiMoE (sparsemixer) asserts top_k == 2",)),
    Architecture(
        "minimax_m2",
        ("minimax_m2",),
        (Stack(("model.layers",), "block_sparse_moe.experts",
               ("block_sparse_moe.gate.weight", "block_sparse_moe.e_score_correction_bias")),),
        ("num_local_experts", "num_experts"),
        scoring="sigmoid",
        selection_bias="block_sparse_moe.e_score_correction_bias",
    ),
    Architecture(
        "deepseek_v2",
        ("deepseek_v2",),
        (_deepseek_layers(),),
        _DEEPSEEK_KEYS,
        moe_rule=first_k_dense,
        group_keys=_GROUPS,
        grouped_when=("group_limited_greedy",),
    ),
    Architecture(
        "deepseek_v3",
        ("deepseek_v3", "deepseek_v32", "kimi_k2"),
        (_deepseek_layers(),),
        _DEEPSEEK_KEYS,
        moe_rule=first_k_dense,
        group_keys=_GROUPS,
        scoring="sigmoid",
        selection_bias="mlp.gate.e_score_correction_bias",
    ),
    Architecture(
        "kimi_k25",
        ("kimi_k25",),
        (_deepseek_layers(("language_model.model.layers", "language_model.layers")),),
        _DEEPSEEK_KEYS,
        moe_rule=first_k_dense,
        config_path=("text_config",),
        group_keys=_GROUPS,
        scoring="sigmoid",
        selection_bias="mlp.gate.e_score_correction_bias",
    ),
    Architecture(
        "glm4_moe",
        ("glm4_moe",),
        (_deepseek_layers(),),
        _DEEPSEEK_KEYS,
        moe_rule=first_k_dense,
        group_keys=_GROUPS,
        scoring="sigmoid",
        selection_bias="mlp.gate.e_score_correction_bias",
    ),
    Architecture(
        "dots1",
        ("dots1",),
        (_deepseek_layers(),),
        _DEEPSEEK_KEYS,
        moe_rule=first_k_dense,
        group_keys=_GROUPS,
        scoring="sigmoid",
        selection_bias="mlp.gate.e_score_correction_bias",
    ),
    Architecture(
        "ernie4_5_moe",
        ("ernie4_5_moe",),
        (Stack(("model.layers",), "mlp.experts", ("mlp.gate.weight",),
               expert_cols=("mlp.moe_statics.e_score_correction_bias",)),),
        ("moe_num_experts", "num_experts"),
        top_k_keys=("moe_k", "num_experts_per_tok"),
        moe_rule=ernie_interval,
        selection_bias="mlp.moe_statics.e_score_correction_bias",
    ),
    Architecture(
        "gpt_oss",
        ("gpt_oss",),
        (Stack(("model.layers",), "mlp.experts", ("mlp.router.weight", "mlp.router.bias")),),
        ("num_local_experts", "num_experts"),
    ),
    Architecture(
        "llama4",
        ("llama4", "llama4_text"),
        (Stack(("language_model.model.layers", "model.layers"), "feed_forward.experts",
               ("feed_forward.router.weight",)),),
        ("num_local_experts",),
        moe_rule=llama4_moe_layers,
        config_path=("text_config",),
        scoring="sigmoid",
    ),
    Architecture(
        "granitemoe",
        ("granitemoe", "granitemoeshared", "granitemoehybrid"),
        (Stack(("model.layers",), None,
               ("block_sparse_moe.router.layer.weight", "block_sparse_moe.input_linear.weight",
                "block_sparse_moe.output_linear.weight")),),
        ("num_local_experts",),
    ),
)

_BY_MODEL_TYPE = {mt: a for a in ARCHITECTURES for mt in a.model_types}


def supported_model_types() -> list[str]:
    return sorted(_BY_MODEL_TYPE)


def find_architecture(config: dict) -> Architecture | None:
    """The table entry for a config.json, by `model_type` (None when unsupported)."""
    return _BY_MODEL_TYPE.get(config.get("model_type", ""))

"""The vocabulary of the architecture table: which layers a config makes MoE (the rules), and
the named-field records an entry is made of (`Stack`, `Calibration`, `Architecture`).
The entries themselves are in `architectures.py`.
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


def jamba_period(cfg: dict, layer: int) -> bool:
    return layer % (cfg.get("expert_layer_period") or 1) == (cfg.get("expert_layer_offset") or 0)


def after_dense_layers(cfg: dict, layer: int) -> bool:
    """AFMoE, LFM2-MoE: the first `num_dense_layers` layers are dense."""
    return layer >= (cfg.get("num_dense_layers") or 0)


def moe_block_enabled(cfg: dict, layer: int) -> bool:
    """Gemma-4: every layer carries the MoE block when `enable_moe_block` is set."""
    return bool(cfg.get("enable_moe_block"))


def step3_moe_layers(cfg: dict, layer: int) -> bool:
    """Step3: `moe_layers_enum` ("1,2,…" or a list), else every layer but the first."""
    enum = cfg.get("moe_layers_enum")
    if enum is None:
        return layer >= 1
    items = enum.split(",") if isinstance(enum, str) else enum
    return layer in {int(i) for i in items if str(i).strip()}


def nemotron_h_pattern(cfg: dict, layer: int) -> bool:
    """Nemotron-H: `layers_block_type[L] == "moe"` (transformers), or `E` in the Hub's `hybrid_override_pattern`."""
    types = cfg.get("layers_block_type")
    if isinstance(types, list) and layer < len(types):
        return types[layer] == "moe"
    pattern = cfg.get("hybrid_override_pattern") or ""
    return layer < len(pattern) and pattern[layer] == "E"


def per_layer_types(key: str, moe_values: tuple[str, ...], otherwise: MoeRule) -> MoeRule:
    """A rule reading a per-layer list (`mlp_layer_types`) when the config has one, else `otherwise`."""

    def rule(cfg: dict, layer: int) -> bool:
        types = cfg.get(key)
        if isinstance(types, list) and layer < len(types):
            return types[layer] in moe_values
        return otherwise(cfg, layer)

    return rule


def llama4_moe_layers(cfg: dict, layer: int) -> bool:
    if cfg.get("moe_layers") is not None:
        return layer in cfg["moe_layers"]
    step = cfg.get("interleave_moe_layer_step") or 1
    return (layer + 1) % step == 0


# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Stack:
    """A run of decoder layers that contain MoE blocks, e.g. `model.layers.{L}`.

    layer_prefixes: spellings of the layer list in tensor names (first match wins).
    experts: the per-expert ModuleList path inside a layer (`{experts}.{e}.…` are per-expert
        tensors; any other tensor directly under it is a fused `[E, …]` tensor).
    expert_rows: tensors of a layer sliced along dim 0 (router rows, selection/logit biases,
        fused tensors outside `experts`). Absent ones are fine; the first must exist in every
        MoE layer (it marks the layer as MoE).
    expert_cols: tensors sliced along dim 1 (ERNIE's `[1, E]` selection bias, ERNIE-VL's `[H, E]`
        routers). The marker is the first of `expert_rows + expert_cols`.
    fused: module paths inside a layer whose tensors, whatever their suffix (`weight`,
        `weight_scale_inv`, …), are fused `[E, …]` (Step3's `moe.gate_proj`); for fused tensors
        that sit outside `experts`.
    plan_prefix: prefix of this stack's plan keys (`"mtp."` makes `mtp.0`).
    follows_rule: False for stacks that are MoE wherever present (Qwen3-Next `mtp.layers`).
    config_path: sub-config holding this stack's expert count, top-k and layer rule, when it
        differs from the architecture's (Qwen3-Omni's thinker and talker each have their own).
    zero_experts_key: config key of Z, the zero-computation experts that own the last Z rows of
        the router tensors but have no weights (LongCat-Flash): router rows become
        `kept ++ [E … E+Z-1]`.
    expert_block: for stacks sharing one layer and one `experts` ModuleList (ERNIE-4.5-VL's
        text and vision experts), the block of ids this stack owns: `block·E … block·E+E-1`.
        The halves share one config count, so they keep equal numbers.
    block_cols: `[blocks, E]` tensors shared by such stacks: row `b` belongs to the stack of
        `expert_block` b and is sliced along dim 1 with that stack's kept experts.
    unprunable: (tensor inside a MoE layer, reason): its presence makes pruning impossible
        (DeepSeek-V4's hash-routed layers fix each token's experts in `gate.tid2eid`).
    """

    layer_prefixes: tuple[str, ...]
    experts: str | None
    expert_rows: tuple[str, ...]
    expert_cols: tuple[str, ...] = ()
    plan_prefix: str = ""
    follows_rule: bool = True
    fused: tuple[str, ...] = ()
    config_path: tuple[str, ...] | None = None
    zero_experts_key: str | None = None
    expert_block: int = 0
    block_cols: tuple[str, ...] = ()
    unprunable: tuple[tuple[str, str], ...] = ()

    @property
    def marker(self) -> str:
        """The tensor whose presence makes a layer of this stack a MoE layer (its router)."""
        return (self.expert_rows + self.expert_cols)[0]

    @property
    def block(self) -> str:
        """The MoE block's path inside a layer (`mlp`; "" where the router sits in the layer itself)."""
        if self.experts or self.fused:
            return (self.experts or self.fused[0]).rpartition(".")[0]
        return self.marker.partition(".")[0]

    def _in_block(self, word: str) -> tuple[str, ...]:
        cut = len(self.block) + 1 if self.block else 0
        return tuple(
            name[cut:]
            for name in self.expert_rows + self.expert_cols
            if word in name.rpartition(".")[2] and name.startswith(self.block)
        )

    @property
    def router_weights(self) -> tuple[str, ...]:
        """Paths inside the MoE block of its `[E, H]` router weights (`gate.weight`); the block's
        own name may differ between a checkpoint and transformers' modules, the router's does not."""
        return self._in_block("weight")

    @property
    def selection_biases(self) -> tuple[str, ...]:
        """Paths inside the MoE block of its per-expert selection and logit biases."""
        return self._in_block("bias")


@dataclass(frozen=True, kw_only=True)
class Calibration:
    """How `calibrate` runs a family through transformers' own modelling code (or why it cannot).

    unsupported: why it cannot be calibrated (the CLI prints it); None: it calibrates. Every
        calibratable model type is proven on a tiny model against a float64 full-model
        reference (tests/test_calibrate.py walks the table).
    config_alias: the transformers model_type that builds config.json (and its `text_config`)
        when transformers does not register the spelling the Hub uses (`kimi_k2` is DeepSeek-V3's code).
    images_share_experts: image (or audio) tokens of this multimodal wrapper route through the
        same experts as text; calibration feeds text only (what users do), and the score file says so.
    text_only_stacks: plan-key prefixes of MoE stacks a text-only forward never reaches (ERNIE-VL's
        vision experts, Qwen3-Omni's talker): their layers are not scored.
    experts_module: the experts module a text token runs, relative to the decoder layer, where a
        layer holds several (ERNIE-VL: `mlp.text_moe.experts`) or where it does not take the usual
        `(hidden, top_k_index, top_k_weights)` call (Llama-4); else the layer's one experts module.
    input_scaling_router: the router module (relative to the decoder layer) of a family whose
        routing scores scale each expert's *input* rather than its output, its experts module
        running every expert on the `[E·T, H]` pre-scaled tokens (Llama-4: the layer adds
        f_j(s_j·x), s_j the sigmoid of the top-k logit). The statistics take f_j(x), the expert on
        the unscaled token, as the REAP reference does for Llama-4, with gate s_j, the score the
        layer applies; the layer's own output f_j(s_j·x) flows on. Only routed pairs are computed.
    two_slot_pairs: the experts module cannot take one expert per row (transformers 5.24's
        LongcatFlashExperts squeezes a `[1, N]` top-1 mask to `[N]` and fails): each (token, expert)
        pair gets a second slot of weight 0, on the first zero-computation (identity) expert where
        the module has one (costs nothing), else on the same expert.
    unsupported_when: (text-config key, transformers' default for it, reason): a config where the
        key (absent: its default) is set cannot be calibrated, for that reason (Gemma-4's per-layer
        inputs, which its MoE checkpoints turn off).
    """

    unsupported: str | None = None
    config_alias: str | None = None
    images_share_experts: bool = False
    text_only_stacks: tuple[str, ...] = ()
    experts_module: str | None = None
    input_scaling_router: str | None = None
    two_slot_pairs: bool = False
    unsupported_when: tuple[tuple[str, object, str], ...] = ()


CALIBRATES = Calibration()


@dataclass(frozen=True, kw_only=True)
class DerivedSet:
    """A second copy of the weights under its own names (gpt-oss's `original/`), pruned by the
    same plan as the main shards. `folder` holds the `weights` files and the `config` whose
    `count_key` is its expert count. `layer` matches a tensor name's MoE-layer prefix, its group
    being the plan key; tensors under it ending in one of `expert_rows` hold one dim-0 row block
    per expert (router rows, fused expert weights, their MXFP4 blocks and scales, biases); all
    other tensors are copied. `why` is the line the prune report prints for it."""

    folder: str
    weights: tuple[str, ...]
    config: str
    count_key: str
    layer: str
    expert_rows: tuple[str, ...]
    why: str


@dataclass(frozen=True, kw_only=True)
class Architecture:
    """One MoE family.

    config_path: sub-config holding the counts when present (`text_config`, DBRX's
        `ffn_config`), else top level; a stack may name its own.
    expert_keys: every spelling of the routed-expert count; all present ones are rewritten.
    top_k_keys: spellings of top-k (a per-layer list counts as its largest entry).
    layer_count_keys: spellings of the decoder layer count, looked up in the sub-config, then
        in its parents (DBRX keeps `n_layers` at top level, its counts in `ffn_config`); a list
        or string value (Nemotron-H's per-layer pattern) counts by its length.
    group_keys: (n_group, topk_group) for grouped routing; each may list several spellings.
    grouped_when: config `topk_method` values under which n_group applies (None: always).
    scoring: how the router turns logits into gates (`softmax` or `sigmoid`), for reports.
    top_k_exact: engines assert top-k equals this (PhiMoE in vLLM needs 2).
    unsupported: why this family cannot be pruned (`describe` refuses it with this reason).
    calibration: how `calibrate` runs it (`Calibration`); `calibration_by_type` overrides it for
        some of `model_types` (model_type -> Calibration).
    derived_sets: second copies of the weights under other names that prune rewrites by the
        same plan (`DerivedSet`); any other weight file beside the shards is left out.
    """

    name: str
    model_types: tuple[str, ...]
    stacks: tuple[Stack, ...]
    expert_keys: tuple[str, ...]
    top_k_keys: tuple[str, ...] = ("num_experts_per_tok",)
    moe_rule: MoeRule = every_layer
    config_path: tuple[str, ...] = ()
    layer_count_keys: tuple[str, ...] = ("num_hidden_layers", "n_layers")
    group_keys: tuple[str | tuple[str, ...], str | tuple[str, ...]] | None = None
    grouped_when: tuple[str, ...] | None = None
    scoring: str = "softmax"
    selection_bias: str | None = None
    top_k_exact: int | None = None
    unsupported: str | None = None
    notes: tuple[str, ...] = field(default=())
    calibration: Calibration = CALIBRATES
    calibration_by_type: tuple[tuple[str, Calibration], ...] = ()
    derived_sets: tuple[DerivedSet, ...] = ()

    def calibration_of(self, model_type: str | None) -> Calibration:
        """The calibration facts of one of this entry's model types."""
        return next((c for t, c in self.calibration_by_type if t == model_type), self.calibration)

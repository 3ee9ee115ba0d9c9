"""The architecture table: one declarative entry per MoE family.

An entry says where a family's MoE layers live in tensor names, which tensors of a layer carry
one row (or column) per expert, where the per-expert ModuleList (or fused expert tensors) sits,
which config keys hold the expert count and top-k, and which layers the config makes MoE.
Nothing else in shardcut knows a family by name: the rewriter, the planner, `inspect` and
`verify` all read this table. Facts: ../shared/reference/moe-checkpoint-formats.md, tables A and B.
Entries and stacks take named fields only, one per line; tests/test_architectures.py checks each
entry's own consistency (what one field names, another must hold). The records and the layer
rules the entries are made of are in `schema.py`.
"""

from __future__ import annotations

from shardcut.moe.schema import (  # noqa: F401 (the table's names are imported from here)
    CALIBRATES,
    Architecture,
    Calibration,
    DerivedSet,
    MoeRule,
    Stack,
    after_dense_layers,
    ernie_interval,
    every_layer,
    first_k_dense,
    jamba_period,
    llama4_moe_layers,
    moe_block_enabled,
    nemotron_h_pattern,
    per_layer_types,
    qwen_sparse_step,
    step3_moe_layers,
)


def _qwen_layers(prefixes: tuple[str, ...] = ("model.layers",)) -> Stack:
    return Stack(
        layer_prefixes=prefixes,
        experts="mlp.experts",
        expert_rows=("mlp.gate.weight",),
    )


def _deepseek_layers(prefixes: tuple[str, ...] = ("model.layers",)) -> Stack:
    return Stack(
        layer_prefixes=prefixes,
        experts="mlp.experts",
        expert_rows=("mlp.gate.weight", "mlp.gate.e_score_correction_bias"),
    )


_MIXTRAL = Stack(
    layer_prefixes=("model.layers",),
    experts="block_sparse_moe.experts",
    expert_rows=("block_sparse_moe.gate.weight",),
)
_QWEN_KEYS = ("num_experts", "num_local_experts")
_DEEPSEEK_KEYS = ("n_routed_experts", "num_local_experts", "num_experts")
_GROUPS = ("n_group", "topk_group")
_SPARSE = ("sparse",)
# calibration facts shared by several entries
_SHARED_IMAGES = Calibration(images_share_experts=True)
_NO_TRANSFORMERS = Calibration(
    unsupported="transformers has no implementation of it (the Hub's remote code builds "
    "another MoE block, which the observer does not hook)"
)


def _ernie_vl_half(block: int, plan_prefix: str, router: str) -> Stack:
    return Stack(
        layer_prefixes=("model.layers", "model.language_model.layers"),
        experts="mlp.experts",
        expert_rows=(),
        expert_cols=(router,),
        plan_prefix=plan_prefix,
        expert_block=block,
        block_cols=("mlp.moe_statics.e_score_correction_bias",),
    )


def _qwen_omni(stack: str, config: str, plan_prefix: str) -> Stack:
    return Stack(
        layer_prefixes=(f"{stack}.model.layers",),
        experts="mlp.experts",
        expert_rows=("mlp.gate.weight",),
        plan_prefix=plan_prefix,
        config_path=(config, "text_config"),
    )


# Gemma-4 configs the layer-by-layer stream cannot run (its small dense models use both)
_GEMMA4_SWITCHES = (
    (
        "hidden_size_per_layer_input",
        256,
        "its decoder layers take per-layer token inputs (hidden_size_per_layer_input > 0), computed once "
        "from the token ids and the input embeddings, which the layer-by-layer stream does not carry "
        "(Gemma-4's MoE checkpoints set it to 0 and calibrate)",
    ),
    (
        "num_kv_shared_layers",
        0,
        "its last num_kv_shared_layers layers reuse the keys and values of earlier layers, which the "
        "layer-by-layer stream does not carry",
    ),
)

ARCHITECTURES: tuple[Architecture, ...] = (
    Architecture(
        name="qwen3_moe",
        model_types=("qwen3_moe",),
        stacks=(_qwen_layers(),),
        expert_keys=_QWEN_KEYS,
        moe_rule=qwen_sparse_step,
    ),
    Architecture(
        name="qwen2_moe",
        model_types=("qwen2_moe",),
        stacks=(_qwen_layers(),),
        expert_keys=_QWEN_KEYS,
        moe_rule=qwen_sparse_step,
    ),
    Architecture(
        name="olmoe",
        model_types=("olmoe",),
        stacks=(_qwen_layers(),),
        expert_keys=_QWEN_KEYS,
    ),
    Architecture(
        name="qwen3_next",
        model_types=("qwen3_next",),
        stacks=(
            _qwen_layers(),
            Stack(
                layer_prefixes=("mtp.layers",),
                experts="mlp.experts",
                expert_rows=("mlp.gate.weight",),
                plan_prefix="mtp.",
                follows_rule=False,
            ),
        ),
        expert_keys=_QWEN_KEYS,
        moe_rule=qwen_sparse_step,
    ),
    Architecture(
        name="mixtral",
        model_types=("mixtral",),
        stacks=(_MIXTRAL,),
        expert_keys=("num_local_experts", "num_experts"),
    ),
    Architecture(
        name="phimoe",
        model_types=("phimoe",),
        stacks=(_MIXTRAL,),
        expert_keys=("num_local_experts", "num_experts"),
        top_k_exact=2,
        notes=("vLLM's PhiMoE (sparsemixer) asserts top_k == 2",),
    ),
    Architecture(
        name="minimax_m2",
        model_types=("minimax_m2",),
        stacks=(
            Stack(
                layer_prefixes=("model.layers",),
                experts="block_sparse_moe.experts",
                expert_rows=("block_sparse_moe.gate.weight", "block_sparse_moe.e_score_correction_bias"),
            ),
        ),
        expert_keys=("num_local_experts", "num_experts"),
        scoring="sigmoid",
        selection_bias="block_sparse_moe.e_score_correction_bias",
    ),
    Architecture(
        name="deepseek_v2",
        model_types=("deepseek_v2",),
        stacks=(_deepseek_layers(),),
        expert_keys=_DEEPSEEK_KEYS,
        moe_rule=first_k_dense,
        group_keys=_GROUPS,
        grouped_when=("group_limited_greedy",),
    ),
    Architecture(
        name="deepseek_v3",
        model_types=("deepseek_v3", "deepseek_v32", "kimi_k2"),
        stacks=(_deepseek_layers(),),
        expert_keys=_DEEPSEEK_KEYS,
        moe_rule=first_k_dense,
        group_keys=_GROUPS,
        scoring="sigmoid",
        selection_bias="mlp.gate.e_score_correction_bias",
        calibration_by_type=(("kimi_k2", Calibration(config_alias="deepseek_v3")),),
    ),
    Architecture(
        name="kimi_k25",
        model_types=("kimi_k25",),
        stacks=(_deepseek_layers(("language_model.model.layers", "language_model.layers")),),
        expert_keys=_DEEPSEEK_KEYS,
        moe_rule=first_k_dense,
        config_path=("text_config",),
        group_keys=_GROUPS,
        scoring="sigmoid",
        selection_bias="mlp.gate.e_score_correction_bias",
        calibration=_SHARED_IMAGES,
    ),
    Architecture(
        name="glm4_moe",
        model_types=("glm4_moe",),
        stacks=(_deepseek_layers(),),
        expert_keys=_DEEPSEEK_KEYS,
        moe_rule=first_k_dense,
        group_keys=_GROUPS,
        scoring="sigmoid",
        selection_bias="mlp.gate.e_score_correction_bias",
    ),
    Architecture(
        name="dots1",
        model_types=("dots1",),
        stacks=(_deepseek_layers(),),
        expert_keys=_DEEPSEEK_KEYS,
        moe_rule=first_k_dense,
        group_keys=_GROUPS,
        scoring="sigmoid",
        selection_bias="mlp.gate.e_score_correction_bias",
    ),
    Architecture(
        name="ernie4_5_moe",
        model_types=("ernie4_5_moe",),
        stacks=(
            Stack(
                layer_prefixes=("model.layers",),
                experts="mlp.experts",
                expert_rows=("mlp.gate.weight",),
                expert_cols=("mlp.moe_statics.e_score_correction_bias",),
            ),
        ),
        expert_keys=("moe_num_experts", "num_experts"),
        top_k_keys=("moe_k", "num_experts_per_tok"),
        moe_rule=ernie_interval,
        selection_bias="mlp.moe_statics.e_score_correction_bias",
    ),
    Architecture(
        name="gpt_oss",
        model_types=("gpt_oss",),
        stacks=(
            Stack(
                layer_prefixes=("model.layers",),
                experts="mlp.experts",
                expert_rows=("mlp.router.weight", "mlp.router.bias"),
            ),
        ),
        expert_keys=("num_local_experts", "num_experts"),
        # `original/` (openai/gpt-oss `gpt_oss/torch/model.py` and `weights.py`; transformers'
        # `convert_gpt_oss_weights_to_hf.py` maps it to the HF names without reordering experts):
        # `block.{n}.mlp.gate.{weight,bias}` [E,H]/[E], `mlp1_weight.{blocks,scales}`
        # [E,2I,H/32,16]/[E,2I,H/32], `mlp1_bias` [E,2I], `mlp2_weight.{blocks,scales}`
        # [E,H,I/32,16]/[E,H,I/32], `mlp2_bias` [E,H].
        derived_sets=(
            DerivedSet(
                folder="original",
                weights=("model.safetensors",),
                config="config.json",
                count_key="num_experts",
                layer=r"block\.(\d+)\.mlp\.",
                expert_rows=(
                    "gate.weight",
                    "gate.bias",
                    "mlp1_weight.blocks",
                    "mlp1_weight.scales",
                    "mlp1_bias",
                    "mlp2_weight.blocks",
                    "mlp2_weight.scales",
                    "mlp2_bias",
                ),
                why="OpenAI's own copy of the weights (all experts): pruned by the same plan",
            ),
        ),
    ),
    Architecture(
        name="llama4",
        model_types=("llama4", "llama4_text"),
        stacks=(
            Stack(
                layer_prefixes=("language_model.model.layers", "model.layers"),
                experts="feed_forward.experts",
                expert_rows=("feed_forward.router.weight",),
            ),
        ),
        expert_keys=("num_local_experts",),
        moe_rule=llama4_moe_layers,
        config_path=("text_config",),
        scoring="sigmoid",
        # the router scales the expert input; text only on the multimodal wrapper, whose image tokens
        # route through the same experts
        calibration=Calibration(experts_module="feed_forward.experts", input_scaling_router="feed_forward.router"),
        calibration_by_type=(
            (
                "llama4",
                Calibration(
                    images_share_experts=True,
                    experts_module="feed_forward.experts",
                    input_scaling_router="feed_forward.router",
                ),
            ),
        ),
    ),
    Architecture(
        name="granitemoe",
        model_types=("granitemoe", "granitemoeshared", "granitemoehybrid"),
        stacks=(
            Stack(
                layer_prefixes=("model.layers",),
                experts=None,
                expert_rows=("block_sparse_moe.router.layer.weight",),
                fused=("block_sparse_moe.input_linear", "block_sparse_moe.output_linear"),  # [E, 2I, H], [E, H, I],
            ),
        ),
        expert_keys=("num_local_experts",),
    ),
    # ---- vision-language and omni variants of the Qwen / GLM families ------------------------
    Architecture(
        name="qwen3_vl_moe",
        model_types=("qwen3_vl_moe",),
        stacks=(_qwen_layers(("model.language_model.layers",)),),  # fused, [E,H,2I] / [E,I,H] on the Hub
        expert_keys=_QWEN_KEYS,
        moe_rule=qwen_sparse_step,
        config_path=("text_config",),
        calibration=_SHARED_IMAGES,
    ),
    Architecture(
        name="qwen3_5_moe",
        model_types=("qwen3_5_moe", "qwen3_5_moe_text"),
        stacks=(
            _qwen_layers(("model.language_model.layers", "model.layers")),
            Stack(
                layer_prefixes=("mtp.layers",),
                experts="mlp.experts",
                expert_rows=("mlp.gate.weight",),
                plan_prefix="mtp.",
                follows_rule=False,
            ),
        ),
        expert_keys=_QWEN_KEYS,
        moe_rule=qwen_sparse_step,
        config_path=("text_config",),
        calibration_by_type=(("qwen3_5_moe", _SHARED_IMAGES),),
    ),
    Architecture(
        name="qwen3_omni_moe",
        model_types=("qwen3_omni_moe",),
        stacks=(_qwen_omni("thinker", "thinker_config", ""), _qwen_omni("talker", "talker_config", "talker.")),
        expert_keys=_QWEN_KEYS,
        moe_rule=qwen_sparse_step,
        notes=("thinker and talker have their own expert counts; plan keys 'L' and 'talker.L'",),
        calibration=Calibration(images_share_experts=True, text_only_stacks=("talker.",)),
    ),
    Architecture(
        name="glm4v_moe",
        model_types=("glm4v_moe",),
        stacks=(_deepseek_layers(("model.language_model.layers",)),),
        expert_keys=_DEEPSEEK_KEYS,
        moe_rule=first_k_dense,
        config_path=("text_config",),
        group_keys=_GROUPS,
        scoring="sigmoid",
        selection_bias="mlp.gate.e_score_correction_bias",
        calibration=_SHARED_IMAGES,
    ),
    Architecture(
        name="ernie4_5_vl_moe",
        model_types=("ernie4_5_vl_moe",),
        stacks=(_ernie_vl_half(0, "", "mlp.gate.weight"), _ernie_vl_half(1, "vision.", "mlp.gate.weight_1")),
        expert_keys=("moe_num_experts", "num_experts"),
        top_k_keys=("moe_k", "num_experts_per_tok"),
        moe_rule=per_layer_types("mlp_layer_types", _SPARSE, ernie_interval),
        config_path=("text_config",),
        selection_bias="mlp.moe_statics.e_score_correction_bias",
        notes=(
            "text experts are ids 0..E-1, vision experts E..2E-1 of one ModuleList; routers are [H, E]; "
            "plan keys 'L' (text) and 'vision.L', kept counts equal",
        ),
        calibration=Calibration(text_only_stacks=("vision.",), experts_module="mlp.text_moe.experts"),
    ),
    # ---- DeepSeek-style routers elsewhere ---------------------------------------------------
    Architecture(
        name="kimi_linear",
        model_types=("kimi_linear",),
        stacks=(
            Stack(
                layer_prefixes=("model.layers",),
                experts="block_sparse_moe.experts",
                expert_rows=("block_sparse_moe.gate.weight", "block_sparse_moe.gate.e_score_correction_bias"),
            ),
        ),
        expert_keys=("num_experts", "num_local_experts"),
        top_k_keys=("num_experts_per_token", "num_experts_per_tok"),
        moe_rule=per_layer_types("mlp_layer_types", _SPARSE, first_k_dense),
        group_keys=(("num_expert_group", "n_group"), "topk_group"),
        scoring="sigmoid",
        selection_bias="block_sparse_moe.gate.e_score_correction_bias",
    ),
    Architecture(
        name="bailing_moe",
        model_types=("bailing_moe", "bailing_moe_v2", "bailing_hybrid"),  # Ling / Ring 2.x
        stacks=(
            Stack(
                layer_prefixes=("model.layers",),
                experts="mlp.experts",
                expert_rows=("mlp.gate.weight", "mlp.gate.expert_bias"),
            ),
        ),
        expert_keys=("num_experts", "num_local_experts"),
        top_k_keys=("num_experts_per_tok", "num_experts_per_token"),
        moe_rule=per_layer_types("mlp_layer_types", _SPARSE, first_k_dense),
        group_keys=(("n_group", "num_expert_group"), "topk_group"),
        scoring="sigmoid",
        selection_bias="mlp.gate.expert_bias",
        calibration_by_type=(("bailing_moe", _NO_TRANSFORMERS), ("bailing_moe_v2", _NO_TRANSFORMERS)),
    ),
    Architecture(
        name="afmoe",
        model_types=("afmoe",),
        stacks=(
            Stack(
                layer_prefixes=("model.layers",),
                experts="mlp.experts",
                expert_rows=("mlp.router.gate.weight", "mlp.expert_bias"),
            ),
        ),
        expert_keys=("num_experts",),
        moe_rule=after_dense_layers,
        scoring="sigmoid",
        selection_bias="mlp.expert_bias",
    ),
    Architecture(
        name="lfm2_moe",
        model_types=("lfm2_moe",),
        stacks=(
            Stack(
                layer_prefixes=("model.layers",),
                experts="feed_forward.experts",
                expert_rows=("feed_forward.gate.weight", "feed_forward.expert_bias"),
            ),
        ),
        expert_keys=("num_experts",),
        moe_rule=after_dense_layers,
        scoring="sigmoid",
        selection_bias="feed_forward.expert_bias",
    ),
    Architecture(
        name="nemotron_h",
        model_types=("nemotron_h",),
        stacks=(
            Stack(
                layer_prefixes=("backbone.layers", "model.layers"),
                experts="mixer.experts",  # non-gated: up_proj, down_proj
                expert_rows=("mixer.gate.weight", "mixer.gate.e_score_correction_bias"),
            ),
        ),
        expert_keys=("n_routed_experts", "num_local_experts"),
        moe_rule=nemotron_h_pattern,
        group_keys=_GROUPS,
        layer_count_keys=("num_hidden_layers", "layers_block_type", "hybrid_override_pattern"),
        scoring="sigmoid",
        selection_bias="mixer.gate.e_score_correction_bias",
    ),
    Architecture(
        name="deepseek_v4",
        model_types=("deepseek_v4",),
        stacks=(
            Stack(
                layer_prefixes=("layers", "model.layers"),
                experts="ffn.experts",
                expert_rows=("ffn.gate.weight", "ffn.gate.bias"),
                unprunable=(
                    (
                        "ffn.gate.tid2eid",
                        "is hash-routed: gate.tid2eid fixes each token's expert ids, "
                        "so removing experts would leave tokens routed to experts that no longer exist",
                    ),
                ),
            ),
        ),
        expert_keys=("n_routed_experts", "num_local_experts"),
        moe_rule=per_layer_types("mlp_layer_types", ("moe", "hash_moe"), every_layer),
        scoring="sqrtsoftplus",
        selection_bias="ffn.gate.bias",
        calibration=Calibration(
            unsupported="its decoder layers pass hc_mult parallel hidden streams ([tokens, hc_mult, hidden], "
            "manifold hyper-connections), which the activation store (one [tokens, hidden] row per token) does "
            "not hold, and its hash-routed layers (mlp_layer_types 'hash_moe') pick experts from the token ids "
            "(gate.tid2eid[input_ids]), which the layer-by-layer stream does not pass past the embedding; "
            "a checkpoint with hash-routed layers cannot be pruned either"
        ),
    ),
    Architecture(
        name="longcat_flash",
        model_types=("longcat_flash",),
        stacks=(
            Stack(
                layer_prefixes=("model.layers",),
                experts="mlp.experts",
                expert_rows=(
                    "mlp.router.classifier.weight",
                    "mlp.router.classifier.bias",
                    "mlp.router.e_score_correction_bias",
                ),
                zero_experts_key="zero_expert_num",
            ),
        ),
        expert_keys=("n_routed_experts", "num_local_experts"),
        top_k_keys=("moe_topk", "num_experts_per_tok"),
        layer_count_keys=("num_layers",),
        selection_bias="mlp.router.e_score_correction_bias",
        notes=("zero-computation experts keep router rows E..E+Z-1 after the kept real experts",),
        # zero-computation experts (ids E..E+Z-1) return their token unchanged, have no weights and are
        # never pruned: the statistics cover the E real experts (pairs routed to an identity expert are
        # not recorded; `tokens` counts every token), while the layer's output includes them
        calibration=Calibration(experts_module="mlp.experts", two_slot_pairs=True),
    ),
    # ---- other layouts ------------------------------------------------------------------------
    Architecture(
        name="hunyuan_v1_moe",
        model_types=("hunyuan_v1_moe",),
        stacks=(
            Stack(
                layer_prefixes=("model.layers",),
                experts="mlp.experts",
                expert_rows=("mlp.gate.wg.weight",),
            ),
        ),
        expert_keys=("num_experts",),
        top_k_keys=("moe_topk", "num_experts_per_tok"),
    ),
    Architecture(
        name="jamba",
        model_types=("jamba",),
        stacks=(
            Stack(
                layer_prefixes=("model.layers",),
                experts="feed_forward.experts",
                expert_rows=("feed_forward.router.weight",),
            ),
        ),
        expert_keys=("num_experts",),
        moe_rule=jamba_period,
    ),
    Architecture(
        name="dbrx",
        model_types=("dbrx",),
        stacks=(
            Stack(
                layer_prefixes=("transformer.blocks",),
                experts="ffn.experts",
                expert_rows=("ffn.router.layer.weight",),
            ),
        ),  # 2-D [E·F, H] blocks
        expert_keys=("moe_num_experts",),
        top_k_keys=("moe_top_k",),
        config_path=("ffn_config",),
    ),
    Architecture(
        name="minimax",
        model_types=("minimax",),
        stacks=(_MIXTRAL,),
        expert_keys=("num_local_experts", "num_experts"),
    ),
    Architecture(
        name="step3",
        model_types=("step3_text", "step3_vl", "step3p5", "step3p7"),
        stacks=(
            Stack(
                layer_prefixes=("model.layers", "model.language_model.layers", "language_model.model.layers"),
                experts="moe.experts",
                expert_rows=("moe.gate.weight", "moe.router_bias"),
                fused=("moe.gate_proj", "moe.up_proj", "moe.down_proj"),
            ),
        ),
        expert_keys=("moe_num_experts", "n_routed_experts", "num_local_experts"),
        top_k_keys=("moe_top_k", "num_experts_per_tok"),
        moe_rule=per_layer_types("mlp_layer_types", _SPARSE, step3_moe_layers),
        config_path=("text_config",),
        selection_bias="moe.router_bias",
        calibration_by_type=(
            ("step3_text", _NO_TRANSFORMERS),
            ("step3_vl", _NO_TRANSFORMERS),
            (
                "step3p5",
                Calibration(
                    unsupported="transformers has no model with a head for "
                    "its text-only config (Step-3.5-Flash), only for the "
                    "step3p7 wrapper, which calibrates"
                ),
            ),
        ),
    ),
    Architecture(
        name="gemma4",
        model_types=("gemma4", "gemma4_text"),
        stacks=(
            Stack(
                layer_prefixes=("model.language_model.layers", "model.layers"),
                experts="experts",
                expert_rows=("router.proj.weight", "router.per_expert_scale"),
            ),
        ),
        expert_keys=("num_experts",),
        top_k_keys=("top_k_experts",),
        moe_rule=moe_block_enabled,
        config_path=("text_config",),
        # the MoE checkpoints (26B-A4B) set hidden_size_per_layer_input 0 and share no KV across layers
        calibration=Calibration(unsupported_when=_GEMMA4_SWITCHES),
        calibration_by_type=(("gemma4", Calibration(images_share_experts=True, unsupported_when=_GEMMA4_SWITCHES)),),
    ),
    Architecture(
        name="jetmoe",
        model_types=("jetmoe",),
        stacks=(
            Stack(
                layer_prefixes=("model.layers",),
                experts=None,
                expert_rows=("mlp.router.layer.weight",),
            ),
        ),
        expert_keys=("num_local_experts",),
        unsupported=(
            "JetMoE's num_local_experts counts both its FFN experts and its attention (MoA) "
            "experts, and shardcut cannot prune the attention experts; pruning the FFN experts "
            "alone would leave a config no engine can load"
        ),
    ),
)

_BY_MODEL_TYPE = {mt: a for a in ARCHITECTURES for mt in a.model_types}


def supported_model_types() -> list[str]:
    return sorted(_BY_MODEL_TYPE)


def find_architecture(config: dict) -> Architecture | None:
    """The table entry for a config.json, by `model_type` (None when unsupported)."""
    return _BY_MODEL_TYPE.get(config.get("model_type", ""))

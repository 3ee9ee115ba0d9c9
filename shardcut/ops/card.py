"""The model card `push` writes: the README.md of the pushed repo, generated with
`ModelCard`/`ModelCardData`, crediting the source model's card instead of copying it.

Its sections: what was pruned and the before/after table (parameter counts are
`shardcut.moe.parameters`', real parameters for any expert count), the method, the calibration
data, the commands that reproduce the prune (the plan command from the plan's own record of its
options, `PlanOptions`), re-pruning at another ratio, provenance, and given a `shardcut eval`
report, the evaluation. Also the paths in the repo the card names.
"""

from __future__ import annotations

import shlex
from pathlib import Path

from shardcut import __version__
from shardcut.format import hub
from shardcut.format.checkpoint import Checkpoint
from shardcut.format.text import human_bytes
from shardcut.moe.model import ModelInfo
from shardcut.moe.parameters import count_parameters
from shardcut.plans.options import PlanOptions
from shardcut.plans.plan import Plan

CARD_NAME = "README.md"
PROVENANCE_NAME = "shardcut-provenance.json"
PLAN_IN_REPO = "calibration/plan.json"
SCORES_IN_REPO = "calibration/scores.safetensors"
TAGS = ["moe", "pruning", "expert-pruning", "reap", "shardcut"]
EVAL_IN_REPO = "eval/report.json"
EVAL_PLOT_IN_REPO = "eval/report.png"


def source_card(out: Path, base: str | None, source: dict, api=None) -> dict:
    """License, license name/link, pipeline tag and language of the source model's card: from
    the fields prune recorded in the plan copy, else OUT/README.md, else the source folder or the local cache, else
    (online) the Hub's model info. Missing fields stay missing."""
    from huggingface_hub import ModelCard

    keys = ("license", "license_name", "license_link", "pipeline_tag", "language")
    recorded = source.get("card")  # prune records the source card's fields (it does not copy the card)
    if isinstance(recorded, dict) and any(recorded.get(k) for k in keys):
        return {k: recorded[k] for k in keys if recorded.get(k)}
    candidates = [out / CARD_NAME]
    model = str(source.get("model") or "")
    if model and hub.is_local(model):
        candidates.append(Path(model) / CARD_NAME)
    if base:
        ref = hub.RepoRef(base, source.get("revision"))
        cached = hub.cached_file(ref, ref.revision or "main", CARD_NAME)
        if cached:
            candidates.append(cached)
    for path in candidates:
        if path.is_file():
            data = ModelCard.load(path, ignore_metadata_errors=True).data.to_dict()
            found = {k: data[k] for k in keys if data.get(k)}
            if found:
                return found
    if base and not hub.offline():
        try:
            model_info = (api or hub.hub_api()).model_info(base)
        except Exception:  # best effort: the card is complete without these fields
            return {}
        card = getattr(model_info, "card_data", None)
        found = {k: card.get(k) for k in keys if card is not None and card.get(k)}
        if getattr(model_info, "pipeline_tag", None):
            found.setdefault("pipeline_tag", model_info.pipeline_tag)
        return found
    return {}


def stacks_of(info: ModelInfo, provenance: dict) -> list[tuple]:
    """(count group, experts before, after) for each expert count of the pruned model; a count
    the provenance does not record reads as unchanged, as a single-count card always did."""
    from shardcut.moe.model import count_groups

    main = provenance["experts_per_layer"]
    by_config = provenance.get("experts_per_layer_by_config") or {}
    out = []
    for i, g in enumerate(count_groups(info)):
        rec = by_config.get(g.name) or (main if i == 0 else {})
        after = int(rec.get("after") or g.num_experts)
        out.append((g, int(rec.get("before") or after), after))
    return out


def counts_text(info: ModelInfo, provenance: dict) -> str:
    """ "16 -> 8", or "thinker_config.text_config 8 -> 4, talker_config.text_config 6 -> 3"."""
    stacks = stacks_of(info, provenance)
    if len(stacks) == 1:
        return f"{provenance['experts_per_layer']['before'] or '?'} -> {stacks[0][2]}"
    by_config = provenance.get("experts_per_layer_by_config") or {}
    return ", ".join(f"{g.name} {(by_config.get(g.name) or {}).get('before') or '?'} -> {a}" for g, _, a in stacks)


def _fmt_count(n: int) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit} ({n:,})"
    return f"{n:,}"


def model_card(
    repo_id: str,
    base: str | None,
    plan: Plan,
    ckpt: Checkpoint,
    info: ModelInfo,
    source_meta: dict,
    scores_meta: dict | None,
    provenance: dict,
):
    """The README.md of the pushed repo as a `ModelCard` rendered to text."""
    from huggingface_hub import ModelCard, ModelCardData

    stacks = stacks_of(info, provenance)
    criterion = str(plan.extra.get("criterion") or "unrecorded")
    source_name = base or str(provenance["source"]["model"] or "the source model")
    link = f"[{base}](https://huggingface.co/{base})" if base else f"`{source_name}`"
    revision = provenance["source"]["revision"] if base else None  # a local folder has no revision to pin
    model_ref = f"{source_name}@{revision}" if revision else source_name
    data = ModelCardData(base_model=base, library_name="transformers", tags=list(TAGS), **dict(source_meta))
    sections = [
        f"# {repo_id.split('/')[-1]}",
        *_summary(link, stacks, ckpt, info),
        _method(plan, info, stacks, criterion),
        _calibration_section(scores_meta, source_name, criterion),
        f"## Commands that reproduce it\n\n```bash\n{_commands(repo_id, model_ref, plan, scores_meta, criterion)}\n```",
        _reprune_section(repo_id, model_ref, plan, scores_meta),
        _provenance_section(provenance, source_name),
    ]
    body = "\n" + "\n\n".join(sections) + "\n"
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{body}")


def _summary(link: str, stacks: list[tuple], ckpt: Checkpoint, info: ModelInfo) -> list[str]:
    """What was removed, the before/after table and how its parameters were counted."""
    E_before, E_after = stacks[0][1], stacks[0][2]  # the main stack's
    if len(stacks) > 1:
        removed = "routed experts removed in every MoE layer: " + ", ".join(
            f"{b - a} of {b} in the {g.name} layers ({(b - a) / max(1, b):.0%})" for g, b, a in stacks
        )
        renumbered = "0..(kept - 1) in each layer"
    else:
        pct = (E_before - E_after) / max(1, E_before)
        removed = f"{E_before - E_after} of its {E_before} routed experts removed in every MoE layer ({pct:.0%})"
        renumbered = f"0..{E_after - 1}"
    intro = (
        f"{link} with {removed},\n"
        f"by expert pruning with shardcut {__version__}. Every tensor that stays is byte-identical\n"
        f"to the source: the kept experts were renumbered {renumbered} and the router rows of the pruned ones\n"
        "dropped; nothing was retrained or merged. For what the model is, how to use it and its terms, see the\n"
        f"card of {link}: this card credits it and does not repeat it."
    )
    counts = count_parameters(ckpt, info)
    top_ks = {g.top_k for g, _, _ in stacks}
    picks = (
        f"the {next(iter(top_ks))} routed experts it picks" if len(top_ks) == 1 else "the top-k routed experts it picks"
    )
    mtp = ", MTP layers excluded" if counts.mtp else ""
    quant = "; quantized weights count unpacked, their scales and zero points not at all" if _quantized(info) else ""
    counted = (
        'Parameters are counted from the tensor shapes in the safetensors headers ("active" counts everything\n'
        f"a token runs through: {picks}, every router row, and all non-expert\n"
        f"weights{mtp}{quant})."
    )
    return [intro, _table(stacks, counts, info), counted]


def _table(stacks: list[tuple], counts, info: ModelInfo) -> str:
    """The original/pruned table: experts per layer (per stack), top-k, parameters, bytes."""
    multi = len(stacks) > 1
    top_ks = {g.top_k for g, _, _ in stacks}
    before = counts.at({layer.key: b for g, b, _ in stacks for layer in g.layers})
    after = counts.at({layer.key: a for g, _, a in stacks for layer in g.layers})
    rows = [
        *((f"routed experts per MoE layer{f' ({g.name})' if multi else ''}", str(b), str(a)) for g, b, a in stacks),
        *(
            (f"experts per token (top-k){f' ({g.name})' if len(top_ks) > 1 else ''}", str(g.top_k), str(g.top_k))
            for g, _, _ in (stacks if len(top_ks) > 1 else stacks[:1])
        ),
        ("MoE layers", str(len(info.layers)), str(len(info.layers))),
        ("total parameters", _fmt_count(before["total"]), _fmt_count(after["total"])),
        ("active parameters per token", _fmt_count(before["active"]), _fmt_count(after["active"])),
        ("size on disk (tensor data)", human_bytes(before["bytes"]), human_bytes(after["bytes"])),
    ]
    return "| | original | pruned |\n|---|---|---|\n" + "\n".join(f"| {a} | {b} | {c} |" for a, b, c in rows)


def _method(plan: Plan, info: ModelInfo, stacks: list[tuple], criterion: str) -> str:
    from shardcut.plans.select import CRITERIA

    if len(stacks) > 1:
        keeps = " / ".join(f"{a} ({g.name})" for g, _, a in stacks)
    else:
        keeps = str(stacks[0][2])
    how = CRITERIA.get(criterion, "see the plan file")
    return (
        "## Method\n\n"
        "- Expert pruning in the manner of REAP (Router-weighted Expert Activation Pruning, "
        "[arXiv 2510.13999](https://arxiv.org/abs/2510.13999)):\n"
        f"  each MoE layer keeps the {keeps} experts with the highest saliency on calibration data and drops the\n"
        "  rest together with their router rows; the router's choice among the kept experts is unchanged.\n"
        f"- Criterion: `{criterion}`: {how}.{_count_line(plan)}\n"
        f"- Architecture: {info.arch.name}; MoE layers: {len(info.layers)}; kept expert ids per layer (original\n"
        f"  numbering): `{PLAN_IN_REPO}`."
    )


def _reprune_section(repo_id: str, model_ref: str, plan: Plan, scores_meta: dict | None) -> str:
    where = SCORES_IN_REPO if scores_meta is not None else "(not uploaded)"
    return (
        "## Re-prune at another ratio\n\n"
        f"The per-expert calibration statistics are in `{where}`.\n"
        "A different ratio or criterion needs no GPU (the other options are this plan's):\n\n"
        f"```bash\nhf download {repo_id} {SCORES_IN_REPO} --local-dir .\n{_reprune_command(model_ref, plan)}\n```"
    )


def _provenance_section(provenance: dict, source_name: str) -> str:
    revision = provenance["source"]["revision"]
    scores = provenance["scores_sha256"]
    return (
        f"## Provenance\n\nshardcut {provenance['pruned_with']}; source `{source_name}`"
        + (f" at revision `{revision}`" if revision else "")
        + f";\nplan sha256 `{provenance['plan_sha256']}`"
        + (f"; scores sha256 `{scores}`" if scores else "")
        + f"\n(`{PROVENANCE_NAME}`)."
    )


def evaluation_section(report, picture: str = "") -> str:
    """The card's evaluation section from a `shardcut eval` report (`EvalReport`); `picture`: the
    markdown of its plot, or empty."""
    section = (
        f"\n## Evaluation\n\nMeasured with `shardcut eval` against `{report.model}` before upload "
        f"(KL(original || pruned) of the next-token distributions per token, top-1 agreement of the most "
        f"likely next token; {report.device or 'device unrecorded'}, {report.dtype or 'dtype unrecorded'}; "
        f"full report `{EVAL_IN_REPO}`):\n\n{report.markdown()}{picture}\n"
    )
    if report.warnings:
        section += "\n" + "\n".join(f"> warning: {w}" for w in report.warnings) + "\n"
    return section


def _count_line(plan: Plan) -> str:
    """The plan's counting rule (floor of the ratio, group and multiple_of rounding), as a bullet."""
    rules = plan.extra.get("rounding_by_config") or ({"": plan.extra["rounding"]} if plan.extra.get("rounding") else {})
    if not isinstance(rules, dict) or not rules:
        return ""
    text = "; ".join(f"{name}: {rule}" if name else str(rule) for name, rule in rules.items())
    return f"\n- Experts kept per layer: {text}."


def _quantized(info: ModelInfo) -> bool:
    return bool(info.config.get("quantization_config") or info.text_config.get("quantization_config"))


def _calibration_section(meta: dict | None, source: str, criterion: str) -> str:
    if meta is None:
        return (
            "## Calibration data\n\nNo score file was uploaded with this checkpoint; the plan in "
            f"`{PLAN_IN_REPO}` records the criterion (`{criterion}`) and the score file's sha256."
        )
    lines = [f"- {k}: {v}" for k, v in sorted(meta.items()) if k not in ("merged_from",) and len(str(v)) < 300]
    return (
        "## Calibration data\n\nFrom the score file's metadata (`"
        + SCORES_IN_REPO
        + "`):\n\n"
        + "\n".join(lines or ["- (no metadata recorded)"])
    )


def _commands(repo_id: str, source: str, plan: Plan, meta: dict | None, criterion: str) -> str:
    """The commands that made this checkpoint; the plan command's options come from the plan's own
    record of them (`PlanOptions.from_record`), so every option that decided the plan is in it."""
    options = PlanOptions.from_record(plan.extra)
    lines = []
    if meta is not None:
        opts = [
            arg
            for key, flag in (("samples", "--samples"), ("max_length", "--max-length"))
            if key in meta
            for arg in (flag, str(meta[key]))
        ]
        lines.append(
            shlex.join(
                [
                    "shardcut",
                    "calibrate",
                    source,
                    "--data",
                    str(meta.get("data", "DATA")),
                    *opts,
                    "-o",
                    "scores.safetensors",
                ]
            )
        )
        if options is not None:
            lines.append(
                shlex.join(
                    [
                        "shardcut",
                        "plan",
                        source,
                        "--scores",
                        "scores.safetensors",
                        *options.arguments(),
                        "-o",
                        "plan.json",
                    ]
                )
            )
    plan_file = "plan.json" if meta is not None and options is not None else PLAN_IN_REPO
    lines.append(shlex.join(["shardcut", "prune", source, "-o", "pruned", "--plan", plan_file]))
    lines.append(shlex.join(["shardcut", "verify", "pruned", "--source", source]))
    lines.append(
        shlex.join(
            ["shardcut", "push", "pruned", repo_id, *(["--scores", "scores.safetensors"] if meta is not None else [])]
        )
    )
    return "\n".join(lines)


def _reprune_command(source: str, plan: Plan) -> str:
    """`prune --scores` at another ratio with every other option of the plan (its criterion, MTP
    policy, protections, seed, multiple_of)."""
    options = PlanOptions.from_record(plan.extra) or PlanOptions(criterion=plan.extra.get("criterion") or "reap")
    ratio = 0.25 if options.ratio != 0.25 else 0.5
    return shlex.join(
        [
            "shardcut",
            "prune",
            source,
            "-o",
            "pruned",
            "--scores",
            SCORES_IN_REPO,
            "--ratio",
            str(ratio),
            *options.arguments(count=False),
        ]
    )

"""`shardcut push`: publish a verified pruned checkpoint with its card, scores, plan and provenance.

What goes up, in one commit (`HfApi.upload_folder`, which with hf-xet skips the chunks an
interrupted upload already sent):
- every file of OUT, its README.md (the source's card, copied by prune) replaced by a card
  generated with `ModelCard`/`ModelCardData` that credits the source card instead;
- `calibration/plan.json` and, when given, `calibration/scores.safetensors`, so anyone can
  re-prune at another ratio;
- `shardcut-provenance.json`: shardcut version, source repo and revision, plan and scores sha256.

Parameter counts come from tensor shapes (headers only). A pruned checkpoint holds one
expert's share of every expert tensor, so the counts for the original expert count follow
exactly without the source: `Counts.at(E)` for any E (or one E per layer, for models whose
stacks have their own counts, such as Qwen3-Omni's talker).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from shardcut import __version__, hub
from shardcut.checkpoint import INDEX_NAME, Checkpoint, open_checkpoint, read_json_object
from shardcut.errors import ShardcutError
from shardcut.model import ModelInfo, describe
from shardcut.plan import Plan

CARD_NAME = "README.md"
PROVENANCE_NAME = "shardcut-provenance.json"
PLAN_IN_REPO = "calibration/plan.json"
SCORES_IN_REPO = "calibration/scores.safetensors"
TAGS = ["moe", "pruning", "expert-pruning", "reap", "shardcut"]


@dataclass
class Counts:
    """Tensor elements and bytes of a checkpoint, split so they can be stated for any expert count.

    base: everything outside the routed experts (attention, embeddings, shared experts, norms).
    expert / router: per MoE layer key, one routed expert's elements (its FFN, fused shares
    included) and its share of the router tensors (rows computed for every token).
    Quantized tensors count as stored (a packed INT4 word is one element).
    layer_top_k: a layer's own top-k where its stack has one (default `top_k`).
    """

    top_k: int
    base: tuple[int, int]  # (elements, bytes)
    base_active: int  # base elements one token runs through (MTP layers excluded)
    expert: dict[str, tuple[int, int]] = field(default_factory=dict)
    router: dict[str, tuple[int, int]] = field(default_factory=dict)
    mtp: set[str] = field(default_factory=set)
    layer_top_k: dict[str, int] = field(default_factory=dict)

    def at(self, num_experts: int | Mapping[str, int]) -> dict[str, int]:
        """Total and active parameters and tensor bytes with `num_experts` experts per layer
        (one count, or one per MoE layer key).

        Example:
            >>> counts.at({"0": 8, "1": 8, "talker.0": 6, "talker.1": 6})["total"]
        """
        keys = self.expert.keys() | self.router.keys()
        E = {k: num_experts[k] if isinstance(num_experts, Mapping) else num_experts for k in keys}
        per = {k: [a + b for a, b in zip(self.expert.get(k, (0, 0)), self.router.get(k, (0, 0)))] for k in keys}
        total = self.base[0] + sum(E[k] * p[0] for k, p in per.items())
        size = self.base[1] + sum(E[k] * p[1] for k, p in per.items())
        active = self.base_active + sum(
            min(self.layer_top_k.get(k, self.top_k), E[k]) * self.expert.get(k, (0, 0))[0]
            + E[k] * self.router.get(k, (0, 0))[0]
            for k in keys if k not in self.mtp
        )
        return {"total": total, "active": active, "bytes": size}


def count_parameters(ckpt: Checkpoint, info: ModelInfo) -> Counts:
    """Split `ckpt`'s tensor elements into base, per-expert and per-router-row shares.

    Example:
        >>> c = count_parameters(open_checkpoint("pruned"), describe(open_checkpoint("pruned")))
        >>> c.at(128)["total"], c.at(64)["total"]
    """
    mtp_prefixes = tuple(layer.prefix for layer in info.layers if layer.mtp)
    base = [0, 0]
    base_active = 0
    expert: dict[str, list[int]] = {}
    router: dict[str, list[int]] = {}
    for name, (_, t) in ckpt.tensors.items():
        n = math.prod(t.shape)
        role = info.classify(name)
        if role.kind == "copy":
            base[0] += n
            base[1] += t.nbytes
            if not (mtp_prefixes and name.startswith(mtp_prefixes)):
                base_active += n
            continue
        layer = role.layer
        fused = role.kind == "slice" and layer.stack.experts and name.startswith(f"{layer.prefix}{layer.stack.experts}.")
        bucket = expert if role.kind == "expert" or fused else router
        acc = bucket.setdefault(layer.key, [0, 0])
        acc[0] += n
        acc[1] += t.nbytes
    E = {layer.key: layer.num_experts for layer in info.layers}  # a stack's own count (Qwen3-Omni's talker)
    per = lambda d: {k: (v[0] // E[k], v[1] // E[k]) for k, v in d.items()}  # noqa: E731
    return Counts(info.top_k, (base[0], base[1]), base_active, per(expert), per(router),
                  {layer.key for layer in info.layers if layer.mtp},
                  {layer.key: layer.top_k for layer in info.layers if layer.top_k != info.top_k})


@dataclass
class PushFile:
    """One file of the upload: where it goes in the repo and where its bytes come from."""

    path_in_repo: str
    size: int
    source: Path | None = None  # a file of OUT (or the score file)
    content: bytes | None = None  # generated here

    @property
    def origin(self) -> str:
        return "generated" if self.content is not None else str(self.source)


@dataclass
class PushReport:
    """What `push` uploads (or, with dry_run, would upload)."""

    repo_id: str
    revision: str | None
    private: bool
    create_pr: bool
    dry_run: bool
    files: list[PushFile]
    card: str
    base_model: str | None
    url: str | None = None

    def to_json(self) -> dict:
        return {
            "repo_id": self.repo_id, "revision": self.revision, "private": self.private, "create_pr": self.create_pr,
            "dry_run": self.dry_run, "base_model": self.base_model, "url": self.url,
            "files": [{"path": f.path_in_repo, "size": f.size, "from": f.origin} for f in self.files],
            "card": self.card,
        }


def push(
    out: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    create_pr: bool = False,
    dry_run: bool = False,
    scores: str | Path | None = None,
    base_model: str | None = None,
    api=None,
    eval_report: str | Path | None = None,
    eval_plot: str | Path | None = None,
) -> PushReport:
    """Upload the pruned checkpoint OUT to `repo_id` with a model card, the calibration files and
    provenance, creating the repo if needed. Refuses an OUT that `verify` rejects.

    `api` is any `HfApi`-compatible object (default: `HfApi()` with HF_TOKEN or the stored login).
    `eval_report` (a `shardcut eval --json` file) and `eval_plot` (its `--plot` picture) add an
    evaluation section to the card and are uploaded under eval/.

    Example:
        >>> report = push("Qwen3-30B-A3B-pruned", "me/Qwen3-30B-A3B-REAP-50", scores="scores.safetensors",
        ...               dry_run=True)
        >>> [f.path_in_repo for f in report.files][:2]
        ['README.md', 'calibration/plan.json']
    """
    from shardcut.verification import verify

    out = Path(out)
    target = _check_target(repo_id, revision, create_pr)
    checked = verify(out)
    if not checked.ok:
        raise ShardcutError(f"verify rejects it, nothing uploaded: {checked.problems[0]}", out)
    plan_path = out / _plan_copy_name()
    if not plan_path.is_file():
        raise ShardcutError(f"no {plan_path.name}: not an output of shardcut prune, nothing uploaded", out)
    plan = Plan.load(plan_path)
    score_file = Path(scores) if scores is not None else None
    scores_meta = _scores_metadata(score_file, plan) if score_file else None

    ckpt = open_checkpoint(out)
    info = describe(ckpt)
    source = plan.extra.get("source") if isinstance(plan.extra.get("source"), dict) else {}
    source_model = str(source.get("model") or "")
    base = base_model or (source_model if _is_repo_id(source_model) else None)
    card_meta = source_card(out, base, source, api)
    provenance = _provenance(out, plan, source, base, score_file, info)
    card = str(model_card(target, base, plan, ckpt, info, card_meta, scores_meta, provenance))

    extra_files = []
    if eval_report is not None:
        card, extra_files = with_evaluation(card, eval_report, eval_plot)
    files = [PushFile(CARD_NAME, len(card.encode()), content=card.encode()), *extra_files]
    files.append(PushFile(PLAN_IN_REPO, plan_path.stat().st_size, source=plan_path))
    if score_file:
        files.append(PushFile(SCORES_IN_REPO, score_file.stat().st_size, source=score_file))
    body = (json.dumps(provenance, indent=2) + "\n").encode()
    files.append(PushFile(PROVENANCE_NAME, len(body), content=body))
    taken = {f.path_in_repo for f in files}
    for path in sorted(p for p in out.rglob("*") if p.is_file()):
        rel = path.relative_to(out).as_posix()
        if rel not in taken and not any(part.startswith(".") for part in path.relative_to(out).parts):
            files.append(PushFile(rel, path.stat().st_size, source=path))
    report = PushReport(target, revision, private, create_pr, dry_run, files, card, base)
    if dry_run:
        return report

    api = api or hub.hub_api()
    if not (getattr(api, "token", None) or hub.current_token()):
        raise ShardcutError(f"no Hugging Face token, nothing uploaded: {hub.LOGIN_HINT}", target)
    with tempfile.TemporaryDirectory(prefix="shardcut-push-") as tmp:
        staging = _stage(Path(tmp), files)
        with hub.hub_errors(target, revision):
            api.create_repo(target, private=private, exist_ok=True, repo_type="model")
            if revision and not create_pr:
                api.create_branch(target, branch=revision, exist_ok=True)
            info_commit = api.upload_folder(
                repo_id=target, folder_path=staging, revision=revision, create_pr=create_pr or None,
                commit_message=f"Expert-pruned {_counts_text(info, provenance)} experts per layer with "
                               f"shardcut {__version__}",
            )
    report.url = getattr(info_commit, "pr_url", None) or getattr(info_commit, "commit_url", None) or \
        f"https://huggingface.co/{target}"
    return report


EVAL_IN_REPO = "eval/report.json"
EVAL_PLOT_IN_REPO = "eval/report.png"


def with_evaluation(card: str, report_path: str | Path, plot: str | Path | None = None) -> tuple[str, list[PushFile]]:
    """`card` with an evaluation section (the `shardcut eval` table and, given, its picture)
    appended, and the files to upload with it."""
    from shardcut.evaluation.metrics import EvalReport

    report_path = Path(report_path)
    report = EvalReport.load(report_path)
    files = [PushFile(EVAL_IN_REPO, report_path.stat().st_size, source=report_path)]
    picture = ""
    if plot is not None:
        plot = Path(plot)
        if not plot.is_file():
            raise ShardcutError("evaluation picture not found", plot)
        files.append(PushFile(EVAL_PLOT_IN_REPO, plot.stat().st_size, source=plot))
        picture = f"\n\n![quality against ratio and per-layer error]({EVAL_PLOT_IN_REPO})"
    section = (f"\n## Evaluation\n\nMeasured with `shardcut eval` against `{report.model}` before upload "
               f"(KL(original || pruned) of the next-token distributions per token, top-1 agreement of the most "
               f"likely next token; {report.device or 'device unrecorded'}, {report.dtype or 'dtype unrecorded'}; "
               f"full report `{EVAL_IN_REPO}`):\n\n{report.markdown()}{picture}\n")
    if report.warnings:
        section += "\n" + "\n".join(f"> warning: {w}" for w in report.warnings) + "\n"
    return card.rstrip("\n") + "\n" + section, files


def _plan_copy_name() -> str:
    from shardcut.rewrite import PLAN_COPY_NAME

    return PLAN_COPY_NAME


def _is_repo_id(text: str) -> bool:
    if not text or hub.is_local(text):
        return False
    try:
        hub.parse_repo_id(text)
    except ShardcutError:
        return False
    return "@" not in text


def _check_target(repo_id: str, revision: str | None, create_pr: bool) -> str:
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise ShardcutError(f"malformed Hub repo id ({str(exc).splitlines()[0]})", repo_id) from None
    if create_pr and revision not in (None, "main"):
        raise ShardcutError("--create-pr opens a pull request against main; it cannot target --revision "
                            f"{revision!r}", repo_id)
    return repo_id


def _scores_metadata(path: Path, plan: Plan) -> dict:
    from shardcut.scores import Scores, file_sha256

    scores = Scores.load(path)
    want = plan.extra.get("scores_sha256")
    if want and file_sha256(path) != want:
        raise ShardcutError(f"is not the score file this checkpoint was planned from (plan records sha256 "
                            f"{want[:12]}…)", path)
    meta = {k: v for k, v in scores.metadata.items() if k not in ("format", "layer_keys")}
    if scores.has_sums and "tokens" not in meta:
        meta["tokens"] = str(int(scores.tokens.max()))
    return meta


def source_card(out: Path, base: str | None, source: dict, api=None) -> dict:
    """License, license name/link, pipeline tag and language of the source model's card: from
    OUT/README.md (prune copies the source's), else the source folder or the local cache, else
    (online) the Hub's model info. Missing fields stay missing."""
    from huggingface_hub import ModelCard

    keys = ("license", "license_name", "license_link", "pipeline_tag", "language")
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


def _provenance(out: Path, plan: Plan, source: dict, base: str | None, score_file: Path | None,
                info: ModelInfo) -> dict:
    from shardcut.select import count_groups

    index = out / INDEX_NAME
    meta = read_json_object(index).get("metadata", {}) if index.is_file() else {}
    groups = count_groups(info)  # of the pruned checkpoint: its counts are the kept ones
    before = source.get("num_experts_by_config") if isinstance(source.get("num_experts_by_config"), dict) else {}
    by_config = {"experts_per_layer_by_config": {g.name: {"before": before.get(g.name), "after": g.num_experts}
                                                 for g in groups}} if len(groups) > 1 else {}
    return {
        "format": "shardcut-provenance/1",
        "shardcut_version": __version__,
        "pruned_with": meta.get("shardcut_version", __version__),
        "source": {"model": base or source.get("model"), "revision": source.get("revision"),
                   "num_experts": source.get("num_experts")},
        "plan_sha256": meta.get("plan_sha256") or plan.sha256(),
        "scores_sha256": plan.extra.get("scores_sha256") or None,
        "scores_file": SCORES_IN_REPO if score_file else None,
        "criterion": plan.extra.get("criterion"),
        "experts_per_layer": {"before": source.get("num_experts"), "after": plan.num_experts},
        **by_config,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _stacks(info: ModelInfo, provenance: dict) -> list[tuple]:
    """(count group, experts before, after) for each expert count of the pruned model; a count
    the provenance does not record reads as unchanged, as a single-count card always did."""
    from shardcut.select import count_groups

    main = provenance["experts_per_layer"]
    by_config = provenance.get("experts_per_layer_by_config") or {}
    out = []
    for i, g in enumerate(count_groups(info)):
        rec = by_config.get(g.name) or (main if i == 0 else {})
        after = int(rec.get("after") or g.num_experts)
        out.append((g, int(rec.get("before") or after), after))
    return out


def _counts_text(info: ModelInfo, provenance: dict) -> str:
    """"16 -> 8", or "thinker_config.text_config 8 -> 4, talker_config.text_config 6 -> 3"."""
    stacks = _stacks(info, provenance)
    if len(stacks) == 1:
        return f"{provenance['experts_per_layer']['before'] or '?'} -> {stacks[0][2]}"
    by_config = provenance.get("experts_per_layer_by_config") or {}
    return ", ".join(f"{g.name} {(by_config.get(g.name) or {}).get('before') or '?'} -> {a}" for g, _, a in stacks)


def _stage(root: Path, files: list[PushFile]) -> Path:
    """A folder laid out as the repo: links to OUT's files, the generated files written."""
    for f in files:
        dest = root / f.path_in_repo
        dest.parent.mkdir(parents=True, exist_ok=True)
        if f.content is not None:
            dest.write_bytes(f.content)
        else:
            os.symlink(f.source.resolve(), dest)
    return root


def _fmt_count(n: int) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit} ({n:,})"
    return f"{n:,}"


def _fmt_bytes(n: int) -> str:
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def model_card(repo_id: str, base: str | None, plan: Plan, ckpt: Checkpoint, info: ModelInfo, source_meta: dict,
               scores_meta: dict | None, provenance: dict):
    """The README.md of the pushed repo as a `ModelCard` rendered to text."""
    from huggingface_hub import ModelCard, ModelCardData

    from shardcut.select import CRITERIA

    stacks = _stacks(info, provenance)
    E_before, E_after = stacks[0][1], stacks[0][2]  # the main stack's
    counts = count_parameters(ckpt, info)
    before = counts.at({layer.key: b for g, b, _ in stacks for layer in g.layers})
    after = counts.at({layer.key: a for g, _, a in stacks for layer in g.layers})
    criterion = str(plan.extra.get("criterion") or "unrecorded")
    source_name = base or str(provenance["source"]["model"] or "the source model")
    data = ModelCardData(
        base_model=base, library_name="transformers", tags=list(TAGS),
        **{k: v for k, v in source_meta.items()},
    )
    link = f"[{base}](https://huggingface.co/{base})" if base else f"`{source_name}`"
    pct = (E_before - E_after) / max(1, E_before)
    multi = len(stacks) > 1
    top_ks = {g.top_k for g, _, _ in stacks}
    rows = [
        *((f"routed experts per MoE layer{f' ({g.name})' if multi else ''}", str(b), str(a)) for g, b, a in stacks),
        *((f"experts per token (top-k){f' ({g.name})' if len(top_ks) > 1 else ''}", str(g.top_k), str(g.top_k))
          for g, _, _ in (stacks if len(top_ks) > 1 else stacks[:1])),
        ("MoE layers", str(len(info.layers)), str(len(info.layers))),
        ("total parameters", _fmt_count(before["total"]), _fmt_count(after["total"])),
        ("active parameters per token", _fmt_count(before["active"]), _fmt_count(after["active"])),
        ("size on disk (tensor data)", _fmt_bytes(before["bytes"]), _fmt_bytes(after["bytes"])),
    ]
    table = "\n".join(f"| {a} | {b} | {c} |" for a, b, c in rows)
    how = CRITERIA.get(criterion, "see the plan file")
    calib = _calibration_section(scores_meta, source_name, criterion)
    commands = _commands(repo_id, source_name, plan, scores_meta, criterion)
    if multi:
        removed = "routed experts removed in every MoE layer: " + ", ".join(
            f"{b - a} of {b} in the {g.name} layers ({(b - a) / max(1, b):.0%})" for g, b, a in stacks)
        renumbered, keeps = "0..(kept - 1) in each layer", " / ".join(f"{a} ({g.name})" for g, _, a in stacks)
    else:
        removed = f"{E_before - E_after} of its {E_before} routed experts removed in every MoE layer ({pct:.0%})"
        renumbered, keeps = f"0..{E_after - 1}", str(E_after)
    picks = f"the {top_ks.pop()} routed experts it picks" if len(top_ks) == 1 else "the top-k routed experts it picks"
    body = f"""
# {repo_id.split("/")[-1]}

{link} with {removed},
by expert pruning with shardcut {__version__}. Every tensor that stays is byte-identical
to the source: the kept experts were renumbered {renumbered} and the router rows of the pruned ones
dropped; nothing was retrained or merged. For what the model is, how to use it and its terms, see the
card of {link}: this card credits it and does not repeat it.

| | original | pruned |
|---|---|---|
{table}

Parameters are counted from the tensor shapes in the safetensors headers ("active" counts everything
a token runs through: {picks}, every router row, and all non-expert
weights{", MTP layers excluded" if counts.mtp else ""}{"; quantized tensors count as stored" if _quantized(info) else ""}).

## Method

- Expert pruning in the manner of REAP (Router-weighted Expert Activation Pruning, [arXiv 2510.13999](https://arxiv.org/abs/2510.13999)):
  each MoE layer keeps the {keeps} experts with the highest saliency on calibration data and drops the
  rest together with their router rows; the router's choice among the kept experts is unchanged.
- Criterion: `{criterion}`: {how}.
- Architecture: {info.arch.name}; MoE layers: {len(info.layers)}; kept expert ids per layer (original
  numbering): `{PLAN_IN_REPO}`.

{calib}

## Commands that reproduce it

```bash
{commands}
```

## Re-prune at another ratio

The per-expert calibration statistics are in `{SCORES_IN_REPO if scores_meta is not None else "(not uploaded)"}`.
A different ratio or criterion needs no GPU:

```bash
hf download {repo_id} {SCORES_IN_REPO} --local-dir .
shardcut prune {source_name} -o pruned --scores {SCORES_IN_REPO} --ratio 0.25 --criterion {criterion}
```

## Provenance

shardcut {provenance["pruned_with"]}; source `{source_name}`{
    f" at revision `{provenance['source']['revision']}`" if provenance["source"]["revision"] else ""};
plan sha256 `{provenance["plan_sha256"]}`{
    f"; scores sha256 `{provenance['scores_sha256']}`" if provenance["scores_sha256"] else ""}
(`{PROVENANCE_NAME}`).
"""
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{body}")


def _quantized(info: ModelInfo) -> bool:
    return bool(info.config.get("quantization_config") or info.text_config.get("quantization_config"))


def _calibration_section(meta: dict | None, source: str, criterion: str) -> str:
    if meta is None:
        return ("## Calibration data\n\nNo score file was uploaded with this checkpoint; the plan in "
                f"`{PLAN_IN_REPO}` records the criterion (`{criterion}`) and the score file's sha256.")
    lines = [f"- {k}: {v}" for k, v in sorted(meta.items()) if k not in ("merged_from",) and len(str(v)) < 300]
    return ("## Calibration data\n\nFrom the score file's metadata (`" + SCORES_IN_REPO + "`):\n\n"
            + "\n".join(lines or ["- (no metadata recorded)"]))


def _commands(repo_id: str, source: str, plan: Plan, meta: dict | None, criterion: str) -> str:
    lines = []
    one_count = len({len(ids) for ids in plan.keep.values()}) == 1
    how = (f"--ratio {plan.extra['ratio']}" if "ratio" in plan.extra else
           f"--experts {plan.num_experts}" if one_count else None)  # stacks keeping their own counts: no flag says it
    if meta is not None:
        opts = "".join(f" --{flag} {meta[key]}" for key, flag in (("samples", "samples"), ("max_length", "max-length"))
                       if key in meta)
        lines.append(f"shardcut calibrate {source} --data {meta.get('data', 'DATA')}{opts} -o scores.safetensors")
        if how:
            lines.append(f"shardcut plan {source} --scores scores.safetensors {how} --criterion {criterion} "
                         "-o plan.json")
    lines.append(f"shardcut prune {source} -o pruned --plan {'plan.json' if meta is not None and how else PLAN_IN_REPO}")
    lines.append("shardcut verify pruned --source " + source)
    lines.append(f"shardcut push pruned {repo_id}" + (" --scores scores.safetensors" if meta is not None else ""))
    return "\n".join(lines)

"""`shardcut push`: publish a verified pruned checkpoint with its card, scores, plan and provenance.

What goes up, in one commit (`HfApi.upload_folder`, which with hf-xet skips the chunks an
interrupted upload already sent):
- every file of OUT (prune does not copy the source's README.md) and a card
  generated with `ModelCard`/`ModelCardData` that credits the source card instead; a symlink
  in OUT that resolves outside it is refused before anything is read (push reads only OUT);
- `calibration/plan.json` and, when given, `calibration/scores.safetensors`, so anyone can
  re-prune at another ratio;
- `shardcut-provenance.json`: shardcut version, source repo and revision, plan and scores sha256.

The card's parameter counts are `shardcut.moe.parameters`' (real parameters, for any expert count).
"""

from __future__ import annotations

import json
import os
import shlex
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from shardcut import __version__
from shardcut.format import hub
from shardcut.format.checkpoint import INDEX_NAME, Checkpoint, open_checkpoint, read_json_object
from shardcut.format.errors import CheckpointError, HubError, ScoresError, ShardcutError
from shardcut.format.text import human_bytes
from shardcut.moe.model import ModelInfo, describe
from shardcut.moe.parameters import count_parameters
from shardcut.plans.options import PlanOptions
from shardcut.plans.plan import Plan

CARD_NAME = "README.md"
PROVENANCE_NAME = "shardcut-provenance.json"
PLAN_IN_REPO = "calibration/plan.json"
SCORES_IN_REPO = "calibration/scores.safetensors"
TAGS = ["moe", "pruning", "expert-pruning", "reap", "shardcut"]


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
            "repo_id": self.repo_id,
            "revision": self.revision,
            "private": self.private,
            "create_pr": self.create_pr,
            "dry_run": self.dry_run,
            "base_model": self.base_model,
            "url": self.url,
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
    from shardcut.ops.verification import verify

    out = Path(out)
    target = _check_target(repo_id, revision, create_pr)
    own = _own_files(out)  # before anything reads OUT: a link leading out of it is refused
    checked = verify(out)
    if not checked.ok:
        raise CheckpointError(f"verify rejects it, nothing uploaded: {checked.problems[0]}", out)
    plan_path = out / _plan_copy_name()
    if not plan_path.is_file():
        raise CheckpointError(f"no {plan_path.name}: not an output of shardcut prune, nothing uploaded", out)
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
    for path in own:
        rel = path.relative_to(out).as_posix()
        if rel not in taken:
            files.append(PushFile(rel, path.stat().st_size, source=path))
    report = PushReport(target, revision, private, create_pr, dry_run, files, card, base)
    if dry_run:
        return report

    api = api or hub.hub_api()
    if not (getattr(api, "token", None) or hub.current_token()):
        raise HubError(f"no Hugging Face token, nothing uploaded: {hub.LOGIN_HINT}", target)
    with tempfile.TemporaryDirectory(prefix="shardcut-push-") as tmp:
        staging = _stage(Path(tmp), files, out)
        with hub.hub_errors(target, revision):
            api.create_repo(target, private=private, exist_ok=True, repo_type="model")
            if revision and not create_pr:
                api.create_branch(target, branch=revision, exist_ok=True)
            info_commit = api.upload_folder(
                repo_id=target,
                folder_path=staging,
                revision=revision,
                create_pr=create_pr or None,
                commit_message=f"Expert-pruned {_counts_text(info, provenance)} experts per layer with "
                f"shardcut {__version__}",
            )
    report.url = (
        getattr(info_commit, "pr_url", None)
        or getattr(info_commit, "commit_url", None)
        or f"https://huggingface.co/{target}"
    )
    return report


EVAL_IN_REPO = "eval/report.json"
EVAL_PLOT_IN_REPO = "eval/report.png"


def with_evaluation(card: str, report_path: str | Path, plot: str | Path | None = None) -> tuple[str, list[PushFile]]:
    """`card` with an evaluation section (the `shardcut eval` table and, given, its picture)
    appended, and the files to upload with it."""
    from shardcut.ops.evaluation.metrics import EvalReport

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
    section = (
        f"\n## Evaluation\n\nMeasured with `shardcut eval` against `{report.model}` before upload "
        f"(KL(original || pruned) of the next-token distributions per token, top-1 agreement of the most "
        f"likely next token; {report.device or 'device unrecorded'}, {report.dtype or 'dtype unrecorded'}; "
        f"full report `{EVAL_IN_REPO}`):\n\n{report.markdown()}{picture}\n"
    )
    if report.warnings:
        section += "\n" + "\n".join(f"> warning: {w}" for w in report.warnings) + "\n"
    return card.rstrip("\n") + "\n" + section, files


def _plan_copy_name() -> str:
    from shardcut.rewrite.writer import PLAN_COPY_NAME

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
        raise ShardcutError(
            f"create_pr opens a pull request against main; it cannot target revision {revision!r}",
            repo_id,
            params=("create_pr", "revision"),
        )
    return repo_id


def _scores_metadata(path: Path, plan: Plan) -> dict:
    from shardcut.plans.scores import Scores, file_sha256

    scores = Scores.load(path)
    want = plan.extra.get("scores_sha256")
    if want and file_sha256(path) != want:
        raise ScoresError(
            f"is not the score file this checkpoint was planned from (plan records sha256 {want[:12]}…)", path
        )
    meta = {k: v for k, v in scores.metadata.items() if k not in ("format", "layer_keys")}
    if scores.has_sums and "tokens" not in meta:
        meta["tokens"] = str(int(scores.tokens.max()))
    return meta


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


def _provenance(
    out: Path, plan: Plan, source: dict, base: str | None, score_file: Path | None, info: ModelInfo
) -> dict:
    from shardcut.moe.model import count_groups

    index = out / INDEX_NAME
    meta = read_json_object(index).get("metadata", {}) if index.is_file() else {}
    groups = count_groups(info)  # of the pruned checkpoint: its counts are the kept ones
    before = source.get("num_experts_by_config") if isinstance(source.get("num_experts_by_config"), dict) else {}
    by_config = (
        {
            "experts_per_layer_by_config": {
                g.name: {"before": before.get(g.name), "after": g.num_experts} for g in groups
            }
        }
        if len(groups) > 1
        else {}
    )
    return {
        "format": "shardcut-provenance/1",
        "shardcut_version": __version__,
        "pruned_with": meta.get("shardcut_version", __version__),
        "source": {
            "model": base or source.get("model"),
            "revision": source.get("revision"),
            "num_experts": source.get("num_experts"),
        },
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
    from shardcut.moe.model import count_groups

    main = provenance["experts_per_layer"]
    by_config = provenance.get("experts_per_layer_by_config") or {}
    out = []
    for i, g in enumerate(count_groups(info)):
        rec = by_config.get(g.name) or (main if i == 0 else {})
        after = int(rec.get("after") or g.num_experts)
        out.append((g, int(rec.get("before") or after), after))
    return out


def _counts_text(info: ModelInfo, provenance: dict) -> str:
    """ "16 -> 8", or "thinker_config.text_config 8 -> 4, talker_config.text_config 6 -> 3"."""
    stacks = _stacks(info, provenance)
    if len(stacks) == 1:
        return f"{provenance['experts_per_layer']['before'] or '?'} -> {stacks[0][2]}"
    by_config = provenance.get("experts_per_layer_by_config") or {}
    return ", ".join(f"{g.name} {(by_config.get(g.name) or {}).get('before') or '?'} -> {a}" for g, _, a in stacks)


def _own_files(out: Path) -> list[Path]:
    """OUT's files to upload (hidden ones left out), in order; refuses a symlink anywhere in OUT
    that resolves outside it, a dangling one, and a link to a folder (push uploads OUT's own
    files only: a planted link must not carry a token file or another model up)."""
    if not out.is_dir():
        raise CheckpointError("not a directory (expected a pruned checkpoint folder)", out)
    root = out.resolve()
    found = []
    for dirpath, dirnames, filenames in os.walk(out):  # followlinks=False: a linked folder is not entered
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in [*dirnames, *sorted(filenames)]:
            path = Path(dirpath) / name
            if name.startswith(".") or not path.is_symlink():
                if name in filenames and not name.startswith("."):
                    found.append(path)
                continue
            _check_link(path, root, out)
            if path.is_dir():
                raise CheckpointError(
                    f"{path.relative_to(out)} is a symlink to a folder; push uploads files only, nothing uploaded", out
                )
            found.append(path)
    return sorted(found)


def _check_link(path: Path, root: Path, out: Path) -> None:
    target = path.resolve()
    if not target.exists():
        raise CheckpointError(f"{path.relative_to(out)} is a broken symlink, nothing uploaded", out)
    if not target.is_relative_to(root):
        raise CheckpointError(
            f"{path.relative_to(out)} is a symlink to {target}, outside OUT; push uploads only "
            "OUT's own files, nothing uploaded",
            out,
        )


def _stage(root: Path, files: list[PushFile], out: Path) -> Path:
    """A folder laid out as the repo: links to OUT's files, the generated files written."""
    for f in files:
        dest = root / f.path_in_repo
        dest.parent.mkdir(parents=True, exist_ok=True)
        if f.content is not None:
            dest.write_bytes(f.content)
        else:
            src = f.source
            if f.source.absolute().is_relative_to(out.absolute()):  # OUT's files: checked again at upload
                _check_link(src, out.resolve(), out)
            os.symlink(src.resolve(), dest)
    return root


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

    from shardcut.plans.select import CRITERIA

    stacks = _stacks(info, provenance)
    E_before, E_after = stacks[0][1], stacks[0][2]  # the main stack's
    counts = count_parameters(ckpt, info)
    before = counts.at({layer.key: b for g, b, _ in stacks for layer in g.layers})
    after = counts.at({layer.key: a for g, _, a in stacks for layer in g.layers})
    criterion = str(plan.extra.get("criterion") or "unrecorded")
    source_name = base or str(provenance["source"]["model"] or "the source model")
    data = ModelCardData(
        base_model=base,
        library_name="transformers",
        tags=list(TAGS),
        **{k: v for k, v in source_meta.items()},
    )
    link = f"[{base}](https://huggingface.co/{base})" if base else f"`{source_name}`"
    pct = (E_before - E_after) / max(1, E_before)
    multi = len(stacks) > 1
    top_ks = {g.top_k for g, _, _ in stacks}
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
    table = "\n".join(f"| {a} | {b} | {c} |" for a, b, c in rows)
    how = CRITERIA.get(criterion, "see the plan file")
    calib = _calibration_section(scores_meta, source_name, criterion)
    revision = provenance["source"]["revision"] if base else None  # a local folder has no revision to pin
    model_ref = f"{source_name}@{revision}" if revision else source_name
    commands = _commands(repo_id, model_ref, plan, scores_meta, criterion)
    reprune = _reprune_command(model_ref, plan)
    if multi:
        removed = "routed experts removed in every MoE layer: " + ", ".join(
            f"{b - a} of {b} in the {g.name} layers ({(b - a) / max(1, b):.0%})" for g, b, a in stacks
        )
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
weights{", MTP layers excluded" if counts.mtp else ""}{
        "; quantized weights count unpacked, their scales and zero points not at all" if _quantized(info) else ""
    }).

## Method

- Expert pruning in the manner of REAP (Router-weighted Expert Activation Pruning, [arXiv 2510.13999](https://arxiv.org/abs/2510.13999)):
  each MoE layer keeps the {keeps} experts with the highest saliency on calibration data and drops the
  rest together with their router rows; the router's choice among the kept experts is unchanged.
- Criterion: `{criterion}`: {how}.{_count_line(plan)}
- Architecture: {info.arch.name}; MoE layers: {len(info.layers)}; kept expert ids per layer (original
  numbering): `{PLAN_IN_REPO}`.

{calib}

## Commands that reproduce it

```bash
{commands}
```

## Re-prune at another ratio

The per-expert calibration statistics are in `{SCORES_IN_REPO if scores_meta is not None else "(not uploaded)"}`.
A different ratio or criterion needs no GPU (the other options are this plan's):

```bash
hf download {repo_id} {SCORES_IN_REPO} --local-dir .
{reprune}
```

## Provenance

shardcut {provenance["pruned_with"]}; source `{source_name}`{
        f" at revision `{provenance['source']['revision']}`" if provenance["source"]["revision"] else ""
    };
plan sha256 `{provenance["plan_sha256"]}`{
        f"; scores sha256 `{provenance['scores_sha256']}`" if provenance["scores_sha256"] else ""
    }
(`{PROVENANCE_NAME}`).
"""
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{body}")


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

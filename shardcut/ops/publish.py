"""`shardcut push`: publish a verified pruned checkpoint with its card, scores, plan and provenance.

What goes up, in one commit (`HfApi.upload_folder`, which with hf-xet skips the chunks an
interrupted upload already sent):
- every file of OUT (prune does not copy the source's README.md) and a card
  generated with `ModelCard`/`ModelCardData` that credits the source card instead; a symlink
  in OUT that resolves outside it is refused before anything is read (push reads only OUT);
- `calibration/plan.json` and, when given, `calibration/scores.safetensors`, so anyone can
  re-prune at another ratio;
- `shardcut-provenance.json`: shardcut version, source repo and revision, plan and scores sha256.

The card itself (its text, the source card's fields, the commands that reproduce the prune) is
`shardcut.ops.card`'s.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from shardcut import __version__
from shardcut.format import hub
from shardcut.format.checkpoint import INDEX_NAME, open_checkpoint, read_json_object
from shardcut.format.errors import CheckpointError, HubError, ScoresError, ShardcutError
from shardcut.moe.model import ModelInfo, describe
from shardcut.ops.card import (
    CARD_NAME,
    EVAL_IN_REPO,
    EVAL_PLOT_IN_REPO,
    PLAN_IN_REPO,
    PROVENANCE_NAME,
    SCORES_IN_REPO,
    counts_text,
    evaluation_section,
    model_card,
    source_card,
)
from shardcut.plans.plan import Plan


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
    out = Path(out)
    target = _check_target(repo_id, revision, create_pr)
    own = _own_files(out)  # before anything reads OUT: a link leading out of it is refused
    plan_path = _checked_plan_path(out)
    plan = Plan.load(plan_path)
    score_file = Path(scores) if scores is not None else None
    scores_meta = _scores_metadata(score_file, plan) if score_file else None

    ckpt = open_checkpoint(out)
    info = describe(ckpt)
    recorded = plan.extra.get("source")
    source = recorded if isinstance(recorded, dict) else {}
    source_model = str(source.get("model") or "")
    base = base_model or (source_model if _is_repo_id(source_model) else None)
    card_meta = source_card(out, base, source, api)
    provenance = _provenance(out, plan, source, base, score_file, info)
    card = str(model_card(target, base, plan, ckpt, info, card_meta, scores_meta, provenance))

    extra_files: list[PushFile] = []
    if eval_report is not None:
        card, extra_files = with_evaluation(card, eval_report, eval_plot)
    files = _files_to_upload(out, own, card, extra_files, plan_path, score_file, provenance)
    report = PushReport(target, revision, private, create_pr, dry_run, files, card, base)
    if dry_run:
        return report
    message = f"Expert-pruned {counts_text(info, provenance)} experts per layer with shardcut {__version__}"
    report.url = _upload(api, target, revision, private, create_pr, files, out, message)
    return report


def _checked_plan_path(out: Path) -> Path:
    """OUT passes `verify` and holds the plan it was pruned with; its path."""
    from shardcut.ops.verification import verify

    checked = verify(out)
    if not checked.ok:
        raise CheckpointError(f"verify rejects it, nothing uploaded: {checked.problems[0]}", out)
    plan_path = out / _plan_copy_name()
    if not plan_path.is_file():
        raise CheckpointError(f"no {plan_path.name}: not an output of shardcut prune, nothing uploaded", out)
    return plan_path


def _files_to_upload(
    out: Path,
    own: list[Path],
    card: str,
    extra_files: list[PushFile],
    plan_path: Path,
    score_file: Path | None,
    provenance: dict,
) -> list[PushFile]:
    """The card, the evaluation, the calibration files and provenance, then OUT's own files."""
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
    return files


def _upload(
    api,
    target: str,
    revision: str | None,
    private: bool,
    create_pr: bool,
    files: list[PushFile],
    out: Path,
    message: str,
) -> str:
    """Stage the files, create the repo (and branch), upload them in one commit; the commit's URL."""
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
                commit_message=message,
            )
    return (
        getattr(info_commit, "pr_url", None)
        or getattr(info_commit, "commit_url", None)
        or f"https://huggingface.co/{target}"
    )


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
    return card.rstrip("\n") + "\n" + evaluation_section(report, picture), files


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


def _provenance(
    out: Path, plan: Plan, source: dict, base: str | None, score_file: Path | None, info: ModelInfo
) -> dict:
    from shardcut.moe.model import count_groups

    index = out / INDEX_NAME
    meta = read_json_object(index).get("metadata", {}) if index.is_file() else {}
    groups = count_groups(info)  # of the pruned checkpoint: its counts are the kept ones
    recorded = source.get("num_experts_by_config")
    before = recorded if isinstance(recorded, dict) else {}
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
        elif (src := f.source) is not None:
            if src.absolute().is_relative_to(out.absolute()):  # OUT's files: checked again at upload
                _check_link(src, out.resolve(), out)
            os.symlink(src.resolve(), dest)
    return root

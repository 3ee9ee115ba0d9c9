"""Inputs that lie, through every command (issue 15 section 2).

A table of hostile configs, score files, plans, data files and options, each run through the
real CLI on a private copy of the demo checkpoint (Qwen3-MoE, 16 experts, 4 layers). Every case
must end with exit code 2, exactly one line on stderr naming the file or option and the
problem, no traceback, nothing written, every input byte unchanged, in bounded time. Most run
in process (CliRunner); the ones that could block (FIFOs, a looping chat template) run as a
subprocess under a timeout, so a regression fails the test instead of hanging the suite.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from shardcut.plans.scores import Scores
from shardcut_cli.main import app

pytest.importorskip("transformers")
LIMIT_S = 60  # bounded time per case, generous for a shared 2-core machine
OUTSAFE = None  # these cases were xfail until the describe checks of the outsafe branch landed


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """model/, scores.safetensors, plan.json and data files, built once."""
    from shardcut.ops.demo import build_demo_model

    root = tmp_path_factory.mktemp("world")
    build_demo_model(root / "model")
    rng = np.random.default_rng(0)
    s = Scores.zeros(["0", "1", "2", "3"], 16, metadata={"model": str(root / "model"), "architecture": "qwen3_moe"})
    for layer in s.layers:
        for _ in range(40):
            experts = rng.choice(16, 4, replace=False)
            s.accumulate(layer, experts, rng.random(4) / 4, rng.random(4) + 0.5, rng.random(4), tokens=1)
    s.save(root / "scores.safetensors")
    keep = {k: list(range(8)) for k in s.layers}
    (root / "plan.json").write_text(json.dumps({"format": "shardcut-plan/1", "keep": keep}))
    (root / "data.txt").write_text("hello world, this is calibration text.\n\nanother sample of text here.\n")
    return root


def snapshot(root: Path) -> dict[str, str]:
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_fifo():
            out[str(p.relative_to(root))] = "fifo"
        elif p.is_file():
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
        else:
            out[str(p.relative_to(root))] = "dir"
    return out


def _edit_config(**changes) -> Callable[[Path], None]:
    def edit(w: Path) -> None:
        cfg_path = w / "model" / "config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg.update(changes)
        cfg_path.write_text(json.dumps(cfg))

    return edit


def _config_dir(w: Path) -> None:
    (w / "model" / "config.json").unlink()
    (w / "model" / "config.json").mkdir()


def _config_duplicate_key(w: Path) -> None:
    path = w / "model" / "config.json"
    text = path.read_text().rstrip()
    assert text.endswith("}")
    path.write_text(text[:-1] + ', "num_local_experts": 8}')


def _scores(edit: Callable[[Scores], None], metadata: dict | None = None) -> Callable[[Path], None]:
    """Rewrite the score file with its arrays or metadata edited (written by hand, so no
    validation on the way out)."""

    def apply(w: Path) -> None:
        from safetensors.numpy import save_file

        s = Scores.load(w / "scores.safetensors")
        edit(s)
        meta = {**s.file_metadata(), **(metadata or {})}
        save_file(s.tensors(), str(w / "scores.safetensors"), metadata=meta)

    return apply


def _counts_huge(s: Scores) -> None:
    s.count[:] = 1e308


def _all_zero(s: Scores) -> None:
    for name in ("count", "gate_sum", "norm_sum", "reap_sum", "act_max"):
        getattr(s, name)[:] = 0
    s.tokens[:] = 0


def _sums_without_counts(s: Scores) -> None:
    s.count[0, 0] = 0  # expert 0 of layer 0 never routed, yet its sums are not zero


def _empty_layer_key(s: Scores) -> None:
    s.layers[0] = ""


def _fifo(rel: str) -> Callable[[Path], None]:
    def make(w: Path) -> None:
        path = next(iter(sorted(w.glob(rel))))
        path.unlink()
        os.mkfifo(path)

    return make


def _jsonl(lines: list[str]) -> Callable[[Path], None]:
    def write(w: Path) -> None:
        (w / "data.jsonl").write_text("\n".join(lines) + "\n")

    return write


def _looping_template(w: Path) -> None:
    path = w / "model" / "tokenizer_config.json"
    cfg = json.loads(path.read_text())
    cfg["chat_template"] = (
        "{% for i in range(100000) %}{% for j in range(100000) %}{% for k in range(100000) %}"
        "{% endfor %}{% endfor %}{% endfor %}"
    )
    path.write_text(json.dumps(cfg))
    (w / "model" / "chat_template.jinja").unlink(missing_ok=True)
    _jsonl(['{"messages": [{"role": "user", "content": "hi"}]}'])(w)


def _work_dir_file(w: Path) -> None:
    (w / "wd").write_text("a file, not a folder\n")


def _side_fifo(w: Path) -> None:
    os.mkfifo(w / "model" / "notes.txt")


def _existing_file(w: Path) -> None:
    (w / "demo-here").write_text("mine\n")


def _nothing(w: Path) -> None:
    pass


@dataclass
class Hostile:
    damage: Callable[[Path], None]
    args: list[str]
    words: tuple[str, ...] = ()  # each must appear in the one error line
    subprocess: bool = False  # could block: run out of process under a timeout
    xfail: str | None = None


M, S, P, D, O = "{m}", "{s}", "{p}", "{d}", "{o}"
INSPECT, PLAN = ["inspect", M], ["plan", M, "--scores", S, "--ratio", "0.5"]
PRUNE = ["prune", M, "-o", O, "--plan", P, "--no-verify"]
CALIB = ["calibrate", M, "--data", "{w}/data.txt", "-o", "{w}/new.safetensors", "--device", "cpu", "--samples", "2"]
CALIB_JSONL = ["calibrate", M, "--data", "{w}/data.jsonl", "-o", "{w}/new.safetensors", "--device", "cpu"]

CONFIGS: dict[str, tuple[Callable[[Path], None], tuple[str, ...], str | None]] = {
    "experts 0": (_edit_config(num_local_experts=0), ("num_local_experts", "0"), None),
    "experts 10**18": (_edit_config(num_local_experts=10**18), ("num_local_experts",), None),
    "experts a string": (_edit_config(num_local_experts="16"), ("num_local_experts",), None),
    "experts a bool": (_edit_config(num_local_experts=True), ("num_local_experts",), None),
    "experts a float": (_edit_config(num_local_experts=16.5), ("num_local_experts",), None),
    "decoder_sparse_step '2'": (_edit_config(decoder_sparse_step="2"), ("decoder_sparse_step",), None),
    "decoder_sparse_step -1": (_edit_config(decoder_sparse_step=-1), ("decoder_sparse_step",), None),
    "decoder_sparse_step 0": (_edit_config(decoder_sparse_step=0), ("decoder_sparse_step",), None),
    "mlp_only_layers 5": (_edit_config(mlp_only_layers=5), ("mlp_only_layers",), None),
    "mlp_only_layers 'abc'": (_edit_config(mlp_only_layers="abc"), ("mlp_only_layers",), None),
    "mlp_only_layers [-1]": (_edit_config(mlp_only_layers=[-1]), ("mlp_only_layers",), None),
    "model_type a list": (_edit_config(model_type=["qwen3_moe"]), ("model_type",), None),
    "config.json a directory": (_config_dir, ("config.json",), None),
    "config key duplicated": (_config_duplicate_key, ("num_local_experts", "twice"), None),
    "vocab_size -1": (_edit_config(vocab_size=-1), ("vocab_size",), None),
    "hidden_size 0": (_edit_config(hidden_size=0), ("hidden_size",), None),
    "hidden_size contradicts tensors": (_edit_config(hidden_size=32), ("hidden_size", "64"), None),
    "vocab_size contradicts tensors": (_edit_config(vocab_size=1000), ("vocab_size", "512"), None),
    "num_hidden_layers a string": (_edit_config(num_hidden_layers="4"), ("num_hidden_layers",), None),
    "num_hidden_layers 0": (_edit_config(num_hidden_layers=0), ("num_hidden_layers",), None),
    "top_k 0": (_edit_config(num_experts_per_tok=0), ("num_experts_per_tok",), None),
    "top_k -3": (_edit_config(num_experts_per_tok=-3), ("num_experts_per_tok",), None),
    "top_k above the experts": (_edit_config(num_experts_per_tok=17), ("num_experts_per_tok",), OUTSAFE),
    "num_hidden_layers below the layers present": (_edit_config(num_hidden_layers=2), ("num_hidden_layers",), OUTSAFE),
    "experts below the tensors": (_edit_config(num_local_experts=8), ("num_local_experts",), OUTSAFE),
}

CASES: dict[str, Hostile] = {}
for _name, (_damage, _words, _xfail) in CONFIGS.items():
    for _cmd, _args in (("inspect", INSPECT), ("plan", PLAN), ("prune", PRUNE), ("verify", ["verify", M])):
        CASES[f"{_cmd}: {_name}"] = Hostile(_damage, _args, ("config.json", *_words), xfail=_xfail)
for _name in (
    "experts 0",
    "decoder_sparse_step '2'",
    "model_type a list",
    "config key duplicated",
    "top_k above the experts",
    "experts below the tensors",
    "num_hidden_layers below the layers present",
):
    _damage, _words, _xfail = CONFIGS[_name]
    CASES[f"calibrate: {_name}"] = Hostile(_damage, CALIB, ("config.json", *_words), xfail=_xfail)
for _name in ("experts 0", "mlp_only_layers 5", "config key duplicated", "hidden_size contradicts tensors"):
    _damage, _words, _xfail = CONFIGS[_name]
    CASES[f"push: {_name}"] = Hostile(_damage, ["push", M, "me/pruned", "--dry-run"], ("config.json", *_words))
    CASES[f"scores import: {_name}"] = Hostile(
        lambda w, d=_damage: (d(w), (w / "keep.json").write_text(json.dumps({k: [0, 1] for k in "0123"}))),
        ["scores", "import", "{w}/keep.json", "--model", M, "-o", "{w}/imp.safetensors"],
        ("config.json", *_words),
    )

CASES.update(
    {
        # numeric and enumerated options
        "calibrate --max-memory nanGB": Hostile(_nothing, [*CALIB, "--max-memory", "nanGB"], ("--max-memory",)),
        "calibrate --max-memory 1e400GB": Hostile(_nothing, [*CALIB, "--max-memory", "1e400GB"], ("--max-memory",)),
        "calibrate --max-memory -5GB": Hostile(_nothing, [*CALIB, "--max-memory", "-5GB"], ("--max-memory",)),
        "calibrate --seed -1": Hostile(_nothing, [*CALIB, "--seed", "-1"], ("--seed",)),
        "calibrate --max-length 0": Hostile(_nothing, [*CALIB, "--max-length", "0"], ("--max-length",)),
        "calibrate --samples 0": Hostile(_nothing, [*CALIB, "--samples", "0"], ("--samples",)),
        "calibrate --batch-tokens -1": Hostile(_nothing, [*CALIB, "--batch-tokens", "-1"], ("--batch-tokens",)),
        "calibrate --work-dir a file": Hostile(_work_dir_file, [*CALIB, "--work-dir", "{w}/wd"], ("wd",)),
        "prune --max-shard-size nanGB": Hostile(_nothing, [*PRUNE, "--max-shard-size", "nanGB"], ("--max-shard-size",)),
        "prune --max-shard-size 1e400GB": Hostile(
            _nothing, [*PRUNE, "--max-shard-size", "1e400GB"], ("--max-shard-size",)
        ),
        "prune --max-shard-size 0": Hostile(_nothing, [*PRUNE, "--max-shard-size", "0"], ("--max-shard-size",)),
        "prune --ratio nan": Hostile(_nothing, ["prune", M, "-o", O, "--scores", S, "--ratio", "nan"], ("--ratio",)),
        "prune --mtp-policy bogus": Hostile(
            _nothing,
            ["prune", M, "-o", O, "--scores", S, "--ratio", "0.5", "--mtp-policy", "bogus"],
            ("--mtp-policy", "bogus"),
        ),
        "plan --ratio nan": Hostile(_nothing, ["plan", M, "--scores", S, "--ratio", "nan"], ("--ratio",)),
        "plan --ratio inf": Hostile(_nothing, ["plan", M, "--scores", S, "--ratio", "inf"], ("--ratio",)),
        "plan --ratio 1.5": Hostile(_nothing, ["plan", M, "--scores", S, "--ratio", "1.5"], ("--ratio",)),
        "plan --experts -1": Hostile(_nothing, ["plan", M, "--scores", S, "--experts", "-1"], ("--experts",)),
        "plan --seed -1": Hostile(_nothing, [*PLAN, "--seed", "-1"], ("--seed",)),
        "plan --mtp-policy bogus": Hostile(_nothing, [*PLAN, "--mtp-policy", "bogus"], ("--mtp-policy", "bogus")),
        "scores show --top -5": Hostile(_nothing, ["scores", "show", S, "--top", "-5"], ("--top",)),
        "scores show --top 0": Hostile(_nothing, ["scores", "show", S, "--top", "0"], ("--top",)),
        "scores show --seed -1": Hostile(_nothing, ["scores", "show", S, "--seed", "-1"], ("--seed",)),
        "scores merge weight nan": Hostile(
            _nothing, ["scores", "merge", f"{S}:nan", S, "-o", "{w}/m.safetensors"], ("nan",)
        ),
        "scores merge weight 1e400": Hostile(
            _nothing, ["scores", "merge", f"{S}:1e400", S, "-o", "{w}/m.safetensors"], ("1e400",)
        ),
        "demo DIR an existing file": Hostile(_existing_file, ["demo", "{w}/demo-here"], ("demo-here",)),
        # score files
        "plan: counts 1e308": Hostile(_scores(_counts_huge), PLAN, ("scores.safetensors", "count")),
        "show: counts 1e308": Hostile(_scores(_counts_huge), ["scores", "show", S], ("scores.safetensors", "count")),
        "plan: sums without counts": Hostile(_scores(_sums_without_counts), PLAN, ("scores.safetensors",)),
        "plan: all-zero scores": Hostile(_scores(_all_zero), PLAN, ("scores.safetensors", "no tokens")),
        "prune: all-zero scores": Hostile(
            _scores(_all_zero),
            ["prune", M, "-o", O, "--scores", S, "--ratio", "0.5"],
            ("scores.safetensors", "no tokens"),
        ),
        "plan: empty layer key": Hostile(_scores(_empty_layer_key), PLAN, ("scores.safetensors", "layer key")),
        "show: empty layer key": Hostile(_scores(_empty_layer_key), ["scores", "show", S], ("layer key",)),
        "merge: rich markup in metadata of another model": Hostile(
            _scores(lambda s: None, {"model": "[/oops]"}),
            ["scores", "merge", S, "{w}/plain.safetensors", "-o", "{w}/m.safetensors"],
            ("[/oops]",),
        ),
        "import: saliency value too large for float": Hostile(
            lambda w: (w / "sal.json").write_text('{"0": [1e400' + ", 1" * 15 + "]}"),
            [
                "scores",
                "import",
                "{w}/sal.json",
                "--model",
                M,
                "-o",
                "{w}/imp.safetensors",
                "--format",
                "saliency-json",
            ],
            ("sal.json",),
        ),
        # plans
        "prune: plan keeps 0 experts": Hostile(
            lambda w: (w / "plan.json").write_text(
                json.dumps({"format": "shardcut-plan/1", "keep": {k: [] for k in "0123"}})
            ),
            PRUNE,
            ("plan.json",),
        ),
        "prune: plan with an id 10**30": Hostile(
            lambda w: (w / "plan.json").write_text(
                '{"format": "shardcut-plan/1", "keep": {"0": [100000000000000000'
                '0000000000000], "1": [0], "2": [0], "3": [0]}}'
            ),
            PRUNE,
            ("plan.json",),
        ),
        # data files
        "calibrate: input_ids beyond int64": Hostile(
            _jsonl(['{"input_ids": [1, 99999999999999999999999]}']), CALIB_JSONL, ("data.jsonl",)
        ),
        "calibrate: negative input_ids": Hostile(_jsonl(['{"input_ids": [1, -4]}']), CALIB_JSONL, ("data.jsonl",)),
        "calibrate: deeply nested JSON line": Hostile(
            _jsonl(["[" * 100_000 + "]" * 100_000]), CALIB_JSONL, ("data.jsonl",)
        ),
        "calibrate: input_ids a float": Hostile(_jsonl(['{"input_ids": [1.5, 2]}']), CALIB_JSONL, ("data.jsonl",)),
        # special files and untrusted code: out of process, under a timeout
        "inspect: a shard that is a FIFO": Hostile(
            _fifo("model/model-*.safetensors"), INSPECT, ("FIFO",), subprocess=True
        ),
        "verify: a shard that is a FIFO": Hostile(
            _fifo("model/model-*.safetensors"), ["verify", M], ("FIFO",), subprocess=True
        ),
        "prune: a shard that is a FIFO": Hostile(_fifo("model/model-*.safetensors"), PRUNE, ("FIFO",), subprocess=True),
        "prune: a side file that is a FIFO": Hostile(_side_fifo, PRUNE, ("notes.txt",), subprocess=True),
        "calibrate: data file a FIFO": Hostile(_fifo("data.txt"), CALIB, ("data.txt",), subprocess=True),
        "plan: score file a FIFO": Hostile(_fifo("scores.safetensors"), PLAN, ("scores.safetensors",), subprocess=True),
        "prune: plan a FIFO": Hostile(_fifo("plan.json"), PRUNE, ("plan.json",), subprocess=True),
        "calibrate: a chat template that loops": Hostile(
            _looping_template, CALIB_JSONL, ("chat template",), subprocess=True
        ),
    }
)


def _prepare(world: Path, tmp: Path, case: Hostile) -> tuple[Path, list[str]]:
    w = tmp / "w"
    shutil.copytree(world, w)
    shutil.copy(w / "scores.safetensors", w / "plain.safetensors")
    case.damage(w)
    fill = {
        "{m}": str(w / "model"),
        "{s}": str(w / "scores.safetensors"),
        "{p}": str(w / "plan.json"),
        "{o}": str(w / "out"),
        "{d}": str(w / "data.jsonl"),
    }

    def sub(arg: str) -> str:
        for k, v in fill.items():
            arg = arg.replace(k, v)
        return arg.replace("{w}", str(w))

    return w, [sub(a) for a in case.args]


def _run(args: list[str], out_of_process: bool) -> tuple[int, str, str]:
    if not out_of_process:
        result = CliRunner().invoke(app, args)
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            import traceback

            return 1, result.stdout, "Traceback\n" + "".join(traceback.format_exception(result.exception))
        return result.exit_code, result.stdout, result.stderr
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "shardcut_cli.main", *args],
            capture_output=True,
            text=True,
            timeout=LIMIT_S,
            # the looping template is cut at 2 s, not 10 (test_chat_template_runs_under_a_time_limit tests the limit)
            env={**os.environ, "COLUMNS": "400", "SHARDCUT_TEMPLATE_SECONDS": "2"},
        )
    except subprocess.TimeoutExpired:
        return -1, "", f"timed out after {LIMIT_S} s"
    return proc.returncode, proc.stdout, proc.stderr


def outcome(world: Path, tmp: Path, case: Hostile) -> str | None:
    """None when the case is refused cleanly, else what went wrong."""
    w, args = _prepare(world, tmp, case)
    before = snapshot(w)
    start = time.monotonic()
    code, stdout, stderr = _run(args, case.subprocess)
    took = time.monotonic() - start
    lines = stderr.strip().splitlines()
    problems = []
    if code != 2:
        problems.append(f"exit {code}")
    if "Traceback" in stdout + stderr:
        problems.append("traceback")
    if len(lines) != 1:
        problems.append(f"{len(lines)} lines on stderr")
    missing = [word for word in case.words if word not in stderr]
    if missing:
        problems.append(f"message lacks {missing}")
    if snapshot(w) != before:
        problems.append("inputs changed or something was written")
    if took > LIMIT_S:
        problems.append(f"took {took:.0f} s")
    return f"{'; '.join(problems)}: {(stderr or stdout).strip()[-600:]}" if problems else None


@pytest.mark.parametrize("name", list(CASES))
def test_hostile_input_is_refused_cleanly(world, tmp_path, name):
    case = CASES[name]
    if case.xfail:
        pytest.xfail(case.xfail) if outcome(world, tmp_path, case) else None
        return
    problem = outcome(world, tmp_path, case)
    assert problem is None, problem


def test_markup_in_score_metadata_is_shown_literally(world, tmp_path):
    """Metadata is data, never rich markup: `scores show` prints it as written."""
    w, args = _prepare(
        world, tmp_path, Hostile(_scores(lambda s: None, {"model": "[/oops] [bold]x"}), ["scores", "show", S])
    )
    code, stdout, stderr = _run(args, False)
    assert code == 0, stderr
    assert "model: [/oops] [bold]x" in stdout


class _Jinja:
    """A tokenizer stand-in rendering like transformers does (jinja2's immutable sandbox)."""

    def __init__(self, template: str) -> None:
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        self.template = ImmutableSandboxedEnvironment().from_string(template)

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=False, tools=None):
        return self.template.render(messages=messages)


def test_chat_template_runs_under_a_time_limit():
    from shardcut.format.errors import DataError
    from shardcut.ops.calibration.template import render_chat_template

    messages = [{"role": "user", "content": "hi"}]
    assert (
        render_chat_template(
            _Jinja("{% for m in messages %}{{ m.role }}: {{ m.content }}{% endfor %}"), messages, "chat.jsonl"
        )
        == "user: hi"
    )
    tracer = sys.gettrace()
    loop = _Jinja("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}")
    start = time.monotonic()
    with pytest.raises(DataError, match="chat.jsonl: chat template ran longer than 0.5 s"):
        render_chat_template(loop, messages, "chat.jsonl", seconds=0.5)
    assert time.monotonic() - start < 5
    assert sys.gettrace() is tracer  # the time limit's tracer is gone after the render

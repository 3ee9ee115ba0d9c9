"""Never destroy what the user has, never call a wrong result done (issue 17, items 2, 7, 8, 10,
12 and 14): outputs that would overwrite inputs, a source shard replaced while `prune` runs, a
config expert count that contradicts the tensors, the durability order of OUT, escape sequences
from files reaching the terminal, and OUT paths that cannot be committed.

Each test reproduces the defect on real files, most through a real `shardcut` process.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from shardcut.format.errors import OutputError, OutputExistsError, ShardcutError
from shardcut.ops.synthetic import SyntheticSpec, _write_raw_shard, write_synthetic_checkpoint
from shardcut.plans.plan import Plan
from shardcut.plans.score_merge import merge_score_files
from shardcut.plans.scores import Scores
from shardcut.rewrite.outdir import partial_dir
from shardcut.rewrite.writer import prune

SPEC = SyntheticSpec(layers=4, experts=8, top_k=2, hidden=64, moe_inter=32, shards=4, vocab=256)
KEEP = {"1": [0, 2, 3, 7], "2": [1, 2, 5, 6], "3": [0, 1, 4, 5]}
ONE_SHARD = SyntheticSpec(layers=3, experts=8, top_k=2, hidden=32, moe_inter=16, shards=1, vocab=64)


def tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def run(*args: object) -> subprocess.CompletedProcess:
    """The CLI in this process (a process each would add a second per call); an exception that
    escapes it reads as the traceback a real process would print."""
    import traceback

    from typer.testing import CliRunner

    from shardcut_cli.main import app

    # wide, so rich does not wrap the paths the assertions look for
    result = CliRunner().invoke(app, [*map(str, args)], env={"COLUMNS": "500"})
    err = result.stderr
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        err += "Traceback\n" + "".join(traceback.format_exception(result.exception))
    return subprocess.CompletedProcess(args, result.exit_code, result.stdout.encode(), err.encode())


def one_line_error(r: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit 2 with one `error:` line on stderr, no traceback; returns that line."""
    err = r.stderr.decode()
    assert r.returncode == 2, (r.returncode, err, r.stdout.decode())
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    for needle in needles:
        assert needle in err, err
    return err


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    return write_synthetic_checkpoint(tmp_path_factory.mktemp("safety") / "model", SPEC)


@pytest.fixture(scope="module")
def scores_file(source, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("scores") / "scores.safetensors"
    filled(seed=0).save(path)
    return path


def filled(seed: int, metadata: dict | None = None) -> Scores:
    s = Scores.zeros(list(KEEP), SPEC.experts, metadata or {"model": "model", "architecture": "deepseek_v3"})
    rng = np.random.default_rng(seed)
    for key in s.layers:
        n = 64
        s.accumulate(
            key, rng.integers(0, SPEC.experts, n), rng.random(n), rng.random(n) * 3, rng.normal(size=n), tokens=n // 2
        )
    return s


# ---------------------------------------------------------------------------------------------
# 17.2: outputs that overwrite inputs


def test_plan_output_into_the_model_is_refused(source, scores_file, tmp_path):
    """`plan -o MODEL/config.json` replaced the model's config; `-o SCORES` the score file."""
    before, scores_before = tree_digest(source), scores_file.read_bytes()
    for target in (source / "config.json", source / "new-plan.json", scores_file):
        r = run("plan", source, "--scores", scores_file, "--ratio", "0.5", "-o", target)
        one_line_error(r, str(target))
        r = run("plan", source, "--scores", scores_file, "--ratio", "0.5", "-o", target, "--overwrite")
        one_line_error(r, str(target))  # --overwrite never extends to inputs
    assert tree_digest(source) == before and scores_file.read_bytes() == scores_before
    assert not (source / "new-plan.json").exists()


def test_existing_plan_is_kept_unless_overwrite(source, scores_file, tmp_path):
    plan = tmp_path / "plan.json"
    Plan(KEEP).save(plan)
    mine = plan.read_bytes()
    one_line_error(run("plan", source, "--scores", scores_file, "--ratio", "0.25", "-o", plan), "exists")
    assert plan.read_bytes() == mine
    r = run("plan", source, "--scores", scores_file, "--ratio", "0.25", "-o", plan, "--overwrite")
    assert r.returncode == 0, r.stderr.decode()
    assert {len(v) for v in Plan.load(plan).keep.values()} == {6}
    assert not list(tmp_path.glob(".*tmp"))  # the durable write leaves no temporary file
    # --overwrite replaces a plan, never another kind of file (say, another model's config)
    other = tmp_path / "config.json"
    other.write_text('{"model_type": "qwen3_moe"}')
    one_line_error(
        run("plan", source, "--scores", scores_file, "--ratio", "0.5", "-o", other, "--overwrite"),
        "not a shardcut-plan/1 file",
    )
    assert other.read_text() == '{"model_type": "qwen3_moe"}'


def test_scores_import_and_merge_into_the_model_are_refused(source, scores_file, tmp_path):
    """`scores import -o MODEL/<shard>` and `scores merge -o MODEL/<shard>` replaced a shard."""
    before = tree_digest(source)
    shard = source / "model-00002-of-00005.safetensors"
    keep = tmp_path / "keep.json"
    keep.write_text(json.dumps({"keep": KEEP}))
    other = tmp_path / "other.safetensors"
    filled(seed=1).save(other)
    one_line_error(run("scores", "import", keep, "--model", source, "-o", shard), "inside the input folder")
    one_line_error(run("scores", "import", keep, "--model", source, "-o", shard, "--overwrite"), str(shard))
    one_line_error(run("scores", "import", keep, "--model", source, "-o", keep, "--overwrite"), "one of the inputs")
    # merge knows no MODEL: a shard is still never replaced, as it is not a score file
    one_line_error(run("scores", "merge", scores_file, other, "-o", shard, "--overwrite"), "not a shardcut-scores/1")
    one_line_error(run("scores", "merge", scores_file, other, "-o", shard), "exists")
    merged_input = other.read_bytes()
    one_line_error(run("scores", "merge", scores_file, f"{other}:2", "-o", other, "--overwrite"), "one of the inputs")
    assert tree_digest(source) == before and other.read_bytes() == merged_input
    out = tmp_path / "merged.safetensors"
    assert run("scores", "merge", scores_file, other, "-o", out).returncode == 0
    one_line_error(run("scores", "merge", scores_file, other, "-o", out), "exists")
    assert run("scores", "merge", scores_file, other, "-o", out, "--overwrite").returncode == 0
    assert Scores.load(out).layers == list(KEEP)


def test_library_calls_refuse_the_same_outputs(source, scores_file, tmp_path):
    """A Python caller is protected as the CLI is: the checks live in the library."""
    from shardcut.ops.planning import make_plan
    from shardcut.plans.score_import import import_scores

    before = tree_digest(source)
    with pytest.raises(OutputError, match="inside the input folder"):
        make_plan(source, scores_file, ratio=0.5, out=source / "config.json", overwrite=True)
    keep = tmp_path / "keep.json"
    keep.write_text(json.dumps({"keep": KEEP}))
    with pytest.raises(OutputError, match="inside the input folder"):
        import_scores(keep, source, out=source / "model-00001-of-00005.safetensors", overwrite=True)
    with pytest.raises(OutputError, match="one of the inputs"):
        merge_score_files([scores_file, (scores_file, 2.0)], scores_file, overwrite=True)
    existing = tmp_path / "plan.json"
    Plan(KEEP).save(existing)
    mine = existing.read_bytes()
    with pytest.raises(OutputExistsError):
        make_plan(source, scores_file, ratio=0.5, out=existing)
    assert existing.read_bytes() == mine and tree_digest(source) == before
    plan, _ = make_plan(source, scores_file, ratio=0.5, out=existing, overwrite=True)
    assert Plan.load(existing).keep == plan.keep and Plan.load(existing).sha256() == plan.sha256()


# ---------------------------------------------------------------------------------------------
# 17.7: a source shard replaced while prune runs


def _tampered_copy(shard: Path, where: Path) -> Path:
    """A different file with the same header: the data bytes flipped."""
    raw = bytearray(shard.read_bytes())
    start = 8 + int.from_bytes(raw[:8], "little")
    raw[start:] = bytes(b ^ 0xFF for b in raw[start:])
    where.write_bytes(bytes(raw))
    return where


@pytest.fixture
def fresh_source(tmp_path) -> Path:
    return write_synthetic_checkpoint(tmp_path / "model", SPEC)


@pytest.mark.parametrize("how", ["replace", "in-place"])
def test_shard_changed_during_prune_is_an_error(fresh_source, tmp_path, how):
    """Before: the copy used the old header's ranges on the new file and the self-check re-read
    the same path, so the output was corrupt and reported as verified."""
    shard = fresh_source / "model-00003-of-00005.safetensors"
    tampered = _tampered_copy(shard, tmp_path / "tampered.safetensors")
    out = tmp_path / "out"
    fired = []

    def progress(done: int, total: int) -> None:
        if not fired:
            fired.append(done)
            if how == "replace":
                os.replace(tampered, shard)
            else:  # same inode, new bytes
                with open(shard, "r+b") as f:
                    f.seek(-64, os.SEEK_END)
                    f.write(os.urandom(64))

    with pytest.raises(ShardcutError, match="changed while shardcut read it"):
        prune(fresh_source, out, Plan(KEEP), progress=progress)
    assert fired and not out.exists() and not partial_dir(out).exists()


def test_shard_replaced_by_another_process_during_prune(fresh_source, tmp_path):
    """A real second process replaces a shard while a real prune process is mid-copy (the prune
    waits in its progress callback until the replacement is done, so the race is deterministic)."""
    shard = fresh_source / "model-00002-of-00005.safetensors"
    tampered = _tampered_copy(shard, tmp_path / "tampered.safetensors")
    out = tmp_path / "out"
    script = textwrap.dedent("""
        import json, sys
        from shardcut.plans.plan import Plan
        from shardcut.rewrite.writer import prune
        asked = []
        def progress(done, total):
            if not asked:
                asked.append(1)
                print("copying", flush=True)
                sys.stdin.readline()
        prune(sys.argv[1], sys.argv[2], Plan(json.loads(sys.argv[3])), progress=progress)
        print("committed", flush=True)
    """)
    proc = subprocess.Popen(
        [sys.executable, "-c", script, str(fresh_source), str(out), json.dumps(KEEP)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout.readline().strip() == "copying"
        subprocess.run(
            [sys.executable, "-c", "import os, sys; os.replace(sys.argv[1], sys.argv[2])", str(tampered), str(shard)],
            check=True,
        )
        stdout, stderr = proc.communicate("go\n", timeout=120)
    finally:
        proc.kill()
    assert proc.returncode != 0 and "committed" not in stdout
    assert "changed while shardcut read it (replaced by another file)" in stderr, stderr
    assert not out.exists() and not partial_dir(out).exists()


def test_unchanged_sources_still_prune_and_verify(fresh_source, tmp_path):
    from shardcut.ops.verification import verify

    report = prune(fresh_source, tmp_path / "out", Plan(KEEP))
    assert report.verified and verify(tmp_path / "out", source=fresh_source).ok


# ---------------------------------------------------------------------------------------------
# 17.8 (and the start of 15.2): config counts checked against the tensors


def _gpt_oss(path: Path, config_experts: int = 8, **config_edits) -> Path:
    """A gpt-oss checkpoint (fused experts, router with bias) with 8 experts in its tensors."""
    E, H, I, V, L = 8, 16, 8, 64, 2
    tensors = [
        ("model.embed_tokens.weight", "BF16", (V, H)),
        ("model.norm.weight", "BF16", (H,)),
        ("lm_head.weight", "BF16", (V, H)),
    ]
    for layer in range(L):
        p = f"model.layers.{layer}"
        tensors += [
            (f"{p}.input_layernorm.weight", "BF16", (H,)),
            (f"{p}.self_attn.q_proj.weight", "BF16", (H, H)),
            (f"{p}.mlp.router.weight", "BF16", (E, H)),
            (f"{p}.mlp.router.bias", "BF16", (E,)),
            (f"{p}.mlp.experts.gate_up_proj", "BF16", (E, H, 2 * I)),
            (f"{p}.mlp.experts.gate_up_proj_bias", "BF16", (E, 2 * I)),
            (f"{p}.mlp.experts.down_proj", "BF16", (E, I, H)),
            (f"{p}.mlp.experts.down_proj_bias", "BF16", (E, H)),
        ]
    path.mkdir(parents=True)
    _write_raw_shard(path / "model.safetensors", tensors, np.random.default_rng(0))
    config = {
        "model_type": "gpt_oss",
        "architectures": ["GptOssForCausalLM"],
        "hidden_size": H,
        "num_hidden_layers": L,
        "num_local_experts": config_experts,
        "num_experts_per_tok": 2,
        "vocab_size": V,
        **config_edits,
    }
    (path / "config.json").write_text(json.dumps(config))
    return path


def test_fused_expert_count_that_divides_the_real_one_is_refused(tmp_path):
    """gpt-oss num_local_experts 4 for 8 experts in the tensors: before, prune sliced the fused
    tensors in blocks of two experts and wrote tensors contradicting the new config."""
    model = _gpt_oss(tmp_path / "gpt-oss", config_experts=4)
    plan = tmp_path / "plan.json"
    Plan({"0": [0, 1], "1": [2, 3]}).save(plan)
    err = one_line_error(
        run("prune", model, "-o", tmp_path / "out", "--plan", plan),
        "num_local_experts = 4",
        "model.layers.0.mlp.router.weight has 8 expert rows",
    )
    assert str(model / "config.json") in err
    assert not (tmp_path / "out").exists() and not partial_dir(tmp_path / "out").exists()
    one_line_error(run("inspect", model), "num_local_experts = 4")
    # the truthful config prunes, and the output's config agrees with its tensors
    good = _gpt_oss(tmp_path / "gpt-oss-8")
    Plan({"0": [0, 1, 5, 6], "1": [2, 3, 4, 7]}).save(plan)
    r = run("prune", good, "-o", tmp_path / "good-out", "--plan", plan)
    assert r.returncode == 0, r.stderr.decode()
    assert json.loads((tmp_path / "good-out" / "config.json").read_text())["num_local_experts"] == 4
    assert run("inspect", tmp_path / "good-out").returncode == 0


@pytest.mark.parametrize(
    "edit, field",
    [
        ({"num_experts_per_tok": 0}, "num_experts_per_tok = 0"),
        ({"num_experts_per_tok": -3}, "num_experts_per_tok = -3"),
        ({"num_experts_per_tok": 9}, "num_experts_per_tok = 9"),
        ({"num_local_experts": 0}, "num_local_experts = 0"),
        ({"num_local_experts": 16}, "num_local_experts = 16"),
        ({"num_hidden_layers": 1}, "num_hidden_layers = 1"),
    ],
)
def test_lying_counts_are_refused_naming_the_field(tmp_path, edit, field):
    model = _gpt_oss(tmp_path / "m", **edit)
    err = one_line_error(run("inspect", model), "config.json")
    # out of range (config_check) says `name=value`; against the tensors (describe) `name = value`
    assert field in err or field.replace(" = ", "=") in err, err


def test_missing_expert_ids_are_refused(tmp_path):
    """Per-expert families: the ids present must be exactly 0..E-1 (here expert 5 of layer 2 is gone)."""
    model = write_synthetic_checkpoint(tmp_path / "m", ONE_SHARD)
    shard = model / "model-00001-of-00001.safetensors"
    from shardcut.format.container import read_header

    header = read_header(shard)
    keep = [(t.name, t.dtype, t.shape) for t in header.tensors.values() if ".layers.2.mlp.experts.5." not in t.name]
    shard.unlink()
    _write_raw_shard(shard, keep, np.random.default_rng(1))
    index = json.loads((model / "model.safetensors.index.json").read_text())
    index["weight_map"] = {n: v for n, v in index["weight_map"].items() if ".layers.2.mlp.experts.5." not in n}
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    one_line_error(run("inspect", model), "n_routed_experts = 8", "layer 2 holds expert ids 0..7 (7 experts)")


# ---------------------------------------------------------------------------------------------
# 17.10: durability order of OUT


def test_out_is_fsynced_file_then_folder_then_rename_then_parent(source, tmp_path, monkeypatch):
    """Record every fsync (by the path its descriptor names) and every rename: each file of OUT
    is fsynced, then its folder, before the partial folder is renamed; then OUT's parent."""
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        real_fsync(fd)
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))

    def replace(src, dst, **kw) -> None:
        real_replace(src, dst, **kw)
        events.append(("replace", f"{os.path.abspath(src)} -> {os.path.abspath(dst)}"))

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    (tmp_path / "side").mkdir()
    out = tmp_path / "side" / "out"
    partial = str(partial_dir(out).absolute())
    prune(source, out, Plan(KEEP))
    monkeypatch.undo()

    commit = events.index(("replace", f"{partial} -> {out.absolute()}"))
    synced = [(i, path) for i, (kind, path) in enumerate(events) if kind == "fsync"]
    files = [p for p in sorted(out.rglob("*")) if p.is_file()]
    assert {"config.json", "model.safetensors.index.json", "shardcut-plan.json", "generation_config.json"} <= {
        p.name for p in files
    }
    for f in files:
        in_partial = os.path.join(partial, str(f.relative_to(out)))
        file_syncs = [i for i, p in synced if p == in_partial and i < commit]
        assert file_syncs, f"{f.name} was never fsynced before the commit"
        folder = os.path.dirname(in_partial)
        assert any(i > file_syncs[-1] and p == folder for i, p in synced if i < commit), (
            f"{f.name}'s folder was not fsynced after it"
        )
    assert any(i > commit and p == str(out.parent.absolute()) for i, p in synced), "parent not fsynced after rename"


def test_plan_and_score_writes_are_fsynced_before_their_rename(tmp_path, monkeypatch):
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(
        os, "fsync", lambda fd: (real_fsync(fd), events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))))
    )
    monkeypatch.setattr(os, "replace", lambda a, b: (real_replace(a, b), events.append(("replace", str(b)))))
    Plan(KEEP).save(tmp_path / "plan.json")
    filled(seed=0).save(tmp_path / "s.safetensors")
    monkeypatch.undo()
    for name in ("plan.json", "s.safetensors"):
        target = str(tmp_path / name)
        rename = events.index(("replace", target))
        assert events[rename - 1] == ("fsync", str(tmp_path / f".{name}.shardcut-tmp"))
        assert events[rename + 1] == ("fsync", str(tmp_path))


# ---------------------------------------------------------------------------------------------
# 17.12: escape sequences and rich markup from files


HOSTILE_MODEL = "model[v2]\x1b]52;c;aGVsbG8=\x07\x1b[31m"
HOSTILE_DATA = "[/oops] \x9b2J [bold]x\u202e"


def test_scores_show_prints_file_text_safely(tmp_path):
    """Before: OSC 52 (clipboard write) from metadata reached the terminal, `[/oops]` crashed
    and `model[v2]` was shown as `model`."""
    name = tmp_path / "dl[" / "oops]" / "scores.safetensors"  # the path reads `…/dl[/oops]/…`
    name.parent.mkdir(parents=True)
    filled(0, {"model": HOSTILE_MODEL, "data": HOSTILE_DATA, "architecture": "deepseek_v3"}).save(name)
    r = run("scores", "show", name)
    out = r.stdout.decode()
    assert r.returncode == 0, r.stderr.decode()
    for bad in (b"\x1b", b"\x07", "\x9b".encode(), "\u202e".encode()):
        assert bad not in r.stdout
    assert "model[v2]" in out and "[/oops]" in out and "[bold]x" in out and "dl[/oops]" in out
    assert "\\x1b]52;c;aGVsbG8=\\x07" in out  # shown, harmless, so the user sees what the file holds
    # errors quoting a hostile path are one safe line too
    missing = tmp_path / "no[/such]\x1b[2J.safetensors"
    r = run("scores", "show", missing)
    assert b"\x1b" not in r.stderr and "no[/such]" in one_line_error(r)


def test_merge_output_with_markup_in_paths(tmp_path):
    (tmp_path / "a[").mkdir()
    a, b = tmp_path / "a[" / "x].safetensors", tmp_path / "b[v2].safetensors"
    filled(0, {"model": HOSTILE_MODEL}).save(a)
    filled(1, {"model": HOSTILE_MODEL}).save(b)
    out = tmp_path / "a[" / "oops]\x1b.safetensors"
    r = run("scores", "merge", a, b, "-o", out)
    assert r.returncode == 0, r.stderr.decode()
    text = r.stdout.decode()
    assert b"\x1b" not in r.stdout and "a[/x].safetensors" in text and "b[v2].safetensors" in text
    assert "a[/oops]\\x1b.safetensors" in text and out.exists()


def test_errors_quoting_checkpoint_text_are_safe(tmp_path):
    """A config's model_type (or a tensor name) quoted in an error reaches stderr escaped."""
    model = _gpt_oss(tmp_path / "m", model_type="x[/oops]\x1b]52;c;aGk=\x07")
    r = run("inspect", model)
    line = one_line_error(r, "unsupported architecture", "x[/oops]")
    assert b"\x1b" not in r.stderr and b"\x07" not in r.stderr and "\\x1b]52" in line


# ---------------------------------------------------------------------------------------------
# 17.14: OUT on a mount point, a symlink, a read-only or tiny filesystem, a too-long name


@pytest.fixture
def mount(tmp_path):
    """Mount small tmpfs filesystems under tmp_path (root only; skipped elsewhere)."""
    mounted: list[Path] = []

    def make(name: str, size: str = "16m", ro: bool = False) -> Path:
        where = tmp_path / name
        where.mkdir()
        opts = f"size={size}" + (",ro" if ro else "")
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(where)], capture_output=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({r.stderr.decode().strip()[:80]})")
        mounted.append(where)
        return where

    yield make
    for where in reversed(mounted):
        subprocess.run(["umount", str(where)], check=False)


def test_out_a_mount_point_is_refused(source, mount, tmp_path):
    """Before: free space was measured on the parent filesystem, the whole output written there,
    and the final rename failed with a traceback."""
    plan = tmp_path / "plan.json"
    Plan(KEEP).save(plan)
    mnt = mount("empty-mount")
    err = one_line_error(run("prune", source, "-o", mnt, "--plan", plan), "mount point")
    assert str(mnt) in err
    assert list(mnt.iterdir()) == [] and not partial_dir(mnt).exists()
    # a folder inside the mount is fine: built and renamed on the mount's own filesystem
    r = run("prune", source, "-o", mnt / "out", "--plan", plan)
    assert r.returncode == 0, r.stderr.decode()
    assert os.stat(mnt / "out").st_dev == os.stat(mnt).st_dev != os.stat(tmp_path).st_dev


def test_free_space_is_measured_where_out_is_built(source, mount, tmp_path):
    plan = tmp_path / "plan.json"
    Plan(KEEP).save(plan)
    tiny = mount("tiny", size="64k")
    one_line_error(run("prune", source, "-o", tiny / "out", "--plan", plan), "not enough disk space", str(tiny))
    assert list(tiny.iterdir()) == []


def test_out_in_a_read_only_folder_is_refused(source, mount, tmp_path):
    plan = tmp_path / "plan.json"
    Plan(KEEP).save(plan)
    ro = mount("ro", ro=True)
    one_line_error(run("prune", source, "-o", ro / "out", "--plan", plan), "cannot write")


def test_out_a_symlink_is_refused(source, tmp_path):
    plan = tmp_path / "plan.json"
    Plan(KEEP).save(plan)
    target = tmp_path / "elsewhere"
    target.mkdir()
    for link, to in ((tmp_path / "link", target), (tmp_path / "dangling", tmp_path / "nowhere")):
        link.symlink_to(to)
        one_line_error(run("prune", source, "-o", link, "--plan", plan), "symlink")
        assert link.is_symlink() and os.readlink(link) == str(to)
    assert list(target.iterdir()) == [] and not (tmp_path / "nowhere").exists()


def test_out_whose_work_folder_name_is_too_long(source, tmp_path):
    plan = tmp_path / "plan.json"
    Plan(KEEP).save(plan)
    out = tmp_path / ("o" * 245)  # a valid name, but `.{name}.shardcut-partial` is not
    one_line_error(run("prune", source, "-o", out, "--plan", plan), "name too long")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plan.json"]


def test_existing_out_file_is_refused(source, tmp_path):
    plan = tmp_path / "plan.json"
    Plan(KEEP).save(plan)
    out = tmp_path / "out"
    out.write_text("mine")
    one_line_error(run("prune", source, "-o", out, "--plan", plan), "exists")
    assert out.read_text() == "mine"


def test_pinning_many_shards_under_a_low_descriptor_limit(tmp_path):
    """Every source shard stays open for the whole prune: a checkpoint of more shards than the
    soft descriptor limit still prunes (the limit is raised up to the hard one)."""
    spec = SyntheticSpec(layers=3, experts=8, top_k=2, hidden=32, moe_inter=16, shards=120, vocab=64)
    model = write_synthetic_checkpoint(tmp_path / "m", spec)
    assert len(list(model.glob("*.safetensors"))) > 64
    script = textwrap.dedent("""
        import json, resource, sys
        from shardcut.plans.plan import Plan
        from shardcut.rewrite.writer import prune
        resource.setrlimit(resource.RLIMIT_NOFILE, (48, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
        print(prune(sys.argv[1], sys.argv[2], Plan(json.loads(sys.argv[3]))).verified)
    """)
    keep = {"1": [0, 2, 3, 7], "2": [1, 2, 5, 6]}
    r = subprocess.run(
        [sys.executable, "-c", script, str(model), str(tmp_path / "out"), json.dumps(keep)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0 and r.stdout.strip() == "True", r.stderr[-2000:]

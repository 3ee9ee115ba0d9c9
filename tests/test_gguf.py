"""A second real client: llama.cpp's converter turns shardcut's pruned checkpoints into GGUF.

Each case prunes a tiny checkpoint with a different kept set per layer, runs the pinned
`convert_hf_to_gguf.py` on the pruned folder in a subprocess (see fixtures/gguf_fixtures.py),
and reads the GGUF back with gguf-py's reader: the expert count is the pruned one, the top-k is
the source's, and every expert tensor holds exactly the kept experts of the source, in order,
as does the router (and DeepSeek's selection bias). Values are compared, not only shapes.
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from fixtures.calib_fixtures import save_tokenizer
from fixtures.gguf_fixtures import convert, converter_dir, field, reader

pytest.importorskip("transformers")

PER_EXPERT = {"ffn_gate_exps": "gate_proj", "ffn_up_exps": "up_proj", "ffn_down_exps": "down_proj"}
MIXTRAL = {"ffn_gate_exps": "w1", "ffn_up_exps": "w3", "ffn_down_exps": "w2"}


@dataclass
class Case:
    arch: str  # the GGUF architecture name (key prefix)
    source: Path
    pruned: Path
    keep: dict[str, list[int]]
    top_k: int
    gguf: Path | None = None


def _demo_case(root: Path) -> Case:
    """The demo's Qwen3-MoE (16 experts, no `mlp_only_layers`) with its BPE tokenizer, pruned to 8."""
    from shardcut.ops.demo import DEMO_CONFIG, build_demo_model
    from shardcut.plans.plan import Plan
    from shardcut.rewrite.writer import prune

    source, pruned = root / "source", root / "pruned"
    build_demo_model(source)
    rng = random.Random(0)
    E = DEMO_CONFIG["num_experts"]
    keep = {str(layer): sorted(rng.sample(range(E), E // 2)) for layer in range(DEMO_CONFIG["num_hidden_layers"])}
    prune(source, pruned, Plan(keep, {"criterion": "test"}))
    return Case("qwen3moe", source, pruned, keep, DEMO_CONFIG["num_experts_per_tok"])


def _family_case(families, name: str, arch: str, root: Path) -> Case:
    """A family fixture's pruned checkpoint, with a BPE tokenizer in place of its stub."""
    from fixtures.families import _BASE, TOP_K

    built = families(name)
    pruned = root / "pruned"
    shutil.copytree(built.pruned, pruned)
    for stub in ("tokenizer.json", "tokenizer_config.json"):
        (pruned / stub).unlink()
    save_tokenizer(pruned, _BASE["vocab_size"])
    return Case(arch, built.source, pruned, built.keep, TOP_K)


@pytest.fixture(scope="module")
def cases(families, tmp_path_factory) -> dict[str, Case]:
    """Every case built, then all converted at once (one converter process each, in parallel)."""
    converter_dir()  # skip (or fail under CI) before building anything
    root = tmp_path_factory.mktemp("gguf")
    built = {"qwen3_moe": _demo_case(root / "qwen3_moe")}
    for name, arch in (("mixtral", "llama"), ("deepseek_v3", "deepseek2"), ("gpt_oss", "gpt-oss")):
        built[name] = _family_case(families, name, arch, root / name)
    procs = {}
    for name, case in built.items():
        case.gguf = root / f"{name}.gguf"
        procs[name] = convert(case.pruned, case.gguf, wait=False)
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0 and built[name].gguf.is_file(), f"converter failed on {name}:\n{err[-4000:]}"
    return built


def _source_tensors(path: Path) -> dict[str, np.ndarray]:
    from safetensors import safe_open

    out = {}
    for shard in sorted(path.glob("*.safetensors")):
        with safe_open(shard, "np") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def _expected(name: str, src: dict[str, np.ndarray], layer: str, kept: list[int]) -> dict[str, np.ndarray]:
    """GGUF tensor name -> the values it must hold: the kept experts of the source, in order."""
    p = f"model.layers.{layer}."
    blk = f"blk.{layer}."
    if name == "gpt_oss":  # fused [E, H, 2I] with gate/up interleaved on the last axis; down [E, I, H]
        gate_up = src[p + "mlp.experts.gate_up_proj"][kept].transpose(0, 2, 1)
        bias = src[p + "mlp.experts.gate_up_proj_bias"][kept]
        return {
            blk + "ffn_gate_exps.weight": gate_up[:, ::2],
            blk + "ffn_up_exps.weight": gate_up[:, 1::2],
            blk + "ffn_down_exps.weight": src[p + "mlp.experts.down_proj"][kept].transpose(0, 2, 1),
            blk + "ffn_gate_exps.bias": bias[:, ::2],
            blk + "ffn_up_exps.bias": bias[:, 1::2],
            blk + "ffn_down_exps.bias": src[p + "mlp.experts.down_proj_bias"][kept],
            blk + "ffn_gate_inp.weight": src[p + "mlp.router.weight"][kept],
            blk + "ffn_gate_inp.bias": src[p + "mlp.router.bias"][kept],
        }
    moe, parts = ("block_sparse_moe.", MIXTRAL) if name == "mixtral" else ("mlp.", PER_EXPERT)
    out = {
        blk + f"{gguf}.weight": np.stack([src[f"{p}{moe}experts.{e}.{hf}.weight"] for e in kept])
        for gguf, hf in parts.items()
    }
    out[blk + "ffn_gate_inp.weight"] = src[p + moe + "gate.weight"][kept]
    if name == "deepseek_v3":
        out[blk + "exp_probs_b.bias"] = src[p + "mlp.gate.e_score_correction_bias"][kept]
    return out


@pytest.mark.parametrize("name", ["qwen3_moe", "mixtral", "deepseek_v3", "gpt_oss"])
def test_pruned_checkpoint_converts_to_gguf_with_kept_experts(cases, name):
    case = cases[name]
    r = reader(case.gguf)
    kept_count = len(next(iter(case.keep.values())))
    source_config = json.loads((case.source / "config.json").read_text())
    assert field(r, f"{case.arch}.expert_count") == kept_count < _count(source_config)
    assert field(r, f"{case.arch}.expert_used_count") == case.top_k
    tensors = {t.name: t for t in r.tensors}
    src = _source_tensors(case.source)
    layers = dict(case.keep)
    if name == "deepseek_v3":  # the converter leaves the MTP layer (model.layers.3) out of the GGUF
        assert field(r, "deepseek2.block_count") == 3 and not [t for t in tensors if t.startswith("blk.3.")]
        del layers["3"]
    for layer, kept in layers.items():
        for gguf_name, want in _expected(name, src, layer, kept).items():
            got = tensors[gguf_name]
            assert got.data.shape == want.shape, gguf_name
            np.testing.assert_array_equal(np.asarray(got.data), want, err_msg=gguf_name)
    # no tensor in the GGUF still carries an unpruned expert axis
    E = _count(source_config)
    assert not [t.name for t in r.tensors if "exps" in t.name and int(t.shape[-1]) == E]


def test_demo_tokenizer_converts_as_qwen2_bpe(cases):
    """The demo's BPE tokenizer reaches the GGUF whole: every token in id order, every merge,
    llama.cpp's `qwen2` pre-tokenizer, the special ids and the chat template."""
    case = cases["qwen3_moe"]
    r = reader(case.gguf)
    tok = json.loads((case.pruned / "tokenizer.json").read_text())
    vocab = {**tok["model"]["vocab"], **{t["content"]: t["id"] for t in tok["added_tokens"]}}
    assert field(r, "tokenizer.ggml.model") == "gpt2" and field(r, "tokenizer.ggml.pre") == "qwen2"
    assert field(r, "tokenizer.ggml.tokens") == sorted(vocab, key=vocab.get)
    assert field(r, "tokenizer.ggml.merges") == [" ".join(m) for m in tok["model"]["merges"]]
    assert (
        field(r, "tokenizer.ggml.bos_token_id") == vocab["<s>"]
        and field(r, "tokenizer.ggml.eos_token_id") == vocab["</s>"]
    )
    from shardcut.ops.demo import CHAT_TEMPLATE

    assert field(r, "tokenizer.chat_template") == CHAT_TEMPLATE


def _count(config: dict) -> int:
    return next(config[k] for k in ("num_experts", "num_local_experts", "n_routed_experts") if k in config)

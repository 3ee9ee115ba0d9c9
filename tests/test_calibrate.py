"""Streaming calibration is right: on tiny real-architecture models, the streamed hidden states
equal a full-model forward after every layer, and the statistics equal a straightforward
float64 reference computed on the fully loaded model with hooks (tests/fixtures/calib_fixtures.py).
Also: counts add up, resume is exact, shard halves merge into the full run.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from fixtures.calib_fixtures import layer_outputs, reference_statistics, write_ids_jsonl
from fixtures.families import TOP_K, E, family

from shardcut.ops.calibration.runner import CalibrateOptions, Calibrator, calibrate
from shardcut.plans.score_merge import merge_scores
from shardcut.plans.scores import FIELDS, Scores

PROOF_FAMILIES = ["qwen3_moe", "deepseek_v3", "mixtral", "gpt_oss"]
# every other family the adapter table lists, on the same reference
MORE_FAMILIES = [
    "qwen2_moe",
    "olmoe",
    "qwen3_next",
    "qwen3_5_moe",
    "phimoe",
    "minimax",
    "minimax_m2",
    "deepseek_v2",
    "kimi_k2",
    "glm4_moe",
    "dots1",
    "ernie4_5_moe",
    "granitemoe",
    "kimi_linear",
    "bailing_hybrid",
    "afmoe",
    "lfm2_moe",
    "nemotron_h",
    "hunyuan_v1_moe",
    "jamba",
    "granitemoeshared",
    "granitemoehybrid",
    "deepseek_v32",
    "step3",
    "qwen3_5_moe_text",
    "llama4",
    "longcat_flash",
    "dbrx",
    "gemma4",
]
# multimodal wrappers: their text stack streams from the wrapper's own shards, keyed as plan/prune key it
WRAPPERS = [
    "kimi_k25",
    "qwen3_vl_moe",
    "qwen3_5_moe",
    "glm4v_moe",
    "ernie4_5_vl_moe",
    "qwen3_omni_moe",
    "llama4_multimodal",
    "gemma4_multimodal",
]
CALIBRATED = PROOF_FAMILIES + MORE_FAMILIES + WRAPPERS
# lengths up to the tiny models' 64 positions; a batch budget of 96 tokens forces padded batches
LENGTHS = [3, 17, 40, 9, 64, 25, 33, 12, 50, 7]
BATCH_TOKENS = 96

pytest.importorskip("transformers")


@pytest.fixture(scope="session")
def ids_data(tmp_path_factory) -> tuple[Path, list[np.ndarray]]:
    path = tmp_path_factory.mktemp("calib-data") / "ids.jsonl"
    return path, write_ids_jsonl(path, LENGTHS, vocab=96, seed=0)


@pytest.fixture(scope="session")
def streamed(families, ids_data, tmp_path_factory):
    """`streamed(name)` -> (scores, hidden states per step and sample, the Calibrator) of one full run."""
    cache = {}

    def get(name: str):
        if name not in cache:
            hidden: dict[int, list] = {}

            def on_layer(step: int, cal: Calibrator) -> None:
                hidden[step] = [cal.hidden_states(j) for j in range(len(cal.local))]

            out = tmp_path_factory.mktemp(f"calib-{name}") / "scores.safetensors"
            cal = Calibrator(
                str(families(name).source),
                str(ids_data[0]),
                out,
                CalibrateOptions(max_length=64, batch_tokens=BATCH_TOKENS),
                on_layer=on_layer,
            )
            scores = cal.run()
            cache[name] = (scores, hidden, cal)
        return cache[name]

    return get


def _keys(name: str) -> dict[int, str]:
    """The text stack's MoE layers (a wrapper's other stacks, `vision.L` and `talker.L`, are not run)."""
    fam = family(name)
    return {int(k): k for k in fam.runs if "." not in k}


def _text_model(name: str, model):
    """The module whose forward the reference runs on text (Qwen3-Omni: its thinker)."""
    if name == "qwen3_omni_moe":
        return model.thinker
    # transformers 5.24's Llama4ForConditionalGeneration cannot run text alone: its language model can
    return model.language_model if name == "llama4_multimodal" else model


@pytest.mark.parametrize("name", PROOF_FAMILIES)
def test_streamed_hidden_states_equal_full_forward(name, families, streamed):
    _, hidden, cal = streamed(name)
    model = _text_model(name, families(name).model)
    worst = 0.0
    for j, sample in enumerate(cal.local):
        full = layer_outputs(model, sample)
        assert len(full) == cal.skeleton.num_layers
        for i, expected in enumerate(full):
            got = hidden[i + 1][j]
            scale = expected.abs().max().item()
            worst = max(worst, (got - expected).abs().max().item() / scale)
    assert worst < 1e-5, f"largest relative difference {worst:.2e}"


@pytest.mark.parametrize("name", CALIBRATED)
def test_statistics_equal_hook_reference(name, families, streamed):
    if name not in PROOF_FAMILIES:  # the proof families have their own hidden-state test
        test_streamed_hidden_states_equal_full_forward(name, families, streamed)
    scores, _, cal = streamed(name)
    keys = _keys(name)
    assert scores.layers == list(keys.values())  # reachable MoE layers only (no MTP layer)
    ref = reference_statistics(_text_model(name, families(name).model), cal.local, keys, E)
    for key in scores.layers:
        r = scores.row(key)
        assert scores.tokens[r] == ref[key]["tokens"] == sum(LENGTHS)
        np.testing.assert_array_equal(scores.count[r], ref[key]["count"], err_msg=f"layer {key} count")
        for f in ("gate_sum", "norm_sum", "reap_sum", "act_max"):
            np.testing.assert_allclose(
                getattr(scores, f)[r], ref[key][f], rtol=1e-6, atol=1e-9, err_msg=f"layer {key} {f}"
            )


@pytest.mark.parametrize("name", PROOF_FAMILIES)
def test_counts_sum_to_top_k_times_tokens(name, streamed):
    scores, _, _ = streamed(name)
    np.testing.assert_array_equal(scores.count.sum(axis=1), TOP_K * scores.tokens)
    assert (scores.tokens == sum(LENGTHS)).all()
    assert (scores.count > 0).sum() > E  # routing spreads over experts: the test data is not degenerate


def test_deepseek_statistics_follow_selection_bias_and_groups(families, streamed):
    """The fixture's selection bias and group limit change routing, so matching the reference
    above means shardcut used the router's real decisions, not a softmax/sigmoid top-k of logits."""
    import torch

    model = families("deepseek_v3").model
    _, _, cal = streamed("deepseek_v3")
    seen = []
    hooks = [layer.mlp.gate.register_forward_hook(lambda m, a, o: seen.append(o)) for layer in model.model.layers[1:]]
    try:
        with torch.no_grad():
            for s in cal.local:
                model(torch.as_tensor(s)[None])
    finally:
        for h in hooks:
            h.remove()
    naive_differs = 0
    for logits, _, index in seen:
        naive = torch.topk(logits.sigmoid(), TOP_K, dim=-1).indices
        naive_differs += int((naive.sort(-1).values != index.sort(-1).values).any(-1).sum())
        assert all(len((row // (E // 2)).unique()) == 1 for row in index)  # n_group=2, topk_group=1
    assert naive_differs > 0


def _run(source: Path, data: Path, out: Path, **kwargs) -> Scores:
    return calibrate(source, str(data), out, max_length=64, batch_tokens=BATCH_TOKENS, **kwargs)


def _assert_identical(a: Scores, b: Scores) -> None:
    assert a.layers == b.layers
    for f in (*FIELDS, "tokens"):
        np.testing.assert_array_equal(getattr(a, f), getattr(b, f), err_msg=f)


class Interrupt(Exception):
    pass


@pytest.mark.parametrize("name,memory", [(n, "1") for n in PROOF_FAMILIES] + [("qwen3_moe", None), ("gpt_oss", None)])
def test_resume_after_interruption_is_identical(name, memory, families, ids_data, streamed, tmp_path):
    """Interrupted after the first MoE layer (activations spilled to disk, or held in RAM and
    rebuilt by replaying), then resumed: the scores equal an uninterrupted run's bit for bit."""
    full, _, _ = streamed(name)
    out = tmp_path / "scores.safetensors"
    first_moe_step = min(_keys(name)) + 1
    modes = []

    def stop(event):
        if event.kind == "info" and event.message.startswith("activations"):
            modes.append(event.message)
        if event.kind == "layer_done" and event.step == first_moe_step + 1:
            raise Interrupt

    with pytest.raises(Interrupt):
        _run(families(name).source, ids_data[0], out, max_memory=memory, progress=stop)
    assert not out.exists()
    assert (tmp_path / "scores.safetensors.calib" / "state.json").exists()
    assert ("spilled" in modes[0]) == (memory is not None)
    resumed_msgs = []
    scores = _run(
        families(name).source,
        ids_data[0],
        out,
        max_memory=memory,
        resume=True,
        progress=lambda e: resumed_msgs.append(e.message) if e.kind == "info" else None,
    )
    assert any(m.startswith(f"resuming at step {first_moe_step + 1}") for m in resumed_msgs)
    _assert_identical(scores, full)
    _assert_identical(Scores.load(out), full)
    assert not (tmp_path / "scores.safetensors.calib").exists()


@pytest.mark.parametrize("name", PROOF_FAMILIES)
def test_shard_halves_merge_to_full_run(name, families, ids_data, streamed, tmp_path):
    full, _, _ = streamed(name)
    halves = [
        _run(families(name).source, ids_data[0], tmp_path / f"half{i}.safetensors", shard=f"{i}/2") for i in (1, 2)
    ]
    assert halves[0].metadata["shard"] == "1/2"
    assert sum(int(h.metadata["samples"]) for h in halves) == len(LENGTHS)
    merged = merge_scores([(Scores.load(tmp_path / f"half{i}.safetensors"), 1.0) for i in (1, 2)])
    np.testing.assert_array_equal(merged.count, full.count)
    np.testing.assert_array_equal(merged.tokens, full.tokens)
    for f in ("gate_sum", "norm_sum", "reap_sum", "act_max"):
        np.testing.assert_allclose(getattr(merged, f), getattr(full, f), rtol=1e-6, err_msg=f)


def test_bfloat16_spilled_run_resumes_exactly_and_tracks_float32(families, ids_data, streamed, tmp_path):
    """bfloat16 activations on disk (the GPU default dtype, here on the CPU): a resumed run equals
    an uninterrupted one bit for bit, and the statistics stay close to the float32 run's."""
    full32, _, _ = streamed("qwen3_moe")
    source = families("qwen3_moe").source
    straight = _run(source, ids_data[0], tmp_path / "a.safetensors", dtype="bfloat16", max_memory="1")

    def stop(event):
        if event.kind == "layer_done" and event.step == 3:
            raise Interrupt

    with pytest.raises(Interrupt):
        _run(source, ids_data[0], tmp_path / "b.safetensors", dtype="bfloat16", max_memory="1", progress=stop)
    resumed = _run(source, ids_data[0], tmp_path / "b.safetensors", dtype="bfloat16", max_memory="1", resume=True)
    _assert_identical(resumed, straight)
    assert straight.metadata["dtype"] == "bfloat16"
    np.testing.assert_array_equal(straight.count.sum(1), TOP_K * straight.tokens)
    np.testing.assert_allclose(straight.norm_sum.sum(1), full32.norm_sum.sum(1), rtol=0.05)


def test_score_file_metadata(streamed):
    scores, _, cal = streamed("deepseek_v3")
    saved = Scores.load(cal.out)
    meta = saved.metadata
    assert meta["architecture"] == "deepseek_v3" and meta["num_experts"] == str(E) and meta["top_k"] == str(TOP_K)
    assert meta["samples"] == str(len(LENGTHS)) and meta["tokens"] == str(sum(LENGTHS))
    assert meta["max_length"] == "64" and meta["seed"] == "0" and meta["data"].endswith("ids.jsonl")
    assert meta["model"] == str(cal.model) and meta["shardcut_version"] and meta["created"]
    assert saved.layers == ["1", "2"]  # the MTP layer 3 is never run by the model's forward


@pytest.mark.parametrize("name", WRAPPERS)
def test_wrapper_scores_use_the_plan_keys_and_say_text_only(name, families, streamed):
    """A wrapper's score file is keyed as `plan`/`prune` key the wrapper checkpoint (no renaming), and
    says where text-only calibration leaves image-token routing or other stacks unseen."""
    from shardcut.format.checkpoint import open_checkpoint
    from shardcut.moe.model import describe

    scores, _, _ = streamed(name)
    info = describe(open_checkpoint(families(name).source))
    text = [layer.key for layer in info.layers if not layer.mtp and "." not in layer.key]
    assert scores.layers == text
    meta = Scores.load(streamed(name)[2].out).metadata
    shares = name not in ("ernie4_5_vl_moe",)
    assert ("text_only" in meta) == shares
    others = sorted({layer.key.split(".")[0] + "." for layer in info.layers if "." in layer.key and not layer.mtp})
    assert meta.get("unscored_stacks", "") == ", ".join(others)


def test_deepseek_v32_indexer_drops_tokens(families, streamed):
    """The fixture's indexer keeps INDEX_TOPK keys per query while samples run to 64 tokens, so the
    statistics above match the reference with the sparse attention really dropping tokens."""
    import torch
    from fixtures.families import INDEX_TOPK

    model = families("deepseek_v32").model
    _, _, cal = streamed("deepseek_v32")
    picked = []
    hooks = [
        layer.self_attn.indexer.register_forward_hook(lambda m, a, o: picked.append(o.shape))
        for layer in model.model.layers
    ]
    try:
        with torch.no_grad():
            model(torch.as_tensor(max(cal.local, key=len))[None])
    finally:
        for h in hooks:
            h.remove()
    assert picked and all(shape[-1] == INDEX_TOPK < shape[-2] for shape in picked)


def test_gpu_settings_run_on_the_cpu(families, ids_data, streamed, tmp_path, monkeypatch):
    """What a CUDA run does differently, run on the CPU: the compute dtype is bfloat16 (the next
    layer's tensors are read while the current one runs, `prefetch`, on both by default; reading
    in turn instead changes nothing, bit-identical scores); in bfloat16 every loaded parameter sits
    on the run's device in bfloat16 except those transformers keeps in float32 (its dtype plan:
    DeepSeek's router), and the statistics track float32."""
    import re

    import torch

    from shardcut.ops.calibration import stream

    name = "kimi_k25"
    full, _, _ = streamed(name)
    source = families(name).source
    placed: list[tuple[str, torch.device, torch.dtype, bool]] = []
    original = stream.LayerLoader.load_layer

    def spy(self, i, raw):
        layer = original(self, i, raw)
        plan = [re.compile(p) for p in self.sk.dtype_plan or ()]
        for n, p in layer.named_parameters():
            full_name = f"{self.sk.module_prefix}{i}.{n}"
            placed.append((full_name, p.device, p.dtype, any(q.search(full_name) for q in plan)))
        return layer

    monkeypatch.setattr(stream.LayerLoader, "load_layer", spy)
    in_turn = Calibrator(  # the streamed runs read ahead (the default): reading in turn changes nothing
        str(source),
        str(ids_data[0]),
        tmp_path / "a.safetensors",
        CalibrateOptions(max_length=64, batch_tokens=BATCH_TOKENS, prefetch=False),
    ).run()
    _assert_identical(in_turn, full)
    placed.clear()
    bf16 = Calibrator(
        str(source),
        str(ids_data[0]),
        tmp_path / "b.safetensors",
        CalibrateOptions(max_length=64, batch_tokens=BATCH_TOKENS, prefetch=True, dtype="bfloat16"),
    ).run()
    assert placed and all(device == torch.device("cpu") for _, device, _, _ in placed)
    assert all(dtype == (torch.float32 if keep32 else torch.bfloat16) for _, _, dtype, keep32 in placed), placed
    assert any(keep32 for *_, keep32 in placed) and not all(keep32 for *_, keep32 in placed)
    np.testing.assert_array_equal(bf16.count.sum(1), TOP_K * bf16.tokens)
    np.testing.assert_allclose(bf16.norm_sum.sum(1), full.norm_sum.sum(1), rtol=0.05)


def _prune_and_oracle(name: str, families, plan, tmp_path):
    """prune -> verify --source -> transformers loads it -> pruned logits equal the masked original's."""
    import torch
    from fixtures.families import load

    from shardcut.moe.oracle import forbid_pruned_experts
    from shardcut.ops.verification import verify
    from shardcut.rewrite.writer import prune

    b = families(name)
    out = tmp_path / "pruned"
    prune(b.source, out, plan)
    checked = verify(out, source=b.source)
    assert checked.ok, checked.problems
    small, loading = load(b.family, out)
    assert not loading["missing_keys"] and not loading["mismatched_keys"], loading
    ids = torch.randint(3, 90, (2, 12), generator=torch.Generator().manual_seed(7))
    counts = {k: b.family.experts_of(k) for k in plan.keep}
    with torch.no_grad():
        base = b.family.forward(b.model, ids)
        with forbid_pruned_experts(b.model, plan.keep, counts, b.family.oracle_key) as masked_routers:
            masked = b.family.forward(b.model, ids)
        got = b.family.forward(small, ids)
    assert masked_routers == len(b.family.runs)
    assert (base - masked).abs().max().item() > 1e-3
    assert (got - masked).abs().max().item() < 1e-5
    return out


def test_talker_never_reached_by_text_is_kept_whole(families, streamed, tmp_path):
    """Qwen3-Omni: text calibration scores the thinker only; plan keeps the talker (its own expert
    count) whole by default, says so in the report and the plan, and calibrate -> plan -> prune ->
    verify gives a checkpoint transformers loads, with the talker's experts and count unchanged."""
    import json

    from shardcut.ops.planning import make_plan

    scores, _, cal = streamed("qwen3_omni_moe")
    plan, report = make_plan(families("qwen3_omni_moe").source, cal.out, ratio=0.5)
    assert {k: len(v) for k, v in plan.keep.items()} == {"0": 4, "1": 4, "talker.0": 6, "talker.1": 6}
    assert plan.keep["talker.0"] == list(range(6))
    whole = [row for row in report.rows if row.layer.startswith("talker.")]
    assert all(row.pruned == 0 and row.source.startswith("kept whole") for row in whole)
    assert report.by_config["talker_config.text_config"]["kept"] == 6
    assert any("talker_config.text_config: every expert kept" in n for n in report.notes)
    assert "text-only calibration never routes" in plan.extra["unscored_stacks"]["talker_config.text_config"]
    assert "mtp_policy" not in plan.extra
    out = _prune_and_oracle("qwen3_omni_moe", families, plan, tmp_path)
    config = json.loads((out / "config.json").read_text())
    assert config["thinker_config"]["text_config"]["num_experts"] == 4
    assert config["talker_config"]["text_config"]["num_local_experts"] == 6


def test_vision_experts_sharing_the_text_count_need_an_explicit_policy(families, streamed, tmp_path):
    """ERNIE-4.5-VL: the vision half shares `moe_num_experts` with the text half (one int in
    transformers; vLLM asserts both halves equal), so it cannot be kept whole while text is
    pruned: plan refuses with the reason, and with --mtp-policy prunes both halves alike."""
    from shardcut.format.errors import ShardcutError
    from shardcut.ops.planning import make_plan

    _, _, cal = streamed("ernie4_5_vl_moe")
    source = families("ernie4_5_vl_moe").source
    with pytest.raises(
        ShardcutError, match=r"vision\.1, vision\.2 \(vision\. stack\) have no scores.*one expert count"
    ):
        make_plan(source, cal.out, ratio=0.5)
    plan, report = make_plan(source, cal.out, ratio=0.5, mtp_policy="reuse-last")
    assert plan.keep["vision.1"] == plan.keep["vision.2"] == plan.keep["2"]
    assert {len(v) for v in plan.keep.values()} == {4}
    _prune_and_oracle("ernie4_5_vl_moe", families, plan, tmp_path)


def test_longcat_identity_experts_are_routed_but_not_scored(families, ids_data, tmp_path):
    """LongCat-Flash: tokens routed to a zero-computation (identity) expert, ids E..E+Z-1, pass
    through unchanged. Those pairs are in the layer's output but not in the statistics of the E real
    experts, which still equal the full-model reference; counts plus identity choices make
    top_k x tokens. The fixture's identity experts get a selection bias so that tokens choose them."""
    import shutil

    import torch
    from fixtures.calib_fixtures import decoder_layers
    from fixtures.families import load
    from safetensors.torch import load_file, save_file

    b = families("longcat_flash")
    source = tmp_path / "longcat"
    shutil.copytree(b.source, source)
    for shard in source.glob("*.safetensors"):
        tensors = load_file(shard)
        biased = {n: t for n, t in tensors.items() if n.endswith("mlp.router.e_score_correction_bias")}
        for t in biased.values():
            t.zero_()
            t[E:] = 0.02  # identity experts compete with the real ones
        if biased:
            save_file(tensors, shard, metadata={"format": "pt"})
    model, _ = load(b.family, source)
    scores = _run(source, ids_data[0], tmp_path / "s.safetensors")
    identity: dict[int, int] = {}
    hooks = [
        layer.mlp.experts.register_forward_pre_hook(
            lambda m, args, i=i: identity.__setitem__(i, identity.get(i, 0) + int((args[1] >= E).sum()))
        )
        for i, layer in enumerate(decoder_layers(model))
    ]
    try:
        with torch.no_grad():
            for s in ids_data[1]:
                model(torch.as_tensor(s)[None])
    finally:
        for h in hooks:
            h.remove()
    assert len(identity) == len(scores.layers) and all(0 < n < TOP_K * sum(LENGTHS) // 2 for n in identity.values())
    ref = reference_statistics(model, ids_data[1], {int(k): k for k in scores.layers}, E)
    for key in scores.layers:
        r = scores.row(key)
        assert scores.count[r].sum() + identity[int(key)] == TOP_K * scores.tokens[r]
        np.testing.assert_array_equal(scores.count[r], ref[key]["count"])
        for f in ("gate_sum", "norm_sum", "reap_sum", "act_max"):
            np.testing.assert_allclose(getattr(scores, f)[r], ref[key][f], rtol=1e-6, atol=1e-9, err_msg=f)


def test_llama4_skewed_routing_splits_the_padded_expert_call(families, ids_data, streamed, tmp_path, monkeypatch):
    """Llama-4's experts run padded to the busiest expert; spans whose padding would waste more than
    PAD_WASTE x are halved. Forced here on every span: the statistics do not change."""
    from shardcut.ops.calibration import observe

    monkeypatch.setattr(observe, "PAD_MIN_TOKENS", 1)
    monkeypatch.setattr(observe, "PAD_WASTE", 1)
    grouped, calls = observe.ScaledInputObserver._grouped, []

    def counted(self, expert, *args):
        calls.append(len(expert))
        return grouped(self, expert, *args)

    monkeypatch.setattr(observe.ScaledInputObserver, "_grouped", counted)
    split = _run(families("llama4").source, ids_data[0], tmp_path / "s.safetensors")
    assert len(calls) > sum(LENGTHS) and max(calls) <= 2 * TOP_K  # spans of one or two tokens
    full, _, _ = streamed("llama4")
    np.testing.assert_array_equal(split.count, full.count)
    for f in ("gate_sum", "norm_sum", "reap_sum", "act_max"):
        np.testing.assert_allclose(getattr(split, f), getattr(full, f), rtol=1e-6, err_msg=f)

"""Per-family calibration adapters and the observer that records routed expert statistics.

Every MoE block that transformers 5 builds for the supported families computes its router
(softmax or sigmoid, selection bias, group limits, renormalisation, scaling: whatever the family
does) and then calls its experts module as `experts(hidden, top_k_index, top_k_weights)`, where
`top_k_weights` are exactly the gates the layer applies to each chosen expert's output. The
observer replaces that call: it runs the experts module's own forward (its own activation,
biases, clamping, interleaving: gpt-oss included) on one (token, expert) pair per row with gate
1, which yields f_j(x) for the routed pairs only, records the statistics, and returns
Σ g_j(x)·f_j(x): the layer's output, so hidden states flow on. No expert runs on a token that
did not choose it, and nothing of size experts x tokens x hidden is ever formed.
"""

from __future__ import annotations

import inspect
import time

import torch

from shardcut.format.errors import ShardcutError
from shardcut.moe.architectures import ARCHITECTURES, Calibration, find_architecture
from shardcut.moe.model import ModelInfo
from shardcut.ops.calibration.device import synchronize
from shardcut.ops.calibration.options import DEFAULT_PAIR_CHUNK
from shardcut.plans.scores import Scores


def calibratable_model_types() -> list[str]:
    """Model types the architecture table says calibrate."""
    return sorted(
        mt
        for a in ARCHITECTURES
        for mt in a.model_types
        if a.unsupported is None and a.calibration_of(mt).unsupported is None
    )


def unsupported_reason(config: dict) -> str | None:
    """Why a checkpoint of this config cannot be calibrated (None: it can), from the table."""
    model_type = config.get("model_type")
    arch = find_architecture(config)
    if arch is None:
        return "shardcut's architecture table does not know it"
    calib = arch.calibration_of(model_type)
    if arch.unsupported or calib.unsupported:
        return arch.unsupported or calib.unsupported
    sub = config.get("text_config")
    text = sub if isinstance(sub, dict) else config
    return next((why for key, default, why in calib.unsupported_when if text.get(key, default)), None)


def check_supported(info: ModelInfo, source) -> None:
    """Raise a one-line error for a family the architecture table says cannot be calibrated."""
    why = unsupported_reason(info.config)
    if why is not None:
        raise ShardcutError(
            f"cannot calibrate model_type={info.config.get('model_type')!r}: {why}; calibration "
            f"supports {', '.join(calibratable_model_types())}",
            source,
        )


def calibration_notes(info: ModelInfo) -> dict[str, str]:
    """Score-file metadata saying what a text-only calibration of a multimodal wrapper covers."""
    calib = info.arch.calibration_of(info.config.get("model_type"))
    out = {}
    if calib.images_share_experts:
        out["text_only"] = (
            "calibrated on text only; this model also routes image tokens through the same "
            "experts, which these statistics do not see"
        )
    if calib.text_only_stacks:
        out["unscored_stacks"] = ", ".join(calib.text_only_stacks)
    return out


def find_experts(layer: torch.nn.Module, calib: Calibration | None = None) -> torch.nn.Module | None:
    """The routed-experts module of a decoder layer (transformers' `@use_experts_implementation`
    classes, which all take `(hidden, top_k_index, top_k_weights)`), or None for a dense layer.
    `calib.experts_module` names it where a layer holds several (ERNIE-VL's text and vision experts)."""
    if calib is not None and calib.experts_module:
        try:
            return layer.get_submodule(calib.experts_module)
        except AttributeError:
            return None
    found = [
        m
        for m in layer.modules()
        if hasattr(m, "num_experts") and (hasattr(m, "has_gate") and hasattr(m, "is_concatenated") or _takes_routing(m))
    ]
    if len(found) > 1:
        raise ShardcutError(f"{type(layer).__name__} holds {len(found)} expert modules; calibration expects one")
    return found[0] if found else None


def _takes_routing(module: torch.nn.Module) -> bool:
    """An experts module outside `@use_experts_implementation` (Step3's) with the same call."""
    params = list(inspect.signature(type(module).forward).parameters)[1:4]
    return params == ["hidden_states", "top_k_index", "top_k_weights"]


class ExpertObserver:
    """Wraps one experts module while its layer runs; accumulates into `scores` row `key`.

    valid: per-token bool mask (padding False) of the batch about to run, set by the caller.
    record: False replays the layer (same numerics) without touching the statistics.

    Example:
        >>> obs = ExpertObserver(find_experts(layer), scores, "3", top_k=8)
        >>> with obs: out = layer(hidden, **call)
    """

    def __init__(
        self,
        experts: torch.nn.Module,
        scores: Scores,
        key: str,
        top_k: int,
        pair_chunk: int = DEFAULT_PAIR_CHUNK,
        two_slot_pairs: bool = False,
    ):
        self.experts, self.scores, self.key, self.top_k = experts, scores, key, top_k
        self.two_slot_pairs = two_slot_pairs
        self.pair_chunk = max(pair_chunk, top_k)
        self.valid: torch.Tensor | None = None
        self.record = True
        self.calls = 0
        self.stats_s = 0.0  # wall seconds spent recording the statistics (LayerTimes.stats_s)
        self._original = type(experts).forward
        self._signature = inspect.signature(self._original)
        # LongCat's module counts its real experts as `num_routed_experts` (its identity experts follow)
        n = getattr(experts, "num_experts", None)
        n = experts.num_routed_experts if n is None else n
        if n != scores.experts_of(key):
            raise ShardcutError(f"layer {key}: the model has {n} experts, the config says {scores.experts_of(key)}")
        self.num_real = int(n)

    def __enter__(self) -> ExpertObserver:
        self.experts.forward = self.forward
        return self

    def __exit__(self, *exc) -> None:
        self.experts.__dict__.pop("forward", None)

    def forward(self, *args, **kwargs) -> torch.Tensor:
        bound = self._signature.bind(self.experts, *args, **kwargs)
        hidden, index, weights = list(bound.arguments.values())[1:4]
        shape = hidden.shape  # DBRX hands its experts [B, T, H] and gets that shape back
        hidden = hidden.reshape(-1, shape[-1])
        T, k = index.shape
        if k != self.top_k:
            raise ShardcutError(
                f"layer {self.key}: the router chose {k} experts per token, the config says {self.top_k}"
            )
        valid = self.valid if self.valid is not None else torch.ones(T, dtype=torch.bool, device=hidden.device)
        if valid.numel() != T:
            raise RuntimeError(f"layer {self.key}: experts saw {T} tokens, the batch has {valid.numel()}")
        self.calls += 1
        out = torch.empty_like(hidden)
        step = max(1, self.pair_chunk // k)
        for s in range(0, T, step):
            e = min(T, s + step)
            out[s:e] = self._chunk(hidden[s:e], index[s:e], weights[s:e], valid[s:e])
        return out.view(shape)

    def _chunk(self, hidden, index, weights, valid) -> torch.Tensor:
        n, k = index.shape
        pairs = hidden.repeat_interleave(k, dim=0)  # row t*k + slot = token t for its slot-th expert
        ones = torch.ones(n * k, 1, dtype=weights.dtype, device=weights.device)
        slots = index.reshape(n * k, 1)
        if self.two_slot_pairs:  # a second slot of weight 0: f_j(x)·1 + y·0 is f_j(x) exactly
            total = getattr(self.experts, "total_experts", self.num_real)
            second = torch.full_like(slots, self.num_real) if total > self.num_real else slots
            slots, ones = torch.cat([slots, second], 1), torch.cat([ones, torch.zeros_like(ones)], 1)
        f = self._original(self.experts, pairs, slots, ones).reshape(n * k, -1)  # f_j(x) per routed pair
        f32 = f.float()  # gates are applied and statistics taken in float32, whatever the compute dtype
        gates = weights.float()
        out = torch.bmm(gates.unsqueeze(1), f32.view(n, k, -1)).squeeze(1).to(hidden.dtype)  # sum_slot g * f
        if self.record:
            synchronize(f32.device)  # the expert forward queued above is forward time, not statistics time
            t0 = time.perf_counter()
            # reduce per pair first, select the non-padding pairs after: no second copy of f
            norms = torch.linalg.vector_norm(f32, dim=-1)
            low, high = torch.aminmax(f32, dim=-1)
            peaks = torch.maximum(high, -low)
            # pairs routed to a zero-computation (identity) expert, ids >= num_real, are not recorded
            keep = valid.repeat_interleave(k) & (index.reshape(-1) < self.num_real)
            self.scores.accumulate(
                self.key,
                experts=index.reshape(-1)[keep].cpu().numpy(),
                gates=gates.reshape(-1)[keep].double().cpu().numpy(),
                norms=norms[keep].double().cpu().numpy(),
                peaks=peaks[keep].double().cpu().numpy(),
                tokens=int(valid.sum()),
            )
            self.stats_s += time.perf_counter() - t0
        return out


# ScaledInputObserver pads each expert's rows to the busiest expert's: spans are halved (down to
# PAD_MIN_TOKENS tokens) while the padded call would exceed PAD_WASTE times the routed rows
PAD_WASTE, PAD_MIN_TOKENS = 8, 256


class ScaledInputObserver(ExpertObserver):
    """For a family whose routing scores scale each expert's input (`Calibration.input_scaling_router`,
    Llama-4): its experts module is called with `[E·T, H]`, row e·T+t = s_{t,e}·x_t (zero where
    token t did not choose expert e), and returns f_e of every row, which the block sums over e.

    The observer reads the router's own decision from its output (scores `[T, E]`, logits) and the
    unscaled tokens from its input, runs the experts module's own forward on the routed pairs only
    (grouped per expert, padded to the largest group), both on s·x (the rows the layer adds, placed
    where the model puts them; the other rows stay zero, as f_e(0) is for these bias-free experts)
    and on x (f_e(x), whose statistics are recorded with gate s).
    """

    def __init__(self, experts, router: torch.nn.Module, scores: Scores, key: str, top_k: int, pair_chunk: int):
        super().__init__(experts, scores, key, top_k, pair_chunk)
        self.router = router
        self._routing: tuple | None = None
        self._hook: torch.utils.hooks.RemovableHandle | None = None

    def __enter__(self) -> ScaledInputObserver:
        self._hook = self.router.register_forward_hook(self._capture)
        super().__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._hook is not None:
            self._hook.remove()
        self._routing = None
        super().__exit__(*exc)

    def _capture(self, module, args, output) -> None:
        scores, logits = output
        x = args[0]
        self._routing = (x.reshape(-1, x.shape[-1]), scores, logits)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self._routing is None:
            raise RuntimeError(f"layer {self.key}: the experts ran before the router")
        x, scores, logits = self._routing
        T, E = scores.shape
        index = torch.topk(logits, self.top_k, dim=1).indices  # the router's own top-k, as it computed it
        gates = scores.gather(1, index)
        valid = self.valid if self.valid is not None else torch.ones(T, dtype=torch.bool, device=x.device)
        if valid.numel() != T or hidden_states.shape[0] != E * T:
            raise RuntimeError(f"layer {self.key}: experts saw {hidden_states.shape[0]} rows for {T} tokens")
        self.calls += 1
        routed = hidden_states.view(E, T, -1)
        out = torch.zeros_like(hidden_states)
        placed = out.view(E, T, -1)
        k = self.top_k
        spans = [(s, min(T, s + max(1, self.pair_chunk // k))) for s in range(0, T, max(1, self.pair_chunk // k))]
        while spans:
            s, e = spans.pop(0)
            expert = index[s:e].reshape(-1)
            if e - s > PAD_MIN_TOKENS and E * int(torch.bincount(expert, minlength=E).max()) > PAD_WASTE * len(expert):
                # skewed routing pads every expert to the busiest one: halve the span to bound that
                spans[:0] = [(s, (s + e) // 2), ((s + e) // 2, e)]
                continue
            token = torch.arange(s, e, device=x.device).repeat_interleave(k)
            f_scaled, f_plain = self._grouped(expert, routed[expert, token], x[token], E)
            placed[expert, token] = f_scaled.to(out.dtype)
            if self.record:
                f32 = f_plain.float()
                low, high = torch.aminmax(f32, dim=-1)
                keep = valid[s:e].repeat_interleave(k)
                self.scores.accumulate(
                    self.key,
                    experts=expert[keep].cpu().numpy(),
                    gates=gates[s:e].reshape(-1)[keep].double().cpu().numpy(),
                    norms=torch.linalg.vector_norm(f32, dim=-1)[keep].double().cpu().numpy(),
                    peaks=torch.maximum(high, -low)[keep].double().cpu().numpy(),
                    tokens=int(valid[s:e].sum()),
                )
        return out

    def _grouped(self, expert: torch.Tensor, a: torch.Tensor, b: torch.Tensor, E: int):
        """f_expert[r](a[r]) and f_expert[r](b[r]) for every row r, by the module's own forward on
        `[E, 2·m, H]` (m the largest group; padding rows are zero and dropped)."""
        order = torch.argsort(expert, stable=True)
        counts = torch.bincount(expert, minlength=E)
        m = int(counts.max())
        starts = torch.cumsum(counts, 0) - counts
        sorted_expert = expert[order]
        slot = torch.arange(len(expert), device=expert.device) - starts[sorted_expert]
        pad = a.new_zeros((E, 2 * m, a.shape[-1]))
        pad[sorted_expert, slot] = a[order]
        pad[sorted_expert, m + slot] = b[order].to(a.dtype)
        y = self._original(self.experts, pad.view(E * 2 * m, -1)).view(E, 2 * m, -1)
        fa, fb = y.new_empty((len(expert), y.shape[-1])), y.new_empty((len(expert), y.shape[-1]))
        fa[order] = y[sorted_expert, slot]
        fb[order] = y[sorted_expert, m + slot]
        return fa, fb


def make_observer(
    layer: torch.nn.Module, calib: Calibration, scores: Scores, key: str, top_k: int, pair_chunk: int
) -> ExpertObserver:
    """The observer of one MoE decoder layer, as the family's table entry says it routes."""
    experts = find_experts(layer, calib)
    if experts is None:
        raise ShardcutError(f"layer {key}: no routed-experts module found in {type(layer).__name__}")
    if calib.input_scaling_router:
        return ScaledInputObserver(
            experts, layer.get_submodule(calib.input_scaling_router), scores, key, top_k, pair_chunk
        )
    return ExpertObserver(experts, scores, key, top_k, pair_chunk, calib.two_slot_pairs)

"""Run a transformers model one decoder layer at a time, straight from its safetensors shards.

The model is built from config.json with every parameter on the meta device (buffers such as
rotary frequencies are real: they are computed at construction, not loaded). A layer's tensors
are read from the shards by byte range (only that layer's, as stored: FP8 block, compressed-tensors
INT4 and MXFP4 stay quantized in RAM), moved to the device and dequantised there a few modules at
a time (`shardcut.moe.dequant`), pushed through transformers' own weight-conversion machinery
(per-expert -> fused parameters, renames), run on every batch, and put back on the meta device.

What a decoder layer receives besides its hidden states (position embeddings, the causal or
sliding-window mask of its attention type, position ids) is captured from the model's own
forward: every layer's `forward` is temporarily replaced by a recorder, the model runs on a
batch of the right shape, and the recorder of the wanted layer keeps its arguments and stops
the pass. Nothing about masks or rotary embeddings is re-implemented here.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from shardcut.format.checkpoint import Checkpoint
from shardcut.format.errors import ShardcutError
from shardcut.moe.model import ModelInfo
from shardcut.ops.calibration.device import current_memory as current_memory  # the eval runner imports it from here

if TYPE_CHECKING:
    from transformers import PreTrainedModel

# safetensors dtype -> torch dtype (quantized checkpoints store packed ints and scales in most of them)
TORCH_DTYPES = {
    key: getattr(torch, name)
    for key, name in {
        "F64": "float64",
        "F32": "float32",
        "F16": "float16",
        "BF16": "bfloat16",
        "F8_E4M3": "float8_e4m3fn",
        "F8_E5M2": "float8_e5m2",
        "F8_E8M0": "float8_e8m0fnu",
        "F8_E4M3FNUZ": "float8_e4m3fnuz",
        "F8_E5M2FNUZ": "float8_e5m2fnuz",
        "C64": "complex64",
        "I64": "int64",
        "I32": "int32",
        "I16": "int16",
        "I8": "int8",
        "U64": "uint64",
        "U32": "uint32",
        "U16": "uint16",
        "U8": "uint8",
        "BOOL": "bool",
    }.items()
    if hasattr(torch, name)
}
READ_THREADS = 4
# stored bytes dequantised at once (whole modules, at least one): bounds the float copies in flight
# besides the layer itself to tens of MB; smaller chunks cost nothing measurable (one Python call each)
DEQUANT_CHUNK_BYTES = 8 << 20


@contextmanager
def params_on_meta() -> Iterator[None]:
    """Inside the block, new parameters land on the meta device; buffers stay real (rotary
    frequencies and the like are computed at construction and never loaded)."""
    original = torch.nn.Module.register_parameter

    def register(self, name, param):
        original(self, name, param)
        p = self._parameters.get(name)
        if p is not None and p.device.type != "meta":
            self._parameters[name] = torch.nn.Parameter(p.to("meta"), requires_grad=False)

    torch.nn.Module.register_parameter = register  # type: ignore[method-assign]  # patched for the block only
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = original  # type: ignore[method-assign]


@contextmanager
def one_thread(device: torch.device) -> Iterator[None]:
    """On the CPU, torch's intra-op threads off for the block: one expert's slice (hundreds of KB)
    is copied faster by one thread than by a parallel region, many times faster when the cores
    are shared (measured 0.13 s against 1.6-4 s for a 64-expert layer on a loaded 2-core machine)."""
    if device.type != "cpu":
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """No "Loading weights" bars or init warnings from transformers while we drive it."""
    from transformers.utils import logging

    bars, level = logging.is_progress_bar_enabled(), logging.get_verbosity()
    logging.disable_progress_bar()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(level)
        if bars:
            logging.enable_progress_bar()


def load_config(ckpt: Checkpoint, trust_remote_code: bool = False):
    """The transformers config of a checkpoint, without its quantization section (weights are
    dequantised when read, so the skeleton is a plain floating-point model)."""
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    from shardcut.moe.architectures import find_architecture

    raw = dict(ckpt.config)
    model_type = raw.get("model_type")
    arch = find_architecture(raw)
    alias = arch.calibration_of(model_type).config_alias if arch else None
    try:
        if alias:  # a Hub spelling transformers does not register (the table names the code that runs it)
            raw = {k: v for k, v in raw.items() if k not in ("model_type", "auto_map", "architectures")}
            raw.pop("quantization_config", None)
            config = CONFIG_MAPPING[alias].from_dict(raw)
        else:
            with quiet_transformers():
                config = AutoConfig.from_pretrained(str(ckpt.root), trust_remote_code=trust_remote_code)
    except Exception as exc:  # transformers raises ValueError/KeyError/OSError for unknown or remote-code configs
        hint = " (try trust_remote_code)" if "trust_remote_code" in str(exc) else ""
        raise ShardcutError(
            f"transformers cannot build this config ({type(exc).__name__}: {str(exc).splitlines()[0][:120]}){hint}",
            ckpt.root / "config.json",
        ) from None
    for cfg in _sub_configs(config):
        if hasattr(cfg, "quantization_config"):
            delattr(cfg, "quantization_config")
        cfg.use_cache = False
    return config


def _sub_configs(config) -> list:
    """`config` and its nested sub-configs (a wrapper's `text_config`, Qwen3-Omni's `thinker_config.text_config`)."""
    from transformers import PretrainedConfig

    out, todo = [], [config]
    while todo:
        cfg = todo.pop()
        out.append(cfg)
        todo += [v for v in vars(cfg).values() if isinstance(v, PretrainedConfig)]
    return out


def build_skeleton(config, dtype: torch.dtype, trust_remote_code: bool = False):
    """A causal LM of `config` whose parameters are all on the meta device (costs no memory).

    Parameters that transformers keeps in float32 whatever the dtype (`_keep_in_fp32_modules_strict`,
    e.g. DeepSeek's selection bias) are float32 here too, as `from_pretrained` would make them.
    """
    import transformers
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    # a causal LM where transformers has one (for some wrappers, its text-only language model); else the
    # multimodal wrapper itself (Kimi-K2.5, Qwen3-VL-MoE, GLM-4.5V, ERNIE-VL), else the class config.json
    # names (Qwen3-Omni): its decoder stack is found by tensor name in `make_skeleton`
    builders = [AutoModelForCausalLM.from_config, AutoModelForImageTextToText.from_config]
    builders += [
        getattr(transformers, a)._from_config
        for a in getattr(config, "architectures", None) or []
        if hasattr(getattr(transformers, a, None), "_from_config")
    ]
    first = None
    for build in builders:
        try:
            with quiet_transformers(), params_on_meta():
                kwargs = {"trust_remote_code": trust_remote_code} if build.__name__ == "from_config" else {}
                model = build(config, dtype=dtype, **kwargs)
            break
        except Exception as exc:  # noqa: PERF203 -- an architecture this builder has no class for
            first = first or exc
    else:
        raise ShardcutError(
            f"transformers cannot build a model for model_type={config.model_type!r} "
            f"({type(first).__name__}: {str(first).splitlines()[0][:120]})"
        ) from None
    model.eval()
    plan = model._get_dtype_plan(dtype)
    if plan:
        patterns = [re.compile(p) for p in plan]
        for name, module in model.named_modules():
            for attr, store in (("_parameters", True), ("_buffers", False)):
                for key, t in list(getattr(module, attr).items()):
                    full = f"{name}.{key}" if name else key
                    if t is not None and t.is_floating_point() and any(p.search(full) for p in patterns):
                        t32 = t.to(torch.float32)
                        getattr(module, attr)[key] = torch.nn.Parameter(t32, requires_grad=False) if store else t32
    return model, plan


@dataclass
class Skeleton:
    """The meta model and where its decoder layers are, in the model and in the checkpoint."""

    model: PreTrainedModel
    base: (
        torch.nn.Module
    )  # the decoder stack module (model.model; a wrapper's language model), whose forward builds masks and rotary
    layers: torch.nn.ModuleList  # the decoder ModuleList
    module_prefix: str  # "model.layers." in the model's own parameter names
    ckpt_prefix: str  # "model.layers." in the checkpoint's tensor names
    num_layers: int
    dtype: torch.dtype
    dtype_plan: dict
    hidden_size: int = 0
    base_prefix: str = ""  # "model." (the base module's path) in the model's own parameter names


def make_skeleton(ckpt: Checkpoint, info: ModelInfo, dtype: torch.dtype, trust_remote_code: bool = False) -> Skeleton:
    config = load_config(ckpt, trust_remote_code)
    model, plan = build_skeleton(config, dtype, trust_remote_code)
    main = [layer for layer in info.layers if not layer.mtp and layer.stack is info.arch.stacks[0]]
    ckpt_prefix = main[0].prefix[: -len(f"{main[0].index}.")]
    # the decoder stack is the ModuleList that the main stack's tensors load into (through the model's
    # own renamings: a wrapper's `language_model.model.layers.3.…` is its `model.language_model.layers.3.…`)
    targets = ModelNames(model)
    sample = next(n for n in ckpt.tensors if n.startswith(main[0].prefix))
    target = targets.target(sample) or sample
    # a tensor of the first and of the last MoE layer: a list nested in a layer (LongCat's
    # `input_layernorm.0`) holds one of them at most
    ends = [main[0], main[-1]] if len(main) > 1 else main
    samples = [(layer.index, next(n for n in ckpt.tensors if n.startswith(layer.prefix))) for layer in ends]
    loaded = [(i, targets.target(n) or n) for i, n in samples]
    lists = [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.ModuleList) and all(t.startswith(f"{name}.{i}.") for i, t in loaded)
    ]
    if not lists:
        raise ShardcutError(
            f"{type(model).__name__} has no decoder layer list holding {sample} "
            f"(loaded as {target}); calibration cannot stream it",
            ckpt.root,
        )
    layers_path, layers = max(lists, key=lambda item: len(item[0]))
    base_path = layers_path.rpartition(".")[0]
    base = model.get_submodule(base_path)
    text = getattr(base, "config", None) or config.get_text_config()
    num_layers = min(len(layers), int(getattr(text, "num_hidden_layers", len(layers))))
    return Skeleton(
        model,
        base,
        layers,
        layers_path + ".",
        ckpt_prefix,
        num_layers,
        dtype,
        plan,
        int(text.hidden_size),
        base_path + "." if base_path else "",
    )


class ModelNames:
    """Checkpoint tensor name -> the model's parameter name, by the model's own renamings and converters."""

    def __init__(self, model):
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming

        self.model = model
        self.mapping = get_model_conversion_mapping(model)
        self.renamings = [m for m in self.mapping if isinstance(m, WeightRenaming)]
        self.converters = [m for m in self.mapping if isinstance(m, WeightConverter)]
        self.params = dict(model.named_parameters())  # names only are used: they never change

    def target(self, name: str) -> str | None:
        from transformers.core_model_loading import rename_source_key

        try:
            return rename_source_key(name, self.renamings, self.converters, self.model.base_model_prefix, self.params)[
                0
            ]
        except Exception:  # noqa: BLE001 -- a name no rule of the model maps
            return None


# ---------------------------------------------------------------------------------------------
# Reading tensors


class TensorReader:
    """Reads named tensors of a checkpoint by byte range into owned CPU memory, as stored: FP8,
    packed INT4 and MXFP4 blocks stay quantized in RAM and are dequantised a few modules at a
    time on the device (`shardcut.moe.dequant.dequantize`), so a layer never sits in RAM as floats.
    Refuses, when built, quantization schemes `dequantize` cannot read."""

    def __init__(self, ckpt: Checkpoint):
        from shardcut.moe.dequant import check_dequantizable

        self.ckpt = ckpt
        config = ckpt.config
        quant = config.get("quantization_config") or (config.get("text_config") or {}).get("quantization_config")
        self.quant: dict | None = quant or None
        check_dequantizable(self.quant, ckpt.root / "config.json")

    def read(self, name: str) -> torch.Tensor:
        header, info = self.ckpt.tensors[name]
        if info.dtype not in TORCH_DTYPES:
            raise ShardcutError(f"tensor {name!r} has dtype {info.dtype}, which calibration cannot read", header.path)
        dtype = TORCH_DTYPES[info.dtype]
        if info.nbytes == 0:
            return torch.empty(info.shape, dtype=dtype)
        # torch.empty, not bytearray: no memset of bytes about to be overwritten (a layer's worth per layer)
        buf = torch.empty(info.nbytes, dtype=torch.uint8)
        view = buf.numpy().data
        with open(header.path, "rb", buffering=0) as f:
            f.seek(info.start)
            done = 0
            while done < info.nbytes:
                n = f.readinto(view[done:])
                if not n:
                    raise ShardcutError(f"unexpected end of file reading {name!r}", header.path)
                done += n
        return buf.view(dtype).reshape(info.shape)

    def read_many(self, names: list[str]) -> dict[str, torch.Tensor]:
        """Read `names` with a few threads (large layers are I/O bound)."""
        with ThreadPoolExecutor(READ_THREADS) as pool:
            return dict(zip(names, pool.map(self.read, names), strict=True))

    def dequantize(
        self, raw: dict[str, torch.Tensor], names: list[str], device: torch.device, dtype: torch.dtype
    ) -> dict[str, torch.Tensor]:
        """Pop `names` (whole modules: a weight with its companions) from `raw`; their float values
        on `device` under the plain names transformers loads (`X.weight`), unquantized ones as stored."""
        from shardcut.moe.dequant import dequantize

        try:
            return dequantize({n: raw.pop(n) for n in names}, self.quant, device, dtype)
        except ShardcutError as exc:  # name the checkpoint, not a bare config.json
            if exc.path not in (None, "config.json"):
                raise
            where = self.ckpt.root / "config.json" if exc.path else self.ckpt.root
            raise ShardcutError(str(exc).removeprefix(f"{exc.path}: "), where) from None


def module_chunks(raw: dict[str, torch.Tensor], budget: int) -> Iterator[list[str]]:
    """`raw`'s names in runs of whole modules (`X.weight_packed`, `X.weight_scale`, ... stay
    together; so do gpt-oss `experts.gate_up_proj_blocks` and `_scales`) of at most `budget`
    stored bytes; a module larger than `budget` comes alone.

    Example:
        >>> for names in module_chunks(raw, 8 << 20):
        ...     floats = dequantize({n: raw.pop(n) for n in names}, quant_config, "cuda")
    """
    modules: dict[str, list[str]] = {}
    for name in raw:
        modules.setdefault(name.rpartition(".")[0], []).append(name)
    chunk: list[str] = []
    size = 0
    for names in modules.values():
        n = sum(raw[x].nbytes for x in names)
        if chunk and size + n > budget:
            yield chunk
            chunk, size = [], 0
        chunk += names
        size += n
    if chunk:
        yield chunk


# ---------------------------------------------------------------------------------------------
# Loading and freeing layers


@dataclass(frozen=True)
class FusedPart:
    """A checkpoint tensor that becomes slice `part` of expert `expert` of a fused parameter."""

    target: str  # the model's parameter name, e.g. model.layers.3.mlp.experts.gate_up_proj
    expert: int
    part: int
    parts: int
    dim: int  # the dimension of one expert's slice that the parts are concatenated along


class LayerLoader:
    """Fills the skeleton's decoder layer `i` (or everything outside the layers) from the shards.

    A layer's stored tensors are dequantised on the device a few modules at a time
    (`DEQUANT_CHUNK_BYTES` of stored bytes; float checkpoints are just moved there). Per-expert
    tensors that transformers would stack into fused `[E, ...]` parameters are copied one by one
    into a parameter allocated on the device (no stacked copy, no concatenation buffer); every
    other tensor goes through transformers' own conversion. So the device holds the layer plus
    one chunk, never the model.
    """

    def __init__(self, skeleton: Skeleton, ckpt: Checkpoint, info: ModelInfo, device: torch.device):
        self.sk, self.ckpt, self.device = skeleton, ckpt, device
        self.reader = TensorReader(ckpt)
        names = ModelNames(skeleton.model)
        self.mapping, self._renamings, self._converters = names.mapping, names.renamings, names.converters
        self._params = names.params
        # parameters transformers keeps in float32 whatever the dtype are dequantised in float32
        self._fp32 = [re.compile(p) for p in skeleton.dtype_plan or ()]
        stacks = "|".join(re.escape(p) for s in info.arch.stacks for p in s.layer_prefixes)
        in_stack = re.compile(rf"^(?:{stacks})\.(\d+)\.")
        # zero-computation experts (LongCat) have no weights: their rows of fused parameters stay zero
        main = info.arch.stacks[0]
        self._zero = {layer.index: layer.zero_experts for layer in info.layers if layer.stack is main and not layer.mtp}
        self._by_layer: dict[int, list[str]] = {}
        self.outside: list[str] = []
        # fused expert parameters of freed layers, by (shape, dtype), lent again to the next layer:
        # fresh memory costs page faults on every first touch (on the CPU, copying a layer's experts
        # into fresh buffers measured 3-10x slower than into reused ones)
        self._pool: dict[tuple, list[torch.Tensor]] = {}
        self._lent: dict[int, torch.Tensor] = {}  # data_ptr -> buffer, of the layers now loaded
        for name in ckpt.tensors:
            if name.startswith(skeleton.ckpt_prefix):
                m = re.match(r"(\d+)\.", name[len(skeleton.ckpt_prefix) :])
                if m:
                    self._by_layer.setdefault(int(m.group(1)), []).append(name)
                    continue
            if in_stack.match(name) or name.startswith("lm_head."):
                continue  # MTP stacks and the output head are never run
            target = names.target(name) or name
            if skeleton.base_prefix and not target.startswith(skeleton.base_prefix):
                continue  # a wrapper's vision or audio tower, its output head: text calibration never runs them
            self.outside.append(name)

    def read_layer(self, i: int) -> dict[str, torch.Tensor]:
        names = self._by_layer.get(i, [])
        if not names:
            raise ShardcutError(
                f"the checkpoint has no tensors for decoder layer {i} ({self.sk.ckpt_prefix}{i}.*)", self.ckpt.root
            )
        return self.reader.read_many(names)

    def load_layer(self, i: int, raw: dict[str, torch.Tensor]) -> torch.nn.Module:
        """Put layer `i`'s tensors (consumed from `raw`) into the skeleton, on the device."""
        layer = self.sk.layers[i]
        self._convert(self._load(raw, f"decoder layer {i}", self._zero.get(i, 0)), f"decoder layer {i}")
        missing = [n for n, p in layer.named_parameters() if p.device.type == "meta"]
        if missing:
            raise ShardcutError(
                f"decoder layer {i}: the checkpoint lacks {len(missing)} of its parameters, "
                f"e.g. {self.sk.module_prefix}{i}.{missing[0]}",
                self.ckpt.root,
            )
        return layer.to(self.device)

    def load_outside(self) -> None:
        """Embedding, final norm and the like: everything the stack needs outside its layers."""
        raw = self.reader.read_many(self.outside)
        self._convert(self._load(raw, "embeddings"), "embeddings")
        for module in self._outside_modules():
            module.to(self.device)

    def buffers_to_device(self) -> None:
        """Move the buffers outside the layers (rotary frequencies) to the device, weights left unloaded."""
        for module in self._outside_modules():
            for sub in module.modules():
                for key, b in list(sub._buffers.items()):
                    if b is not None and b.device.type != "meta":
                        sub._buffers[key] = b.to(self.device)

    def free_outside_params(self) -> None:
        """Drop the embedding & co from memory once the first hidden states exist (buffers stay)."""
        for module in self._outside_modules():
            for sub in module.modules():
                for key, p in list(sub._parameters.items()):
                    if p is not None:
                        sub._parameters[key] = torch.nn.Parameter(p.to("meta"), requires_grad=False)

    def _outside_modules(self) -> list[torch.nn.Module]:
        return [m for _, m in self.sk.base.named_children() if m is not self.sk.layers]

    def free(self, layer: torch.nn.Module) -> None:
        """Put `layer` back on the meta device; its fused expert buffers go back to the pool."""
        for p in layer.parameters():
            buf = self._lent.pop(p.data_ptr(), None) if p.device.type != "meta" else None
            if buf is not None:
                self._pool.setdefault((tuple(buf.shape), buf.dtype), []).append(buf)
        layer.to("meta")

    def _buffer(self, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
        """An uninitialised `[E, ...]` buffer on the device, reused from a freed layer when one fits."""
        free = self._pool.get((tuple(shape), dtype))
        buf = free.pop() if free else torch.empty(shape, dtype=dtype, device=self.device)
        self._lent[buf.data_ptr()] = buf
        return buf

    def fused_parts(self, names: list[str]) -> dict[str, FusedPart]:
        """Which of `names` (float tensor names) transformers stacks (and concatenates) into fused
        expert parameters."""
        from transformers.core_model_loading import Concatenate, MergeModulelist, apply_renamings, rename_source_key

        out = {}
        for name in names:
            target, pattern = rename_source_key(
                name, self._renamings, self._converters, self.sk.model.base_model_prefix, self._params
            )
            if pattern is None or target not in self._params:
                continue
            conv = next(c for c in self._converters if pattern in c.source_patterns)
            ops = conv.operations
            if not (
                isinstance(ops[0], MergeModulelist)
                and ops[0].dim == 0
                and (len(ops) == 1 or len(ops) == 2 and isinstance(ops[1], Concatenate) and ops[1].dim >= 1)
            ):
                continue  # any other recipe goes through transformers' own conversion
            regex = r"(\d+)".join(re.escape(p) for p in pattern.split("*"))
            m = re.search(regex, apply_renamings(name, self._renamings))
            if m is None or m.lastindex != 1:
                continue
            dim = ops[1].dim - 1 if len(ops) == 2 else 0
            out[name] = FusedPart(
                target,
                int(m.group(1)),
                conv.source_patterns.index(pattern),
                len(conv.source_patterns) if len(ops) == 2 else 1,
                dim,
            )
        return out

    def _dtype_of(self, names: list[str]) -> torch.dtype:
        """The dtype a chunk is dequantised to: the skeleton's (dequantising straight to bfloat16
        rounds exactly as dequantising to float32 and casting), float32 for parameters the
        skeleton keeps in float32."""
        if self.sk.dtype == torch.float32 or any(p.search(n) for p in self._fp32 for n in names):
            return torch.float32
        return self.sk.dtype

    def _load(self, raw: dict[str, torch.Tensor], what: str, zero_experts: int = 0) -> dict[str, torch.Tensor]:
        """Dequantise `raw` (consumed) chunk by chunk on the device; per-expert tensors of fused
        parameters go straight into them; returns the other float tensors for `_convert`.
        zero_experts: a fused parameter may lack its last this many experts (LongCat's identity
        experts, which transformers allocates but never reads); their rows are zero."""
        targets: dict[str, torch.Tensor] = {}
        filled: dict[str, int] = {}
        parts_per_expert: dict[str, int] = {}
        rest: dict[str, torch.Tensor] = {}
        for names in list(module_chunks(raw, DEQUANT_CHUNK_BYTES)):
            floats = self.reader.dequantize(raw, names, self.device, self._dtype_of(names))
            parts = self.fused_parts(list(floats))
            copies: list[tuple[torch.Tensor, torch.Tensor]] = []
            for name, t in floats.items():
                fp = parts.get(name)
                if fp is None:
                    rest[name] = t
                    continue
                if fp.target not in targets:
                    module_path, _, attr = fp.target.rpartition(".")
                    meta = getattr(self.sk.model.get_submodule(module_path), attr)
                    targets[fp.target] = self._buffer(meta.shape, meta.dtype)
                    if zero_experts:  # the identity experts' slots have no weights to fill them
                        targets[fp.target].zero_()
                dst = targets[fp.target][fp.expert]
                if fp.parts > 1:
                    size = t.shape[fp.dim]
                    dst = dst.narrow(fp.dim, fp.part * size, size)
                if tuple(dst.shape) != tuple(t.shape):
                    raise ShardcutError(
                        f"{what}: {name} has shape {list(t.shape)}, {fp.target} expects {list(dst.shape)} per expert",
                        self.ckpt.root,
                    )
                copies.append((dst, t))
                filled[fp.target] = filled.get(fp.target, 0) + 1
                parts_per_expert[fp.target] = fp.parts
            with one_thread(self.device):
                for dst, t in copies:
                    dst.copy_(t)
            del floats, copies
        for target, tensor in targets.items():
            expected = tensor.shape[0] * parts_per_expert[target]
            weightless = (tensor.shape[0] - zero_experts) * parts_per_expert[target] if zero_experts else expected
            if filled[target] not in (expected, weightless):
                raise ShardcutError(
                    f"{what}: {target} needs {expected} per-expert tensors, the checkpoint has {filled[target]}",
                    self.ckpt.root,
                )
            module_path, _, attr = target.rpartition(".")
            setattr(self.sk.model.get_submodule(module_path), attr, torch.nn.Parameter(tensor, requires_grad=False))
        return rest

    def _convert(self, tensors: dict[str, torch.Tensor], what: str) -> None:
        from transformers.core_model_loading import convert_and_load_state_dict_in_model
        from transformers.modeling_utils import LoadStateDictConfig

        if not tensors:
            return
        # the tensors are on the device already: materialise the parameters there too
        config = LoadStateDictConfig(
            device_map={"": str(self.device)},
            dtype=self.sk.dtype,
            dtype_plan=self.sk.dtype_plan,
            weight_mapping=self.mapping,
        )
        with quiet_transformers():
            info, _ = convert_and_load_state_dict_in_model(self.sk.model, tensors, config)
        if info.mismatched_keys:
            name, got, want = sorted(info.mismatched_keys, key=str)[0]
            raise ShardcutError(
                f"{what}: tensor for {name} has shape {list(got)}, the model expects {list(want)}", self.ckpt.root
            )
        if info.conversion_errors:
            name, err = next(iter(info.conversion_errors.items()))
            raise ShardcutError(f"{what}: cannot convert {name} ({str(err)[:120]})", self.ckpt.root)


# ---------------------------------------------------------------------------------------------
# What the model's own forward hands each layer


class _Stop(Exception):
    pass


@dataclass
class LayerCall:
    """The arguments the model's forward passes to one decoder layer, hidden states aside."""

    hidden: torch.Tensor  # the hidden states it was given (the embeddings, for layer 0)
    args: tuple
    kwargs: dict


def capture_call(sk: Skeleton, target: int, **forward_kwargs) -> LayerCall:
    """Run the stack's forward with every layer replaced by a recorder; return what layer
    `target` receives. Layers before it pass hidden states through unchanged (their outputs do
    not influence masks or position embeddings)."""
    captured: list[LayerCall] = []

    def recorder(i: int):
        def forward(*args, **kwargs):
            hidden = args[0] if args else kwargs.pop("hidden_states")
            if i == target:
                captured.append(LayerCall(hidden, tuple(args[1:]), kwargs))
                raise _Stop
            return hidden

        return forward

    for i in range(target + 1):
        sk.layers[i].forward = recorder(i)
    try:
        sk.base(use_cache=False, **forward_kwargs)
    except _Stop:
        pass
    finally:
        for i in range(target + 1):
            sk.layers[i].__dict__.pop("forward", None)
    if not captured:
        raise ShardcutError(f"the model's forward never reached decoder layer {target}")
    return captured[0]


def run_layer(layer: torch.nn.Module, hidden: torch.Tensor, call: LayerCall) -> torch.Tensor:
    out = layer(hidden, *call.args, **call.kwargs)
    return out[0] if isinstance(out, tuple) else out


def release_free_memory() -> None:
    """Hand freed heap memory back to the OS (glibc keeps it after a layer's large buffers are
    freed; without this the resident size creeps up layer after layer). A no-op elsewhere."""
    global _malloc_trim
    if _malloc_trim is None:
        try:
            import ctypes

            _malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _malloc_trim = False
    if callable(_malloc_trim):
        _malloc_trim(0)


_malloc_trim: Callable[[int], int] | bool | None = None  # False: not glibc

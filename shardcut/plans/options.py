"""`PlanOptions`: every option that decides a plan, declared once.

`make_plan` takes them, a plan records them (`options`), the model card turns the record back
into `shardcut plan` / `prune --scores` arguments (`arguments`), and the CLI builds both
commands' options from the fields (each field's metadata holds its flag and help). A new plan
option is one field here: the commands, the record and the card follow.

Imports nothing heavy (no numpy): the CLI reads it when it starts.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import MISSING, Field, asdict, dataclass, field, fields
from typing import Any

from shardcut.format.errors import PlanError
from shardcut.plans.keys import PLAN_KEY_PATTERN

MTP_POLICIES = ("reuse-last", "scores-of:N", "same-ids-as:N")
_MTP_POLICY = re.compile(rf"reuse-last|(?:scores-of|same-ids-as):{PLAN_KEY_PATTERN}")
SUPER_PERCENTILE = 99.5
SUPER_LAYER_FRACTION = 0.75

CRITERION_HELP = (
    "Saliency criterion: reap (mean g·‖f‖ over routed tokens), ean (Σ‖f‖), ean_mean (mean ‖f‖), "
    "frequency (routed tokens), weighted_frequency (Σ g), random (seeded), or an imported one. "
    "Default: reap, or the only criterion an imported values-only file holds."
)
MTP_HELP = (
    "How to prune MoE layers the scores do not cover (MTP layers; ERNIE-4.5-VL's vision experts, which "
    "share the text experts' count): reuse-last (rank with the last scored layer's scores), scores-of:N "
    "(with layer N's), same-ids-as:N (keep exactly layer N's ids). A stack text calibration never reaches "
    "that has its own count (Qwen3-Omni's talker) is kept whole without it."
)
MULTIPLE_HELP = (
    "Round the kept count per layer up to a multiple of N (and of n_group), e.g. the expert-parallel "
    "size vLLM serves with (E' % ep_size == 0); never prunes more than asked. Default: off."
)
SUPER_HELP = (
    "Keep super experts whatever their score. Defined as in the REAP reference: experts whose act_max "
    "exceeds max(99.5th percentile of act_max over all scored layers, global max / 10), in the first 75% "
    "of the scored MoE layers (by layer key)."
)


def _option(default: Any, flag: str, help: str, **cli: object) -> Any:
    """A field with its command-line flag and help (and `cli` extras: short, metavar)."""
    return field(default=default, metadata={"flag": flag, "help": help, **cli})


@dataclass(frozen=True)
class PlanOptions:
    """How `make_plan` chooses the experts to keep. Give exactly one of `ratio` or `experts`.

    Example:
        >>> PlanOptions(ratio=0.5, criterion="reap", mtp_policy="reuse-last").arguments()
        ['--ratio', '0.5', '--criterion', 'reap', '--mtp-policy', 'reuse-last']
    """

    ratio: float | None = _option(
        None,
        "--ratio",
        "Fraction of routed experts removed, in (0, 1); pruned per layer = floor(E x ratio), with E each "
        "stack's own count where stacks differ (Qwen3-Omni's talker).",
    )
    experts: int | None = _option(
        None,
        "--experts",
        "Experts kept per layer. A model with several expert counts keeps this many in every stack; "
        "refused, naming the stack, where it does not fit one (not below its count, or below its top-k): "
        "use --ratio.",
    )
    criterion: str | None = _option(None, "--criterion", CRITERION_HELP, short="-c")
    seed: int = _option(0, "--seed", "Seed of the random criterion.")
    protect_super_experts: bool = _option(False, "--protect-super-experts", SUPER_HELP)
    # layer key -> expert ids always kept; on the command line LAYER:ID[,ID...] (`parse_protect`)
    protect: Mapping[str, list[int]] | None = _option(
        None,
        "--protect",
        "Always keep these experts: LAYER:ID[,ID...] (repeatable), e.g. --protect 3:0,17.",
        text=True,
    )
    mtp_policy: str | None = _option(None, "--mtp-policy", MTP_HELP)
    super_percentile: float = _option(
        SUPER_PERCENTILE,
        "--super-percentile",
        "Super-expert rule: the act_max percentile of the threshold (REAP reference: 99.5).",
    )
    super_layer_fraction: float = _option(
        SUPER_LAYER_FRACTION,
        "--super-layer-fraction",
        "Super-expert rule: look in the first this fraction of the scored layers (REAP reference: 0.75; "
        "1 = every layer).",
    )
    multiple_of: int = _option(1, "--multiple-of", MULTIPLE_HELP, metavar="N")

    def check(self, *, count: bool = True) -> PlanOptions:
        """Refuse, before any file is read, values no plan can be made from (one line naming
        the parameter); the deeper rules (a ratio that prunes nothing, a count below top-k) are
        the model's, checked by `make_plan`. `count=False`: the values only, not that exactly
        one of ratio / experts is given. Returns self."""
        if count and (self.ratio is None) == (self.experts is None):
            raise PlanError("give exactly one of ratio or experts", params=("ratio", "experts"))
        if self.ratio is not None and not (_number(self.ratio) and math.isfinite(self.ratio) and 0 < self.ratio < 1):
            raise PlanError(f"ratio {self.ratio}: must be a number strictly between 0 and 1", params=("ratio",))
        for name, low in (("experts", 1), ("seed", 0)):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
                raise PlanError(f"{name} {value}: must be an integer at least {low}", params=(name,))
        if self.mtp_policy is not None and not (
            isinstance(self.mtp_policy, str) and _MTP_POLICY.fullmatch(self.mtp_policy)
        ):
            raise PlanError(
                f"unknown mtp_policy {self.mtp_policy!r} (known: {', '.join(MTP_POLICIES)})",
                params=("mtp_policy",),
            )
        return self

    def recorded(self, criterion: str) -> dict:
        """The options as a plan records them (`options`): JSON-ready, the criterion as resolved
        (`criterion`), None and empty ones left out, protected ids sorted and unique."""
        out = {}
        for key, value in {**asdict(self), "criterion": criterion}.items():
            if value is None or value == {}:
                continue
            out[key] = {k: sorted({int(i) for i in v}) for k, v in value.items()} if key == "protect" else value
        return out

    @classmethod
    def from_record(cls, extra: Mapping) -> PlanOptions | None:
        """The options a plan (its `extra`) was made with: its `options`, or for a plan made before
        they were recorded, what its provenance implies (its `protected` ids, super experts
        included, as explicit protections: the same selection). None when it does not say how
        many were kept."""
        if isinstance(extra.get("options"), dict):
            record = dict(extra["options"])
        elif "ratio" in extra or isinstance(extra.get("experts"), int):
            record = {"ratio": extra["ratio"]} if "ratio" in extra else {"experts": extra["experts"]}
            record |= {
                k: extra[k] for k in ("criterion", "seed", "mtp_policy", "multiple_of") if extra.get(k) is not None
            }
            if isinstance(extra.get("protected"), dict) and extra["protected"]:
                record["protect"] = extra["protected"]
        else:
            return None
        unknown = sorted(set(record) - {f.name for f in fields(cls)})
        if unknown:
            raise PlanError(f"plan option {unknown[0]!r} has no shardcut plan flag (a plan of a newer shardcut?)")
        return cls(**record)

    def arguments(self, *, count: bool = True) -> list[str]:
        """The `shardcut plan` (or `prune --scores`) arguments that make these options: the count
        and criterion always, every other option where it differs from its default. `count=False`
        leaves out --ratio / --experts (for "re-prune at another ratio")."""
        args: list[str] = []
        for f in fields(self):
            value, flag = getattr(self, f.name), f.metadata["flag"]
            if value is None or value is False or (f.name in ("ratio", "experts") and not count):
                continue
            if f.name not in ("ratio", "experts", "criterion") and value == f.default:
                continue
            if value is True:
                args.append(flag)
            elif f.name == "protect":
                for layer, ids in value.items():
                    args += [flag, f"{layer}:{','.join(str(i) for i in ids)}"]
            else:
                args += [flag, repr(value) if isinstance(value, float) else str(value)]
        return args


def option_fields() -> tuple[Field, ...]:
    """`PlanOptions`' fields, each with metadata `flag`, `help` (and `short`, `metavar`, `text`:
    given on the command line as text that `parse_protect` reads)."""
    return fields(PlanOptions)


def option_default(f: Field) -> object:
    return None if f.default is MISSING else f.default


def parse_protect(specs: list[str] | None) -> dict[str, list[int]]:
    """`protect` as the command line gives it: LAYER:ID[,ID...] specs -> {layer: [ids]}.

    Example:
        >>> parse_protect(["3:0,5"])
        {'3': [0, 5]}
    """
    out: dict[str, list[int]] = {}
    for spec in specs or []:
        layer, sep, ids = spec.partition(":")
        try:
            parsed = [int(x) for x in ids.split(",") if x.strip()]
        except ValueError:
            parsed = []
        if not sep or not layer.strip() or not parsed:
            raise PlanError(f"protect {spec!r}: expected LAYER:ID[,ID...], e.g. 3:0,17", params=("protect",))
        out.setdefault(layer.strip(), []).extend(parsed)
    return out


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)

"""Calibration data: parse a `--data` spec, read its records, pick samples, tokenise them.

A spec is one source or a comma-separated mixture, each `SOURCE[:COUNT]`:

- `notes.txt`: one sample per line, or, when the file holds a blank line, one sample per
  blank-line-separated paragraph (the log says which);
- `chat.jsonl`: one JSON object per line with `text`, `messages` (rendered with the tokenizer's
  chat template) or pre-tokenised `input_ids`;
- a local folder: a `datasets.save_to_disk` folder, or a folder of `.jsonl` / `.txt` files;
- `org/name[subset](split)`: a Hugging Face Hub dataset (needs the `datasets` package and the
  network, or its cache).

Selection is deterministic: the records of each source are shuffled with `seed` and the first
COUNT are taken. Sources without a COUNT share what `samples` leaves after the counted ones;
with no `samples` at all, every record of every source is used. Truncation keeps the first
`max_length` tokens of a sample (special tokens the tokenizer adds, such as BOS, included).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from shardcut.errors import ShardcutError

_HUB_SOURCE = re.compile(r"^(?P<name>[\w.-]+/[\w.-]+)(?:\[(?P<subset>[^\]]+)\])?(?:\((?P<split>[^)]+)\))?$")
_TEXT_FIELDS = ("text", "content")


@dataclass(frozen=True)
class Source:
    """One part of a data spec: where the records come from and how many to take (None: share)."""

    spec: str
    count: int | None


@dataclass
class Record:
    """One calibration sample before tokenisation: exactly one of text, messages, input_ids."""

    text: str | None = None
    messages: list | None = None
    input_ids: list[int] | None = None


@dataclass
class CalibData:
    """The selected samples as token arrays, in selection order, and what they came from.

    Example:
        >>> data = load_data("notes.txt:100", "Qwen3-30B-A3B", samples=None, max_length=2048, seed=0)
        >>> len(data.samples), data.tokens
        (100, 51234)
    """

    spec: str
    samples: list[np.ndarray]
    notes: list[str] = field(default_factory=list)

    @property
    def tokens(self) -> int:
        return int(sum(len(s) for s in self.samples))

    def fingerprint(self) -> str:
        """sha256 over every selected token id, in order: equal iff the token streams are equal."""
        digest = hashlib.sha256(self.spec.encode())
        for s in self.samples:
            digest.update(len(s).to_bytes(8, "little"))
            digest.update(np.ascontiguousarray(s, dtype=np.int64).tobytes())
        return digest.hexdigest()


def parse_spec(spec: str) -> list[Source]:
    """`a.jsonl:700,b.txt` -> [Source('a.jsonl', 700), Source('b.txt', None)].

    A trailing `:N` is a count only when N is all digits and the whole text is not an existing path.
    """
    if not spec or not spec.strip():
        raise ShardcutError("empty --data spec")
    sources = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            raise ShardcutError(f"empty source in data spec {spec!r}")
        head, sep, tail = part.rpartition(":")
        if sep and head and tail.isdigit() and not Path(part).exists():
            count = int(tail)
            if count <= 0:
                raise ShardcutError(f"sample count must be positive in {part!r}")
            sources.append(Source(head, count))
        else:
            sources.append(Source(part, None))
    return sources


def plan_counts(sources: list[Source], available: list[int], samples: int | None) -> list[int]:
    """How many records to take from each source (see the module docstring for the rule)."""
    explicit = sum(s.count for s in sources if s.count is not None)
    shared = [i for i, s in enumerate(sources) if s.count is None]
    counts = [s.count or 0 for s in sources]
    if samples is not None:
        if samples <= 0:
            raise ShardcutError(f"--samples must be positive (got {samples})")
        left = samples - explicit
        if left < 0 or (not shared and left != 0):
            raise ShardcutError(f"the data spec's counts add up to {explicit} but --samples is {samples}")
        for j, i in enumerate(shared):
            counts[i] = left // len(shared) + (1 if j < left % len(shared) else 0)
    else:
        for i in shared:
            counts[i] = available[i]
    for s, n, have in zip(sources, counts, available):
        if n > have:
            raise ShardcutError(f"asks for {n} samples but holds only {have} non-empty records", s.spec)
    return counts


def read_records(source: str) -> tuple[list[Record], str]:
    """All non-empty records of one source and a short description of how it was read."""
    path = Path(source)
    if path.is_file():
        return _read_file(path)
    if path.is_dir():
        return _read_dir(path)
    m = _HUB_SOURCE.match(source)
    if m and not path.exists():
        return _read_hub(m.group("name"), m.group("subset"), m.group("split"))
    raise ShardcutError("data file not found (not a file, a folder or a Hub dataset name)", source)


def _read_file(path: Path) -> tuple[list[Record], str]:
    suffix = path.suffix.lower()
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ShardcutError("not UTF-8 text", path) from None
    except OSError as exc:
        raise ShardcutError(f"cannot read ({exc.strerror or exc})", path) from None
    if suffix in (".jsonl", ".json"):
        records = _parse_jsonl(raw, path)
        how = "JSON lines"
    else:
        if re.search(r"\n[ \t]*\n", raw.strip()):
            parts, how = re.split(r"\n[ \t]*\n", raw), "one sample per blank-line-separated paragraph"
        else:
            parts, how = raw.splitlines(), "one sample per line"
        records = [Record(text=p.strip()) for p in parts if p.strip()]
    if not records:
        raise ShardcutError("holds no samples (empty file)", path)
    return records, f"{path}: {len(records)} records, {how}"


def _parse_jsonl(raw: str, path: Path) -> list[Record]:
    records = []
    for n, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except (ValueError, RecursionError) as exc:  # RecursionError: nested deeper than Python's stack
            raise ShardcutError(f"line {n}: not valid JSON ({str(exc)[:60]})", path) from None
        record = _record_from_object(obj)
        if record is None:
            raise ShardcutError(f"line {n}: needs a 'text', 'messages' or 'input_ids' field", path)
        if record.text is None or record.text.strip():
            records.append(record)
    return records


def _record_from_object(obj: object) -> Record | None:
    if not isinstance(obj, dict):
        return None
    ids = obj.get("input_ids")
    if isinstance(ids, list) and ids and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        return Record(input_ids=ids)
    msgs = obj.get("messages")
    if isinstance(msgs, list) and msgs and all(isinstance(m, dict) and "role" in m for m in msgs):
        return Record(messages=msgs)
    for key in _TEXT_FIELDS:
        if isinstance(obj.get(key), str):
            return Record(text=obj[key])
    return None


def _read_dir(path: Path) -> tuple[list[Record], str]:
    if (path / "dataset_info.json").exists() or (path / "state.json").exists() or any(path.glob("*.arrow")):
        return _read_datasets(path, lambda ds: ds.load_from_disk(str(path)), str(path))
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in (".jsonl", ".json", ".txt"))
    if not files:
        raise ShardcutError("folder holds no .jsonl, .txt or saved dataset files", path)
    records: list[Record] = []
    for f in files:
        try:
            records += _read_file(f)[0]
        except ShardcutError:
            continue  # an empty file among several is fine
    if not records:
        raise ShardcutError("holds no samples", path)
    return records, f"{path}: {len(records)} records from {len(files)} files"


def _read_hub(name: str, subset: str | None, split: str | None) -> tuple[list[Record], str]:
    label = name + (f"[{subset}]" if subset else "") + (f"({split})" if split else "")
    return _read_datasets(name, lambda ds: ds.load_dataset(name, subset, split=split or "train"), label)


def _read_datasets(where, load, label: str) -> tuple[list[Record], str]:
    try:
        import datasets
    except ImportError:
        raise ShardcutError("reading this source needs the `datasets` package (pip install datasets)", where) from None
    try:
        ds = load(datasets)
    except Exception as exc:  # datasets raises many types (network, missing split, format)
        raise ShardcutError(f"cannot load dataset ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})",
                            where) from None
    if hasattr(ds, "keys") and not hasattr(ds, "column_names"):  # a DatasetDict: take train or the first split
        ds = ds["train"] if "train" in ds else ds[next(iter(ds.keys()))]
    records = [r for r in (_record_from_object(row) for row in ds) if r is not None and (r.text is None or r.text.strip())]
    if not records:
        raise ShardcutError(f"no row has a 'text', 'messages' or 'input_ids' field (columns: {ds.column_names})", where)
    return records, f"{label}: {len(records)} records"


def select(records: list[Record], count: int, seed: int, source_index: int) -> list[Record]:
    """The first `count` records of a seeded shuffle (independent of other sources)."""
    rng = np.random.default_rng([seed, source_index])
    order = rng.permutation(len(records))[:count]
    return [records[i] for i in order]


def load_tokenizer(model_dir: str | Path, trust_remote_code: bool = False):
    """The model's tokenizer; a ShardcutError when the folder has none."""
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=trust_remote_code)
    except Exception as exc:  # transformers raises OSError, ValueError, KeyError... for a missing tokenizer
        raise ShardcutError(f"no usable tokenizer ({type(exc).__name__}: {str(exc).splitlines()[0][:120]}); "
                            "pre-tokenised input_ids data needs none", model_dir) from None


def tokenize(records: list[Record], tokenizer_fn, max_length: int, vocab_size: int, source: str) -> list[np.ndarray]:
    """Token arrays of `records`, each truncated to its first `max_length` tokens."""
    tokenizer = None
    out = []
    for r in records:
        if r.input_ids is not None:
            ids = r.input_ids
        else:
            if tokenizer is None:
                tokenizer = tokenizer_fn()
            if r.messages is not None:
                if not getattr(tokenizer, "chat_template", None):
                    raise ShardcutError("has 'messages' records but the tokenizer has no chat template", source)
                from shardcut.calibration.template import render_chat_template

                text = render_chat_template(tokenizer, r.messages, source)  # untrusted code: time-limited
                ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            else:
                ids = tokenizer(r.text)["input_ids"]
        try:
            arr = np.asarray(ids[:max_length], dtype=np.int64)
        except OverflowError:  # a pre-tokenised id beyond int64
            raise ShardcutError(f"a token id is not below the model's vocabulary size {vocab_size}", source) from None
        if len(arr) == 0:
            continue
        if arr.max() >= vocab_size:
            raise ShardcutError(f"token id {int(arr.max())} is not below the model's vocabulary size {vocab_size}", source)
        out.append(arr)
    return out


def load_data(spec: str, model_dir: str | Path, *, samples: int | None, max_length: int, seed: int,
              vocab_size: int, trust_remote_code: bool = False) -> CalibData:
    """Read, select and tokenise the samples of a data spec for the model in `model_dir`.

    Example:
        >>> data = load_data("code.jsonl:700,tools.jsonl:330", "model/", samples=None, max_length=4096,
        ...                  seed=0, vocab_size=151936)
    """
    if max_length < 1:
        raise ShardcutError(f"--max-length must be positive (got {max_length})")
    sources = parse_spec(spec)
    read = [read_records(s.spec) for s in sources]
    counts = plan_counts(sources, [len(r) for r, _ in read], samples)
    tokenizer = []

    def get_tokenizer():
        if not tokenizer:
            tokenizer.append(load_tokenizer(model_dir, trust_remote_code))
        return tokenizer[0]

    data = CalibData(spec, [], [how for _, how in read])
    for i, (source, (records, _), n) in enumerate(zip(sources, read, counts)):
        data.samples += tokenize(select(records, n, seed, i), get_tokenizer, max_length, vocab_size, source.spec)
    if not data.samples:
        raise ShardcutError("no sample has any token", spec)
    return data

"""Calibration data: parse a `--data` spec, read its rows, pick samples, tokenise them.

A spec is one source or a comma-separated mixture, each `SOURCE[{MAPPING}][:COUNT]`:

- `notes.txt`: one sample per line, or, when the file holds a blank line, one sample per
  blank-line-separated paragraph (the log says which);
- `chat.jsonl` / `chat.json` (JSON lines or one JSON array), `rows.csv`, `rows.parquet`: rows
  with `text`, `messages` (rendered with the tokenizer's chat template) or pre-tokenised
  `input_ids`, or the columns of a known dataset recipe, or any columns with a MAPPING;
- a folder: a `datasets.save_to_disk` Dataset or DatasetDict (`folder(split)` picks a split),
  a Hugging Face-style folder of parquet files (`data/train-*.parquet`), or of .jsonl/.json/.txt/.csv;
- `org/name[subset](split)`: a Hugging Face Hub dataset, read with `datasets.load_dataset`
  (offline from the local cache when HF_HUB_OFFLINE=1). A source that is neither a local path
  nor a valid repo id is refused at once, without asking the Hub.

The REAP reference's datasets (`shardcut.ops.calibration.recipes.REAP_RECIPES`) are formatted as
the reference formats them, by Hub id, or for a local copy by `{recipe=NAME}` (or detected from
its columns). MAPPING is `key=COLUMN;...` with keys text, messages, prompt, response, system,
tools, or `recipe=NAME|FILE.json`, e.g. `rows.jsonl{prompt=question;response=answer}:500`.

Selection is deterministic: the rows of each source are shuffled with `seed` and taken in that
order. Sources without a COUNT share what `samples` leaves after the counted ones; with no
`samples` at all, every row of every source is used. Two ways to make sequences, as the
reference offers (recorded as `sequences` in the score metadata):

- `truncate` (default): one sequence per sample, its first `max_length` tokens (special tokens
  the tokenizer adds, such as BOS, included); COUNT counts samples;
- `pack`: samples laid end to end into sequences of `max_length` tokens, a sample that does not
  fit cut at the end of the sequence, one masked position left between samples as the reference
  leaves it (that position is not a token here: only the position ids after it differ);
  sequences never mix sources, COUNT counts sequences, and the last one may be shorter.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from shardcut.format.errors import DataError
from shardcut.ops.calibration.recipes import normalize_messages
from shardcut.ops.calibration.sources import Loaded, Record, Source, _datasets, read_source

__all__ = ["CalibData", "Record", "Source", "load_data", "parse_mapping", "parse_spec", "read_source"]

SEQUENCE_MODES = ("truncate", "pack")


@dataclass
class CalibData:
    """The selected sequences as token arrays, in selection order, and what they came from.

    Example:
        >>> data = load_data("notes.txt:100", "Qwen3-30B-A3B", samples=None, max_length=2048, seed=0)
        >>> len(data.samples), data.tokens
        (100, 51234)
    """

    spec: str
    samples: list[np.ndarray]
    notes: list[str] = field(default_factory=list)
    sequences: str = "truncate"
    max_length: int = 0

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


def _split_top(spec: str) -> list[str]:
    """Split at commas outside [], (), {}."""
    parts, depth, cur = [], 0, list[str]()
    for ch in spec:
        if ch in "[({":
            depth += 1
        elif ch in "])}":
            depth = max(0, depth - 1)
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return [p.strip() for p in parts]


def parse_mapping(text: str, where: str) -> dict[str, str]:
    """`prompt=instruction;response=output` -> {"prompt": "instruction", "response": "output"}."""
    out = {}
    for item in (i.strip() for i in text.split(";")):
        key, sep, value = item.partition("=")
        if not item or not sep or not key.strip() or not value.strip():
            raise DataError(
                f"mapping {{{text}}}: expected KEY=COLUMN;... (e.g. prompt=instruction;response=output)", where
            )
        out[key.strip()] = value.strip()
    return out


def parse_spec(spec: str) -> list[Source]:
    """`a.jsonl:700,b.txt` -> [Source('a.jsonl', 700), Source('b.txt', None)].

    A trailing `:N` is a count only when N is all digits and the whole text is not an existing
    path; a `{...}` block before it is the source's column mapping.
    """
    if not spec or not spec.strip():
        raise DataError("empty data spec", params=("data",))
    sources = []
    for part in _split_top(spec):
        if not part:
            raise DataError(f"empty source in data spec {spec!r}")
        count = None
        head, sep, tail = part.rpartition(":")
        if sep and head and tail.isdigit() and not Path(part).exists():
            count = int(tail)
            if count <= 0:
                raise DataError(f"sample count must be positive in {part!r}")
            part = head
        mapping = None
        if part.endswith("}") and "{" in part and not Path(part).exists():
            at = part.rindex("{")
            mapping = parse_mapping(part[at + 1 : -1], part)
            part = part[:at].strip()
        sources.append(Source(part, count, mapping))
    return sources


def plan_counts(sources: list[Source], available: list[int | None], samples: int | None) -> list[int | None]:
    """How many rows (or packed sequences) to take from each source; None: all of it.

    `available` is each source's row count, or None where it bounds nothing (packing).
    """
    explicit = sum(s.count for s in sources if s.count is not None)
    shared = [i for i, s in enumerate(sources) if s.count is None]
    counts: list[int | None] = [s.count for s in sources]
    if samples is not None:
        if samples <= 0:
            raise DataError(f"samples must be positive (got {samples})", params=("samples",))
        left = samples - explicit
        if left < 0 or (not shared and left != 0):
            raise DataError(
                f"the data spec's counts add up to {explicit} but samples is {samples}", params=("samples",)
            )
        for j, i in enumerate(shared):
            counts[i] = left // len(shared) + (1 if j < left % len(shared) else 0)
    for s, n, have in zip(sources, counts, available, strict=True):
        if n is not None and have is not None and n > have:
            raise DataError(f"asks for {n} samples but holds only {have} non-empty records", s.spec)
    return counts


# ---------------------------------------------------------------------------------------------
# Formatting and tokenising


def _recipe_records(loaded: Loaded, indices: list[int], source_index: int) -> list[Record]:
    """Rows `indices` mapped with the recipe through `datasets.Dataset.map`, as the reference maps them."""
    datasets = _datasets(loaded.how)
    recipe = loaded.recipe
    assert recipe is not None  # only sources read with a recipe are mapped
    rows = loaded.rows
    ds = rows.select(indices) if hasattr(rows, "select") else datasets.Dataset.from_list([rows[i] for i in indices])
    keys = [f"{source_index}:{i}" for i in indices]
    ds = ds.add_column("__shardcut_row__", keys) if "__shardcut_row__" not in ds.column_names else ds
    mapped = ds.map(
        lambda row: recipe.format_row(row, row["__shardcut_row__"]), keep_in_memory=True, load_from_cache_file=False
    )
    out = []
    for row in mapped:
        if recipe.kind == "text":
            out.append(Record(text=row[recipe.text] or ""))
        else:
            emitted = recipe.kind != "messages" or recipe.rebuild_messages  # the recipe wrote these columns
            tools_col = "tools" if recipe.kind == "tool-calls" or recipe.fixed_tools is not None else recipe.tools
            tools = row.get(tools_col) if tools_col else None
            msgs = row["messages" if emitted else recipe.messages]
            out.append(
                Record(
                    messages=normalize_messages(_maybe_json(msgs)),
                    tools=_maybe_json(tools),
                    special_tokens=recipe.special_tokens,
                )
            )
    return out


def _maybe_json(value):
    return json.loads(value) if isinstance(value, str) else value


def load_tokenizer(model_dir: str | Path, trust_remote_code: bool = False):
    """The model's tokenizer; a ShardcutError when the folder has none."""
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=trust_remote_code)
    except Exception as exc:  # transformers raises OSError, ValueError, KeyError... for a missing tokenizer
        raise DataError(
            f"no usable tokenizer ({type(exc).__name__}: {str(exc).splitlines()[0][:120]}); "
            "pre-tokenised input_ids data needs none",
            model_dir,
        ) from None


def encode(record: Record, tokenizer_fn, source: str) -> list[int]:
    """The token ids of one record, untruncated (see `Record` for the chat conventions)."""
    if record.input_ids is not None:
        return list(record.input_ids)
    tokenizer = tokenizer_fn()
    if record.messages is None:
        return tokenizer(record.text)["input_ids"]
    if not getattr(tokenizer, "chat_template", None):
        raise DataError("has 'messages' records but the tokenizer has no chat template", source)
    from shardcut.ops.calibration.template import render_chat_template

    text = render_chat_template(tokenizer, record.messages, source, tools=record.tools)  # untrusted: time-limited
    return tokenizer(text, add_special_tokens=record.special_tokens)["input_ids"]


def tokenize(records: list[Record], tokenizer_fn, max_length: int, vocab_size: int, source: str) -> list[np.ndarray]:
    """Token arrays of `records`, each truncated to its first `max_length` tokens (empty ones dropped)."""
    out = []
    for r in records:
        try:
            arr = _checked(encode(r, tokenizer_fn, source)[:max_length], vocab_size, source)
        except OverflowError:  # a pre-tokenised id beyond int64
            raise DataError(f"a token id is not below the model's vocabulary size {vocab_size}", source) from None
        if len(arr):
            out.append(arr)
    return out


def _checked(ids: list[int], vocab_size: int, source: str) -> np.ndarray:
    arr = np.asarray(ids, dtype=np.int64)
    if len(arr) and arr.max() >= vocab_size:
        raise DataError(f"token id {int(arr.max())} is not below the model's vocabulary size {vocab_size}", source)
    return arr


def _records(loaded: Loaded, order: np.ndarray, source_index: int, chunk: int = 256) -> Iterator[Record]:
    """The source's records in selection order, formatted a chunk at a time."""
    if loaded.generic is not None:
        for i in order:
            yield loaded.generic[int(i)]
        return
    for at in range(0, len(order), chunk):
        yield from _recipe_records(loaded, [int(i) for i in order[at : at + chunk]], source_index)


def pack(
    records: Iterator[Record], tokenizer_fn, count: int | None, max_length: int, vocab_size: int, source: str
) -> list[np.ndarray]:
    """Sequences of `max_length` tokens filled as the reference fills them (see the module doc)."""
    out: list[np.ndarray] = []
    records = iter(records)
    done = False
    while not done and (count is None or len(out) < count):
        seq: list[int] = []
        pos = 0
        while pos < max_length:
            record = next(records, None)
            if record is None:
                done = True
                break
            take = encode(record, tokenizer_fn, source)[: max_length - pos]
            seq += take
            pos += len(take) + 1  # the reference leaves one masked position after every sample
        if seq:
            out.append(_checked(seq, vocab_size, source))
    if count is not None and len(out) < count:
        raise DataError(
            f"asks for {count} packed sequences of {max_length} tokens but its rows fill only {len(out)}", source
        )
    return out


def select(records: list, count: int, seed: int, source_index: int) -> list:
    """The first `count` records of a seeded shuffle (independent of other sources)."""
    return [records[i] for i in selection_order(len(records), seed, source_index)[:count]]


def selection_order(n: int, seed: int, source_index: int) -> np.ndarray:
    return np.random.default_rng([seed, source_index]).permutation(n)


def load_data(
    spec: str,
    model_dir: str | Path,
    *,
    samples: int | None,
    max_length: int,
    seed: int,
    vocab_size: int,
    trust_remote_code: bool = False,
    sequences: str = "truncate",
) -> CalibData:
    """Read, select and tokenise the samples of a data spec for the model in `model_dir`.

    sequences: `truncate` (one sequence per sample) or `pack` (see the module doc).

    Example:
        >>> data = load_data("code.jsonl:700,tools.jsonl:330", "model/", samples=None, max_length=4096,
        ...                  seed=0, vocab_size=151936)
    """
    if max_length < 1:
        raise DataError(f"max_length must be positive (got {max_length})", params=("max_length",))
    if sequences not in SEQUENCE_MODES:
        raise DataError(f"unknown sequence mode {sequences!r} (known: {', '.join(SEQUENCE_MODES)})")
    sources = parse_spec(spec)
    loaded = [read_source(s) for s in sources]
    packing = sequences == "pack"
    counts = plan_counts(sources, [None if packing else len(x) for x in loaded], samples)
    tokenizer: list = []

    def get_tokenizer():
        if not tokenizer:
            tokenizer.append(load_tokenizer(model_dir, trust_remote_code))
        return tokenizer[0]

    data = CalibData(spec, [], [x.how for x in loaded], sequences, max_length)
    for i, (source, x, n) in enumerate(zip(sources, loaded, counts, strict=True)):
        order = selection_order(len(x), seed, i)
        if packing:
            data.samples += pack(_records(x, order, i), get_tokenizer, n, max_length, vocab_size, source.spec)
        else:
            order = order if n is None else order[:n]
            data.samples += tokenize(list(_records(x, order, i)), get_tokenizer, max_length, vocab_size, source.spec)
    if not data.samples:
        raise DataError("no sample has any token", spec)
    return data

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

import csv
import hashlib
import io
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from shardcut.format.errors import DataError
from shardcut.ops.calibration.recipes import Recipe, detect_recipe, normalize_messages, recipe_for_hub

_HUB_SOURCE = re.compile(r"^(?P<name>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:\[(?P<subset>[^\]]+)\])?(?:\((?P<split>[^)]+)\))?$")
_LOCAL_SPLIT = re.compile(r"^(?P<path>.+?)(?:\[(?P<subset>[^\]]+)\])?\((?P<split>[^)]+)\)$")
_TEXT_FIELDS = ("text", "content")
_FILE_SUFFIXES = (".jsonl", ".json", ".txt", ".csv", ".parquet", ".arrow", ".gz", ".md")
SEQUENCE_MODES = ("truncate", "pack")


@dataclass(frozen=True)
class Source:
    """One part of a data spec: where the rows come from, how many to take (None: share), and
    the column mapping given in the spec."""

    spec: str
    count: int | None
    mapping: dict[str, str] | None = None


@dataclass
class Record:
    """One calibration sample before tokenisation: exactly one of text, messages, input_ids.

    tools: passed to the chat template with `messages`; special_tokens: whether the rendered
    chat is tokenised with the tokenizer's special tokens (the REAP reference's way).
    """

    text: str | None = None
    messages: list | None = None
    input_ids: list[int] | None = None
    tools: object = None
    special_tokens: bool = False


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
# Reading sources


@dataclass
class Loaded:
    """One source's rows: plain dicts, or a `datasets.Dataset` (kept as one for recipes)."""

    rows: Any  # list[dict] | datasets.Dataset (an optional dependency)
    how: str
    recipe: Recipe | None = None
    generic: list[Record] | None = None  # the records of a source read without a recipe

    def __len__(self) -> int:
        return len(self.generic) if self.generic is not None else len(self.rows)


def _is_repo_id(text: str) -> bool:
    m = _HUB_SOURCE.match(text)
    if not m:
        return False
    name = m.group("name")
    return len(name) <= 96 and ".." not in name and "--" not in name and not name.lower().endswith(_FILE_SUFFIXES)


def read_source(source: Source) -> Loaded:
    """The rows of one source, its recipe (from the mapping, its Hub id or its columns)."""
    text = source.spec
    recipe = Recipe.from_mapping(source.mapping, text) if source.mapping else None
    path = Path(text).expanduser()
    split = subset = None
    if not path.exists() and (m := _LOCAL_SPLIT.match(text)) and Path(m.group("path")).expanduser().exists():
        path, split, subset = Path(m.group("path")).expanduser(), m.group("split"), m.group("subset")
    if path.is_file():
        rows, how = _read_file(path)
    elif path.is_dir():
        rows, how = _read_dir(path, split)
    elif _is_repo_id(text) and not text.startswith(("./", "../", "/", "~")):
        m = _HUB_SOURCE.match(text)
        assert m is not None  # _is_repo_id matched it
        recipe = recipe or recipe_for_hub(m.group("name"))
        rows, how = _read_hub(m.group("name"), m.group("subset"), m.group("split"), recipe)
    else:
        raise DataError(
            "data source not found: no such file or folder, and not a Hub dataset id (org/name[subset](split))", text
        )
    del subset  # local sources have no subsets; the syntax is accepted for symmetry with Hub ids
    columns = _columns(rows)
    if recipe is None and not (columns & {"text", "content", "messages", "input_ids"}):
        recipe = detect_recipe(columns)
        if recipe is not None:
            how += f" (columns of {recipe.name}: formatted with its recipe)"
    if recipe is not None:
        missing = [c for c in recipe.columns if c not in columns]
        if missing and len(rows):
            raise DataError(
                f"{recipe.describe()} needs columns {missing} (the source has: {', '.join(sorted(columns)) or 'none'})",
                text,
            )
        if not len(rows):
            raise DataError("holds no rows", text)
        return Loaded(rows, f"{how}, {recipe.describe()}", recipe)
    return Loaded(rows, how, None, _generic_records(rows, text))


def _columns(rows) -> set[str]:
    if hasattr(rows, "column_names"):
        return set(rows.column_names)
    return set(rows[0]) if rows and isinstance(rows[0], dict) else set()


def _generic_records(rows, where: str) -> list[Record]:
    records = []
    for n, row in enumerate(rows, 1):
        record = _record_from_object(row)
        if record is None:
            cols = ", ".join(sorted(row)) if isinstance(row, dict) else type(row).__name__
            raise DataError(
                f"row {n}: needs a 'text', 'messages' or 'input_ids' field, the columns of a "
                f"known dataset, or a mapping like {{prompt=COL;response=COL}} (has: {cols})",
                where,
            )
        if record.text is None or record.text.strip():
            records.append(record)
    if not records:
        raise DataError("holds no samples (empty)", where)
    return records


def _record_from_object(obj: object) -> Record | None:
    if not isinstance(obj, dict):
        return None
    ids = obj.get("input_ids")
    if isinstance(ids, list) and ids and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        return Record(input_ids=ids)
    msgs = obj.get("messages")
    if isinstance(msgs, list) and msgs and all(isinstance(m, dict) and "role" in m for m in msgs):
        return Record(messages=msgs, tools=obj.get("tools"))
    for key in _TEXT_FIELDS:
        if isinstance(obj.get(key), str):
            return Record(text=obj[key])
    return None


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DataError("not UTF-8 text", path) from None
    except OSError as exc:
        raise DataError(f"cannot read ({exc.strerror or exc})", path) from None


def _read_file(path: Path) -> tuple[list[dict], str]:
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return _read_parquet([path], str(path))
    if suffix == ".arrow":
        return _datasets_rows(path, lambda ds: ds.Dataset.from_file(str(path)), str(path))
    raw = _read_text(path)
    if suffix in (".jsonl", ".json"):
        rows = _parse_json(raw, path)
        how = "JSON lines" if suffix == ".jsonl" or not raw.lstrip().startswith("[") else "JSON array"
    elif suffix == ".csv":
        rows = [dict(r) for r in csv.DictReader(io.StringIO(raw))]
        how = "CSV rows"
    else:
        if re.search(r"\n[ \t]*\n", raw.strip()):
            parts, how = re.split(r"\n[ \t]*\n", raw), "one sample per blank-line-separated paragraph"
        else:
            parts, how = raw.splitlines(), "one sample per line"
        rows = [{"text": p.strip()} for p in parts if p.strip()]
    if not rows:
        raise DataError("holds no samples (empty file)", path)
    return rows, f"{path}: {len(rows)} records, {how}"


def _parse_json(raw: str, path: Path) -> list[dict]:
    if raw.lstrip().startswith("["):
        try:
            data = json.loads(raw)
        except (ValueError, RecursionError) as exc:  # RecursionError: nested deeper than Python's stack
            raise DataError(f"not valid JSON ({str(exc)[:60]})", path) from None
        bad = next((i for i, r in enumerate(data, 1) if not isinstance(r, dict)), None)
        if bad is not None:
            raise DataError(f"item {bad}: expected a JSON object", path)
        return data
    rows = []
    for n, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except (ValueError, RecursionError) as exc:  # RecursionError: nested deeper than Python's stack
            raise DataError(f"line {n}: not valid JSON ({str(exc)[:60]})", path) from None
        if not isinstance(obj, dict):
            raise DataError(f"line {n}: expected a JSON object", path)
        rows.append(obj)
    return rows


def _read_parquet(files: list[Path], label: str) -> tuple[list[dict], str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError("reading parquet needs pyarrow (pip install 'shardcut[calibrate]')", label) from None
    rows: list[dict] = []
    for f in files:
        try:
            rows += pq.read_table(f).to_pylist()
        except Exception as exc:  # pyarrow raises ArrowInvalid, OSError... for a damaged file
            raise DataError(f"not a readable parquet file ({type(exc).__name__}: {str(exc)[:80]})", f) from None
    if not rows:
        raise DataError("holds no rows", label)
    return rows, f"{label}: {len(rows)} rows from {len(files)} parquet file{'s' * (len(files) > 1)}"


def _read_dir(path: Path, split: str | None) -> tuple[Any, str]:
    if (
        (path / "dataset_dict.json").exists()
        or (path / "state.json").exists()
        or (path / "dataset_info.json").exists()
        or any(path.glob("*.arrow"))
    ):
        return _datasets_rows(path, lambda ds: ds.load_from_disk(str(path)), str(path), split)
    parquet = sorted(path.rglob("*.parquet"))
    if parquet:
        by_split = _parquet_splits(parquet, path)
        chosen = split or ("train" if "train" in by_split else None)
        if chosen is None and len(by_split) == 1:
            chosen = next(iter(by_split))
        if chosen not in by_split:
            raise DataError(
                f"parquet folder: split {chosen!r} not found (splits: {', '.join(sorted(by_split))}); "
                "pick one with FOLDER(split)"
                if chosen
                else f"parquet folder holds several splits ({', '.join(sorted(by_split))}); pick one with "
                "FOLDER(split)",
                path,
            )
        rows, how = _read_parquet(by_split[chosen], str(path))
        return rows, f"{how}, split {chosen}"
    files = sorted(
        p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in (".jsonl", ".json", ".txt", ".csv")
    )
    if not files:
        raise DataError("folder holds no .jsonl, .json, .txt, .csv, .parquet or saved dataset files", path)
    rows = []
    for f in files:
        try:
            rows += _read_file(f)[0]
        except DataError as exc:
            if "empty" not in str(exc):
                raise
    if not rows:
        raise DataError("holds no samples", path)
    return rows, f"{path}: {len(rows)} records from {len(files)} files"


def _parquet_splits(files: list[Path], root: Path) -> dict[str, list[Path]]:
    """Split name of each parquet file, as the Hub names them: `train-00000-of-00001.parquet`,
    `data/train/...`, or `<split>.parquet`; files of no known split go to `train`."""
    out: dict[str, list[Path]] = {}
    for f in files:
        rel = f.relative_to(root)
        names = [p.lower() for p in rel.parts[:-1]] + [re.split(r"[-_.]", f.name.lower())[0]]
        split = next(
            (n for n in reversed(names) if n in ("train", "test", "validation", "valid", "dev", "eval")), "train"
        )
        out.setdefault(split, []).append(f)
    return out


def _datasets(where) -> ModuleType:
    try:
        import datasets
    except ImportError:
        raise DataError(
            "reading this source needs the `datasets` package (pip install 'shardcut[calibrate]')", where
        ) from None
    datasets.disable_progress_bars()
    return datasets


def _datasets_rows(where, load, label: str, split: str | None = None) -> tuple[Any, str]:
    datasets = _datasets(where)
    try:
        ds = load(datasets)
    except Exception as exc:  # datasets raises many types (network, missing split, format)
        raise DataError(
            f"cannot load dataset ({type(exc).__name__}: {str(exc).splitlines()[0][:160]})", where
        ) from None
    if isinstance(ds, datasets.DatasetDict):
        names = list(ds.keys())
        chosen = split or ("train" if "train" in names else names[0] if len(names) == 1 else None)
        if chosen not in names:
            raise DataError(
                f"split {chosen!r} not found (splits: {', '.join(names)}); pick one with SOURCE(split)"
                if chosen
                else f"holds several splits ({', '.join(names)}); pick one with SOURCE(split)",
                where,
            )
        ds, label = ds[chosen], f"{label}({chosen})"
    if len(ds) == 0:
        raise DataError("holds no rows", where)
    return ds, f"{label}: {len(ds)} rows"


def _read_hub(name: str, subset: str | None, split: str | None, recipe: Recipe | None) -> tuple[Any, str]:
    label = name + (f"[{subset}]" if subset else "")
    kwargs: dict = {"split": split or "train"}
    if subset:
        kwargs["name"] = subset
    if recipe is not None and recipe.data_files and not subset:
        kwargs["data_files"] = {"train": recipe.data_files}
    return _datasets_rows(name, lambda ds: ds.load_dataset(name, **kwargs), f"{label}({kwargs['split']})")


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

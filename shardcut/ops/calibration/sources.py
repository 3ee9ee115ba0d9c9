"""Reading the rows of one calibration data source: local files and folders, or a Hub dataset.

`read_source(Source)` returns the source's rows (plain dicts, or a `datasets.Dataset` kept as one
for a recipe) with its recipe; `shardcut.ops.calibration.data` parses specs, selects and tokenises.
"""

from __future__ import annotations

import csv
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from shardcut.format.errors import DataError
from shardcut.ops.calibration.recipes import Recipe, detect_recipe, recipe_for_hub

_HUB_SOURCE = re.compile(r"^(?P<name>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:\[(?P<subset>[^\]]+)\])?(?:\((?P<split>[^)]+)\))?$")
_LOCAL_SPLIT = re.compile(r"^(?P<path>.+?)(?:\[(?P<subset>[^\]]+)\])?\((?P<split>[^)]+)\)$")
_TEXT_FIELDS = ("text", "content")
_FILE_SUFFIXES = (".jsonl", ".json", ".txt", ".csv", ".parquet", ".arrow", ".gz", ".md")


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

"""Dataset recipes: how the rows of a calibration dataset become a chat (or a text) to tokenise.

`REAP_RECIPES` is the REAP reference's `DATASET_REGISTRY` (CerebrasResearch/reap,
`src/reap/data.py` at 1970473) written as data: each entry says which columns become the
user and assistant turns, where the messages, the text and the tools are, and how tool calls
are built, so that a sample is formatted exactly as the reference formats it:

- rows are mapped with `datasets.Dataset.map` as the reference does, so Arrow's type
  unification (a key missing from some list entries becomes null in all of them) is the same;
- chat samples are rendered with `apply_chat_template(messages, tools=..., tokenize=False,
  add_generation_prompt=False)` after the reference's tool-call normalisation (JSON-string
  arguments parsed), then tokenised with the tokenizer's special tokens, as the reference does
  (`tokenizer(text)`); text samples are `tokenizer(text)`.

Differences, on purpose: tool-call ids are `chatcmpl-tool-<uuid>` as in the reference, but the
uuid is derived from the row and the call's position instead of `uuid4()`, so a run is
repeatable (a chat template that renders ids is the only place this shows).
`m-a-p/CodeFeedback-Filtered-Instruction` reads the column `text_fieldmessages` in the
reference, which that dataset does not have (its processor cannot run); the recipe here maps
`query` and `answer`, its real columns, to a user and an assistant turn.

Any other dataset is described by a mapping (`Recipe.from_mapping`): `text=COL`, `messages=COL`,
or `prompt=COL` and optionally `response=COL` and `system=COL`, plus `tools=COL`; or
`recipe=NAME` (a recipe of the table) or `recipe=FILE.json` (a JSON object of those keys).
"""

from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path

from shardcut.format.errors import DataError

MAPPING_KEYS = ("recipe", "text", "messages", "prompt", "response", "system", "tools")


@dataclass(frozen=True)
class Recipe:
    """How one dataset's rows are formatted (see the module doc).

    kind: "text" (column `text`), "messages" (column `messages`, JSON string or list),
    "turns" (user `prompt`, optional assistant `response` and `system`), or "tool-calls"
    (user `prompt`, assistant tool calls built from the `{name, arguments}` list in
    `tool_calls`, as the reference builds xlam's).
    prompt_format: a `str.format` pattern of the user turn over the row's columns ("{instruction}").
    tools: the column holding the tools passed to the chat template (JSON string or list);
    fixed_tools: a tool list given by the recipe itself (SWE-smith's).
    rebuild_messages: rebuild every message as the reference's SWE-smith processor does
    (content flattened to text, tool calls re-created with fresh ids).
    """

    name: str
    kind: str
    hub_id: str | None = None
    text: str = "text"
    messages: str = "messages"
    prompt: str | None = None
    prompt_format: str | None = None
    response: str | None = None
    system: str | None = None
    tool_calls: str | None = None
    tools: str | None = "tools"
    fixed_tools: tuple | None = None
    rebuild_messages: bool = False
    special_tokens: bool = True  # the reference tokenises the rendered chat with special tokens
    data_files: str | None = None  # the reference reads only this file of the Hub repo (c4)
    note: str = ""
    columns: tuple[str, ...] = field(default=())  # columns a row must have (auto-detection, checks)

    def describe(self) -> str:
        return f"recipe {self.name}" + (f" ({self.note})" if self.note else "")

    @classmethod
    def from_mapping(cls, mapping: dict[str, str], where: str) -> Recipe:
        """A recipe from `--data` mapping keys (or a recipe file's object), e.g.
        `{"prompt": "instruction", "response": "output"}`."""
        unknown = [k for k in mapping if k not in MAPPING_KEYS]
        if unknown:
            raise DataError(f"unknown mapping key {unknown[0]!r} (known: {', '.join(MAPPING_KEYS)})", where)
        if "recipe" in mapping:
            base = find_recipe(mapping["recipe"], where)
            rest = {k: v for k, v in mapping.items() if k != "recipe"}
            return replace(base, **_fields(rest)) if rest else base
        chosen = [k for k in ("text", "messages", "prompt") if k in mapping]
        if len(chosen) != 1:
            raise DataError(
                "a mapping needs exactly one of text=COL, messages=COL or prompt=COL (with response=COL, system=COL)",
                where,
            )
        kind = {"text": "text", "messages": "messages", "prompt": "turns"}[chosen[0]]
        if kind != "turns" and ("response" in mapping or "system" in mapping):
            raise DataError("response= and system= go with prompt=", where)
        spec = ";".join(f"{k}={v}" for k, v in mapping.items())
        return cls(
            name=f"mapping {{{spec}}}",
            kind=kind,
            special_tokens=False,
            **_fields(mapping),
            columns=tuple(v for k, v in mapping.items() if k != "tools"),
        )

    def format_row(self, row: dict, row_key: str) -> dict:
        """The reference's `_map_fn`: the columns to add to (or replace in) the row."""
        try:
            if self.kind == "text":
                return {}
            if self.kind == "messages":
                if not self.rebuild_messages:
                    return {}
                out = {
                    "messages": [_rebuilt(m, f"{row_key}/{i}") for i, m in enumerate(_maybe_json(row[self.messages]))]
                }
                if self.fixed_tools is not None:
                    out["tools"] = [dict(t) for t in self.fixed_tools]
                return out
            user = self.prompt_format.format(**row) if self.prompt_format else row[self.prompt]
            msgs = [{"role": "system", "content": row[self.system]}] if self.system else []
            msgs.append({"role": "user", "content": user})
            if self.kind == "tool-calls":
                calls = [
                    {
                        "function": {"arguments": json.dumps(c["arguments"]), "name": c["name"]},
                        "id": _call_id(f"{row_key}/{i}"),
                        "type": "function",
                    }
                    for i, c in enumerate(_maybe_json(row[self.tool_calls]))
                ]
                msgs.append({"role": "assistant", "content": "", "tool_calls": calls})
                tools = row[self.tools]
                return {"messages": msgs, "tools": tools if isinstance(tools, str) else json.dumps(tools)}
            if self.response:
                msgs.append({"role": "assistant", "content": row[self.response]})
            return {"messages": msgs}
        except KeyError as exc:
            raise DataError(
                f"{self.describe()}: a row has no column {exc.args[0]!r} (columns: {', '.join(sorted(row))})"
            ) from None
        except (TypeError, ValueError) as exc:  # a JSON column that is not JSON, a call without name...
            raise DataError(
                f"{self.describe()}: cannot format a row ({type(exc).__name__}: {str(exc)[:100]})"
            ) from None


def _fields(mapping: dict[str, str]) -> dict:
    out = {k: v for k, v in mapping.items() if k in ("text", "messages", "prompt", "response", "system", "tools")}
    return out


def _maybe_json(value):
    return json.loads(value) if isinstance(value, str) else value


def _call_id(key: str) -> str:
    """`chatcmpl-tool-<uuid>` like the reference's, but a function of the row and position."""
    return f"chatcmpl-tool-{uuid.UUID(bytes=hashlib.sha256(key.encode()).digest()[:16], version=4)}"


def _flatten_content(content) -> str:
    """The reference's `_normalize_message_content`: text parts joined, other parts as JSON."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for item in content:
            if isinstance(item, str):
                parts.append(item)
            elif isinstance(item, dict):
                text = item.get("text")
                parts.append(
                    text if item.get("type") == "text" and isinstance(text, str) else json.dumps(item, sort_keys=True)
                )
            else:
                parts.append(str(item))
        return "\n".join(p for p in parts if p)
    return str(content)


def _rebuilt(message: dict, key: str) -> dict:
    out = {"role": message["role"], "content": _flatten_content(message.get("content"))}
    if message.get("tool_calls") is not None:
        out["tool_calls"] = [
            {
                "function": {"arguments": c["function"]["arguments"], "name": c["function"]["name"]},
                "id": _call_id(f"{key}/{i}"),
                "type": "function",
            }
            for i, c in enumerate(message["tool_calls"])
        ]
    return out


def normalize_messages(messages):
    """The reference's `_normalize_messages_for_chat_template`: tool-call arguments given as
    JSON strings are parsed into objects (templates expect objects)."""
    if not isinstance(messages, list):
        return messages
    out = []
    for m in messages:
        if not isinstance(m, dict) or not m.get("tool_calls"):
            out.append(m)
            continue
        calls = []
        for c in m["tool_calls"]:
            if isinstance(c, dict) and isinstance(c.get("function"), dict):
                c = {**c, "function": {**c["function"], "arguments": _maybe_json(c["function"].get("arguments"))}}
            calls.append(c)
        out.append({**m, "tool_calls": calls})
    return out


def _tool(name: str, description: str, properties: dict, required: list[str] | None = None) -> dict:
    params: dict = {"type": "object", "properties": properties}
    if required:
        params["required"] = required
    params["additionalProperties"] = False
    return {
        "type": "function",
        "function": {"name": name, "description": description, "strict": True, "parameters": params},
    }


def _prop(kind: str, description: str, **extra) -> dict:
    return {"type": kind, "description": description, **extra}


# The tool list the reference passes with every SWE-smith trajectory (SWESmithTrajectoriesDataset.tools).
SWE_SMITH_TOOLS: tuple = (
    _tool(
        "str_replace_editor",
        "Custom editing tool for viewing, creating and editing files.\n"
        "State is persistent across calls. If `path` is a file, `view` shows `cat -n`; "
        "if a directory, `view` lists non-hidden entries up to 2 levels. "
        "The `create` command fails if `path` already exists as a file. "
        "Long outputs may be truncated with '<response clipped>'. "
        "`undo_edit` reverts the last edit for `path`.\n\n"
        "Notes for `str_replace`:\n"
        "- `old_str` must match EXACTLY one or more consecutive lines (watch whitespace).\n"
        "- If `old_str` is not unique in the file, no replacement happens\u2014include enough context.\n"
        "- `new_str` contains the edited lines replacing `old_str`.",
        {
            "command": _prop(
                "string", "The command to run.", enum=["view", "create", "str_replace", "insert", "undo_edit"]
            ),
            "path": _prop("string", "Absolute path to file or directory, e.g. `/testbed/file.py` or `/testbed`."),
            "file_text": _prop("string", "Required for `create`: the full contents of the new file."),
            "old_str": _prop("string", "Required for `str_replace`: the exact string in `path` to replace."),
            "new_str": _prop(
                "string", "Optional for `str_replace` (replacement text). Required for `insert` (the string to insert)."
            ),
            "insert_line": _prop("integer", "Required for `insert`: insert `new_str` AFTER this 1-based line number."),
            "view_range": _prop(
                "array",
                "Optional for `view` when `path` is a file. If omitted, shows the full "
                "file. Provide `[start, end]` (1-based). Use `[start, -1]` to show from "
                "start to EOF.",
                items={"type": "integer"},
                minItems=2,
                maxItems=2,
            ),
        },
        ["command", "path"],
    ),
    _tool("_state_anthropic", "Internal helper to manage persistent editor state across tool calls.", {}),
    _tool(
        "submit",
        "Submits the current file. Note: implementation may use internal flags (e.g., a hidden '-f') not exposed here.",
        {},
    ),
    _tool(
        "bash",
        "Runs the given command directly in bash.",
        {"command": _prop("string", "The bash command to execute.")},
        ["command"],
    ),
)

REAP_RECIPES: tuple[Recipe, ...] = (
    Recipe(
        "evol-codealpaca-v1",
        "turns",
        "theblackcat102/evol-codealpaca-v1",
        prompt="instruction",
        response="output",
        columns=("instruction", "output"),
    ),
    Recipe(
        "xlam-function-calling-60k",
        "tool-calls",
        "Salesforce/xlam-function-calling-60k",
        prompt="query",
        tool_calls="answers",
        tools="tools",
        columns=("query", "answers", "tools"),
    ),
    Recipe(
        "SWE-smith-trajectories",
        "messages",
        "SWE-bench/SWE-smith-trajectories",
        rebuild_messages=True,
        fixed_tools=SWE_SMITH_TOOLS,
        columns=("messages",),
        note="the reference's four SWE-agent tools passed to the chat template",
    ),
    Recipe("tulu-3-sft-mixture", "messages", "allenai/tulu-3-sft-mixture", columns=("messages",)),
    Recipe("tulu-3-sft-personas-math", "messages", "allenai/tulu-3-sft-personas-math", columns=("messages",)),
    Recipe("Mixture-of-Thoughts", "messages", "open-r1/Mixture-of-Thoughts", columns=("messages",)),
    Recipe(
        "Magicoder-Evol-Instruct-110K",
        "turns",
        "ise-uiuc/Magicoder-Evol-Instruct-110K",
        prompt="instruction",
        response="response",
        columns=("instruction", "response"),
    ),
    Recipe(
        "CodeFeedback-Filtered-Instruction",
        "turns",
        "m-a-p/CodeFeedback-Filtered-Instruction",
        prompt="query",
        response="answer",
        columns=("query", "answer"),
        note="the reference reads a column 'text_fieldmessages' this dataset lacks; query/answer used",
    ),
    Recipe(
        "c4",
        "text",
        "allenai/c4",
        data_files="en/c4-train.00000-of-01024.json.gz",
        columns=("text",),
        note="the reference reads only en/c4-train.00000-of-01024.json.gz",
    ),
    Recipe(
        "mmlu",
        "turns",
        "cais/mmlu",
        prompt_format="{question} Choose from the following options: {choices}",
        columns=("question", "choices"),
    ),
    Recipe(
        "WritingPrompts_curated",
        "turns",
        "euclaise/WritingPrompts_curated",
        prompt_format="Please write a creative story using the following writing prompt:\n\n {prompt}",
        response="body",
        columns=("prompt", "body"),
    ),
)


def find_recipe(name: str, where: str = "data") -> Recipe:
    """A recipe by its short name or Hub id (case-insensitive), or from a recipe file (.json)."""
    if name.lower().endswith(".json"):
        path = Path(name)
        try:
            obj = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise DataError("recipe file not found", path) from None
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise DataError(f"not a readable JSON recipe ({type(exc).__name__})", path) from None
        if not isinstance(obj, dict) or not all(isinstance(v, str) for v in obj.values()):
            raise DataError(f"a recipe file holds one JSON object of strings ({', '.join(MAPPING_KEYS)})", path)
        return Recipe.from_mapping(obj, str(path))
    key = name.lower()
    for r in REAP_RECIPES:
        if key in (r.name.lower(), (r.hub_id or "").lower()):
            return r
    raise DataError(
        f"unknown recipe {name!r} (known: {', '.join(r.name for r in REAP_RECIPES)}; or a recipe .json file)", where
    )


def recipe_for_hub(name: str) -> Recipe | None:
    """The REAP recipe of a Hub dataset id, as the reference's registry maps it."""
    key = name.lower()
    return next((r for r in REAP_RECIPES if (r.hub_id or "").lower() == key), None)


def detect_recipe(columns: set[str]) -> Recipe | None:
    """The one REAP recipe whose columns a row has (rows without text/messages/input_ids)."""
    fits = [r for r in REAP_RECIPES if r.kind in ("turns", "tool-calls") and set(r.columns) <= columns]
    best = max((len(r.columns) for r in fits), default=0)
    fits = [r for r in fits if len(r.columns) == best]
    return fits[0] if len(fits) == 1 else None

"""Every campaign config field as a table: dotted path, type, default and meaning, generated from the live schema.

The meaning of a field is the `# comment` the code gives it: the trailing comment on its line(s), then the block of
comment lines directly above it (read from the source with `ast` and `tokenize`, so the code stays as it is). A field
without one falls back to its section's docstring (a nested model) or its variant's docstring (a discriminator such
as a loss's `name`); a field with neither has an empty meaning, which the tests refuse.

    python -m cdm_dist.driver.fields                    # print the markdown
    python -m cdm_dist.driver.fields --write README.md  # rewrite the block between the config-fields markers
"""

from __future__ import annotations

import argparse
import ast
import functools
import inspect
import io
import math
import re
import sys
import textwrap
import tokenize
import types
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import annotated_types
import yaml
from pydantic import AfterValidator, BaseModel, Tag
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from cdm_dist.chains.config import UNION_TAG
from cdm_dist.driver.campaign import CampaignConfig
from cdm_dist.errors import InputError
from cdm_dist.models.spec import existing_file, existing_folder

START = "<!-- config-fields:start -->"
END = "<!-- config-fields:end -->"
REGENERATE = "python -m cdm_dist.driver.fields --write README.md"
TOP = "top level"
PRAGMA = re.compile(r"^(fmt|noqa|type|pragma|pyright|mypy)\b")


class Required:
    """The default of a field that has none."""

    def __repr__(self) -> str:
        return "required"


REQUIRED = Required()


@dataclass(frozen=True)
class Row:
    """One field: its dotted path ([] a list's items, {} a mapping's values), type, default value and meaning, and
    the table it is listed in."""

    path: str
    type: str
    default: Any  # the value (REQUIRED when there is none)
    meaning: str
    table: str

    @property
    def default_text(self) -> str:
        return default_text(self.default)


@dataclass(frozen=True)
class Table:
    """A table of rows: a top-level section, or one variant of a union field."""

    name: str
    intro: str


# -- comments ------------------------------------------------------------------------------------------------


@functools.cache
def _class_comments(cls: type) -> dict[str, str]:
    """Field name -> its comments in the class body (trailing, then the block directly above)."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):  # a model made at run time (pydantic.create_model) has no source
        return {}
    tree = ast.parse(source)
    lines = source.splitlines()
    comments: dict[int, str] = {}
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            text = token.string.lstrip("#").strip()
            if text and not PRAGMA.match(text):
                comments[token.start[0]] = text

    def own_line(number: int) -> bool:
        return lines[number - 1].lstrip().startswith("#")

    found: dict[str, str] = {}
    for node in tree.body[0].body:  # type: ignore[attr-defined]
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        end = node.end_lineno or node.lineno
        trailing = [comments[n] for n in range(node.lineno, end + 1) if n in comments and not own_line(n)]
        above, n = [], node.lineno - 1
        while n >= 1 and own_line(n):
            if n in comments:
                above.insert(0, comments[n])
            n -= 1
        parts = [" ".join(trailing), " ".join(above)]
        found[node.target.id] = ". ".join(p.rstrip(".") if i == 0 else p for i, p in enumerate(parts) if p)
    return found


def field_comment(model: type[BaseModel], name: str) -> str:
    """The comment of a field, read from the class (in the model's MRO) that declares it."""
    for cls in model.__mro__:
        if name in vars(cls).get("__annotations__", {}):
            return _class_comments(cls).get(name, "")
    return ""


def first_sentence(text: str | None) -> str:
    """A docstring's first sentence, on one line, without its full stop."""
    text = " ".join((text or "").split())
    match = re.match(r"(.+?)(?<!e\.g)(?<!i\.e)(?<!Exp)(?<! al)\.(\s|$)", text)
    return match.group(1) if match else text.rstrip(".")


# -- types ---------------------------------------------------------------------------------------------------


def is_model(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def _strip(tp: Any) -> tuple[Any, list[Any]]:
    """The type under Annotated, and the metadata it carried (FieldInfo's constraints flattened)."""
    meta: list[Any] = []
    while get_origin(tp) is Annotated:
        tp, *extra = get_args(tp)
        for item in extra:
            meta.extend(item.metadata if isinstance(item, FieldInfo) else [item])
    return tp, meta


def _members(tp: Any) -> list[Any]:
    """The members of a union, nested unions (an Optional around a discriminated union) flattened and each
    member's Tag kept; [tp] for a type that is no union."""
    base, _ = _strip(tp)
    if get_origin(base) in (Union, types.UnionType):
        return [member for arg in get_args(base) for member in _members(arg)]
    return [tp]


def _tag(tp: Any) -> str | None:
    """A discriminated union member's tag without the union prefix ('~flow' -> 'flow')."""
    while get_origin(tp) is Annotated:
        tp, *extra = get_args(tp)
        for item in extra:
            if isinstance(item, Tag):
                return item.tag.removeprefix(UNION_TAG)
    return None


def _number(value: float) -> str:
    return str(int(value)) if isinstance(value, float) and value.is_integer() and abs(value) < 1e15 else str(value)


def _constraints(base: str, meta: list[Any]) -> str:
    """A type with its constraints: 'int ≥ 1', 'float in [0, 1]', 'str, non-empty, matching ...'."""
    low = high = None
    notes = []
    for item in meta:
        if isinstance(item, annotated_types.Ge):
            low = f"[{_number(item.ge)}"
        elif isinstance(item, annotated_types.Gt):
            low = f"({_number(item.gt)}"
        elif isinstance(item, annotated_types.Le):
            high = f"{_number(item.le)}]"
        elif isinstance(item, annotated_types.Lt):
            high = f"{_number(item.lt)})"
        elif isinstance(item, annotated_types.MinLen) and item.min_length > 0:
            notes.append("non-empty" if item.min_length == 1 else f"at least {item.min_length} items")
        elif isinstance(item, annotated_types.MaxLen):
            notes.append(f"at most {item.max_length} items")
        elif isinstance(item, AfterValidator) and item.func in (existing_file, existing_folder):
            base = "file path" if item.func is existing_file else "folder path"
        elif getattr(item, "pattern", None):
            notes.append(f"matching `{item.pattern}`")
    if low and high:
        base = f"{base} in {low}, {high}"
    elif low:
        base = f"{base} {'≥' if low[0] == '[' else '>'} {low[1:]}"
    elif high:
        base = f"{base} {'≤' if high[-1] == ']' else '<'} {high[:-1]}"
    return ", ".join([base, *notes])


def type_text(tp: Any, meta: list[Any] = ()) -> str:
    """How a field's type reads in the table."""
    tp, inner = _strip(tp)
    meta = [*inner, *meta]
    origin = get_origin(tp)
    if tp is type(None):
        return "null"
    if tp is Any:
        return "any"
    if origin is Literal:
        return " | ".join(f"`{v}`" for v in get_args(tp))
    if origin in (Union, types.UnionType):
        members = get_args(tp)
        labels = [_tag(m) for m in members]
        if all(labels[i] is not None for i, m in enumerate(members) if is_model(_strip(m)[0])) and any(labels):
            kinds = [(label, m) for label, m in zip(labels, members, strict=True) if label != "?"]  # ?: unknown names
            return " | ".join(f"`{label}`" if label else type_text(m) for label, m in kinds)
        return _constraints(" | ".join(type_text(m) for m in members), meta)
    if origin is list:
        return _constraints(f"list[{type_text(get_args(tp)[0])}]", meta)
    if origin is dict:
        key, value = get_args(tp)
        return _constraints(f"dict[{type_text(key)}, {type_text(value)}]", meta)
    if origin is Callable or tp is Callable:
        return "function"
    if is_model(tp):
        return "section"
    return _constraints(getattr(tp, "__name__", str(tp)), meta)


# -- defaults ------------------------------------------------------------------------------------------------


def _plain(value: Any) -> Any:
    """A default as plain data: a model as its non-default fields (with its `name`, which says which it is)."""
    if isinstance(value, BaseModel):
        data = value.model_dump(mode="json", exclude_defaults=True)
        if "name" in type(value).model_fields and "name" not in data:
            data = {"name": value.model_dump(mode="json")["name"], **data}
        return data
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def default_text(value: Any) -> str:
    """How a default reads in the table: `null`, `true`, `250`, `"mlgd_f"`, `[{kind: linear, ...}]`."""
    if value is REQUIRED:
        return "required"
    value = _plain(value)
    if isinstance(value, float) and not math.isfinite(value):
        return f"`{value}`"
    text = yaml.safe_dump(value, default_flow_style=True, width=math.inf, sort_keys=False).strip()
    text = text.removesuffix("\n...").removesuffix("...").strip()
    return f"`{text}`"


def field_default(info: FieldInfo) -> Any:
    if info.default is PydanticUndefined and info.default_factory is None:
        return REQUIRED
    return info.get_default(call_default_factory=True, validated_data={})


# -- the walk ------------------------------------------------------------------------------------------------


@dataclass
class _Walk:
    rows: list[Row]
    tables: list[Table]
    unions: dict[tuple[type, ...], str]  # the kinds of a union already expanded -> the path it was at

    def model(self, model: type[BaseModel], prefix: str, table: str) -> None:
        for name, info in model.model_fields.items():
            self.field(model, name, info, prefix + name, table)

    def field(self, owner: type[BaseModel], name: str, info: FieldInfo, path: str, table: str) -> None:
        tp, _ = _strip(info.annotation)
        members = [m for m in _members(tp) if _strip(m)[0] is not type(None)]
        models = [_strip(m)[0] for m in members if is_model(_strip(m)[0])]
        meaning = field_comment(owner, name)
        if not meaning and len(models) == 1:
            meaning = first_sentence(models[0].__doc__)
        if not meaning and get_origin(tp) is Literal and len(get_args(tp)) == 1:  # a variant's discriminator
            meaning = "selects this kind"
        default = field_default(info)
        if not path.count(".") and len(models) == 1 and len(members) == 1 and table == TOP:
            self.tables.append(Table(path, meaning))  # a top-level section is a table of its own
            self.model(models[0], path + ".", path)
            return
        text = type_text(info.annotation, info.metadata)
        if len(models) > 1:  # a union of sections: one table per kind
            kinds = tuple(models)
            first = self.unions.get(kinds)
            if first is not None:
                text = f"{text}, as `{first}`"
            self.rows.append(Row(path, text, default, meaning, table))
            if first is None:
                self.unions[kinds] = path
                for member in members:
                    label, cls = _tag(member), _strip(member)[0]
                    if is_model(cls) and label is not None and label != "?":  # "?": a placeholder for unknown names
                        self.tables.append(Table(f"{path}: {label}", first_sentence(cls.__doc__)))
                        self.model(cls, path + ".", f"{path}: {label}")
            return
        self.rows.append(Row(path, text, default, meaning, table))
        if len(models) == 1 and len(members) == 1:
            self.model(models[0], path + ".", table)
            return
        container = _strip(members[0])[0] if len(members) == 1 else None
        if get_origin(container) in (list, dict):
            item, _ = _strip(get_args(container)[-1])
            if is_model(item):
                mark = "[]" if get_origin(container) is list else "{}"
                self.model(item, f"{path}{mark}.", table)


def walk(model: type[BaseModel] = CampaignConfig) -> tuple[list[Table], list[Row]]:
    """The tables and rows of every field of a config model (the campaign config by default)."""
    state = _Walk([], [Table(TOP, "")], {})
    state.model(model, "", TOP)
    return state.tables, state.rows


def rows(model: type[BaseModel] = CampaignConfig) -> list[Row]:
    """Every field of a config model as a row."""
    return walk(model)[1]


# -- markdown ------------------------------------------------------------------------------------------------


def _cell(text: str, cell: bool = True) -> str:
    """Text safe in markdown: angle brackets and asterisks escaped outside code spans, and in a table cell pipes."""
    out = []
    for part in re.split(r"(`[^`]*`)", text):
        code = part.startswith("`") and part.endswith("`") and len(part) > 1
        special = ("|" if cell else "") if code else ("|<*" if cell else "<*")
        out.append(re.sub(f"([{re.escape(special)}])", r"\\\1", part) if special else part)
    return "".join(out)


def markdown(model: type[BaseModel] = CampaignConfig) -> str:
    """The tables as markdown, between the config-fields markers."""
    tables, all_rows = walk(model)
    intro = (
        "Every field can be set in the YAML or with `--set path=value` (list items by index, e.g."
        " `chains.zeta.0.scale=2`). In a path, `[]` is any item of a list and `{}` any value of a mapping; their"
        " defaults are what an item gets for a field it leaves out. A field that takes one of several kinds of"
        " section (a problem part as a folder or a factory, a loss by its `name`) has a table per kind."
    )
    lines = [
        START,
        f"<!-- generated by `{REGENERATE}` from the schema; edit the fields' # comments, not this -->",
        "",
        *textwrap.wrap(intro, 120, break_on_hyphens=False, break_long_words=False),
    ]
    for table in tables:
        body = [r for r in all_rows if r.table == table.name]
        if not body:
            continue
        title = "Top level" if table.name == TOP else f"`{table.name.split(': ')[0]}`"
        if ": " in table.name:
            title += f" as `{table.name.split(': ', 1)[1]}`"
        heading = f"**{title}**" + (f": {_cell(table.intro, cell=False)}." if table.intro else "")
        lines += ["", *textwrap.wrap(heading, 120, break_on_hyphens=False, break_long_words=False), ""]
        lines += ["| field | type | default | meaning |", "| --- | --- | --- | --- |"]
        for row in body:
            cells = [f"`{row.path}`", _cell(row.type), _cell(row.default_text), _cell(row.meaning)]
            lines.append("| " + " | ".join(cells) + " |")
    lines += ["", END]
    return "\n".join(lines)


def block(text: str, source: str = "README.md") -> str:
    """The config-fields block of a text, markers included."""
    start, end = text.find(START), text.find(END)
    if start < 0 or end < start:
        raise InputError(f"{source}: no {START} ... {END} block")
    return text[start : end + len(END)]


def write(path: str | Path) -> bool:
    """Rewrite the block in a file; whether it changed."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: not found")
    text = path.read_text(encoding="utf-8")
    new = text.replace(block(text, str(path)), markdown(), 1)
    if new != text:
        path.write_text(new, encoding="utf-8")
    return new != text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cdm_dist.driver.fields", description=__doc__.split("\n")[0])
    parser.add_argument("--write", metavar="FILE", help="rewrite the config-fields block of FILE (e.g. README.md)")
    args = parser.parse_args(argv)
    try:
        if args.write is None:
            print(markdown())
        else:
            changed = write(args.write)
            print(f"{args.write}: config fields {'rewritten' if changed else 'already up to date'}")
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""docs/configuration.md, generated from the config dataclasses themselves, so it cannot drift.

Every key of a federation YAML (`FederationConfig` and its sections) and every Meerkat argument of
`MeerkatZOArguments` is listed with its default and its help. The help is the field's
`metadata["help"]` where it has one (the Trainer's arguments, the mask spec), else the comment that
documents the field in its source (on its line, or the comment lines right above it): the field's
own documentation, read where a maintainer writes it. `python -m meerkat_hf.federated.config_reference`
prints the document; a test checks that docs/configuration.md equals it and that no field lacks help.
"""

from __future__ import annotations

import dataclasses
import inspect
import io
import textwrap
import tokenize
from typing import Any

__all__ = ["field_help", "render_reference"]


def _comments_by_field(cls: type) -> dict[str, str]:
    """{field name: its comment}: a trailing `# ...` on the field's line, or the `# ...` lines just above it."""
    source = textwrap.dedent(inspect.getsource(cls))
    lines = source.splitlines()
    comments: dict[int, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
    names = {f.name for f in dataclasses.fields(cls)}
    out: dict[str, str] = {}
    for number, line in enumerate(lines, start=1):
        stripped = line.strip()
        name = stripped.split(":", 1)[0].strip()
        if name not in names or not line.startswith("    ") or line.startswith("     ") or ":" not in stripped:
            continue
        above = []
        k = number - 1
        while k in comments and lines[k - 1].strip().startswith("#"):
            above.insert(0, comments[k])
            k -= 1
        parts = above + ([comments[number]] if number in comments else [])
        if parts:
            out[name] = " ".join(parts)
    return out


def field_help(cls: type) -> dict[str, str]:
    """{field name: help} of a dataclass: `metadata["help"]` first, else the field's source comment."""
    comments = _comments_by_field(cls)
    return {f.name: str(f.metadata.get("help") or comments.get(f.name, "")).strip() for f in dataclasses.fields(cls)}


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None


def _show(value: Any) -> str:
    if dataclasses.is_dataclass(value):
        return "(section)"
    if value is None:
        return "`null`"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, float):
        return f"`{value:g}`"
    return f"`{value}`"


def _escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _table(cls: type, prefix: str = "") -> list[str]:
    helps = field_help(cls)
    rows = ["| key | default | what it does |", "|---|---|---|"]
    for f in dataclasses.fields(cls):
        default = _default(f)
        if dataclasses.is_dataclass(default):
            continue
        rows.append(f"| `{prefix}{f.name}` | {_escape(_show(default))} | {_escape(helps[f.name])} |")
    return rows


def render_reference() -> str:
    """The whole reference as Markdown."""
    from ..trainer.arguments import MeerkatZOArguments
    from .federation_config import DEPRECATED_KEYS, FederationConfig

    out = ["# Configuration reference", "",
           "Generated from the config dataclasses by `python -m meerkat_hf.federated.config_reference > "
           "docs/configuration.md` (a test checks that this file is current). One name per setting: the federation "
           "config uses `MeerkatZOArguments`' names; a section key `dp.clip` is the Trainer's `dp_clip`. "
           "Old names still read, with a FutureWarning, for one release: "
           + ", ".join(f"`{old}` -> `{new}`" for old, new in DEPRECATED_KEYS.items()) + ".", "",
           "## Federation config (the YAML file of `--config`, or `--set key=value` overrides)", "",
           "Top-level keys:", ""]
    out += _table(FederationConfig)
    for f in dataclasses.fields(FederationConfig):
        default = _default(f)
        if dataclasses.is_dataclass(default):
            doc = type(default).__doc__ or ""
            if doc.startswith(f"{type(default).__name__}("):  # dataclass's generated signature, not a docstring
                doc = ""
            doc = inspect.cleandoc(doc)
            out += ["", f"### `{f.name}:`", "", doc.split("\n\n")[0].replace("\n", " "), ""]
            out += _table(type(default), prefix=f"{f.name}.")
    out += ["", "## `MeerkatZOArguments` (the Trainer)", "",
            "Everything of `transformers.TrainingArguments`, plus:", ""]
    own = {f.name for f in dataclasses.fields(MeerkatZOArguments)} - {
        f.name for f in dataclasses.fields(MeerkatZOArguments.__mro__[1])}
    helps = field_help(MeerkatZOArguments)
    out += ["| argument | default | what it does |", "|---|---|---|"]
    for f in dataclasses.fields(MeerkatZOArguments):
        if f.name in own or f.name == "learning_rate":
            out.append(f"| `{f.name}` | {_escape(_show(_default(f)))} | {_escape(helps[f.name])} |")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    print(render_reference(), end="")

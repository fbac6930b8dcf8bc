"""YAML from users and operators, read so that a mistake is one line, never a traceback or a silent choice.

PyYAML's `safe_load` runs no code, but it takes the last of two equal keys without a word (a config
that says `lr` twice trains with whichever came last), recurses once per nesting level (a 20,000-deep
file is a RecursionError), and reads any size. `load_yaml` refuses all three with a `ValueError` that
names the source.
"""

from __future__ import annotations

from typing import Any

import yaml

MAX_YAML_BYTES = 4 << 20  # a federation config is a few KB; 4 MiB leaves room for long inline file lists
MAX_YAML_DEPTH = 32  # configs nest 3 deep (section.key.value); lists of files one more


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate mapping keys (the PyYAML default keeps the last one)."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
            except TypeError:  # an unhashable key: SafeLoader's own error says so below
                break
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    None, None, f"the key {key!r} is given twice (line {seen[key] + 1} and line "
                    f"{key_node.start_mark.line + 1}); keep one", key_node.start_mark)
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def _depth(value: Any) -> int:
    """Nesting depth of loaded YAML, iteratively (no recursion on hostile input)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        deepest = max(deepest, depth)
        if depth > MAX_YAML_DEPTH:
            break
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)
    return deepest


def load_yaml(text: str, source: str) -> Any:
    """Parse `text` (from `source`, named in every error) with bounded size and depth and no duplicate keys."""
    if len(text.encode("utf-8", "surrogatepass")) > MAX_YAML_BYTES:
        raise ValueError(f"{source} is larger than {MAX_YAML_BYTES >> 20} MiB: not a federation config")
    try:
        data = yaml.load(text, Loader=_StrictLoader)  # noqa: S506  (a SafeLoader subclass: no code runs)
    except RecursionError:
        raise ValueError(f"{source} nests deeper than YAML can be read (more than {MAX_YAML_DEPTH} levels is "
                         "not a config)") from None
    except yaml.YAMLError as err:
        raise ValueError(f"{source} is not valid YAML: {' '.join(str(err).split())}") from None
    if _depth(data) > MAX_YAML_DEPTH:
        raise ValueError(f"{source} nests more than {MAX_YAML_DEPTH} levels deep: not a config")
    return data

"""YAML for config files: PyYAML's safe loader, refusing what would silently or slowly go wrong.

- A key given twice in one mapping. PyYAML keeps the last one without a word, so a second
  `optim:` block pasted further down drops every setting of the first.
- Aliases that expand to more than MAX_NODES nodes ("billion laughs"). PyYAML shares the aliased
  objects, so loading is quick, but anything that walks or prints the value (the type checks, an
  error message) meets the full expansion: gigabytes from a few hundred bytes.
- An alias inside the node it names (a recursive structure): no config needs one, and it has no
  finite expansion.

Merge keys keep working: a key given by `<<: *defaults` and again explicitly is not a duplicate
(the explicit one wins, as YAML says). Errors are `YamlStructureError` (a `yaml.YAMLError`) with
the key path or the line in the message; the caller adds the file name.
"""

from __future__ import annotations

import reprlib
from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

MAX_NODES = 100_000  # a config has about a hundred; far below what takes memory or time to walk

_MERGE, _VALUE = "tag:yaml.org,2002:merge", "tag:yaml.org,2002:value"


class YamlStructureError(yaml.YAMLError):
    """A YAML document refused for its structure (duplicate key, alias bomb, recursion)."""


def load(text: str) -> Any:
    """The single YAML document in `text` (None when empty), loaded safely with the checks above."""
    loader = ConfigLoader(text)
    try:
        return loader.get_single_data()
    except RecursionError:  # PyYAML composes and constructs recursively
        raise YamlStructureError("nested too deeply") from None
    except ValueError as exc:  # a constructor's own error, e.g. `2020-13-45` read as a date
        raise yaml.YAMLError(f"unreadable value: {cut(str(exc))}") from None
    finally:
        loader.dispose()


class ConfigLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys, alias bombs and recursive aliases."""

    def __init__(self, stream: str):
        super().__init__(stream)
        self._checked: set[Node] = set()  # mapping nodes whose keys were checked (nodes hash by identity)
        self._paths: dict[Node, str] = {}  # value node -> dotted key path, for messages

    def construct_document(self, node: Node) -> Any:
        check_expansion(node)  # before anything is built from the node graph
        return super().construct_document(node)

    def construct_mapping(self, node: Node, deep: bool = False) -> dict:
        if isinstance(node, MappingNode):
            self._check_unique_keys(node)
        return super().construct_mapping(node, deep)

    def flatten_mapping(self, node: MappingNode) -> None:
        # Merging rewrites node.value (merged pairs first, then the explicit ones), so each mapping
        # is checked as written before that; PyYAML flattens merged mappings through this method too.
        self._check_unique_keys(node)
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE:  # merged keys are reported under the merging mapping's path
                merged = value_node.value if isinstance(value_node, SequenceNode) else [value_node]
                for m in merged:
                    self._paths.setdefault(m, self._paths.get(node, ""))
        super().flatten_mapping(node)

    def _check_unique_keys(self, node: MappingNode) -> None:
        if node in self._checked:
            return
        self._checked.add(node)
        parent = self._paths.get(node, "")
        lines: dict[Any, int] = {}  # key -> line of its first occurrence
        for key_node, value_node in node.value:
            if not isinstance(key_node, ScalarNode) or key_node.tag in (_MERGE, _VALUE):
                continue  # merge keys may repeat; non-scalar keys are refused later as unhashable
            key = self.construct_object(key_node)
            path = f"{parent}.{cut(str(key), 40)}" if parent else cut(str(key), 40)
            self._paths.setdefault(value_node, path)
            line = key_node.start_mark.line + 1
            if key in lines:
                raise YamlStructureError(f"{path}: key given twice (lines {lines[key]} and {line}); "
                                         "YAML would silently keep only the last")
            lines[key] = line


def check_expansion(root: Node, limit: int = MAX_NODES) -> int:
    """Nodes in the document once every alias is replaced by a copy of its anchor's node.

    Aliases make the node graph a DAG: sizes are summed once per node (memoized), so a bomb is
    measured in time linear in the text. Raises YamlStructureError past `limit` or on a cycle.
    """
    sizes: dict[Node, int] = {}
    open_nodes: set[Node] = set()  # entered but not finished: the current path from the root
    stack: list[tuple[Node, bool]] = [(root, False)]
    while stack:
        node, finished = stack.pop()
        kids = _children(node)
        if finished:
            open_nodes.discard(node)
            sizes[node] = 1 + sum(sizes[k] for k in kids)
            if sizes[node] > limit:
                raise YamlStructureError(f"line {node.start_mark.line + 1}: aliases make the document expand "
                                         f"to more than {limit} nodes (YAML alias bomb?)")
        elif node in open_nodes:
            raise YamlStructureError(f"line {node.start_mark.line + 1}: an alias refers to a node that "
                                     "contains it (a recursive structure)")
        elif node not in sizes:
            open_nodes.add(node)
            stack.append((node, True))
            stack.extend((k, False) for k in kids)
    return sizes[root]


def _children(node: Node) -> list[Node]:
    if isinstance(node, MappingNode):
        return [n for pair in node.value for n in pair]
    return list(node.value) if isinstance(node, SequenceNode) else []


# Messages quote values; a value may be huge (a long list, a 5000-digit int), a message must not be.
_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 60
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = 4
_REPR.maxlevel = 2


def show(value: Any, limit: int = 80) -> str:
    """A value's repr for a message, at most `limit` characters, built without a full repr."""
    try:
        text = _REPR.repr(value)
    except ValueError:  # an int past Python's int-to-text digit limit
        text = f"<{type(value).__name__} too large to show>"
    return cut(text, limit)


def cut(text: str, limit: int = 200) -> str:
    """text, shortened to at most `limit` characters."""
    return text if len(text) <= limit else text[: limit - 3] + "..."

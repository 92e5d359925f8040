"""YAML from untrusted files (strategies, job lists), composed with bounds: nesting at most
:data:`MAX_DEPTH` levels, at most :data:`MAX_NODES` values once aliases (``*name``) are expanded
(so a small "alias bomb" cannot grow into a huge tree), no alias cycles, at most
:data:`MAX_DOCUMENT_BYTES` characters, and only the safe loader's tags. Every refusal is an
:class:`UntrustedYAMLError` with the 1-based line where known; callers turn it into their own
error type naming the file."""

from __future__ import annotations

from typing import Any

import yaml

#: Limits on a document: characters of text, nesting depth of mappings and lists, and values
#: (scalars, lists, mappings) once its aliases are expanded.
MAX_DOCUMENT_BYTES = 1 << 20
MAX_DEPTH = 32
MAX_NODES = 20_000


class UntrustedYAMLError(ValueError):
    """A refused or malformed document: ``message`` says why, ``line`` (1-based) where, if known."""

    def __init__(self, message: str, mark: yaml.Mark | None) -> None:
        self.message = message
        self.line = mark.line + 1 if mark is not None else None
        super().__init__(message if self.line is None else f"line {self.line}: {message}")


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that composes no nesting deeper than MAX_DEPTH (the composer recurses per level)."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise UntrustedYAMLError(f"nested more than {MAX_DEPTH} levels deep", self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def _check_expansion(root: yaml.Node) -> None:
    """Aliases make the composed tree a graph: refuses a cycle, more than MAX_NODES values once
    every alias is expanded, or nesting deeper than MAX_DEPTH through aliases. Linear in the
    number of distinct nodes (sizes and heights are memoized), so an alias bomb costs nothing."""
    size: dict[int, int] = {}
    height: dict[int, int] = {}
    on_path: set[int] = set()

    def visit(node: yaml.Node, depth: int) -> int:
        key = id(node)
        if key in on_path:
            raise UntrustedYAMLError("an alias refers to a value that contains it (a cycle)", node.start_mark)
        if key in size:
            if depth + height[key] > MAX_DEPTH:
                raise UntrustedYAMLError(f"nested more than {MAX_DEPTH} levels deep (through aliases)", node.start_mark)
            return size[key]
        if depth > MAX_DEPTH:
            raise UntrustedYAMLError(f"nested more than {MAX_DEPTH} levels deep (through aliases)", node.start_mark)
        if isinstance(node, yaml.SequenceNode):
            children = list(node.value)
        elif isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
        else:
            children = []
        on_path.add(key)
        total, tallest = 1, 0
        for child in children:
            total += visit(child, depth + 1)
            tallest = max(tallest, height[id(child)] + 1)
            if total > MAX_NODES:
                raise UntrustedYAMLError(
                    f"expands to more than {MAX_NODES} values (through aliases)",
                    node.start_mark,
                )
        on_path.discard(key)
        size[key], height[key] = total, tallest
        return total

    visit(root, 1)


def compose_untrusted(text: str) -> yaml.Node | None:
    """The composed node tree of ``text`` (None for an empty document), within the limits above.
    Raises :class:`UntrustedYAMLError` for anything refused or malformed."""
    if len(text) > MAX_DOCUMENT_BYTES:
        raise UntrustedYAMLError(f"document of {len(text)} characters; at most {MAX_DOCUMENT_BYTES} allowed", None)
    try:
        loader = _StrictLoader(text)
        try:
            root = loader.get_single_node()
        finally:
            loader.dispose()
        if root is not None:
            _check_expansion(root)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        raise UntrustedYAMLError(f"invalid YAML: {exc.problem or exc.context or 'invalid YAML'}", mark) from None
    except yaml.YAMLError as exc:
        raise UntrustedYAMLError(f"invalid YAML: {exc}", None) from None
    except RecursionError:
        raise UntrustedYAMLError("nested too deeply", None) from None
    return root


def load_untrusted(text: str) -> Any:
    """``yaml.safe_load`` of ``text`` within the limits above (aliases expanded, bounded)."""
    root = compose_untrusted(text)
    if root is None:
        return None
    try:
        return yaml.SafeLoader("").construct_document(root)
    except yaml.YAMLError as exc:
        raise UntrustedYAMLError(f"invalid YAML: {exc}", getattr(exc, "problem_mark", None)) from None


__all__ = ["MAX_DEPTH", "MAX_DOCUMENT_BYTES", "MAX_NODES", "UntrustedYAMLError", "compose_untrusted", "load_untrusted"]

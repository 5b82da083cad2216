"""What a template's own text says before it is rendered: its options, and whether its output
can be kept from one poll to the next.

Both are read once per version of a file (a version is its stamp: mtime, size, inode).
"""

from __future__ import annotations

from collections.abc import Mapping

import jinja2
from jinja2 import nodes

from ..apply_once import OptionsError, TemplateOptions, parse_options

# Context names whose value changes from poll to poll, and Jinja's random helpers.
_PER_POLL_NAMES = frozenset({"now", "request", "lipsum"})
_PER_POLL_FILTERS = frozenset({"random"})
_PARSER = jinja2.Environment(autoescape=False)

Stamp = tuple[int, int, int]
Facts = tuple[bool, tuple[str, ...]]   # (reads per-poll values?, templates it references)


def template_facts(source: str) -> Facts:
    """Whether one template's own text reads per-poll values, and the templates it references.

    A reference computed at render time (`{% include vars.x %}`) counts as reading per-poll
    values: which file it names cannot be known before. Unparsable text too: its render fails.
    """
    try:
        ast = _PARSER.parse(source)
    except Exception:  # a syntax error, or absurd nesting: the render will fail and say why
        return True, ()
    if any(node.name in _PER_POLL_NAMES for node in ast.find_all(nodes.Name)):
        return True, ()
    if any(node.name in _PER_POLL_FILTERS for node in ast.find_all(nodes.Filter)):
        return True, ()
    # a filter or test named by a string, as in map('random')
    if any(node.value in _PER_POLL_FILTERS for node in ast.find_all(nodes.Const) if isinstance(node.value, str)):
        return True, ()
    references: list[str] = []
    for node in ast.find_all((nodes.Extends, nodes.Include, nodes.Import, nodes.FromImport)):
        target = node.template
        names = target.items if isinstance(target, (nodes.List, nodes.Tuple)) else [target]
        for item in names:
            if not (isinstance(item, nodes.Const) and isinstance(item.value, str)):
                return True, ()
            references.append(item.value)
    return False, tuple(references)


def options_of(name: str, text: str) -> TemplateOptions | str:
    """The apply-once options of the template `name`, or the problem with them (file:line: why)."""
    try:
        return parse_options(text)
    except OptionsError as error:
        return f"{name}:{error.line}: {error.message}"


class Analyses:
    """The facts of every template version seen, kept while that version is on disk."""

    def __init__(self) -> None:
        self._facts: dict[tuple[str, Stamp], Facts] = {}
        self._options: dict[tuple[str, Stamp], TemplateOptions | str] = {}

    def options(self, name: str, stamp: Stamp, text: str) -> TemplateOptions | str:
        key = (name, stamp)
        found = self._options.get(key)
        if found is None:
            found = self._options[key] = options_of(name, text)
        return found

    def reads_per_poll(self, name: str, texts: Mapping[str, tuple[Stamp, str]]) -> bool:
        """Whether `name`, or any template it includes, imports or extends, reads what changes
        from poll to poll (`now`, `request`, randomness) or names a template only at render time.
        `texts` maps each template to its (stamp, text)."""
        seen: set[str] = set()
        pending = [name]
        while pending:
            current = pending.pop()
            if current in seen:
                continue
            seen.add(current)
            found = texts.get(current)
            if found is None:
                continue  # a missing include fails the render anyway
            key = (current, found[0])
            facts = self._facts.get(key)
            if facts is None:
                facts = self._facts[key] = template_facts(found[1])
            reads_per_poll, references = facts
            if reads_per_poll:
                return True
            pending.extend(references)
        return False

    def forget_except(self, current: Mapping[str, Stamp]) -> None:
        """Drop what was learned of versions no longer on disk."""
        self._facts = {k: v for k, v in self._facts.items() if current.get(k[0]) == k[1]}
        self._options = {k: v for k, v in self._options.items() if current.get(k[0]) == k[1]}

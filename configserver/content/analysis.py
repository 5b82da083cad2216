"""What a template's own text says before it is rendered: its options, and which files its
output depends on (or that it reads what changes from poll to poll).

Worked out lazily, the first time a device is given the template, and once per version of a
file: the result lives on that version (SourceFile) itself, so it is shared by every snapshot
that holds the version and goes with it. Start-up reads files; it parses no template.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING

import jinja2
from jinja2 import nodes

from ..apply_once import OptionsError, TemplateOptions, parse_options
from ..caches import BoundedCache

if TYPE_CHECKING:
    from .snapshot import SourceFile

# Context names whose value changes from poll to poll, and Jinja's random helpers.
_PER_POLL_NAMES = frozenset({"now", "request", "lipsum"})
_PER_POLL_FILTERS = frozenset({"random"})
_PARSER = jinja2.Environment(autoescape=False)
_NO_OPTIONS = TemplateOptions()

Facts = tuple[bool, tuple[str, ...]]   # (reads per-poll values?, templates it references)
# A fleet's templates say the same few things (100,000 device templates that include default.j2):
# equal facts are one tuple, kept by every version that has them
_ALIKE: BoundedCache[Facts, Facts] = BoundedCache(4096)
_PER_POLL: Facts = (True, ())


def template_facts(source: str) -> Facts:
    """Whether one template's own text reads per-poll values, and the templates it references.

    A reference computed at render time (`{% include vars.x %}`) counts as reading per-poll
    values: which file it names cannot be known before. Unparsable text too: its render fails.
    """
    try:
        ast = _PARSER.parse(source)
    except Exception:  # a syntax error, or absurd nesting: the render will fail and say why
        return _PER_POLL
    if any(node.name in _PER_POLL_NAMES for node in ast.find_all(nodes.Name)):
        return _PER_POLL
    if any(node.name in _PER_POLL_FILTERS for node in ast.find_all(nodes.Filter)):
        return _PER_POLL
    # a filter or test named by a string, as in map('random')
    if any(node.value in _PER_POLL_FILTERS for node in ast.find_all(nodes.Const) if isinstance(node.value, str)):
        return _PER_POLL
    references: list[str] = []
    for node in ast.find_all((nodes.Extends, nodes.Include, nodes.Import, nodes.FromImport)):
        target = node.template
        names = target.items if isinstance(target, (nodes.List, nodes.Tuple)) else [target]
        for item in names:
            if not (isinstance(item, nodes.Const) and isinstance(item.value, str)):
                return _PER_POLL
            references.append(sys.intern(item.value))
    found = (False, tuple(references))
    return _ALIKE.get(found) or _ALIKE.put(found, found)


def options_of(name: str, text: str) -> TemplateOptions | str:
    """The apply-once options of the template `name`, or the problem with them (file:line: why)."""
    try:
        return parse_options(text)
    except OptionsError as error:
        return f"{name}:{error.line}: {error.message}"


def facts(source: SourceFile) -> Facts:
    """`template_facts` of one version of a template file, worked out once."""
    found = source.facts
    if found is None:
        found = template_facts(source.text)
        object.__setattr__(source, "facts", found)   # a memo of the frozen version, not a change
    return found


def options(source: SourceFile) -> TemplateOptions | str:
    """`options_of` one version of a template file, worked out once."""
    found = source.options
    if found is None:
        found = options_of(source.name, source.text) if "configserver:" in source.text else _NO_OPTIONS
        object.__setattr__(source, "options", found)
    return found


def dependencies(name: str, templates: Mapping[str, SourceFile]) -> tuple[SourceFile, ...] | None:
    """The versions of `name` and of every template it includes, imports or extends, in the
    order met; None when one of them reads what changes from poll to poll (`now`, `request`,
    randomness) or names a template only at render time: its output may then not be kept.
    A missing include is left out: the render fails and says so."""
    seen: dict[str, SourceFile] = {}
    pending = [name]
    while pending:
        current = pending.pop()
        if current in seen:
            continue
        source = templates.get(current)
        if source is None:
            continue
        seen[current] = source
        reads_per_poll, references = facts(source)
        if reads_per_poll:
            return None
        pending.extend(reversed(references))
    return tuple(seen.values())

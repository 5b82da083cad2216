"""What a template's own text says before it is rendered: its options, and which files its
output depends on (or that it reads what changes from poll to poll).

Worked out from one reading of the text, the first time a device is given the template, and
once per version of a file: the result lives on that version (SourceFile) itself, so it is
shared by every snapshot that holds the version and goes with it. Start-up reads files; it
parses no template.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING, NamedTuple

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
_PER_POLL: Facts = (True, ())


class Learned(NamedTuple):
    """What one version of a template says: all that is kept of its text."""

    per_poll: bool                     # reads what changes from poll to poll
    references: tuple[str, ...]        # the templates it includes, imports or extends
    options: TemplateOptions | str     # its apply-once options, or the problem with them
    # why the text could not be read: then nothing is known of it (per_poll, no references,
    # no options are placeholders that nothing may rely on)
    unread: str | None = None


# A fleet's templates say the same few things (100,000 device templates that include default.j2):
# equal findings are one tuple, kept by every version that has them
_ALIKE: BoundedCache[Learned, Learned] = BoundedCache(4096)


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
    return False, tuple(references)


def options_of(name: str, text: str) -> TemplateOptions | str:
    """The apply-once options of the template `name`, or the problem with them (file:line: why)."""
    try:
        return parse_options(text)
    except OptionsError as error:
        return f"{name}:{error.line}: {error.message}"


def learn(name: str, text: str) -> Learned:
    """`template_facts` and `options_of` the text of the template `name`, from one reading."""
    per_poll, references = template_facts(text)
    options = options_of(name, text) if "configserver:" in text else _NO_OPTIONS
    found = Learned(per_poll, references, options)
    return _ALIKE.get(found) or _ALIKE.put(found, found)


def learned(source: SourceFile) -> Learned:
    """What one version of a template file says, worked out once. A version that cannot be
    read says nothing: `unread` is why, and nothing is learned from an empty text. A reading
    that failed only for now (permissions, no file descriptor left) is not kept: the next
    call reads again."""
    found = source.learned
    if found is None:
        text, problem = source.read()
        found = learn(source.name, text) if problem is None else Learned(True, (), _NO_OPTIONS, problem)
        if problem is None or source.problem is not None:   # not from a read that failed only for now
            object.__setattr__(source, "learned", found)   # a memo of the frozen version, not a change
    return found


def facts(source: SourceFile) -> Facts:
    """`template_facts` of one version of a template file."""
    found = learned(source)
    return found.per_poll, found.references


def options(source: SourceFile) -> TemplateOptions | str:
    """`options_of` one version of a template file."""
    return learned(source).options


class Dependencies(NamedTuple):
    """What the output of one template depends on (`dependencies`)."""

    # the versions of the template and of every one it includes, imports or extends, in the
    # order met; None when one of them reads what changes from poll to poll
    files: tuple[SourceFile, ...] | None
    # "<template>: <why>" for one of them that cannot be read: nothing is known of it
    unread: str | None = None


def dependencies(name: str, templates: Mapping[str, SourceFile]) -> Dependencies:
    """The versions of `name` and of every template it includes, imports or extends; files is
    None when one of them reads what changes from poll to poll (`now`, `request`, randomness)
    or names a template only at render time: its output may then not be kept. A file met that
    cannot be read is `unread`: what it says (its includes, its per-poll reads) is unknown. A
    missing include is left out: the render fails and says so. A file found changed on disk
    since it was listed is not `unread`: the next snapshot has it, and a render that reaches
    it raises ContentChanged (the poll waits for that snapshot); one that does not reach it
    does not depend on it, nor on what it includes."""
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
        found = learned(source)
        if found.unread is not None:
            if source.changed:
                continue
            return Dependencies(None, f"{current}: {found.unread}")
        if found.per_poll:
            return Dependencies(None)
        pending.extend(reversed(found.references))
    return Dependencies(tuple(seen.values()))

"""Template files: syntax, references to files that do not exist, options and markers, and
files placed where no device gets them."""

from __future__ import annotations

import re

import jinja2
from jinja2 import nodes

from ..apply_once import EVERY_POLL_MARKER, OptionsError, line_of, parse_options
from ..content import TEMPLATE_SUFFIX, SourceFile
from ._findings import Findings
from ._places import device_file, duplicate, model_file

_LOOKS_LIKE_MARKER = re.compile(r"\s*#\s*configserver\b", re.IGNORECASE)
_OPTIONS_COMMENT = re.compile(r"\{#-?\s*configserver:")


def check_templates(found: Findings) -> None:
    lookup_names = set(found.snapshot.lookup.values())
    for name, source in sorted(found.snapshot.templates.items()):
        file = found.template_file(name)
        if source.error:
            found.add(file, 1, source.error)
            continue
        _syntax(found, name, source)
        _markers(found, file, source.text)
        if name in lookup_names:
            try:
                parse_options(source.text)
            except OptionsError as error:
                found.add(file, error.line, error.message)
        elif match := _OPTIONS_COMMENT.search(source.text):
            found.add(file, line_of(source.text, match.start()), "options here are ignored: only the template "
                      "a device is given (devices/, models/, groups/, default.j2) has options")
        _placement(found, name)


def _syntax(found: Findings, name: str, source: SourceFile) -> None:
    environment = found.pipeline.renderer.environment
    path = str(found.store.templates_dir / name)
    try:
        tree = environment.parse(source.text, name, path)
        environment.compile(tree, name, path)
    except jinja2.TemplateSyntaxError as error:
        found.add(found.template_file(error.name or name), error.lineno, f"syntax error: {error.message}")
        return
    except RecursionError:
        found.add(found.template_file(name), 1, "nested too deeply to be compiled: split it with include or macros")
        return
    except Exception as error:  # whatever else compiling a file may raise: still the file's fault
        found.add(found.template_file(name), 1, f"cannot be compiled: {type(error).__name__}: {str(error)[:200]}")
        return
    for node in tree.find_all((nodes.Extends, nodes.Include, nodes.Import, nodes.FromImport)):
        target = node.template
        if getattr(node, "ignore_missing", False) or not isinstance(target, nodes.Const):
            continue
        if isinstance(target.value, str) and target.value not in found.snapshot.templates:
            found.add(found.template_file(name), node.lineno, f"template not found: {target.value}")


def _markers(found: Findings, file: str, text: str) -> None:
    seen = False
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip() == EVERY_POLL_MARKER:
            if seen:
                found.add(file, number, "a second every-poll marker: only the first one counts")
            seen = True
        elif _LOOKS_LIKE_MARKER.match(line):
            found.add(file, number, f"not the every-poll marker, which reads exactly {EVERY_POLL_MARKER!r}")


def _placement(found: Findings, name: str) -> None:
    """Files in devices/, models/ and groups/ that no device will ever get."""
    if not name.endswith(TEMPLATE_SUFFIX) or name.count("/") != 1:
        return
    folder, stem = name[: -len(TEMPLATE_SUFFIX)].split("/")
    file = found.template_file(name)
    lookup = found.snapshot.lookup
    if folder == "devices":
        device_file(found, file, stem, lookup, name, "template")
    elif folder == "models":
        model_file(found, file, stem, f"models/{stem}{TEMPLATE_SUFFIX}")
        duplicate(found, file, lookup.get(f"models/{stem.casefold()}"), name, "template")
    elif folder == "groups":
        if stem.casefold() not in {group.casefold() for group in found.snapshot.groups}:
            found.add(file, 1, f"no group {stem!r} in the groups table: no device gets this template")
        duplicate(found, file, lookup.get(f"groups/{stem.casefold()}"), name, "template")

"""Rendering a template of one snapshot into a script with CRLF line ends.

Templates are loaded from the snapshot the poll chose, never from a snapshot published
meanwhile, and a file is read only in the version that snapshot holds: a poll that races a
reload or an edit still renders one consistent view (or fails, until the edit is published).
Compiled templates are shared across snapshots while their file's version is unchanged, and
at most _COMPILED_KEPT of them are kept (caches.py's one policy): a per-device template is
compiled again when its device's answer has to be rendered again.
"""

from __future__ import annotations

import os
import re
import traceback
from collections.abc import Callable, Generator, Iterable, Mapping
from contextvars import ContextVar
from pathlib import Path
from typing import Any

import jinja2
from jinja2.filters import do_center, do_format, do_indent, make_attrgetter, sync_do_join
from jinja2.nodes import EvalContext
from jinja2.sandbox import SandboxedEnvironment, SandboxedFormatter, SecurityError

from ..caches import BoundedCache
from ..errors import ConfigserverError
from .snapshot import Snapshot

# What the arithmetic of a template may build. A render runs on the event loop: one that works
# for minutes, or fills gigabytes, stalls every device of the worker (and `configserver check`).
_MAX_EXPONENT = 1000     # x ** y with a larger y is refused: 2**10**9 would keep a worker busy for minutes
# an int of more bits from ** or * is refused: each bound per operator alone lets a chain through
# ((3**1000)**1000)**1000 runs for minutes with every exponent 1,000; 100,000 bits is 30,000 digits
_MAX_INT_BITS = 100_000
# 'x' * n, [..] * n, a + b, a width or precision in % or format(), center(), a join: at most
# this many characters or items
_MAX_REPEAT = 1_000_000
# a rendered script longer than this is refused as it is generated: twice the largest template
# file read (4 MB), and far above a device's whole configuration (uploads are bounded at 4 MB)
_MAX_SCRIPT = 8_000_000
# compiled templates kept: the ones many devices share stay (hits are promoted); a per-device
# one (about 8 KB) is compiled again when its device's answer is rendered again anyway
_COMPILED_KEPT = 128
_LINE_BREAK = re.compile(r"\r\n|\r|\n")
_NO_VARIABLE = re.compile(r"'mappingproxy object' has no attribute '([^']*)'")
_rendering: ContextVar[Snapshot | None] = ContextVar("configserver_rendering", default=None)


class ConfigurationError(ConfigserverError):
    """A device's configuration cannot be produced; the text names the file, line and cause."""

    def __init__(self, cause: str, file: str | None = None, line: int | None = None) -> None:
        where = f"{file}:{line}: " if file and line else (f"{file}: " if file else "")
        super().__init__(f"{where}{cause}")
        self.cause, self.file, self.line = cause, file, line


class ContentChanged(ConfigurationError):
    """A template this rendering needs changed on disk since its snapshot listed it, and that
    version was not read then or its text is no longer held: a later snapshot has the new one."""

    def __init__(self, template: str, cause: str) -> None:
        super().__init__(cause, template)
        self.template = template


class _Changed(jinja2.TemplateError):
    def __init__(self, template: str, cause: str) -> None:
        super().__init__(f"{template}: {cause}")
        self.template, self.cause = template, cause


class _SnapshotLoader(jinja2.BaseLoader):
    """Serves template sources from the snapshot being rendered: a file is read only in the
    version that snapshot holds (SourceFile.read), and no name that is not a file below the
    templates folder can ever be loaded."""

    def __init__(self, templates_dir: Path) -> None:
        self._root = f"{templates_dir}{os.sep}"

    def get_source(self, environment: jinja2.Environment, template: str) -> tuple[str, str, Callable[[], bool]]:
        snapshot = _rendering.get()
        source = snapshot.templates.get(template) if snapshot is not None else None
        if source is None:
            raise jinja2.TemplateNotFound(template)
        text, problem = source.read()   # the version the snapshot lists, or its error
        if source.changed:
            raise _Changed(template, problem or "")
        if problem:
            raise jinja2.TemplateError(f"{template}: {problem}")

        def uptodate() -> bool:
            current = _rendering.get()
            return current is not None and current.templates.get(template) is source

        # the file name for tracebacks, joined as a string: a Path would be parsed (and its
        # parts interned) once per compile
        return text, self._root + template, uptodate

    def list_templates(self) -> list[str]:
        snapshot = _rendering.get()
        return sorted(snapshot.templates) if snapshot is not None else []


class _Sandbox(SandboxedEnvironment):
    """Jinja's sandbox, a second wall behind the admins who write templates: no attribute that
    reaches Python's internals (`__class__`, `__globals__`...), no range() beyond 100,000, no
    exponent above 1,000 (`2**100000000`), no number above 100,000 bits from ** or * (`3**1000**1000`),
    no text or list above 1,000,000 characters or items from `*` or `+` (`'x' * 10**9`), no width
    or precision above 1,000,000 in `%`, format() and the format filter (`'%0200000000d' % 1`),
    in center/ljust/rjust/zfill and the center and indent filters, no join (filter or method)
    making more than 1,000,000 characters, and no script above 8,000,000 characters. Not bounded
    (README): `~`, and other filters and methods (replace, wordwrap, sum...), except through the
    script's length when what they make is output; nor the time loops take."""

    # intercepted operators are also never folded at compile time: `'x' * 1000000000` written
    # out is refused when rendered, not computed while compiling
    intercepted_binops = frozenset({"**", "*", "%", "+"})

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.filters.update(center=_center, indent=_indent, join=_join, format=_format)

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "**":
            _check_power(left, right)
        elif operator == "*":
            _check_product(left, right)
        elif operator == "%":
            if isinstance(left, str):
                _check_percent(left, right)
        elif isinstance(left, (str, list, tuple)) and isinstance(right, (str, list, tuple)):
            _check_size(len(left) + len(right), "a sum", left)
        return super().call_binop(context, operator, left, right)

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
        owner = getattr(__obj, "__self__", None)
        if isinstance(owner, str):   # a method of a text: those that make a larger one
            name = getattr(__obj, "__name__", "")
            if name in ("center", "ljust", "rjust", "zfill") and args:
                _check_width(args[0], f"a {name}() width")
            elif name == "join" and args:
                return owner.join(_joinable(args[0], owner, "join()"))
        return super().call(__context, __obj, *args, **kwargs)

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        wrapped = super().wrap_str_format(value)
        if wrapped is None:
            return None
        text, by_name = value.__self__, value.__name__ == "format_map"

        def bounded(*args: Any, **kwargs: Any) -> str:
            if by_name and len(args) == 1 and not kwargs:
                _WidthCheck(self).vformat(text, (), args[0])
            else:
                _WidthCheck(self).vformat(text, args, kwargs)   # each field's spec, nested ones resolved
            return wrapped(*args, **kwargs)

        return bounded


class _WidthCheck(SandboxedFormatter):
    """A dry run of str.format: every field's spec, resolved as format() would, is checked.
    Only what a nested spec may be made of (`{:{w}}`: a number, a short text) is formatted."""

    def convert_field(self, value: Any, conversion: str | None) -> Any:
        return value

    def format_field(self, value: Any, format_spec: str) -> str:
        for number in re.findall(r"\d+", format_spec):
            _check_width(int(number) if len(number) <= 9 else _MAX_REPEAT + 1, "a format() width or precision")
        if isinstance(value, int) or (isinstance(value, str) and len(value) <= 100):
            return format(value, format_spec)
        return ""


_PERCENT_SPEC = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(\*|\d*)(?:\.(\*|\d*))?[hlL]?(.?)", re.DOTALL)


def _check_percent(text: str, values: Any) -> None:
    """Raise SecurityError for a % format whose widths or precisions (`*` ones taken from
    `values`) would make a text too large."""
    args = values if isinstance(values, tuple) else (values,)
    taken = 0
    for width, precision, kind in _PERCENT_SPEC.findall(text):
        if kind == "%":
            continue
        for number in (width, precision):
            if number == "*":
                size = args[taken] if taken < len(args) else 0
                taken += 1
            else:
                size = int(number) if 0 < len(number) <= 9 else (_MAX_REPEAT + 1 if number else 0)
            _check_width(size, "a % width or precision")
        taken += 1


def _check_width(width: Any, what: str) -> None:
    if isinstance(width, int) and width > _MAX_REPEAT:
        raise SecurityError(f"{what} of {width:,} is too large (at most {_MAX_REPEAT:,}): use a smaller one")


def _check_size(size: int, what: str, sample: Any) -> None:
    if size > _MAX_REPEAT:
        kind, unit = _kind_of(sample)
        raise SecurityError(f"{what} would make a {kind} of {size:,} {unit} (at most {_MAX_REPEAT:,}): "
                            "make the parts smaller")


def _kind_of(sample: Any) -> tuple[str, str]:
    """What a sequence is called in an error, and what it is made of."""
    return ("text", "characters") if isinstance(sample, (str, bytes)) else ("list", "items")


def _joinable(items: Iterable[Any], separator: str, what: str) -> list[str]:
    """`items` as the texts a join of them with `separator` is made of; raises SecurityError
    once they would make more than _MAX_REPEAT characters."""
    texts: list[str] = []
    size = 0
    for item in items:
        text = item if isinstance(item, str) else str(item)
        size += len(text) + (len(separator) if texts else 0)
        if size > _MAX_REPEAT:
            raise SecurityError(f"{what} would make more than {_MAX_REPEAT:,} characters: join fewer or shorter items")
        texts.append(text)
    return texts


@jinja2.pass_eval_context
def _join(eval_ctx: EvalContext, value: Iterable[Any], d: str = "", attribute: str | int | None = None) -> str:
    if attribute is not None:
        value = map(make_attrgetter(eval_ctx.environment, attribute), value)
    return sync_do_join(eval_ctx, _joinable(value, str(d), "join"), d)


def _center(value: str, width: int = 80) -> str:
    _check_width(width, "a center width")
    return do_center(value, width)


def _indent(s: str, width: int | str = 4, first: bool = False, blank: bool = False) -> str:
    prefix = len(width) if isinstance(width, str) else width
    if isinstance(prefix, int):
        _check_width(prefix, "an indent width")
        _check_size(len(str(s)) + prefix * (str(s).count("\n") + 1), "indent", "")
    return do_indent(s, width, first, blank)


def _format(value: str, *args: Any, **kwargs: Any) -> str:
    _check_percent(str(value), kwargs or args)
    return do_format(value, *args, **kwargs)


def _check_power(base: Any, exponent: Any) -> None:
    """Raise SecurityError for a power too costly to compute."""
    if isinstance(exponent, (int, float)) and abs(exponent) > _MAX_EXPONENT:
        raise SecurityError(f"the exponent {exponent} is too large (at most {_MAX_EXPONENT})")
    if isinstance(base, int) and isinstance(exponent, int) and exponent > 0:
        bits = (abs(base).bit_length() - 1) * exponent + 1   # at least this many: 2**n has n + 1 bits
        if bits > _MAX_INT_BITS:
            raise SecurityError(f"the power would be a number of {bits:,} bits or more (at most {_MAX_INT_BITS:,}): "
                                "use smaller numbers; ** chains (a ** b ** c) multiply their exponents")


def _check_product(left: Any, right: Any) -> None:
    """Raise SecurityError for a product too large to build: a text or list repeated too often,
    or a number of too many bits."""
    for sequence, count in ((left, right), (right, left)):
        if isinstance(sequence, (str, bytes, list, tuple)) and isinstance(count, int):
            size = len(sequence) * count
            if size > _MAX_REPEAT:
                kind, unit = _kind_of(sequence)
                raise SecurityError(f"repeating a {kind} (length {len(sequence):,}) {count:,} times would make "
                                    f"{size:,} {unit} (at most {_MAX_REPEAT:,}): repeat it fewer times")
            return
    if isinstance(left, int) and isinstance(right, int):
        bits = left.bit_length() + right.bit_length() - 1   # at least this many
        if bits > _MAX_INT_BITS:
            raise SecurityError(f"the product would be a number of {bits:,} bits or more (at most {_MAX_INT_BITS:,}): "
                                "use smaller numbers")


class Renderer:
    """The Jinja environment of one templates folder."""

    def __init__(self, templates_dir: Path) -> None:
        self.templates_dir = Path(templates_dir).absolute()
        self.environment = _Sandbox(
            loader=_SnapshotLoader(self.templates_dir),
            undefined=jinja2.StrictUndefined,
            autoescape=False,
            keep_trailing_newline=True,
            auto_reload=True,
        )
        # Jinja reads its cache with get() and fills it with [key] = template; hits promoted, so
        # that default.j2 and the includes, used by every poll, stay among the device templates
        self.environment.cache = BoundedCache(_COMPILED_KEPT, promote_hits=True)  # type: ignore[assignment]

    def render(self, snapshot: Snapshot, template: str, context: Mapping[str, Any]) -> str:
        """Render `template` of `snapshot` with `context` into a complete script with CRLF line ends.

        Raises ConfigurationError naming the template file, line and cause of any failure
        (syntax error, undefined variable, missing include...). Never returns half a script.
        """
        token = _rendering.set(snapshot)
        try:
            text = _bounded(self.environment.get_template(template).generate(context))
        except jinja2.TemplateSyntaxError as exc:
            raise ConfigurationError(f"syntax error: {exc.message}", exc.name or template, exc.lineno) from None
        except _Changed as exc:
            raise ContentChanged(exc.template, exc.cause) from None
        except jinja2.TemplateNotFound as exc:
            file, line = self._where(exc, template)
            raise ConfigurationError(f"template not found: {exc.name}", file, line) from None
        except Exception as exc:  # anything a template raises: undefined variables, type errors, RecursionError...
            file, line = self._where(exc, template)
            if isinstance(exc, RecursionError):
                raise ConfigurationError("nested too deeply to be compiled: split it with include or macros",
                                         file, line) from None
            message = exc.message if isinstance(exc, jinja2.TemplateError) and exc.message else str(exc)
            # `vars` and its tables are read-only mappings: say so in the admin's words
            message = _NO_VARIABLE.sub(r"undefined variable '\1'", message)
            raise ConfigurationError(f"{type(exc).__name__}: {message}"[:500], file, line) from None
        finally:
            _rendering.reset(token)
        return to_crlf(text)

    def compile(self, snapshot: Snapshot, template: str) -> jinja2.Template:
        """The compiled template (for `check`). Raises jinja2.TemplateSyntaxError."""
        token = _rendering.set(snapshot)
        try:
            return self.environment.get_template(template)
        finally:
            _rendering.reset(token)

    def _where(self, exc: BaseException, template: str) -> tuple[str, int | None]:
        # the frames' own file names and lines: extract_tb would read each template file into
        # linecache (in its version on disk now, and held for good)
        root = str(self.templates_dir) + os.sep
        for frame, line in reversed(list(traceback.walk_tb(exc.__traceback__))):
            filename = frame.f_code.co_filename
            if filename.startswith(root):
                return filename[len(root):], line
        return template, None


def _bounded(pieces: Generator[str, None, None]) -> str:
    """The pieces of a script as they are generated, joined; past _MAX_SCRIPT characters the
    error is raised where the template made the piece that crossed it (so it names its line)."""
    made: list[str] = []
    size = 0
    for piece in pieces:
        made.append(piece)
        size += len(piece)
        if size > _MAX_SCRIPT:
            pieces.throw(SecurityError(f"the script would be longer than {_MAX_SCRIPT:,} characters: "
                                       "make it shorter (fewer or shorter loops and values)"))
    return "".join(made)


def to_crlf(text: str) -> str:
    """Every line ending in CRLF, whatever line endings the template file had."""
    lines = _LINE_BREAK.split(text)
    if lines and lines[-1] == "":
        lines.pop()
    return "\r\n".join(lines) + "\r\n" if lines else ""

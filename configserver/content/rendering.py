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
from collections.abc import Callable, Mapping
from contextvars import ContextVar
from pathlib import Path
from typing import Any

import jinja2
from jinja2.sandbox import SandboxedEnvironment, SecurityError

from ..caches import BoundedCache
from ..errors import ConfigserverError
from .snapshot import Snapshot

# What the arithmetic of a template may build. A render runs on the event loop: one that works
# for minutes, or fills gigabytes, stalls every device of the worker (and `configserver check`).
_MAX_EXPONENT = 1000     # x ** y with a larger y is refused: 2**10**9 would keep a worker busy for minutes
# an int of more bits from ** or * is refused: each bound per operator alone lets a chain through
# ((3**1000)**1000)**1000 runs for minutes with every exponent 1,000; 100,000 bits is 30,000 digits
_MAX_INT_BITS = 100_000
_MAX_REPEAT = 1_000_000  # 'x' * n, [..] * n: at most this many characters or items
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
    reaches Python's internals (`__class__`, `__globals__`...), no range() beyond 100,000, and
    no arithmetic that would keep a worker busy for minutes or take gigabytes: no exponent above
    1,000 (`2**100000000`), no number above 100,000 bits from ** or * (`3**1000**1000`), no
    text or list repeated to more than 1,000,000 characters or items (`'x' * 10**9`)."""

    # intercepted operators are also never folded at compile time: `'x' * 1000000000` written
    # out is refused when rendered, not computed while compiling
    intercepted_binops = frozenset({"**", "*"})

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "**":
            _check_power(left, right)
        else:
            _check_product(left, right)
        return super().call_binop(context, operator, left, right)


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
                kind, unit = ("text", "characters") if isinstance(sequence, (str, bytes)) else ("list", "items")
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
            text = self.environment.get_template(template).render(context)
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


def to_crlf(text: str) -> str:
    """Every line ending in CRLF, whatever line endings the template file had."""
    lines = _LINE_BREAK.split(text)
    if lines and lines[-1] == "":
        lines.pop()
    return "\r\n".join(lines) + "\r\n" if lines else ""

"""How the service logs: one JSON object per line, key/value fields, never a sentence to parse."""

from __future__ import annotations

import asyncio
import io
import logging
import logging.config
import os
import signal
import sys
import threading
import time
import types
from typing import Any, TextIO, cast

import orjson

FLUSH_SECONDS = 0.25
# Lines at this level and above are written out at once, not with the next batch.
FLUSHED_AT_ONCE = logging.WARNING


class JSONFormatter(logging.Formatter):
    """Formats `extra={"fields": {...}}` records (and plain messages) as one JSON line.

    Every poll writes one, so the line is built with orjson (a tenth of the standard library's
    json.dumps for a poll's fields) and the timestamp's seconds are formatted once per second.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._second: tuple[int, str] = (-1, "")  # one tuple: threads that log see a pair that belongs together

    def format(self, record: logging.LogRecord) -> str:
        fields = getattr(record, "fields", None)
        if not fields:
            fields = {"event": record.getMessage()}
        if record.exc_info:
            fields = {**fields, "exception": self.formatException(record.exc_info)}
        return self.line(record.name, record.levelname, record.created, record.msecs, fields)

    def line(self, logger_name: str, level_name: str, created: float, msecs: float, fields: dict[str, Any]) -> str:
        """The line of one record, from what the line shows of it: the one shape of every line,
        whether a LogRecord was made for it or not (`BatchingHandler.write_fields`)."""
        out: dict[str, Any] = {
            "ts": f"{self._timestamp(created)}.{int(msecs):03d}Z",
            "level": level_name.lower(),
            "logger": logger_name,
        }
        out.update(fields or _NO_EVENT)   # as a record of no fields: its message, the empty event
        try:
            return orjson.dumps(out, default=str).decode()
        except TypeError:  # what orjson refuses: an integer over 64 bits, a key that is not text
            return orjson.dumps(_storable(out), default=str).decode()

    def _timestamp(self, created: float) -> str:
        second = int(created)
        known, text = self._second
        if second != known:
            text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._second = (second, text)
        return text


_NO_EVENT = {"event": ""}


def _msecs(created: float) -> float:
    """The milliseconds of a time, as a LogRecord holds them."""
    return int((created - int(created)) * 1000) + 0.0


def _storable(value: Any) -> Any:
    """`value` with what orjson refuses written as text: keys that are not text, integers over
    64 bits; the same encoder then writes the line, so every other value keeps its form."""
    if isinstance(value, dict):
        return {key if isinstance(key, str) else str(key): _storable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_storable(item) for item in value]
    if isinstance(value, int) and not isinstance(value, bool) and not -(2**63) <= value < 2**64:
        return str(value)
    return value


class FieldsRecord(logging.LogRecord):
    """The record of one structured line (`fields`), built for the poll path.

    What `Logger.makeRecord` works out per call and is the same for every line of one logger and
    level (no caller's file and line: the line names its own event; the process's name) is
    copied from a template made once; the message (the event), the time, and the thread, task
    and process where logging is asked to name them are the line's own. Every attribute a
    formatter or filter may read is there, as in any LogRecord.
    """

    _templates: dict[tuple[str, int], dict[str, Any]] = {}

    def __init__(self, logger: logging.Logger, level: int, fields: dict[str, Any]) -> None:
        template = self._templates.get((logger.name, level))
        if template is None:
            model = logging.LogRecord(logger.name, level, "", 0, "", (), None)
            template = self._templates[(logger.name, level)] = {
                k: v for k, v in vars(model).items() if k not in _PER_LINE}
        self.__dict__.update(template)
        self.msg = fields.get("event", "")
        self.levelname = logging.getLevelName(level)   # as logging names it now (addLevelName)
        created = time.time()
        self.created = created
        self.msecs = _msecs(created)
        self.relativeCreated = (created - _STARTED) * 1000
        # off in the service (lean_records); a test's or a tool's own logging may want them
        self.thread = threading.get_ident() if logging.logThreads else None
        self.threadName = threading.current_thread().name if logging.logThreads else None
        self.process = os.getpid() if logging.logProcesses else None
        self.processName = _process_name() if logging.logMultiprocessing else None
        if _TASK_NAMES:
            self.taskName = _task_name() if getattr(logging, "logAsyncioTasks", False) else None
        self.fields = fields


def log_fields(logger: logging.Logger, level: int, fields: dict[str, Any]) -> None:
    """Log one structured line: what `logger.log(level, event, extra={"fields": fields})` does,
    for a fraction of its cost (no stack walk, no per-line lookups). A record factory of someone
    else's (`logging.setLogRecordFactory`) is honoured: the usual record is made then.

    A line below warning that the service's handler alone would see, through the standard
    library's own handling and no filter on the way, is written without a record: the handler
    makes it from the fields (`write_fields`), the very line the record would have given. A
    poll's line is the one logged most, and served, the record and its handling cost more than
    the line itself."""
    if not logger.isEnabledFor(level):
        return
    if logging.getLogRecordFactory() is not logging.LogRecord:
        logger.handle(logger.makeRecord(logger.name, level, "", 0, fields.get("event", ""), (), None,
                                        extra={"fields": fields}))
        return
    handler = _sole_handler(logger, level) if level < FLUSHED_AT_ONCE else None
    if handler is not None:
        handler.write_fields(logger, level, fields)
    else:
        logger.handle(FieldsRecord(logger, level, fields))


def _standard_handling() -> bool:
    """Whether a record would go through logging's own handling and this module's emit: when any
    step is replaced or wrapped (sentry-sdk replaces Logger.callHandlers, New Relic's agent wraps
    it), before or after this module is imported, every line goes the usual way. Each set of
    steps is judged once: the check then costs a comparison per line."""
    global _judged
    steps = (logging.Logger.handle, logging.Logger.callHandlers, BatchingHandler.handle, BatchingHandler.emit)
    if steps != _judged[0]:
        _judged = (steps, all(_defined_in(step, file) for step, file in zip(steps, _STEP_FILES, strict=True)))
    return _judged[1]


def _defined_in(step: Any, file: str) -> bool:
    """Whether `step` is a plain function of `file`'s (a wrapper, even one that copies the
    wrapped function's name and module, is not)."""
    return type(step) is types.FunctionType and step.__code__.co_filename == file


_STEP_FILES = (logging.__file__, logging.__file__, logging.__file__, __file__)
_judged: tuple[tuple[Any, ...], bool] = ((), False)   # the steps last judged, and the verdict


def _sole_handler(logger: logging.Logger, level: int) -> BatchingHandler | None:
    """The service's handler, with its JSON formatter, when it is the only handler a record of
    `logger` at `level` would reach, and neither logging's handling nor a filter on the way
    could drop or change the record; otherwise None."""
    if logger.filters or type(logger) is not logging.Logger or not _standard_handling():
        return None
    found: BatchingHandler | None = None
    current: logging.Logger | None = logger
    while current is not None:
        for handler in current.handlers:
            if level >= handler.level:
                if (found is not None or type(handler) is not BatchingHandler or handler.filters
                        or type(handler.formatter) is not JSONFormatter or "handle" in vars(handler)
                        or "emit" in vars(handler)):   # set on one handler, they replace the class's
                    return None
                found = handler
        current = current.parent if current.propagate else None
    return found


def lean_records() -> None:
    """The service's lines name no thread or process: its records need not look them up (a
    poll's line is the one logged most). Called by the service's handler, for its process."""
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    if hasattr(logging, "logAsyncioTasks"):   # Python 3.12 and later
        logging.logAsyncioTasks = False


def _process_name() -> str:
    multiprocessing = sys.modules.get("multiprocessing")
    return multiprocessing.current_process().name if multiprocessing is not None else "MainProcess"


def _task_name() -> str | None:
    try:
        task = asyncio.current_task()
    except RuntimeError:   # no event loop running in this thread
        return None
    return task.get_name() if task is not None else None


# as logging counts relativeCreated: from its own import
_STARTED = getattr(logging, "_startTime", time.time())
_PER_LINE = ("msg", "levelname", "created", "msecs", "relativeCreated", "thread", "threadName", "process", "processName",
             "taskName")
_TASK_NAMES = sys.version_info >= (3, 12)   # records name their asyncio task from Python 3.12 on


class BatchingHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes lines into a buffer that is flushed every FLUSH_SECONDS, and at once for warnings
    and errors: one write(2) per batch of polls instead of one per poll line.

    Not the standard library's QueueHandler and QueueListener: QueueHandler.prepare() formats
    the record on the poll path all the same, adds a copy and a queue hop per line, and the
    listener's StreamHandler flushes after every record, which is the write(2) per poll this
    handler exists to save.
    """

    def __init__(self, stream: TextIO) -> None:
        super().__init__(stream)
        self._stop = threading.Event()
        threading.Thread(target=self._flush_now_and_then, name="log-flush", daemon=True).start()

    def emit(self, record: logging.LogRecord) -> None:
        try:  # Handler.handle holds the handler's lock around emit: the flush thread waits for it
            self.stream.write(self.format(record) + "\n")
            if record.levelno >= FLUSHED_AT_ONCE:
                self.stream.flush()
        except Exception:
            self.handleError(record)

    def write_fields(self, logger: logging.Logger, level: int, fields: dict[str, Any]) -> None:
        """Write the line a record of `fields` would give, without the record (`log_fields`, for
        a line below warning that this handler alone would get; it leaves with the batch). A
        failure is reported as `emit` reports it, with the record the line would have had."""
        formatter = cast(JSONFormatter, self.formatter)   # _sole_handler saw to it
        created = time.time()
        try:
            line = formatter.line(logger.name, logging.getLevelName(level), created, _msecs(created), fields)
            with self.lock:   # as Handler.handle holds it around emit
                self.stream.write(line + "\n")
        except Exception:
            self.handleError(FieldsRecord(logger, level, fields))

    def flush(self) -> None:
        try:
            super().flush()
        except (ValueError, OSError):  # the stream is gone (closed by its owner): nothing to keep
            pass

    def _flush_now_and_then(self) -> None:
        while not self._stop.wait(FLUSH_SECONDS):
            self.flush()

    def close(self) -> None:
        self._stop.set()
        self.flush()
        super().close()


def _buffered_stderr() -> TextIO:
    """stderr without line buffering (Python flushes it at every newline), on the same file."""
    try:
        fileno = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation: stderr is captured
        return sys.stderr
    raw = open(fileno, "wb", buffering=1 << 16, closefd=False)
    return io.TextIOWrapper(raw, encoding="utf-8", errors="backslashreplace", line_buffering=False)


def _flush_then_die(signum: int, frame: object) -> None:
    # uvicorn shuts down on SIGTERM, then restores the handler it found and raises the signal
    # again: the process ends by the signal and atexit never runs. Write out the last lines first.
    for handler in logging.getLogger().handlers:
        handler.flush()
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def stderr_handler() -> logging.Handler:
    """The handler of every process (uvicorn builds it in each worker from `logging_config`).

    Built before uvicorn takes over the signals, so that SIGTERM, which uvicorn raises again
    once it has shut down, reaches `_flush_then_die` instead of killing the process unflushed.
    """
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _flush_then_die)
    return lines_to(_buffered_stderr())


def lines_to(stream: TextIO) -> BatchingHandler:
    """The service's handler on `stream`: JSON lines, written in batches (lean records too)."""
    lean_records()
    handler = BatchingHandler(stream)
    handler.setFormatter(JSONFormatter())
    return handler


def logging_config(level: str = "info") -> dict[str, Any]:
    """The `logging.config.dictConfig` of the service, also handed to uvicorn as `log_config`:
    every logger (ours and uvicorn's) as JSON lines to stderr; no access log, since one
    structured line per poll replaces it."""
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": "configserver.logs.JSONFormatter"}},
        "handlers": {"stderr": {"()": "configserver.logs.stderr_handler", "formatter": "json"}},
        "root": {"level": level.upper(), "handlers": ["stderr"]},
        "loggers": {
            "uvicorn": {"handlers": [], "propagate": True},
            "uvicorn.error": {"handlers": [], "propagate": True},
            "uvicorn.access": {"handlers": [], "propagate": False},
        },
    }


def configure_logging(level: str = "info") -> None:
    """Send every logger as JSON lines to stderr, written in batches. Idempotent."""
    root = logging.getLogger()
    if any(isinstance(handler, BatchingHandler) for handler in root.handlers):
        root.setLevel(level.upper())
        return
    logging.config.dictConfig(logging_config(level))

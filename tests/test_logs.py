"""One JSON line per event, written in batches, and nothing lost when the service is stopped."""

import asyncio
import datetime
import functools
import io
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import types
import urllib.request
from pathlib import Path

import pytest
from ports import free_port

from configserver import logs
from configserver.logs import FLUSH_SECONDS, BatchingHandler, JSONFormatter, log_fields


def handler_on(stream):
    handler = BatchingHandler(stream)
    handler.setFormatter(JSONFormatter())
    return handler


def record(level, fields):
    return logging.makeLogRecord({
        "name": "configserver.poll", "levelno": level, "levelname": logging.getLevelName(level),
        "msg": "poll", "fields": fields,
    })


class Counting(io.StringIO):
    flushes = 0

    def flush(self):
        self.flushes += 1


def test_lines_are_json_and_written_in_batches():
    stream = Counting()
    handler = handler_on(stream)
    for n in range(50):
        handler.handle(record(logging.INFO, {"event": "poll", "n": n}))
    assert stream.flushes == 0  # fifty polls, no write of their own
    time.sleep(FLUSH_SECONDS * 3)
    assert stream.flushes >= 1
    lines = stream.getvalue().splitlines()
    assert [json.loads(line)["n"] for line in lines] == list(range(50))
    handler.close()


def test_a_line_holds_every_field_and_the_time_to_the_millisecond():
    formatter = JSONFormatter()
    when = datetime.datetime(2026, 11, 29, 17, 3, 1, tzinfo=datetime.timezone.utc)
    earlier = record(logging.INFO, {"event": "poll", "hwid": "IP232-30-00-af", "duration_ms": 0.125,
                                    "detail": "\u00e9t\u00e9 \"quoted\"\n", "path": Path("/init"), "at": when})
    earlier.created, earlier.msecs = 1796000000.5, 500.0
    later = record(logging.INFO, {"event": "poll", "big": 2**70, 3: "key that is not text", "at": when,
                                  "nested": {"small": 2**40, 4: [2**65]}})
    later.created, later.msecs = 1796000061.007, 7.0
    first, second = json.loads(formatter.format(earlier)), json.loads(formatter.format(later))
    assert first == {"ts": "2026-11-30T00:53:20.500Z", "level": "info", "logger": "configserver.poll", "event": "poll",
                     "hwid": "IP232-30-00-af", "duration_ms": 0.125, "detail": "\u00e9t\u00e9 \"quoted\"\n",
                     "path": "/init", "at": "2026-11-29T17:03:01+00:00"}   # what JSON has no form for: as text
    assert second["ts"] == "2026-11-30T00:54:21.007Z"   # the next minute: not the second kept from the line before
    # what the fast encoder refuses is written as text, and everything else in that line as always
    assert second["big"] == str(2**70) and second["3"] == "key that is not text" and second["at"] == first["at"]
    assert second["nested"] == {"small": 2**40, "4": [str(2**65)]}
    earlier.msecs = 999.0
    assert json.loads(formatter.format(earlier))["ts"] == "2026-11-30T00:53:20.999Z"


def test_warnings_and_errors_are_written_at_once():
    stream = Counting()
    handler = handler_on(stream)
    handler.handle(record(logging.ERROR, {"event": "poll", "status": 500}))
    assert stream.flushes == 1
    handler.close()


def test_sigterm_writes_out_every_line_before_the_service_ends(tmp_path):
    (tmp_path / "templates").mkdir()
    (tmp_path / "templates/default.j2").write_text("ok\n")
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "configserver", "serve", "--port", str(port)],
        cwd=tmp_path, stderr=subprocess.PIPE, env={**os.environ, "CONFIGSERVER_GRACE_SECONDS": "0"},
    )
    try:
        deadline = time.time() + 20
        while True:
            try:
                request = urllib.request.Request(f"http://127.0.0.1:{port}/init", headers={
                    "X-SSL-Client-Verify": "SUCCESS",
                    "X-SSL-Client-S-DN": "CN=IP232-30-00-af,O=innovaphone,C=DE",
                    "X-SSL-Client-I-DN": "OU=innovaphone Device Certification Authority,O=innovaphone,C=DE",
                })
                urllib.request.urlopen(request, timeout=2).read()
                break
            except OSError:
                if time.time() > deadline:
                    raise
                time.sleep(0.1)
        server.send_signal(signal.SIGTERM)  # at once: the poll's line is still in the buffer
        _, err = server.communicate(timeout=20)
    finally:
        server.kill()
    events = [json.loads(line) for line in err.decode().splitlines() if line.startswith("{")]
    polls = [e for e in events if e.get("event") == "poll"]
    assert len(polls) == 1 and polls[0]["hwid"] == "IP232-30-00-af" and polls[0]["status"] == 200
    assert any(e.get("event", "").startswith("Finished server process") for e in events)
    assert server.returncode == -signal.SIGTERM


def test_a_structured_line_is_the_record_logger_log_makes_without_the_caller(caplog, monkeypatch):
    logger = logging.getLogger("configserver.poll")
    for flag in ("logThreads", "logProcesses", "logMultiprocessing"):   # as logging has them unless told
        monkeypatch.setattr(logging, flag, True)

    async def in_a_task():
        log_fields(logger, logging.INFO, {"event": "upload", "status": 200})
        log_fields(logger, logging.INFO, {"event": "poll", "status": 200})
        logger.info("poll", extra={"fields": {"event": "poll", "status": 200}})

    with caplog.at_level(logging.INFO, logger="configserver.poll"):
        asyncio.run(in_a_task())
        elsewhere = threading.Thread(target=log_fields, name="elsewhere",
                                     args=(logger, logging.INFO, {"event": "poll", "status": 304}))
        elsewhere.start()
        elsewhere.join()
        log_fields(logger, logging.DEBUG, {"event": "poll", "status": 200})   # below the level: nothing
    upload, fast, usual, other = caplog.records
    per_call = {"created", "msecs", "relativeCreated", "pathname", "filename", "module", "lineno", "funcName"}
    assert set(vars(fast)) == set(vars(usual))
    assert {k: v for k, v in vars(fast).items() if k not in per_call} == {
        k: v for k, v in vars(usual).items() if k not in per_call}
    assert abs(fast.created - usual.created) < 1 and abs(fast.relativeCreated - usual.relativeCreated) < 1000
    assert upload.getMessage() == "upload" and fast.getMessage() == "poll"   # each line its own event
    assert other.threadName == "elsewhere" and fast.threadName == threading.current_thread().name
    assert json.loads(JSONFormatter().format(fast))["status"] == 200


def test_a_record_factory_of_someone_else_is_honoured(caplog):
    made = []

    def factory(*args, **kwargs):
        made.append(args[0])
        record = logging.LogRecord(*args, **kwargs)
        record.trace_id = "4bf92f35"
        return record

    logging.setLogRecordFactory(factory)
    try:
        with caplog.at_level(logging.INFO, logger="configserver.poll"):
            log_fields(logging.getLogger("configserver.poll"), logging.INFO, {"event": "poll", "status": 200})
    finally:
        logging.setLogRecordFactory(logging.LogRecord)
    [line] = caplog.records
    assert made == ["configserver.poll"] and line.trace_id == "4bf92f35" and line.fields["status"] == 200


def _alone_on(name, stream, level=logging.INFO):
    """A logger whose lines reach `handler_on(stream)` and nothing else (pytest's own handlers sit
    on the root logger, which this one does not propagate to)."""
    logger = logging.getLogger(name)
    logger.propagate = False
    logger.setLevel(level)
    handler = handler_on(stream)
    logger.handlers[:] = [handler]
    return logger, handler


@pytest.fixture
def records_made(monkeypatch):
    """The fields of every record log_fields makes: none when the handler writes the line itself."""
    made = []

    class Counted(logs.FieldsRecord):
        def __init__(self, logger, level, fields):
            made.append(fields.get("event"))
            super().__init__(logger, level, fields)

    monkeypatch.setattr(logs, "FieldsRecord", Counted)
    return made


def at(monkeypatch, created):
    """The logs module's clock stopped at `created` (for it alone: other threads keep theirs)."""
    monkeypatch.setattr(logs, "time", types.SimpleNamespace(time=lambda: created, strftime=time.strftime,
                                                            gmtime=time.gmtime))


def test_a_line_for_the_service_handler_alone_is_the_line_its_record_would_give(monkeypatch, records_made):
    stream = io.StringIO()
    parent, handler = _alone_on("configserver_alone", stream, logging.DEBUG)
    logger = logging.getLogger("configserver_alone.poll")   # propagates to the handler's logger
    at(monkeypatch, 1796000000.9996)
    fields = {"event": "poll", "hwid": "IP232-30-00-af", "status": 200, "big": 2**70, "where": Path("/init"),
              "detail": "\u00e9t\u00e9 \"quoted\"\n"}
    try:
        log_fields(logger, logging.INFO, fields)
        log_fields(logger, logging.DEBUG, {"event": "debug"})
        log_fields(logger, logging.INFO, {})
        parent.setLevel(logging.INFO)
        log_fields(logger, logging.DEBUG, {"event": "below the level"})
    finally:
        handler.close()
    assert records_made == []   # no record was made: the handler wrote each line itself
    first, debug, empty = stream.getvalue().splitlines()
    usual = logging.makeLogRecord({"name": logger.name, "levelno": logging.INFO, "levelname": "INFO",
                                   "msg": "poll", "fields": fields, "created": 1796000000.9996, "msecs": 999.0})
    assert first == handler.format(usual)
    assert json.loads(first) == {
        "ts": "2026-11-30T00:53:20.999Z", "level": "info", "logger": "configserver_alone.poll", "event": "poll",
        "hwid": "IP232-30-00-af", "status": 200, "big": str(2**70), "where": "/init", "detail": "\u00e9t\u00e9 \"quoted\"\n"}
    assert json.loads(debug)["level"] == "debug" and json.loads(debug)["event"] == "debug"
    no_fields = logging.makeLogRecord({"name": logger.name, "levelno": logging.INFO, "levelname": "INFO", "msg": "",
                                       "fields": {}, "created": 1796000000.9996, "msecs": 999.0})
    assert empty == handler.format(no_fields) and json.loads(empty)["event"] == ""


def test_a_line_goes_the_usual_way_whenever_something_else_could_see_its_record(monkeypatch, records_made):
    stream = io.StringIO()
    logger, handler = _alone_on("configserver.test_others", stream)
    seen = []

    class Seeing(logging.Handler):
        def emit(self, record):
            seen.append(record.fields["event"])

    class Derived(BatchingHandler):   # the service's handler in name only: its own emit
        def emit(self, record):
            seen.append(record.fields["event"])

    def one_line(event):
        log_fields(logger, logging.INFO, {"event": event})
        return records_made[-1] if records_made else None

    try:
        second = Seeing()
        logger.addHandler(second)
        assert one_line("another handler") == "another handler" and seen[-1] == "another handler"
        logger.removeHandler(second)
        elsewhere = io.StringIO()
        twin = handler_on(elsewhere)
        logger.addHandler(twin)
        assert one_line("two of the service's") == "two of the service's"
        logger.removeHandler(twin)
        twin.close()
        assert json.loads(elsewhere.getvalue())["event"] == "two of the service's"

        derived = Derived(io.StringIO())
        derived.setFormatter(JSONFormatter())
        logger.handlers[:] = [derived]
        assert one_line("derived handler") == "derived handler" and seen[-1] == "derived handler"
        derived.close()
        logger.handlers[:] = [handler]

        dropping = logging.Filter("elsewhere")   # drops every record of this logger
        logger.addFilter(dropping)
        assert one_line("logger filter") == "logger filter"
        logger.removeFilter(dropping)
        handler.addFilter(dropping)
        assert one_line("handler filter") == "handler filter"
        handler.removeFilter(dropping)

        handler.setFormatter(logging.Formatter("%(message)s"))
        assert one_line("other formatter") == "other formatter"
        handler.setFormatter(JSONFormatter())

        handler.setLevel(logging.WARNING)   # the service's handler does not want the line: nothing
        assert one_line("above the line") == "above the line"
        handler.setLevel(logging.NOTSET)

        log_fields(logger, logging.WARNING, {"event": "a warning"})   # flushed at once, by the usual emit
        assert records_made[-1] == "a warning"

        with monkeypatch.context() as patched:   # what sentry-sdk does to see every record
            usual = logging.Logger.callHandlers
            patched.setattr(logging.Logger, "callHandlers", lambda self, record: (seen.append("called"), usual(self, record)))
            assert one_line("handling replaced") == "handling replaced" and seen[-1] == "called"

        with monkeypatch.context() as patched:   # what New Relic's agent does: a wrapper that looks like the original
            usual = logging.Logger.callHandlers

            @functools.wraps(usual)
            def wrapped(self, record):
                seen.append("wrapped")
                return usual(self, record)

            patched.setattr(logging.Logger, "callHandlers", wrapped)
            assert one_line("handling wrapped") == "handling wrapped" and seen[-1] == "wrapped"

        with monkeypatch.context() as patched:
            usual_emit = BatchingHandler.emit
            patched.setattr(BatchingHandler, "emit", lambda self, record: (seen.append("emit"), usual_emit(self, record)))
            assert one_line("emit replaced") == "emit replaced" and seen[-1] == "emit"
        with monkeypatch.context() as patched:
            patched.setattr(handler, "emit", lambda record: (seen.append("own emit"), usual_emit(handler, record)))
            assert one_line("emit of one handler") == "emit of one handler" and seen[-1] == "own emit"

        class Special(logging.Logger):
            pass

        special = Special("configserver.test_special")
        special.propagate = False
        special.addHandler(handler)
        log_fields(special, logging.INFO, {"event": "a logger of another class"})
        assert records_made[-1] == "a logger of another class"

        records_made.clear()
        assert one_line("alone") is None   # and with nothing else about, no record at all
    finally:
        handler.close()
    # the filters and the level dropped theirs; the rest were written once each, by the formatter of the moment
    lines = stream.getvalue().splitlines()
    assert lines.pop(2) == "other formatter"
    assert [json.loads(line)["event"] for line in lines] == [
        "another handler", "two of the service's", "a warning", "handling replaced", "handling wrapped", "emit replaced",
        "emit of one handler", "a logger of another class", "alone"]


def test_a_level_renamed_is_named_alike_both_ways(monkeypatch, records_made):
    stream = io.StringIO()
    logger, handler = _alone_on("configserver.test_renamed", stream)
    log_fields(logger, logging.INFO, {"event": "before"})
    log_fields(logger, logging.WARNING, {"event": "before"})   # a record: its level's name is kept by FieldsRecord
    monkeypatch.setitem(logging._levelToName, logging.INFO, "NOTE")
    monkeypatch.setitem(logging._levelToName, logging.WARNING, "HEED")
    log_fields(logger, logging.INFO, {"event": "after"})
    log_fields(logger, logging.WARNING, {"event": "after"})
    handler.close()
    assert [json.loads(line)["level"] for line in stream.getvalue().splitlines()] == ["info", "warning", "note", "heed"]
    assert records_made == ["before", "after"]   # the warnings; the info lines were written directly


def test_the_usual_factory_is_made_for_every_line_when_another_is_set():
    stream = io.StringIO()
    logger, handler = _alone_on("configserver.test_factory", stream)
    made = []
    logging.setLogRecordFactory(lambda *args, **kwargs: made.append(args[0]) or logging.LogRecord(*args, **kwargs))
    try:
        log_fields(logger, logging.INFO, {"event": "poll"})
    finally:
        logging.setLogRecordFactory(logging.LogRecord)
        handler.close()
    assert made == ["configserver.test_factory"] and json.loads(stream.getvalue())["event"] == "poll"


class FailingOnce(io.StringIO):
    failures = 1

    def write(self, text):
        if self.failures:
            self.failures -= 1
            raise OSError(11, "Resource temporarily unavailable")
        return super().write(text)


def test_a_failing_write_is_reported_once_and_the_line_is_not_written_again(capsys, records_made):
    stream = FailingOnce()
    logger, handler = _alone_on("configserver.test_failing", stream)
    log_fields(logger, logging.INFO, {"event": "lost"})   # never raises into the poll
    log_fields(logger, logging.INFO, {"event": "next"})
    handler.close()
    assert capsys.readouterr().err.count("--- Logging error ---") == 1
    assert [json.loads(line)["event"] for line in stream.getvalue().splitlines()] == ["next"]
    assert records_made == ["lost"]   # made only to report the failure, as emit reports one

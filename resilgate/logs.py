"""Structured JSON logs on stdout, one line per event. Never bodies or patient identifiers."""

from __future__ import annotations

import logging
import sys
from datetime import UTC, datetime
from typing import Any, BinaryIO

import orjson
import structlog


class _NoRequestDetails(logging.Filter):
    """aiohttp's own errors quote the request line (a FHIR search names the patient):
    keep the event and the exception class, drop the text and the traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[0] is not None:
            record.msg = f"{record.msg.split('%', 1)[0].strip()} ({record.exc_info[0].__name__})"
            record.args = None
            record.exc_info = None
            record.exc_text = None
        return True


class LogStream:
    """stdout for log lines, flushed by ``flush_now`` rather than after every line.

    A worker flushes every ``FLUSH_INTERVAL_S`` and when it stops, which takes a write
    syscall per request off the hot path; a line waits at most that long to appear.
    """

    FLUSH_INTERVAL_S = 0.2

    def __init__(self, stream: BinaryIO) -> None:
        self._stream = stream
        self.deferred = False
        self.info = True  # info events are written (configure_logging's level allows them)

    def write(self, data: bytes) -> int:
        return self._stream.write(data)

    def flush(self) -> None:
        if not self.deferred:
            self._stream.flush()

    def flush_now(self) -> None:
        self._stream.flush()


LOG_STREAM = LogStream(sys.stdout.buffer)


def configure_logging(level: int = logging.INFO) -> None:
    shared: list[structlog.typing.Processor] = [
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            *shared,
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(serializer=orjson.dumps),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.BytesLoggerFactory(LOG_STREAM),  # type: ignore[arg-type]
        cache_logger_on_first_use=True,
    )
    # Libraries log through the standard library: same JSON lines, same stream.
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[structlog.stdlib.add_logger_name, *shared],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.JSONRenderer(),
            ],
        )
    )
    handler.addFilter(_NoRequestDetails())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    LOG_STREAM.info = level <= logging.INFO


def info_line(component: str, event: str, **fields: Any) -> None:
    """``get_logger(component).info(event, **fields)``'s JSON line, written without structlog's
    processor chain: for the line every request writes, where the chain costs more than the
    rest of the line (benchmarks/profile.py)."""
    if not LOG_STREAM.info:
        return
    stamp = datetime.now(UTC).isoformat().replace("+00:00", "Z")
    line = {"component": component, **fields, "event": event, "level": "info", "timestamp": stamp}
    LOG_STREAM.write(orjson.dumps(line, option=orjson.OPT_APPEND_NEWLINE))
    LOG_STREAM.flush()


def get_logger(name: str) -> structlog.typing.FilteringBoundLogger:
    logger: structlog.typing.FilteringBoundLogger = structlog.get_logger(component=name)
    return logger

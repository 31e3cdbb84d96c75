"""Log set-up of `hypersd serve` and `hypersd worker`: text lines, or one JSON object per line.

`HYPERSD_LOG_FORMAT=json` gives log collectors (Loki, Cloud Logging, ELK) records they parse
without a regex: `timestamp` (UTC, ISO 8601), `level`, `logger`, `message`, `request_id` (the
`X-Request-Id` of the request being served, set by `service.request_id`; null outside one) and
`exception` when there is one. Nothing logs request headers, so API keys never reach a log.
"""

from __future__ import annotations

import json
import logging
from contextvars import ContextVar
from datetime import UTC, datetime

# The request being served, for its log records: set by the gateway's `RequestId` middleware.
REQUEST_ID: ContextVar[str | None] = ContextVar("request_id", default=None)

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object per record (a line: JSON strings escape newlines)."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "timestamp": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": REQUEST_ID.get(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def configure(log_format: str, level: int = logging.WARNING) -> None:
    """Send the root logger's records to stderr as text lines or JSON objects.

    Args:
        log_format: "text" or "json" (`Settings.log_format`).
        level: The root logger's level.

    Raises:
        ValueError: another format.
    """
    if log_format not in ("text", "json"):
        raise ValueError(f"log format {log_format!r} is not known; allowed: text, json")
    handler = logging.StreamHandler()
    json_lines = log_format == "json"
    handler.setFormatter(JsonFormatter() if json_lines else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)

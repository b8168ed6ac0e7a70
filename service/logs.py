"""Logging for `convirt serve`: uvicorn's, with query strings left out of the access log.

A GET query string can hold what a radiologist typed (/v1/explain?text=...), and the application
log is read by more people than the audit log: at info level it carries no query or report text.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

from uvicorn.config import LOGGING_CONFIG


class DropQueryString(logging.Filter):
    """Cuts the query string off the path of uvicorn's access-log records."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) >= 3 and isinstance(args[2], str):
            path, question, _ = args[2].partition("?")
            if question:
                record.args = (*args[:2], path + "?…", *args[3:])
        return True


def log_config() -> dict[str, Any]:
    """uvicorn's logging configuration, the access handler filtered by DropQueryString."""
    config = copy.deepcopy(LOGGING_CONFIG)
    config.setdefault("filters", {})["drop_query_string"] = {"()": f"{__name__}.DropQueryString"}
    config["handlers"]["access"].setdefault("filters", []).append("drop_query_string")
    return config

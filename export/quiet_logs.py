"""Loggers silenced below a level for a block: libraries whose INFO or WARNING lines bury an export's own log."""
from __future__ import annotations

import contextlib
import logging


@contextlib.contextmanager
def quiet_logs(*names: str, level: int = logging.ERROR):
    """Within the block, the named loggers pass only records of ``level`` or above (a logger already stricter stays
    so); their levels come back afterwards."""
    saved = [(log, log.level) for log in map(logging.getLogger, names)]
    for log, old in saved:
        log.setLevel(max(old, level))
    try:
        yield
    finally:
        for log, old in saved:
            log.setLevel(old)

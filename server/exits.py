"""The ``medfed`` command's exit codes, and the one line that goes with a failure.

0 success, 1 a run failed (one line says why; for a sweep: a cell failed), 2 invalid input (scenario, option
or file), 130 interrupted. Shared by :mod:`server.cli` and the commands it delegates to
(:mod:`server.scenario_commands`).
"""

from __future__ import annotations

import sys

EXIT_OK, EXIT_RUN_FAILED, EXIT_INVALID, EXIT_INTERRUPTED = 0, 1, 2, 130


def fail(message: str, code: int) -> int:
    """Print ``medfed: error: <message>`` on stderr; return ``code``."""
    print(f"medfed: error: {message}", file=sys.stderr)
    return code

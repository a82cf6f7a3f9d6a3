"""User-facing errors: one clear line, a non-zero exit, no traceback."""

from __future__ import annotations

import sys
from collections.abc import Callable

from tunepipe.progress import quiet_libraries


class UserError(Exception):
    """A mistake the user can fix (bad params, bad input file). Printed as one line, exit code 2."""


def run_main(main: Callable[[], object]) -> None:
    """Run a stage or CLI entry point, turning UserError into `error: ...` on stderr and exit 2."""
    quiet_libraries()
    try:
        main()
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)

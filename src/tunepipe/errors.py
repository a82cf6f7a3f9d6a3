"""User-facing errors: one clear line, a non-zero exit, no traceback."""

from __future__ import annotations

import re
import signal
import sys
from collections.abc import Callable

from tunepipe.progress import quiet_libraries

# scheme://user:PASSWORD@host -> scheme://user:***@host (SQLAlchemy's hide_password spelling), anywhere in a text;
# up to the last @ of the word, so an unencoded @ in a password does not leave its tail shown.
_URL_PASSWORD = re.compile(r"(\b[A-Za-z][A-Za-z0-9+.-]*://[^/\s:@]*:)[^\s\"']+@")
# ...?password=PASSWORD (libpq and SQLAlchemy accept the password as a query parameter too)
_QUERY_PASSWORD = re.compile(r"([?&;](?:password|passwd|pwd)=)[^&;#\s\"']+", re.IGNORECASE)


def masked(text: str) -> str:
    """`text` with the password of every URL in it replaced by ***: store URIs (tracking.uri, sweep.storage,
    $MLFLOW_TRACKING_URI) reach tags, run params, messages and printed output only through this."""
    return _QUERY_PASSWORD.sub(r"\1***", _URL_PASSWORD.sub(r"\1***@", text))


class UserError(Exception):
    """A mistake the user can fix (bad params, bad input file). Printed as one line, exit code 2."""


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived (a scheduler, `kill`, a timeout). Handled like Ctrl-C (a sweep marks its trial killed),
    and like it not an Exception, so only cleanup code (finally, atomic writes) sees it and nothing swallows it."""


def _terminate(signum, frame) -> None:
    raise Terminated


def run_main(main: Callable[[], object]) -> None:
    """Run a stage or CLI entry point, turning UserError into `error: ...` on stderr and exit 2, and Ctrl-C or
    SIGTERM into one line and exit 130 / 143 after cleanup ran (temp outputs removed, old outputs kept)."""
    quiet_libraries()
    signal.signal(signal.SIGTERM, _terminate)
    try:
        main()
    except UserError as exc:
        print(f"error: {masked(str(exc))}", file=sys.stderr)  # a last guard: messages should be masked already
        sys.exit(2)
    except Terminated:
        print("terminated (SIGTERM)", file=sys.stderr)
        sys.exit(143)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)

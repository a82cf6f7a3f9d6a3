"""Progress a person can read: done/total, rate and ETA, on stdout.

On a terminal the line is redrawn in place; in a log (CI, a redirected `dvc repro`) a line is written at each
tenth of the work, at most one every few seconds, so logs stay short. TUNEPIPE_QUIET=1 keeps only the stages'
one-line summaries.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import warnings

LOG_EVERY_S = 10.0  # in a log, never two progress lines closer than this


def quiet() -> bool:
    return os.environ.get("TUNEPIPE_QUIET", "").strip().lower() not in ("", "0", "false", "no")


def say(msg: str) -> None:
    """A summary line: always printed, flushed so it keeps its place among progress lines in a log."""
    print(msg, flush=True)


def duration(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class Progress:
    """`with Progress("tokenize", n, "texts") as bar: ... bar.update(k)`."""

    def __init__(self, label: str, total: int, unit: str = "it", start: int = 0, log: bool = True):
        self.label, self.total, self.unit = label, max(int(total), 1), unit
        self.n = self.first = start
        self.t0 = time.monotonic()
        self.tty = sys.stdout.isatty()
        self.log = log  # False: draw on a terminal only (short sub-steps such as a validation pass)
        self.extra = ""
        self._drawn = 0.0
        self._next_tenth = (10 * start) // self.total + 1
        self._open = False

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def line(self) -> str:
        elapsed = time.monotonic() - self.t0
        rate = (self.n - self.first) / elapsed if elapsed > 0 else 0.0
        eta = f", ETA {duration((self.total - self.n) / rate)}" if rate > 0 and self.n < self.total else ""
        return (f"{self.label}: {self.n:,}/{self.total:,} {self.unit} ({100 * self.n / self.total:.0f}%), "
                f"{rate:,.1f} {self.unit}/s, {duration(elapsed)}{eta}{self.extra}")

    def update(self, n: int = 1, extra: str | None = None) -> None:
        self.n = min(self.n + n, self.total)
        if extra is not None:
            self.extra = extra
        if quiet():
            return
        now = time.monotonic()
        if self.tty:
            if now - self._drawn >= 0.25 or self.n >= self.total:
                sys.stdout.write("\r\033[K" + self.line())
                sys.stdout.flush()
                self._drawn, self._open = now, True
        elif self.log and 10 * self.n >= self._next_tenth * self.total and now - self._drawn >= LOG_EVERY_S:
            say(self.line())
            self._drawn = now
            self._next_tenth = (10 * self.n) // self.total + 1

    def message(self, msg: str) -> None:
        """A line printed above the progress line (e.g. a validation result)."""
        if self._open:
            sys.stdout.write("\r\033[K")
            self._open = False
        say(msg)

    def close(self) -> None:
        if self._open:
            sys.stdout.write("\r\033[K")
            sys.stdout.flush()
            self._open = False


class _DropMessages(logging.Filter):
    def __init__(self, *fragments: str):
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(f in str(record.msg) for f in self.fragments)


def quiet_libraries() -> None:
    """Silence library output a person cannot act on: per-file progress bars, load reports of the fresh task head,
    exporter notes about torchvision, deprecation warnings from inside the libraries. TUNEPIPE_DEBUG=1 keeps it."""
    if os.environ.get("TUNEPIPE_DEBUG"):
        return
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import huggingface_hub.utils
    import transformers.utils.logging as hf_logging

    huggingface_hub.utils.disable_progress_bars()
    hf_logging.set_verbosity_error()  # e.g. "LOAD REPORT ... classifier.weight MISSING": expected for a new head
    hf_logging.disable_progress_bar()
    for name in ("mlflow", "torch.onnx", "torch.export", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING if name == "mlflow" else logging.ERROR)
    # onnxruntime's quantiser logs this on the root logger for every model; the dynamic int8 path needs no
    # pre-processing (export measures what int8 costs in agreement instead).
    logging.getLogger().addFilter(_DropMessages("Please consider to run pre-processing before quantization"))
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=r".*axis name: .* will not be used")
    # MLflow wraps log_model in its own warning filters ("once"), so this hint is dropped where it is shown: the
    # served model takes a text column or a list of strings and declares its signature from an input example.
    show = warnings.showwarning

    def showwarning(message, category, filename, lineno, file=None, line=None):
        if "Add type hints to the `predict` method" not in str(message):
            show(message, category, filename, lineno, file, line)

    warnings.showwarning = showwarning

"""Progress lines: a rate and an ETA, short in a log, redrawn on a terminal, silent with TUNEPIPE_QUIET."""

from __future__ import annotations

import pytest

from tunepipe import progress
from tunepipe.progress import Progress, duration


@pytest.fixture(autouse=True)
def no_throttle(monkeypatch):
    monkeypatch.setattr(progress, "LOG_EVERY_S", 0.0)
    monkeypatch.delenv("TUNEPIPE_QUIET", raising=False)


def test_a_log_gets_one_line_per_tenth_with_rate_and_eta(capsys):
    with Progress("tokenize", 200, "texts") as bar:
        for _ in range(200):
            bar.update(1)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 10
    assert lines[0].startswith("tokenize: 20/200 texts (10%), ") and "texts/s" in lines[0] and "ETA" in lines[0]
    assert lines[-1].startswith("tokenize: 200/200 texts (100%)") and "ETA" not in lines[-1]


def test_a_terminal_gets_the_line_redrawn_and_messages_above_it(capsys):
    bar = Progress("train", 4, "steps")
    bar.tty = True
    bar.update(4, extra=", loss 0.5")
    bar.message("  step 4/4: validation macro_f1 0.9000")
    bar.close()
    out = capsys.readouterr().out
    assert out.startswith("\r\033[Ktrain: 4/4 steps (100%)") and ", loss 0.5" in out
    assert "\r\033[K  step 4/4: validation macro_f1 0.9000\n" in out


def test_quiet_keeps_only_summaries(capsys, monkeypatch):
    monkeypatch.setenv("TUNEPIPE_QUIET", "1")
    with Progress("parity", 10, "texts") as bar:
        bar.update(10)
    progress.say("export: done")
    assert capsys.readouterr().out == "export: done\n"


def test_durations_read_naturally():
    assert [duration(s) for s in (4.4, 65, 3725)] == ["4s", "1m05s", "1h02m"]

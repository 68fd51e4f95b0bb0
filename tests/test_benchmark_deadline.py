"""`benchmarks/quality.py --deadline HH:MM`: the next such UTC time, also across midnight (recovery.py uses it too)."""

import calendar
import importlib.util
import time
from pathlib import Path

import pytest

QUALITY = Path(__file__).resolve().parents[1] / "benchmarks" / "quality.py"


@pytest.fixture(scope="module")
def quality():
    spec = importlib.util.spec_from_file_location("benchmarks_quality", QUALITY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _at(text: str) -> float:
    return calendar.timegm(time.strptime(text, "%Y-%m-%d %H:%M"))  # UTC, whatever the local zone


@pytest.mark.parametrize("now, hhmm, expected", [
    ("2026-11-30 23:50", "01:45", "2026-12-01 01:45"),  # a run started before midnight keeps going until 01:45
    ("2026-11-30 12:00", "16:40", "2026-11-30 16:40"),
    ("2026-11-30 16:41", "16:40", "2026-12-01 16:40"),
])
def test_deadline_is_the_next_such_time(quality, monkeypatch, now, hhmm, expected):
    monkeypatch.setattr(quality.time, "time", lambda: _at(now))
    assert quality.deadline_at(hhmm) == _at(expected)


def test_bad_deadline_is_one_line(quality):
    with pytest.raises(ValueError, match="--deadline: expected HH:MM"):
        quality.deadline_at("1:45pm")
    with pytest.raises(ValueError, match="--deadline: expected HH:MM"):
        quality.deadline_at("25:00")
    assert quality.deadline_at(None) is None

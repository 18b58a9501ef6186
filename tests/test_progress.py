"""cmb_synthesis.progress: i/N lines with elapsed and remaining time when not on a terminal."""

from __future__ import annotations

import logging

from cmb_synthesis.progress import format_seconds, progress


def test_log_form_reports_i_of_n_with_elapsed_and_remaining(monkeypatch, caplog):
    monkeypatch.setenv("CMB_PROGRESS", "log")
    with caplog.at_level(logging.INFO, logger="cmb_synthesis.progress"):
        out = list(progress(range(5), "scans", min_interval_s=0.0))
    assert out == [0, 1, 2, 3, 4]
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0].startswith("scans: 1/5 (elapsed ") and "remaining ~" in lines[0]
    assert lines[-1].startswith("scans: 5/5 ") and len(lines) == 5


def test_log_form_throttles_but_always_reports_first_and_last(monkeypatch, caplog):
    monkeypatch.setenv("CMB_PROGRESS", "log")
    with caplog.at_level(logging.INFO, logger="cmb_synthesis.progress"):
        list(progress(iter(range(100)), "items", total=100, min_interval_s=3600.0))
    lines = [r.getMessage() for r in caplog.records]
    assert [line.split(" (")[0] for line in lines] == ["items: 1/100", "items: 100/100"]


def test_off_and_unknown_length(monkeypatch, caplog):
    monkeypatch.setenv("CMB_PROGRESS", "off")
    with caplog.at_level(logging.INFO, logger="cmb_synthesis.progress"):
        assert list(progress(iter("ab"), "x")) == ["a", "b"]
    assert not caplog.records
    monkeypatch.setenv("CMB_PROGRESS", "log")
    with caplog.at_level(logging.INFO, logger="cmb_synthesis.progress"):
        list(progress(iter("ab"), "y", min_interval_s=0.0))
    assert caplog.records[-1].getMessage().startswith("y: 2 (elapsed ")


def test_format_seconds():
    assert format_seconds(4.2) == "4s" and format_seconds(65) == "1m05s" and format_seconds(3725.2) == "1h02m05s"

"""The text log format's timestamp, formatted once a second (pie.logconfig.TextFormatter), reads
exactly as the standard formatter's on every line."""

from __future__ import annotations

import logging

from pie.logconfig import TEXT_FORMAT, TextFormatter


def record_at(created: float) -> logging.LogRecord:
    record = logging.LogRecord("pie.access", logging.INFO, __file__, 1, "GET /v2/health 200", None, None)
    record.created = created
    record.msecs = (created - int(created)) * 1000
    record.request_id = "r-1"
    return record


def test_the_cached_timestamp_reads_as_the_standard_one_across_seconds():
    ours, standard = TextFormatter(TEXT_FORMAT), logging.Formatter(TEXT_FORMAT)
    # within one second, across a second boundary, back in time (a clock step), far apart
    for created in (1_700_000_000.001, 1_700_000_000.999, 1_700_000_001.0, 1_700_000_001.5, 1_699_999_999.25, 1.0):
        record = record_at(created)
        assert ours.formatTime(record) == standard.formatTime(record), created
        assert ours.format(record) == standard.format(record), created
    # an explicit date format is the standard formatter's own
    record = record_at(1_700_000_000.5)
    assert ours.formatTime(record, "%H:%M") == standard.formatTime(record, "%H:%M")

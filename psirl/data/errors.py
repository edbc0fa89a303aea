"""The one exception type of `psirl.data`: bad input data, located by file, line and field."""

from __future__ import annotations


class DataError(ValueError):
    """Bad input data. The message always says where: ``file:line: field 'x': what was wrong``.

    Raised for unreadable files, invalid JSON lines, records that fail their schema
    (missing field, wrong type, empty value), empty datasets, unknown splits and prompts
    longer than the configured token limit.
    """

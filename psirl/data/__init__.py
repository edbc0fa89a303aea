"""Data layer: records from JSONL / Parquet / `datasets` folders, chat templates, tasks."""

from psirl.data.errors import DataError
from psirl.data.expression import ExpressionError, ParsedExpression, parse_expression
from psirl.data.lengths import check_prompt_lengths, prompt_token_count
from psirl.data.records import RecordList, load_records
from psirl.data.schema import KINDS, validate_record
from psirl.data.tasks import (
    HELD_OUT_SEED,
    TASKS,
    AdditionTask,
    CountdownTask,
    Task,
    first_answer_line,
    get_task,
    split_of,
)
from psirl.data.templates import render_prompt, render_sft_example

__all__ = [
    "HELD_OUT_SEED",
    "KINDS",
    "TASKS",
    "AdditionTask",
    "CountdownTask",
    "DataError",
    "ExpressionError",
    "ParsedExpression",
    "RecordList",
    "Task",
    "check_prompt_lengths",
    "first_answer_line",
    "get_task",
    "load_records",
    "parse_expression",
    "prompt_token_count",
    "render_prompt",
    "render_sft_example",
    "split_of",
    "validate_record",
]

"""load_records: JSONL / Parquet / datasets-folder round trips and every error message."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from psirl.data import DataError, check_prompt_lengths, load_records


def write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_jsonl_prompt_records_round_trip(tmp_path):
    path = write_jsonl(
        tmp_path / "prompts.jsonl",
        [
            json.dumps({"prompt": "12+34=", "answer": "46", "task": "addition"}),
            "",
            json.dumps({"prompt": [{"role": "user", "content": "hi"}], "answer": 42}),
            json.dumps({"prompt": "x", "meta": {"k": [1, 2]}}),
        ],
    )
    records = load_records(path, kind="prompt")
    assert records == [
        {"prompt": "12+34=", "answer": "46", "task": "addition"},
        {"prompt": [{"role": "user", "content": "hi"}], "answer": "42"},
        {"prompt": "x", "meta": {"k": [1, 2]}},
    ]
    assert records.locations == [f"{path}:1", f"{path}:3", f"{path}:4"]


def test_limit_reads_only_the_first_records(tmp_path):
    lines = [json.dumps({"prompt": f"p{i}"}) for i in range(5)] + ["{broken"]
    path = write_jsonl(tmp_path / "many.jsonl", lines)
    assert [r["prompt"] for r in load_records(path, kind="prompt", limit=3)] == ["p0", "p1", "p2"]


def test_bad_json_line_names_file_line_and_json_error(tmp_path):
    path = write_jsonl(
        tmp_path / "bad.jsonl",
        [json.dumps({"prompt": "a"}), json.dumps({"prompt": "b"}), '{"prompt": "c",}'],
    )
    with pytest.raises(DataError) as info:
        load_records(path, kind="prompt")
    message = str(info.value)
    assert f"{path}:3:" in message
    assert "invalid JSON" in message and "column 16" in message


def test_missing_field_names_file_line_and_field(tmp_path):
    path = write_jsonl(
        tmp_path / "missing.jsonl",
        [json.dumps({"prompt": "a"}), json.dumps({"question": "b"})],
    )
    with pytest.raises(DataError) as info:
        load_records(path, kind="prompt")
    assert str(info.value) == f"{path}:2: field 'prompt': missing"


def test_wrong_type_names_file_line_field_and_type(tmp_path):
    path = write_jsonl(tmp_path / "types.jsonl", [json.dumps({"prompt": 123})])
    with pytest.raises(DataError) as info:
        load_records(path, kind="prompt")
    message = str(info.value)
    assert message.startswith(f"{path}:1: field 'prompt': wrong type")
    assert "got int" in message


def test_wrong_type_inside_a_message_names_the_nested_field(tmp_path):
    record = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": 7}]}
    path = write_jsonl(tmp_path / "sft.jsonl", [json.dumps(record)])
    with pytest.raises(DataError) as info:
        load_records(path, kind="sft")
    message = str(info.value)
    assert f"{path}:1:" in message
    assert "field 'messages[1].content': wrong type" in message and "got int" in message


def test_record_that_is_not_an_object(tmp_path):
    path = write_jsonl(tmp_path / "list.jsonl", ['["prompt", "x"]'])
    with pytest.raises(DataError) as info:
        load_records(path, kind="prompt")
    assert f"{path}:1: field 'record': wrong type" in str(info.value)
    assert "got list" in str(info.value)


def test_empty_prompt_string_is_rejected(tmp_path):
    path = write_jsonl(tmp_path / "empty.jsonl", [json.dumps({"prompt": ""})])
    with pytest.raises(DataError) as info:
        load_records(path, kind="prompt")
    assert f"{path}:1: field 'prompt':" in str(info.value)
    assert "at least 1 character" in str(info.value)


def test_sft_forms_and_their_errors(tmp_path):
    good = write_jsonl(
        tmp_path / "sft.jsonl",
        [
            json.dumps({"prompt": "1+1=", "completion": "2"}),
            json.dumps(
                {
                    "messages": [
                        {"role": "user", "content": "q"},
                        {"role": "assistant", "content": "a"},
                    ]
                }
            ),
        ],
    )
    assert len(load_records(good, kind="sft")) == 2

    no_completion = write_jsonl(tmp_path / "a.jsonl", [json.dumps({"prompt": "1+1="})])
    with pytest.raises(DataError, match=r"a\.jsonl:1: field 'completion': missing"):
        load_records(no_completion, kind="sft")

    last_user = {"messages": [{"role": "user", "content": "q"}, {"role": "user", "content": "q"}]}
    bad_roles = write_jsonl(tmp_path / "b.jsonl", [json.dumps(last_user)])
    with pytest.raises(DataError, match=r"b\.jsonl:1: field 'messages': the last message"):
        load_records(bad_roles, kind="sft")

    both = {"prompt": "p", "messages": [{"role": "assistant", "content": "a"}] * 2}
    both_forms = write_jsonl(tmp_path / "c.jsonl", [json.dumps(both)])
    with pytest.raises(DataError, match=r"c\.jsonl:1: field 'prompt': an sft record holds either"):
        load_records(both_forms, kind="sft")


def test_preference_and_labelled_schemas(tmp_path):
    pref = write_jsonl(
        tmp_path / "pref.jsonl",
        [
            json.dumps({"prompt": "p", "chosen": "good", "rejected": "bad"}),
            json.dumps({"prompt": "p", "chosen": "good"}),
        ],
    )
    with pytest.raises(DataError) as info:
        load_records(pref, kind="preference")
    assert str(info.value) == f"{pref}:2: field 'rejected': missing"

    labelled = write_jsonl(
        tmp_path / "kto.jsonl",
        [
            json.dumps({"prompt": "p", "completion": "c", "label": True}),
            json.dumps({"prompt": "p", "completion": "c", "label": "yes"}),
        ],
    )
    with pytest.raises(DataError) as info:
        load_records(labelled, kind="labelled")
    assert str(info.value).startswith(f"{labelled}:2: field 'label': wrong type")
    assert "got str" in str(info.value)
    ok = load_records(labelled, kind="labelled", limit=1)
    assert ok == [{"prompt": "p", "completion": "c", "label": True}]


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_dataset(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_text(content)
    with pytest.raises(DataError) as info:
        load_records(path, kind="prompt")
    assert str(info.value) == f"{path}: file has no records"


def test_missing_file_unsupported_suffix_and_split_on_a_file(tmp_path):
    with pytest.raises(DataError, match=r"nope\.jsonl: file not found"):
        load_records(tmp_path / "nope.jsonl", kind="prompt")
    csv = tmp_path / "data.csv"
    csv.write_text("prompt\nx\n")
    with pytest.raises(DataError, match=r"data\.csv: unsupported file type '\.csv'"):
        load_records(csv, kind="prompt")
    jsonl = write_jsonl(tmp_path / "one.jsonl", [json.dumps({"prompt": "x"})])
    with pytest.raises(DataError, match=r"one\.jsonl: field 'split': split='train' only applies"):
        load_records(jsonl, kind="prompt", split="train")
    with pytest.raises(ValueError, match="unknown record kind 'dpo'"):
        load_records(jsonl, kind="dpo")


def test_parquet_round_trip_and_row_errors(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "pairs.parquet"
    table = pa.Table.from_pylist(
        [
            {"prompt": "p1", "chosen": "c1", "rejected": "r1", "score": 0.5},
            {"prompt": "p2", "chosen": "c2", "rejected": "r2", "score": None},
        ]
    )
    pq.write_table(table, path)
    assert load_records(path, kind="preference") == [
        {"prompt": "p1", "chosen": "c1", "rejected": "r1", "score": 0.5},
        {"prompt": "p2", "chosen": "c2", "rejected": "r2"},
    ]

    broken = tmp_path / "broken.parquet"
    pq.write_table(
        pa.Table.from_pylist(
            [
                {"prompt": "p", "chosen": "c", "rejected": "r"},
                {"prompt": "p", "chosen": "c", "rejected": None},
            ]
        ),
        broken,
    )
    with pytest.raises(DataError) as info:
        load_records(broken, kind="preference")
    assert str(info.value) == f"{broken}: row 2: field 'rejected': missing"


def test_conversational_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "chat.parquet"
    rows = [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}]
    pq.write_table(pa.Table.from_pylist(rows), path)
    assert load_records(path, kind="sft") == rows


def test_datasets_folder_round_trip_and_splits(tmp_path):
    import datasets

    single = tmp_path / "single"
    datasets.Dataset.from_list(
        [{"prompt": "a", "answer": "1"}, {"prompt": "b", "answer": "2"}]
    ).save_to_disk(str(single))
    assert load_records(single, kind="prompt") == [
        {"prompt": "a", "answer": "1"},
        {"prompt": "b", "answer": "2"},
    ]
    with pytest.raises(
        DataError, match="field 'split': split='train' given but this folder holds a single"
    ):
        load_records(single, kind="prompt", split="train")

    both = tmp_path / "both"
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_list([{"prompt": "t1"}, {"prompt": "t2"}]),
            "test": datasets.Dataset.from_list([{"prompt": "e1"}]),
        }
    ).save_to_disk(str(both))
    assert load_records(both, kind="prompt", split="test") == [{"prompt": "e1"}]
    assert load_records(both, kind="prompt", split="train").locations == [
        f"{both}[train]: row 1",
        f"{both}[train]: row 2",
    ]
    with pytest.raises(DataError) as info:
        load_records(both, kind="prompt", split="validation")
    assert str(info.value) == (
        f"{both}: field 'split': unknown split 'validation'; available splits: test, train"
    )
    with pytest.raises(DataError, match="several splits \\(test, train\\)"):
        load_records(both, kind="prompt")

    only = tmp_path / "only"
    datasets.DatasetDict({"train": datasets.Dataset.from_list([{"prompt": "t"}])}).save_to_disk(
        str(only)
    )
    assert load_records(only, kind="prompt") == [{"prompt": "t"}]

    bad = tmp_path / "bad"
    datasets.Dataset.from_list([{"prompt": "a"}, {"prompt": ""}]).save_to_disk(str(bad))
    with pytest.raises(DataError, match=r"bad: row 2: field 'prompt':"):
        load_records(bad, kind="prompt")

    empty = tmp_path / "empty"
    datasets.Dataset.from_dict({"prompt": []}).save_to_disk(str(empty))
    with pytest.raises(DataError, match="file has no records"):
        load_records(empty, kind="prompt")


def test_check_prompt_lengths_names_line_and_length(tmp_path, char_tokenizer):
    path = write_jsonl(
        tmp_path / "long.jsonl",
        [
            json.dumps({"prompt": "12+34="}),
            "",
            json.dumps({"prompt": "x" * 20}),
        ],
    )
    records = load_records(path, kind="prompt")
    # One token per character: lengths are the string lengths.
    assert check_prompt_lengths(records, char_tokenizer, 20, str(path)) == [6, 20]
    with pytest.raises(DataError) as info:
        check_prompt_lengths(records, char_tokenizer, 19, str(path))
    assert str(info.value) == f"{path}:3: field 'prompt': 20 tokens, more than max_prompt_tokens=19"

    plain = [{"prompt": "ab"}, {"prompt": [{"role": "user", "content": "hello"}]}]
    # "<|user|>hello\n<|assistant|>" is 8 + 5 + 1 + 13 = 27 characters.
    assert check_prompt_lengths(plain, char_tokenizer, 27, "mem") == [2, 27]
    with pytest.raises(DataError) as info:
        check_prompt_lengths(plain, char_tokenizer, 26, "mem")
    assert (
        str(info.value)
        == "mem: record 2: field 'prompt': 27 tokens, more than max_prompt_tokens=26"
    )

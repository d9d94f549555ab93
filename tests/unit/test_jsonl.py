import pytest

from rugpt.errors import DataError
from rugpt.jsonl import iter_jsonl, read_field, read_jsonl


def write(tmp_path, content: bytes | str, name: str = "data.jsonl"):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return path


def test_reads_objects_skipping_blank_lines_and_counting_lines(tmp_path):
    path = write(tmp_path, '\ufeff{"a": 1}\n\n  \n{"a": "б"}\n')
    assert read_jsonl(path) == [{"a": 1}, {"a": "б"}]
    assert [line for line, _ in iter_jsonl(path)] == [1, 4]


@pytest.mark.parametrize("content, needle", [
    ('{"a": 1}\n\n{"a": }\n', "data.jsonl:3: invalid JSON"),
    ('{"a": 1}\n[1, 2]\n', "data.jsonl:2: expected a JSON object"),
    (b'{"a": 1}\n{"a": "\xff"}\n', "data.jsonl:2: not valid UTF-8"),
])
def test_errors_name_the_file_and_line(tmp_path, content, needle):
    with pytest.raises(DataError, match=needle):
        read_jsonl(write(tmp_path, content))


def test_missing_or_unreadable_file(tmp_path):
    with pytest.raises(DataError, match="cannot read .*nope.jsonl"):
        read_jsonl(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match="cannot read"):
        read_jsonl(tmp_path)


def test_read_field_checks_presence_and_type(tmp_path):
    assert read_field(write(tmp_path, '{"text": "а"}\n{"text": "б"}\n'), "text") == ["а", "б"]
    with pytest.raises(DataError, match=r":2: no field 'text' \(fields here: body\)"):
        read_field(write(tmp_path, '{"text": "а"}\n{"body": "б"}\n'), "text")
    with pytest.raises(DataError, match=":1: field 'text' must be a string, got int"):
        read_field(write(tmp_path, '{"text": 5}\n'), "text")
    with pytest.raises(DataError, match="no JSON objects"):
        read_field(write(tmp_path, "\n"), "text")

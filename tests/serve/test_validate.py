"""Unit tests of :mod:`peftkit.serve.validate`: every malformed line of an upload named with its number, its code
and the reason; the one-line summary; the length check at job start."""

from __future__ import annotations

import json
from typing import Any

import pytest

from peftkit.data.template import Template
from peftkit.serve.validate import LISTED, Checked, LineError, check_lengths, check_lines


def jsonl(*rows: Any) -> bytes:
    return ("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n").encode()


def chat(answer: str = "green") -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": "What colour is grass?"}, {"role": "assistant", "content": answer}]}


# -- check_lines: good files ---------------------------------------------------------------------------
def test_a_good_chat_file_gives_its_rows_in_order_and_the_format():
    data = jsonl(chat("green"), chat("blue"), chat("white"))
    checked = check_lines(data)
    assert checked.errors == []
    assert checked.format == "chat"
    assert [r["messages"][-1]["content"] for r in checked.rows] == ["green", "blue", "white"]


@pytest.mark.parametrize(("row", "fmt"), [
    ({"prompt": "2+2=", "completion": "4"}, "prompt_completion"),
    ({"instruction": "Add", "input": "2+2", "output": "4"}, "alpaca"),
    ({"text": "plain text"}, "text"),
    ({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}, "chat"),
])
def test_each_format_is_detected(row, fmt):
    checked = check_lines(jsonl(row, row))
    assert (checked.format, len(checked.rows), checked.errors) == (fmt, 2, [])


def test_content_parts_are_normalized_to_a_string():
    row = {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
                        {"role": "assistant", "content": "c"}]}
    checked = check_lines(jsonl(row))
    assert checked.rows[0]["messages"][0] == {"role": "user", "content": "ab"}


def test_blank_lines_are_skipped_but_still_count_as_lines():
    data = jsonl(chat(), "", "   ", "{oops")
    checked = check_lines(data)
    assert len(checked.rows) == 1
    assert [(e.line, e.code) for e in checked.errors] == [(4, "invalid_json")]


def test_crlf_line_endings_and_a_byte_order_mark_are_accepted():
    data = b"\xef\xbb\xbf" + jsonl(chat("a"), chat("b")).replace(b"\n", b"\r\n")
    checked = check_lines(data)
    assert checked.errors == [] and len(checked.rows) == 2 and checked.format == "chat"


# -- check_lines: faults ----------------------------------------------------------------------------------
def test_every_malformed_line_is_reported_not_only_the_first():
    data = jsonl(chat(), "[1, 2]", chat(), "{not json", chat(), chat(), {"foo": 1}, chat())
    checked = check_lines(data)
    assert [(e.line, e.code) for e in checked.errors] == [(2, "data_type"), (4, "invalid_json"), (7, "unknown_format")]
    assert len(checked.rows) == 5  # the good lines around the faults are kept, in order
    assert checked.format == "chat"


@pytest.mark.parametrize(("line", "code", "message"), [
    ("{bad", "invalid_json", "malformed JSON (Expecting property name enclosed in double quotes, column 2)"),
    ('{"text": "a"', "invalid_json", "malformed JSON (Expecting ',' delimiter, column 13)"),
    ("[1]", "data_type", "expected a JSON object, got list"),
    ("7", "data_type", "expected a JSON object, got int"),
    ('"text"', "data_type", "expected a JSON object, got str"),
    ("null", "data_type", "expected a JSON object, got NoneType"),
    ('{"foo": 1}', "unknown_format", ("cannot tell the data format from fields ['foo']; expected one of "
                                      "instruction/output (alpaca), messages or conversations (chat), "
                                      "prompt/completion, text, or prompt/chosen/rejected (preference)")),
    ('{"messages": [{"role": "bot", "content": "x"}, {"role": "assistant", "content": "y"}]}', "unrecognized_role",
     "messages[0]: role 'bot' does not exist (use system, user, assistant, tool)"),
    ('{"messages": [{"role": "user", "content": "hi"}, {"content": "y"}]}', "unrecognized_role",
     "messages[1]: role None does not exist (use system, user, assistant, tool)"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', "example_missing_assistant_message",
     "the last message must be the assistant's (it is what the model learns to say)"),
    ('{"messages": null, "conversations": null}', "missing_messages_list",
     "missing field 'messages' (format chat; or ShareGPT's 'conversations')"),
    ('{"instruction": "a", "output": null}', "missing_field", "missing field 'output' (format alpaca)"),
    ('{"instruction": "a", "output": ""}', "invalid_example", "field 'output' is empty"),
    ('{"messages": []}', "invalid_example", "field 'messages' must be a non-empty list"),
    ('{"prompt": 1, "completion": "x"}', "invalid_example", "field 'prompt' must be a string, got int"),
])
def test_each_fault_has_its_code_and_reason(line, code, message):
    checked = check_lines(jsonl("", line))  # line 1 blank
    assert checked.errors == [LineError(2, code, message)]
    assert (checked.rows, checked.format) == ([], None)


def test_the_first_good_row_sets_the_format_and_a_later_other_one_is_a_mismatch():
    data = jsonl({"foo": 1}, {"prompt": "a", "completion": "b"}, {"text": "x"}, chat())
    checked = check_lines(data)
    assert checked.format == "prompt_completion"
    assert checked.errors == [
        LineError(1, "unknown_format", checked.errors[0].message),
        LineError(3, "format_mismatch", "a text example in a file of prompt_completion examples"),
        LineError(4, "format_mismatch", "a chat example in a file of prompt_completion examples"),
    ]
    assert checked.rows == [{"prompt": "a", "completion": "b"}]


def test_json_nested_too_deeply_is_a_malformed_line_not_a_crash():
    checked = check_lines(jsonl(chat(), "[" * 200_000))
    assert checked.errors == [LineError(2, "invalid_json", "malformed JSON (nested too deeply)")]


@pytest.mark.parametrize("data", [b"", b"\n", b"\n  \n\r\n"])
def test_a_file_without_examples_is_one_error(data):
    checked = check_lines(data)
    assert (checked.rows, checked.format) == ([], None)
    assert checked.errors == [LineError(1, "empty_file", "no examples in the file")]


def test_bytes_that_are_not_utf8_name_their_line_and_byte():
    data = jsonl(chat(), chat())[:-1] + b'\n{"text": "\xff"}\n'
    offset = data.index(b"\xff")
    checked = check_lines(data)
    assert checked.rows == [] and checked.format is None
    assert checked.errors == [LineError(3, "invalid_encoding", f"not UTF-8 text (invalid start byte at byte {offset})")]


def test_bytes_that_are_not_utf8_after_a_byte_order_mark_name_their_line_and_byte():
    data = b'\xef\xbb\xbf{"text":"a"}\n\xff\n'
    checked = check_lines(data)
    assert checked.errors == [LineError(2, "invalid_encoding", "not UTF-8 text (invalid start byte at byte 16)")]


def test_a_line_separator_inside_a_json_string_does_not_split_the_line():
    data = json.dumps({"text": "a\u2028b\u0085c"}, ensure_ascii=False).encode() + b"\n"
    checked = check_lines(data)
    assert checked.errors == []
    assert checked.rows == [{"text": "a\u2028b\u0085c"}]


def test_an_integer_too_long_to_read_is_not_called_nested_too_deeply():
    checked = check_lines(b'{"text": "a", "n": ' + b"1" * 5000 + b"}\n")
    assert [(e.line, e.code) for e in checked.errors] == [(1, "invalid_json")]
    assert "nested" not in checked.errors[0].message


# -- Checked.summary -----------------------------------------------------------------------------------
def test_summary_of_one_fault_is_singular():
    checked = check_lines(jsonl(chat(), "[1]"))
    assert checked.summary() == "training file has 1 malformed line: line 2: expected a JSON object, got list"


def test_summary_names_every_fault_in_order_and_the_file():
    checked = check_lines(jsonl("[1]", chat(), "{x"))
    assert checked.summary("validation file") == (
        "validation file has 2 malformed lines: line 1: expected a JSON object, got list; "
        "line 3: malformed JSON (Expecting property name enclosed in double quotes, column 2)")


def test_summary_lists_the_first_twenty_and_counts_the_rest():
    errors = [LineError(i, "data_type", f"fault {i}") for i in range(1, 26)]
    text = Checked([], None, errors).summary()
    assert LISTED == 20
    assert text.startswith("training file has 25 malformed lines: line 1: fault 1; line 2: fault 2; ")
    assert text.endswith("; line 20: fault 20; and 5 more")
    assert "line 21" not in text


def test_summary_of_exactly_twenty_has_no_tail():
    errors = [LineError(i, "data_type", f"fault {i}") for i in range(1, 21)]
    text = Checked([], None, errors).summary()
    assert text.endswith("line 20: fault 20") and "more" not in text
    assert text.count("; ") == 19


# -- check_lengths -------------------------------------------------------------------------------------
class WordTokenizer:
    """One token per word; BOS (1) when asked for special tokens; EOS 2. No chat template."""

    eos_token_id = 2
    chat_template = None

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        return {"input_ids": ([1] if add_special_tokens else []) + [5] * len(text.split())}


def text_row(words: int) -> dict[str, str]:
    return {"text": " ".join(["w"] * words)}  # renders as BOS + words + EOS: words + 2 tokens


def test_check_lengths_names_examples_longer_than_the_model_and_counts_the_truncated():
    template = Template.create(WordTokenizer(), "auto", "text")
    rows = [text_row(3), text_row(8), text_row(20), text_row(6), text_row(9)]  # 5, 10, 22, 8, 11 tokens
    too_long, truncated = check_lengths(rows, template, context=10, max_length=6)
    assert too_long == [LineError(3, "too_long", "22 tokens, longer than the model reads (10)"),
                        LineError(5, "too_long", "11 tokens, longer than the model reads (10)")]
    assert truncated == 2  # 10 and 8 tokens: within the model, over max_length


def test_check_lengths_boundaries_are_inclusive():
    template = Template.create(WordTokenizer(), "auto", "text")
    assert check_lengths([text_row(8)], template, context=10, max_length=10) == ([], 0)
    assert check_lengths([text_row(8)], template, context=10, max_length=9) == ([], 1)
    assert check_lengths([text_row(9)], template, context=10, max_length=9) == (
        [LineError(1, "too_long", "11 tokens, longer than the model reads (10)")], 0)


def test_check_lengths_renders_prompt_and_completion():
    template = Template.create(WordTokenizer(), "auto", "prompt_completion")
    rows = [{"prompt": "a b c", "completion": "d e"}]  # BOS + 3 + 2 + EOS = 7
    assert check_lengths(rows, template, context=6, max_length=6) == (
        [LineError(1, "too_long", "7 tokens, longer than the model reads (6)")], 0)


def test_too_long_names_the_line_of_the_file():
    checked = check_lines(b'{"text": "w"}\n\n{"text": "' + b"w " * 20 + b'"}\n')
    template = Template.create(WordTokenizer(), "auto", "text")
    too_long, _ = check_lengths(checked.rows, template, context=10, max_length=10, lines=checked.lines)
    assert [e.line for e in too_long] == [3]

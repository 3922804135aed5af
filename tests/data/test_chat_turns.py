"""Chat data: every assistant turn is trained (or only the last), ``weight: 0`` turns never; tool calls, text
parts and ShareGPT rows are read; a CSV cannot hold messages."""

import copy
import json

import pytest

from peftkit.data.formats import read_records, validate
from peftkit.data.load import load_file
from peftkit.data.template import Template
from peftkit.data.tokenize import IGNORE, encode_all, encode_example
from peftkit.errors import DataError

CHAT = {"messages": [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Capital of France?"},
    {"role": "assistant", "content": "Paris"},
    {"role": "user", "content": "And of Spain?"},
    {"role": "assistant", "content": "Lisbon", "weight": 0},  # a wrong answer the data leaves untrained
    {"role": "user", "content": "Spain, please."},
    {"role": "assistant", "content": "Madrid"},
]}


def labelled_runs(enc: dict[str, list[int]]) -> list[list[int]]:
    """The maximal runs of trained tokens, in order."""
    runs, current = [], []
    for tok, label in zip(enc["input_ids"], enc["labels"]):
        if label == IGNORE:
            if current:
                runs.append(current)
            current = []
        else:
            assert label == tok
            current.append(tok)
    return runs + ([current] if current else [])


def encode(tokenizer, example, **kw):
    validate([example], ["f:1"], "chat")
    enc, truncated = encode_example(Template.create(tokenizer, data_format="chat"), example, 512, **kw)
    assert not truncated
    return enc


def test_every_assistant_turn_is_trained_but_weight_zero(tokenizer):
    enc = encode(tokenizer, copy.deepcopy(CHAT))
    runs = [tokenizer.decode(r) for r in labelled_runs(enc)]
    assert runs == ["Paris<|im_end|>\n", "Madrid<|im_end|>\n"]
    # the ids are the whole conversation as the template renders it (weights are not shown to the template)
    plain = [{k: v for k, v in m.items() if k != "weight"} for m in CHAT["messages"]]
    assert tokenizer.decode(enc["input_ids"]) == tokenizer.apply_chat_template(plain, tokenize=False)
    # exactly the assistant turns' tokens: each run is the tokenization of that turn's text
    for run, text in zip(labelled_runs(enc), ["Paris<|im_end|>\n", "Madrid<|im_end|>\n"]):
        assert run == tokenizer(text, add_special_tokens=False)["input_ids"]


def test_chat_loss_last_trains_only_the_last_turn_as_before(tokenizer):
    ex = copy.deepcopy(CHAT)
    enc = encode(tokenizer, ex, chat_loss="last")
    assert [tokenizer.decode(r) for r in labelled_runs(enc)] == ["Madrid<|im_end|>\n"]
    t = Template.create(tokenizer, data_format="chat")
    n_prompt = len(t.prompt_ids(ex))  # the prompt generation sees: up to the last assistant header
    assert enc["labels"][:n_prompt] == [IGNORE] * n_prompt
    assert enc["input_ids"][:n_prompt] == t.prompt_ids(ex)
    assert all(x == IGNORE for x in encode(tokenizer, copy.deepcopy(CHAT), train_on_prompt=False,
                                           chat_loss="all")["labels"][:3])


def test_weight_zero_everywhere_leaves_nothing_to_learn(tokenizer):
    ex = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo", "weight": 0}]}
    validate([ex], ["f:1"], "chat")
    out = encode_all(Template.create(tokenizer, data_format="chat"), [ex], 512)
    assert out.dropped == 1 and not out.examples


def test_truncation_keeps_the_last_turn(tokenizer):
    ex = copy.deepcopy(CHAT)
    ex["messages"][1]["content"] = "word " * 200
    validate([ex], ["f:1"], "chat")
    enc, truncated = encode_example(Template.create(tokenizer, data_format="chat"), ex, 64)
    assert truncated and len(enc["input_ids"]) == 64
    assert tokenizer.decode(labelled_runs(enc)[-1]) == "Madrid<|im_end|>\n"


@pytest.mark.parametrize("weight", [2, 0.5, True, "1"])
def test_weight_must_be_0_or_1(weight):
    ex = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo", "weight": weight}]}
    with pytest.raises(DataError, match=r"^f:3: messages\[1\]\.weight must be 0 or 1"):
        validate([ex], ["f:3"], "auto")


def test_sharegpt_conversations_are_chat(tokenizer, tmp_path):
    path = tmp_path / "sg.jsonl"
    row = {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "2+2?"},
                             {"from": "gpt", "value": "4"}]}
    path.write_text(json.dumps(row) + "\n")
    rows, fmt = load_file(str(path))
    assert fmt == "chat"
    assert rows[0]["messages"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
                                   {"role": "assistant", "content": "4"}]
    enc, _ = encode_example(Template.create(tokenizer, data_format=fmt), rows[0], 512)
    assert [tokenizer.decode(r) for r in labelled_runs(enc)] == ["4<|im_end|>\n"]
    path.write_text(json.dumps({"conversations": [{"from": "robot", "value": "x"}]}) + "\n")
    with pytest.raises(DataError, match=r"sg.jsonl:1: conversations\[0\] must be \{'from': human\|gpt\|system"):
        load_file(str(path))


def test_content_as_a_list_of_text_parts(tokenizer):
    ex = {"messages": [{"role": "user", "content": [{"type": "text", "text": "Say "}, {"type": "text", "text": "hi"}]},
                       {"role": "assistant", "content": [{"type": "text", "text": "hi"}]}]}
    enc = encode(tokenizer, ex)
    assert ex["messages"][0]["content"] == "Say hi"
    assert [tokenizer.decode(r) for r in labelled_runs(enc)] == ["hi<|im_end|>\n"]
    bad = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]},
                        {"role": "assistant", "content": "y"}]}
    with pytest.raises(DataError, match=r"f:2: messages\[0\]\.content: a list of parts must hold only"):
        validate([bad], ["f:2"], "chat")


TOOLS = {"messages": [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
    {"role": "tool", "tool_call_id": "c1", "content": "18C, sunny"},
    {"role": "assistant", "content": "18C and sunny."},
]}


def test_tool_messages_rendered_as_text_when_the_template_has_no_tools(tokenizer):
    enc = encode(tokenizer, copy.deepcopy(TOOLS))
    text = tokenizer.decode(enc["input_ids"])
    assert '[tool call] get_weather({"city": "Paris"})' in text and "[tool result c1]\n18C, sunny" in text
    runs = [tokenizer.decode(r) for r in labelled_runs(enc)]
    assert runs == ['[tool call] get_weather({"city": "Paris"})<|im_end|>\n', "18C and sunny.<|im_end|>\n"]


def test_tool_messages_use_the_chat_template_when_it_renders_tools(tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
        "{% if m.get('tool_calls') %}{% for c in m['tool_calls'] %}<tool_call>{{ c['function']['name'] }}"
        "</tool_call>{% endfor %}{% else %}{{ m['content'] }}{% endif %}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    enc = encode(tok, copy.deepcopy(TOOLS))
    text = tok.decode(enc["input_ids"])
    assert "<tool_call>get_weather</tool_call>" in text and "<|im_start|>tool\n18C, sunny" in text
    runs = [tok.decode(r) for r in labelled_runs(enc)]
    assert runs == ["<tool_call>get_weather</tool_call><|im_end|>\n", "18C and sunny.<|im_end|>\n"]


def test_a_csv_cannot_carry_messages(tmp_path):
    path = tmp_path / "chat.csv"
    path.write_text('messages\n"[{""role"": ""user"", ""content"": ""hi""}]"\n')
    with pytest.raises(DataError, match=r"chat.csv: a CSV file cannot carry 'messages' .*JSONL or Parquet"):
        read_records(path)


def test_empty_final_answer_is_an_error():
    ex = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]}
    with pytest.raises(DataError, match=r"^f:4: the last \(assistant\) message is empty"):
        validate([ex], ["f:4"], "chat")


def test_parquet_chat_rows_with_unset_fields(tmp_path, tokenizer):
    import datasets

    path = tmp_path / "chat.parquet"
    datasets.Dataset.from_list([{"messages": [{"role": "user", "content": "hi", "weight": None},
                                              {"role": "assistant", "content": "yo", "weight": 1}]},
                                {"messages": [{"role": "user", "content": "a", "weight": None},
                                              {"role": "assistant", "content": "b", "weight": 0},
                                              {"role": "user", "content": "c", "weight": None},
                                              {"role": "assistant", "content": "d", "weight": None}]}]).to_parquet(path)
    rows, fmt = load_file(str(path))
    assert fmt == "chat" and rows[1]["messages"][1]["weight"] == 0 and "weight" not in rows[1]["messages"][3]
    enc = encode_all(Template.create(tokenizer, data_format=fmt), rows, 512)
    assert [tokenizer.decode(r) for e in enc.examples for r in labelled_runs(e)] == ["yo<|im_end|>\n", "d<|im_end|>\n"]

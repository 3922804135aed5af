import pytest

from peftkit.data.template import Template
from peftkit.data.tokenize import IGNORE, encode_all, encode_example
from peftkit.errors import ConfigError

EX = {"instruction": "Classify the review.", "input": "Great film.", "output": "positive"}


def test_chat_template_prompt_and_response_join_to_full_conversation(tokenizer):
    t = Template.create(tokenizer, "auto")
    assert t.kind == "chat"
    prompt, response = t.prompt_text(EX), t.response_text(EX)
    assert prompt.endswith("<|im_start|>assistant\n")
    assert "Classify the review.\n\nGreat film." in prompt
    assert response.startswith("positive<|im_end|>")
    full = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Classify the review.\n\nGreat film."}, {"role": "assistant", "content": "positive"}],
        tokenize=False,
    )
    assert prompt + response == full


def test_alpaca_template_appends_eos(tokenizer):
    t = Template.create(tokenizer, "alpaca")
    assert t.prompt_text(EX) == "### Instruction:\nClassify the review.\n\n### Input:\nGreat film.\n\n### Response:\n"
    ids = t.response_ids("positive")
    assert ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(ids[:-1]) == "positive"


def test_raw_formats_use_no_template(tokenizer):
    t = Template.create(tokenizer, "auto", data_format="prompt_completion")
    assert t.kind == "none"
    ex = {"prompt": "2+2=", "completion": "4"}
    assert t.prompt_text(ex) == "2+2=" and t.response_text(ex) == "4"
    t = Template.create(tokenizer, "auto", data_format="text")
    assert t.prompt_text({"text": "hello"}) == "" and t.response_text({"text": "hello"}) == "hello"


def test_template_errors(tokenizer):
    with pytest.raises(ConfigError, match="data.template must be one of"):
        Template.create(tokenizer, "fancy")
    with pytest.raises(ConfigError, match="needs data.template chat"):
        Template.create(tokenizer, "alpaca", data_format="chat")


def test_loss_only_on_response_by_default(tokenizer):
    t = Template.create(tokenizer)
    enc, truncated = encode_example(t, EX, max_length=512)
    n_prompt = len(t.prompt_ids(EX))
    assert not truncated
    assert enc["labels"][:n_prompt] == [IGNORE] * n_prompt
    assert enc["labels"][n_prompt:] == enc["input_ids"][n_prompt:]
    assert tokenizer.decode(enc["input_ids"][n_prompt:]).startswith("positive<|im_end|>")
    enc2, _ = encode_example(t, EX, max_length=512, train_on_prompt=True)
    assert enc2["labels"] == enc2["input_ids"]


def test_truncation_keeps_response_and_assistant_header(tokenizer):
    t = Template.create(tokenizer)
    long = {**EX, "input": "word " * 300}
    enc, truncated = encode_example(t, long, max_length=64)
    assert truncated and len(enc["input_ids"]) == 64
    text = tokenizer.decode(enc["input_ids"])
    assert text.endswith("assistant\npositive<|im_end|>\n")
    assert "Classify the review." in text


def test_encode_all_counts_truncated(tokenizer):
    t = Template.create(tokenizer)
    out = encode_all(t, [EX, {**EX, "input": "word " * 300}], max_length=64)
    assert out.truncated == 1 and out.dropped == 0 and len(out.examples) == 2


def test_chat_format_renders_history_and_learns_every_assistant_turn(tokenizer):
    ex = {"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Name a color"},
        {"role": "assistant", "content": "Blue."},
    ]}
    t = Template.create(tokenizer, "auto", data_format="chat")
    prompt, response = t.prompt_text(ex), t.response_text(ex)
    assert prompt + response == tokenizer.apply_chat_template(ex["messages"], tokenize=False)
    assert prompt.startswith("<|im_start|>system\nBe brief.") and "Hello." in prompt
    assert response.startswith("Blue.<|im_end|>")
    enc, _ = encode_example(t, ex, max_length=512)  # default data.chat_loss=all: every assistant turn
    learned = [i for i, lab in zip(enc["input_ids"], enc["labels"]) if lab != IGNORE]
    assert tokenizer.decode(learned) == "Hello.<|im_end|>\nBlue.<|im_end|>\n"
    enc, _ = encode_example(t, ex, max_length=512, chat_loss="last")
    learned = [i for i, lab in zip(enc["input_ids"], enc["labels"]) if lab != IGNORE]
    assert tokenizer.decode(learned).startswith("Blue.<|im_end|>")

"""Preference data: TRL's and OpenAI's shapes detected and normalized; bad pairs get one-line errors naming the
file and line, as the other formats do; pairs rendered with the supervised template."""

from __future__ import annotations

import json

import pytest

from peftkit.data.formats import detect_format
from peftkit.data.load import load_file, load_splits
from peftkit.data.preference import encode_pair
from peftkit.data.template import Template
from peftkit.errors import DataError

TRL = {"prompt": "Capital of France?", "chosen": "Paris.", "rejected": "Rome."}
TRL_CHAT = {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"}],
            "chosen": [{"role": "assistant", "content": "Paris."}],
            "rejected": [{"role": "assistant", "content": "Rome."}]}
OPENAI = {"input": {"messages": [{"role": "user", "content": "Capital of France?"}]},
          "preferred_output": [{"role": "assistant", "content": "Paris."}],
          "non_preferred_output": [{"role": "assistant", "content": "Rome."}]}


def _file(tmp_path, *rows) -> str:
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.mark.parametrize("row", [TRL, TRL_CHAT, OPENAI], ids=["trl-standard", "trl-conversational", "openai"])
def test_each_shape_is_detected_and_normalized(tmp_path, row):
    assert detect_format(row) == "preference"
    rows, fmt = load_file(_file(tmp_path, row, row))
    assert fmt == "preference"
    assert rows[0]["chosen"] == "Paris." and rows[0]["rejected"] == "Rome."
    assert rows[0]["messages"][-1] == {"role": "user", "content": "Capital of France?"}
    assert set(rows[0]) == {"messages", "chosen", "rejected"}


@pytest.mark.parametrize(("bad", "message"), [
    ({"prompt": "q", "chosen": "a"}, "p.jsonl:2: missing field 'rejected'"),
    ({"prompt": "q", "chosen": "same", "rejected": "same"}, "p.jsonl:2: chosen and rejected are the same answer"),
    ({"prompt": "  ", "chosen": "a", "rejected": "b"}, "p.jsonl:2: field 'prompt' is empty"),
    ({"prompt": "q", "chosen": "", "rejected": "b"}, "p.jsonl:2: chosen is empty"),
    ({"prompt": "q", "chosen": [{"role": "user", "content": "a"}], "rejected": "b"},
     "p.jsonl:2: chosen must be a string or [{'role': 'assistant', 'content': str}]"),
    ({"input": {"messages": []}, "preferred_output": "a", "non_preferred_output": "b"},
     "p.jsonl:2: field 'input' must be {'messages': [...]}"),
    ({"prompt": [{"role": "robot", "content": "q"}], "chosen": "a", "rejected": "b"}, "p.jsonl:2: prompt[0] must be"),
    ({"prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "x"}], "chosen": "a",
      "rejected": "b"}, "p.jsonl:2: the prompt ends with an assistant message"),
], ids=["missing-rejected", "chosen-equals-rejected", "empty-prompt", "empty-chosen", "chosen-not-assistant",
        "openai-no-messages", "bad-role", "prompt-ends-with-assistant"])
def test_bad_pairs_get_one_line_errors_naming_the_line(tmp_path, bad, message):
    with pytest.raises(DataError) as e:
        load_file(_file(tmp_path, TRL, bad))
    assert str(e.value).startswith(message.replace("p.jsonl", str(tmp_path / "p.jsonl")))
    assert "\n" not in str(e.value)


def test_pairs_render_with_the_supervised_template(tokenizer):
    """Both answers follow the same rendered prompt, labelled on the answer (and the turn's end) only; the prompt
    is what generation sees (the chat template's assistant header)."""
    from peftkit.core.labels import IGNORE

    template = Template.create(tokenizer, "auto", "preference")
    rows, _ = [dict(TRL)], None
    from peftkit.data.formats import validate

    validate(rows, ["row 0"], "preference")
    enc, truncated = encode_pair(template, rows[0], 256)
    prompt = tokenizer(template.prompt_text({"messages": [*rows[0]["messages"], {"role": "assistant",
                                                                                  "content": "Paris."}]}),
                       add_special_tokens=False)["input_ids"]
    for side in ("", "rejected_"):
        ids, labels = enc[f"{side}input_ids"], enc[f"{side}labels"]
        assert ids[: len(prompt)] == prompt and all(t == IGNORE for t in labels[: len(prompt)])
        assert all(t != IGNORE for t in labels[len(prompt):])
    assert tokenizer.decode(enc["input_ids"][len(prompt):]).startswith("Paris.")
    assert tokenizer.decode(enc["rejected_input_ids"][len(prompt):]).startswith("Rome.")
    assert not truncated


def test_built_in_preference_set():
    splits = load_splits("chatterbot-preference")
    chat = load_splits("chatterbot")
    assert splits.format == "preference" and len(splits.train) == len(chat.train)
    assert all(r["chosen"] != r["rejected"] for r in splits.train)
    # the same prompts land in the same splits as chatterbot's (no test prompt is trained on in either)
    assert [r["messages"][0]["content"] for r in splits.test] == [r["instruction"] for r in chat.test]
    assert [r["chosen"] for r in splits.test] == [r["output"] for r in chat.test]

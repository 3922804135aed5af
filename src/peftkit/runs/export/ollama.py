"""An Ollama ``Modelfile`` for an exported GGUF, its chat template translated from the tokenizer's own.

No table of known templates: the tokenizer's Jinja template is *measured*. Rendering conversations whose contents are
sentinels shows what each role's message is wrapped in (``before + content + after``), what comes before the first
message (e.g. a BOS), the assistant header that asks for an answer, and any system prompt the template adds when a
conversation has none (SmolLM2 adds one). The parts are then checked: re-assembled, they must reproduce the
tokenizer's rendering of every test conversation exactly; if not (a template that renders a message differently by
position, or drops some), the Modelfile is refused rather than written wrong. The parts become a Go template
(Ollama's ``TEMPLATE``), the added system prompt its ``SYSTEM``, and the markers that end an answer its ``stop``
parameters.

Use: ``ollama create NAME -f OUT/Modelfile``, then ``ollama run NAME``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from peftkit.errors import ConfigError

ROLES = ("system", "user", "assistant")
_MARK = "PEFTKIT{}MARK"  # sentinel contents: never in a real template, untouched by trim/strip filters


@dataclass
class ChatParts:
    """A chat template as plain pieces.

    Attributes:
        head: text before the first message.
        before, after: per role, the text around a message's content.
        generation: the assistant header that asks the model to answer (``add_generation_prompt``).
        default_system: the system prompt the template adds to a conversation without one ("" if none).
    """

    head: str
    before: dict[str, str]
    after: dict[str, str]
    generation: str
    default_system: str

    def render(self, messages: list[dict[str, str]], generation_prompt: bool = False) -> str:
        """The conversation rendered from the parts (what the Go template does)."""
        if self.default_system and (not messages or messages[0]["role"] != "system"):
            messages = [{"role": "system", "content": self.default_system}, *messages]
        text = self.head + "".join(self.before[m["role"]] + m["content"] + self.after[m["role"]] for m in messages)
        return text + (self.generation if generation_prompt else "")


def chat_parts(tokenizer: Any) -> ChatParts:
    """Measure the tokenizer's chat template (module docstring).

    Raises:
        ConfigError: the tokenizer has no chat template, or one the parts cannot reproduce.
    """
    if not tokenizer.chat_template:
        raise ConfigError("the tokenizer has no chat template: nothing to translate for Ollama")

    def render(messages: list[dict[str, str]], gen: bool = False) -> str:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)

    m = [_MARK.format(i) for i in range(6)]
    convo = [{"role": "system", "content": m[0]}, {"role": "user", "content": m[1]},
             {"role": "assistant", "content": m[2]}, {"role": "user", "content": m[3]},
             {"role": "assistant", "content": m[4]}]
    try:
        full = render(convo)
        gen_full = render(convo[:4], gen=True)
    except Exception as e:  # a template that refuses a system message raises its own exception type
        raise ConfigError(f"the chat template cannot be translated for Ollama: it fails on a plain conversation "
                          f"({type(e).__name__}: {e})") from None
    pieces = _split(full, m[:5])  # text before m0, between m0..m1, ..., after m4
    # each piece between two contents is after[prev] + before[next]; the tail after a role is its after[]
    after = {"system": "", "user": "", "assistant": ""}
    try:
        after["assistant"] = pieces[5]
        after["user"] = _split(render(convo[:2]), m[:2])[2]
        after["system"] = _split(render(convo[:1]), m[:1])[1]
    except Exception:
        raise ConfigError("the chat template cannot be translated for Ollama: it does not render a conversation "
                          "message by message") from None
    before = {}
    for i, role in ((1, "user"), (2, "assistant")):
        prev = convo[i - 1]["role"]
        if not pieces[i].startswith(after[prev]):
            raise ConfigError(f"the chat template cannot be translated for Ollama: what follows a {prev} message "
                              "depends on the next message")
        before[role] = pieces[i][len(after[prev]):]
    head_and_system = pieces[0]
    # the system message's wrapper: the template's own default system prompt, if any, shows it
    plain = render(convo[1:2])
    user_start = _split(plain, [m[1]])[0]
    if not user_start.endswith(before["user"]):
        raise ConfigError("the chat template cannot be translated for Ollama: a user message is wrapped "
                          "differently without a system message")
    lead = user_start[: len(user_start) - len(before["user"])]  # head, or head + a default system block
    if head_and_system.startswith(lead):
        head, before["system"], default_system = lead, head_and_system[len(lead):], ""
    else:
        head, before["system"], default_system = _default_system(lead, head_and_system, after["system"])
    if gen_full.startswith(render(convo[:4])):
        generation = gen_full[len(render(convo[:4])):]
    else:
        raise ConfigError("the chat template cannot be translated for Ollama: its generation prompt rewrites the "
                          "conversation")
    parts = ChatParts(head, before, after, generation, default_system)
    _check(parts, render)
    return parts


def _default_system(lead: str, head_and_system: str, after_system: str) -> tuple[str, str, str]:
    """Split ``lead`` (head + before[system] + DEFAULT + after[system]) using ``head_and_system`` (head +
    before[system]): returns ``(head, before_system, default)``."""
    if not lead.startswith(head_and_system) or not lead.endswith(after_system):
        raise ConfigError("the chat template cannot be translated for Ollama: it adds a system prompt in a form "
                          "its own system messages do not have")
    default = lead[len(head_and_system): len(lead) - len(after_system)]
    # every rendered conversation then starts with a system message, so the head can stay in before[system]
    return "", head_and_system, default


def _split(text: str, marks: list[str]) -> list[str]:
    out, at = [], 0
    for mark in marks:
        i = text.find(mark, at)
        if i < 0:
            raise ConfigError("the chat template cannot be translated for Ollama: it drops or rewrites a message")
        out.append(text[at:i])
        at = i + len(mark)
    out.append(text[at:])
    return out


def _check(parts: ChatParts, render: Any) -> None:
    cases = [
        [{"role": "user", "content": "Hi"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
         {"role": "user", "content": "Name a colour.\nOne word."}],
        [{"role": "system", "content": "S"}, {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
    ]
    for messages in cases:
        for gen in (False, True):
            if parts.render(messages, gen) != render(messages, gen):
                raise ConfigError("the chat template cannot be translated for Ollama: its pieces do not reproduce "
                                  f"the template's rendering of {json.dumps(messages)}")


# -- the Modelfile ----------------------------------------------------------------------------------------------------
def go_template(parts: ChatParts) -> str:
    """Ollama's ``TEMPLATE``: the messages wrapped by role, the assistant header after the last non-assistant one."""

    def lit(text: str) -> str:  # Go template literal text: only "{{" needs escaping
        return text.replace("{{", '{{ "{{" }}')

    body = "".join(
        f'{"{{ if" if i == 0 else "{{ else if"} eq $m.Role "{role}" }}}}'
        f"{lit(parts.before[role])}{{{{ $m.Content }}}}{lit(parts.after[role])}"
        for i, role in enumerate(ROLES)
    )
    return (f"{lit(parts.head)}{{{{ range $i, $m := .Messages }}}}{body}{{{{ end }}}}"
            f'{{{{ if and (eq (len (slice $.Messages $i)) 1) (ne $m.Role "assistant") }}}}{lit(parts.generation)}'
            "{{ end }}{{ end }}")


def stop_words(parts: ChatParts, tokenizer: Any) -> list[str]:
    """Markers that end an answer: special tokens in what follows an assistant message, and EOS."""
    specials = [t for t in tokenizer.all_special_tokens if t and t in parts.after["assistant"]]
    specials += [t.content for t in tokenizer.added_tokens_decoder.values()
                 if t.special and t.content in parts.after["assistant"]]
    if tokenizer.eos_token:
        specials.append(tokenizer.eos_token)
    return list(dict.fromkeys(specials))


def modelfile(model_file: str, tokenizer: Any, adapter_file: str | None = None, context: int = 4096,
              parameters: dict[str, Any] | None = None) -> str:
    """The Modelfile text: ``FROM`` the model GGUF, ``ADAPTER`` the LoRA GGUF (paths relative to the Modelfile),
    the translated TEMPLATE, SYSTEM (the template's own default system prompt), stop words and parameters."""
    parts = chat_parts(tokenizer)
    template = go_template(parts)
    if '"""' in template or '"""' in parts.default_system:
        raise ConfigError('the chat template contains """, which a Modelfile cannot quote')
    lines = [f"FROM ./{model_file}"]
    if adapter_file:
        lines.append(f"ADAPTER ./{adapter_file}")
    lines.append(f'TEMPLATE """{template}"""')
    if parts.default_system:
        lines.append(f'SYSTEM """{parts.default_system}"""')
    for word in stop_words(parts, tokenizer):
        lines.append(f"PARAMETER stop {json.dumps(word)}")
    lines.append(f"PARAMETER num_ctx {context}")
    for key, value in (parameters or {}).items():
        lines.append(f"PARAMETER {key} {value}")
    return "\n".join(lines) + "\n"


def parse_modelfile(text: str) -> dict[str, Any]:
    """The instructions of a Modelfile (``FROM``, ``ADAPTER``, ``TEMPLATE``, ``SYSTEM``: strings; ``PARAMETER``:
    ``[(name, value), ...]``), as Ollama's parser reads them (triple-quoted values may span lines).

    Raises:
        ConfigError: an unknown instruction or an unterminated quote (with its line number).
    """
    out: dict[str, Any] = {"PARAMETER": []}
    lines = text.splitlines(keepends=True)
    i = 0
    while i < len(lines):
        line = lines[i]
        i += 1
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        word, _, rest = line.lstrip().partition(" ")
        word = word.strip().upper()
        if word not in ("FROM", "ADAPTER", "TEMPLATE", "SYSTEM", "PARAMETER", "LICENSE", "MESSAGE"):
            raise ConfigError(f"Modelfile line {i}: unknown instruction {word!r}")
        if rest.startswith('"""'):
            value, start = rest[3:], i
            while '"""' not in value:
                if i >= len(lines):
                    raise ConfigError(f'Modelfile line {start}: """ is never closed')
                value += lines[i]
                i += 1
            value = value[: value.index('"""')]
        else:
            value = rest.strip()
        if word == "PARAMETER":
            name, _, v = value.partition(" ")
            out["PARAMETER"].append((name, json.loads(v) if v.startswith('"') else v))
        else:
            out[word] = value
    return out

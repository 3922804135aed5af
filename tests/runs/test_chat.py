"""``peftkit chat``: the streamed answer is generate()'s answer, the conversation is kept and trimmed to the
context, commands work, and the command answers through a pipe and in a terminal (pty)."""

from __future__ import annotations

import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

from peftkit.data.template import Template, user_example
from peftkit.errors import ConfigError
from peftkit.eval.generate import generate
from peftkit.runs.chat import ChatSession, run_chat


@pytest.fixture
def session(tiny_lm) -> ChatSession:
    model, tok = tiny_lm
    return ChatSession(model, Template.create(tok, "chat"), max_new_tokens=8)


def test_streamed_pieces_are_generates_answer(session: ChatSession) -> None:
    pieces: list[str] = []
    answer = session.reply("Name a fruit.", pieces.append)
    assert len(pieces) > 1 and "".join(pieces).strip() == answer
    assert answer == generate(session.model, session.template, [user_example("Name a fruit.")], 8)[0]


def test_history_is_kept_then_trimmed_to_the_context(session: ChatSession) -> None:
    first = session.reply("Hello", lambda _: None)
    assert session.history == [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": first}]
    prompt = session.template.tokenizer.decode(session.prompt_ids("Again"))
    assert "Hello" in prompt and first in prompt
    session.context = len(session.prompt_ids("Again")) + session.max_new_tokens - 1  # one token short
    assert "Hello" not in session.template.tokenizer.decode(session.prompt_ids("Again"))
    session.context = 5
    with pytest.raises(ConfigError, match="does not fit the model's 5"):
        session.prompt_ids("Again")


def test_commands(session: ChatSession) -> None:
    out: list[str] = []
    run_chat(session, ["Hi", "/system Be brief.", "Hi", "/reset", "/exit", "never read"], out.append)
    text = "".join(out)
    assert "(system message set; conversation reset)" in text and "(conversation reset)" in text
    assert session.history == [] and session.system == "Be brief."


def _cli(model_dir: Path) -> list[str]:
    return [sys.executable, "-m", "peftkit", "chat", "--model", str(model_dir), "--max-new-tokens", "6"]


def _read_until(fd: int, marker: bytes, seen: bytearray, timeout: float = 120) -> None:
    end = time.monotonic() + timeout
    while marker not in seen:
        assert time.monotonic() < end, f"no {marker!r} in {bytes(seen)!r}"
        if select.select([fd], [], [], 1)[0]:
            try:
                seen += os.read(fd, 4096)
            except OSError:
                break


def test_pipe_and_terminal_answer_alike(tiny_lm_dir: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    piped = subprocess.run(_cli(tiny_lm_dir), input="Hello\n/reset\nHello\n", capture_output=True, text=True,
                           env=env, timeout=300)
    assert piped.returncode == 0, piped.stderr
    lines = [x for x in piped.stdout.splitlines() if x]
    assert lines[1] == "(conversation reset)" and lines[0] == lines[2]  # same answer after /reset (greedy)
    leader, follower = pty.openpty()
    proc = subprocess.Popen(_cli(tiny_lm_dir), stdin=follower, stdout=follower, stderr=subprocess.DEVNULL, env=env)
    os.close(follower)
    seen = bytearray()
    try:
        _read_until(leader, b">>> ", seen)
        assert b"/reset: forget the conversation" in seen
        os.write(leader, b"Hello\n")
        seen = bytearray()
        _read_until(leader, b">>> ", seen)  # the answer, then the next prompt
        os.write(leader, b"/exit\n")
        assert proc.wait(timeout=60) == 0
    finally:
        proc.kill()
        os.close(leader)
    answer = bytes(seen).decode().replace("\r\n", "\n").split("\n")
    assert lines[0] in [a.strip() for a in answer]

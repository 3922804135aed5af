"""README's service example, run as written against a live server (the model swapped for the tiny one, the URL
and key for the test server's): if the README's code stops working, this fails."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

from tests.serve.conftest import chat_jsonl

README = Path(__file__).resolve().parents[2] / "README.md"


def _example() -> str:
    text = README.read_text(encoding="utf-8")
    after = text.split("<!-- service-example", 1)[1]
    return re.search(r"```python\n(.*?)```", after, re.S).group(1)


def test_readme_service_example_runs(busy_service, tmp_path, monkeypatch):
    service = busy_service
    key = service.add_key("me")
    (tmp_path / "colours.jsonl").write_bytes(chat_jsonl(16))
    monkeypatch.chdir(tmp_path)
    code = _example()
    assert 'model="smollm2-135m"' in code and "http://127.0.0.1:8000/v1" in code
    code = code.replace('model="smollm2-135m"', 'model="tiny"').replace("http://127.0.0.1:8000/v1", service.url)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README.md", "exec"), {"KEY": key})  # noqa: S102 - the README's own code
    lines = out.getvalue().splitlines()
    assert re.fullmatch(r"succeeded ft:tiny:colours:ftjob-\w+", lines[0]), lines
    assert lines[1] == "The job has successfully completed" and len(lines) == 4
    job_id = lines[0].rsplit(":", 1)[1]
    cfg = (service.storage / "jobs" / job_id / "config.yaml").read_text()
    assert "name: dora" in cfg  # extra_body chose the method

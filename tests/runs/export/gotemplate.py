"""A small interpreter of Go's text/template, enough for the Modelfile TEMPLATEs peftkit writes (and Ollama's
usual ones): literal text, ``{{ range $i, $m := .Messages }}``, ``if`` / ``else if`` / ``else`` / ``end``, the
functions ``eq ne and or not len slice``, variables, fields, string literals, and ``{{-``/``-}}`` trimming. A test
oracle: an exported TEMPLATE is run on conversations and compared with the tokenizer's own Jinja rendering."""

from __future__ import annotations

import re
import shlex
from typing import Any

_ACTION = re.compile(r"\{\{(-?)\s*(.*?)\s*(-?)\}\}", re.S)


def render(template: str, messages: list[dict[str, str]], system: str = "") -> str:
    nodes, _ = _parse(_lex(template), 0, ())
    out: list[str] = []
    _run(nodes, {"$": {"Messages": [{"Role": m["role"], "Content": m["content"]} for m in messages],
                       "System": system}}, out)
    return "".join(out)


def _lex(text: str) -> list[tuple[str, str]]:
    items, at = [], 0
    for m in _ACTION.finditer(text):
        lit = text[at:m.start()]
        if m.group(1):
            lit = lit.rstrip()
        if items and items[-1][0] == "trim":
            items.pop()
            lit = lit.lstrip()
        items.append(("text", lit))
        items.append(("action", m.group(2)))
        if m.group(3):
            items.append(("trim", ""))
        at = m.end()
    tail = text[at:]
    if items and items[-1][0] == "trim":
        items.pop()
        tail = tail.lstrip()
    items.append(("text", tail))
    return items


def _parse(items: list[tuple[str, str]], i: int, stop: tuple[str, ...]) -> tuple[list, int]:
    nodes: list = []
    while i < len(items):
        kind, body = items[i]
        i += 1
        if kind == "text":
            nodes.append(("text", body))
        elif body.split(" ")[0] in stop or body in stop:
            return nodes, i - 1
        elif body.startswith("range "):
            head, expr = body[6:].split(":=")
            inner, i = _parse(items, i, ("end",))
            nodes.append(("range", [v.strip() for v in head.split(",")], expr.strip(), inner))
            i += 1
        elif body.startswith("if "):
            branches, cond = [], body[3:]
            while True:
                inner, i = _parse(items, i, ("else", "end"))
                branches.append((cond, inner))
                tag = items[i][1]
                i += 1
                if tag == "end":
                    break
                cond = tag[8:] if tag.startswith("else if ") else "true"
            nodes.append(("if", branches))
        else:
            nodes.append(("print", body))
    return nodes, i


def _run(nodes: list, scope: dict[str, Any], out: list[str]) -> None:
    for node in nodes:
        if node[0] == "text":
            out.append(node[1])
        elif node[0] == "print":
            out.append(str(_eval(node[1], scope)))
        elif node[0] == "range":
            for i, item in enumerate(_eval(node[2], scope)):
                _run(node[3], {**scope, node[1][0]: i, node[1][-1]: item}, out)
        else:
            for cond, inner in node[1]:
                if cond == "true" or _eval(cond, scope):
                    _run(inner, scope, out)
                    break


def _eval(expr: str, scope: dict[str, Any]) -> Any:
    tokens = shlex.shlex(expr.replace("(", " ( ").replace(")", " ) "), posix=False, punctuation_chars="")
    tokens.wordchars += "$."
    value, _ = _call(list(tokens), 0, scope)
    return value


def _call(tokens: list[str], i: int, scope: dict[str, Any]) -> tuple[Any, int]:
    args = []
    while i < len(tokens) and tokens[i] != ")":
        if tokens[i] == "(":
            v, i = _call(tokens, i + 1, scope)
            args.append(v)
            i += 1
        else:
            args.append(_atom(tokens[i], scope))
            i += 1
    fn, rest = args[0], args[1:]
    if callable(fn):
        return fn(*rest), i
    return fn, i


_FUNCS = {"eq": lambda a, b: a == b, "ne": lambda a, b: a != b, "and": lambda *a: all(a), "or": lambda *a: any(a),
          "not": lambda a: not a, "len": len, "slice": lambda s, i, j=None: s[i:j]}


def _atom(tok: str, scope: dict[str, Any]) -> Any:
    if tok in _FUNCS:
        return _FUNCS[tok]
    if tok.startswith('"'):
        return tok[1:-1].encode().decode("unicode_escape")
    if tok.isdigit():
        return int(tok)
    if tok.startswith("."):
        tok = "$" + tok
    root, *fields = tok.split(".")
    value = scope[root]
    for f in fields:
        if f:
            value = value[f]
    return value

"""Prompt files for the t2i recipes: ``.txt`` (one prompt per line, ``#`` comments) or ``.jsonl``.

A ``.jsonl`` line is an object with a string ``"prompt"``; other keys (ids, categories) are ignored.
Every problem is reported as ``file:line: message``; a file without prompts is an error.
"""

from __future__ import annotations

import json
from pathlib import Path

SUFFIXES = (".txt", ".jsonl")


class PromptFileError(ValueError):
    """A prompt file is missing, of an unknown type, malformed or empty."""


def load_prompts(path: str | Path) -> list[str]:
    """The prompts of ``path``, in file order (duplicates kept: each line is one prompt)."""
    path = Path(path)
    if not path.is_file():
        raise PromptFileError(f"prompt file {path} does not exist")
    if path.suffix not in SUFFIXES:
        raise PromptFileError(
            f"prompt file {path}: unknown type {path.suffix!r}; use .txt (one prompt per line) "
            f'or .jsonl ({{"prompt": ...}} per line)'
        )
    prompts: list[str] = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            text = line.strip()
            if not text:
                continue
            if path.suffix == ".txt":
                if not text.startswith("#"):
                    prompts.append(text)
                continue
            prompts.append(_jsonl_prompt(text, f"{path}:{number}"))
    if not prompts:
        raise PromptFileError(f"prompt file {path} has no prompts")
    return prompts


def _jsonl_prompt(text: str, where: str) -> str:
    try:
        row = json.loads(text)
    except json.JSONDecodeError as e:
        raise PromptFileError(f"{where}: not valid JSON ({e.msg})") from None
    if not isinstance(row, dict) or "prompt" not in row:
        raise PromptFileError(
            f'{where}: each line must be a JSON object with a "prompt" field, got {text[:80]!r}'
        )
    prompt = row["prompt"]
    if not isinstance(prompt, str) or not prompt.strip():
        raise PromptFileError(f'{where}: "prompt" must be a non-empty string, got {prompt!r}')
    return prompt.strip()

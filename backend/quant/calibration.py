"""Calibration text for `trimtab convert`: read it (-c), tokenize it, cut it into rows of tokens.

    text, label = read_text(path_or_None)          # label names the source in quantization_config
    rows = token_rows(tokenizer, text, rows=100, length=2048, flag="-r/-l")   # int64 [rows, length]

Formats (-c): `.txt` (any other suffix too) is read as UTF-8 text; `.jsonl` takes each line's "text"
field; `.parquet` its "text" column (needs pyarrow or fastparquet through pandas).

Without -c the default is the source text of this Python's standard library (`.py` files in sorted
path order): it is on every machine trimtab runs on, needs no network, never changes for one Python
version, and mixes English prose (docstrings, comments) with code. It is a fallback: calibrating on
text like the model's real inputs (-c) is better.

Rows are `rows` windows of `length` consecutive tokens spread evenly over the whole text (the first
starts at its beginning, the last ends at its end), so they sample all of it rather than its opening.
A text shorter than rows × length tokens is an error that says both numbers.
"""
from __future__ import annotations

import hashlib
import json
import sysconfig
from pathlib import Path

import torch

from trimtab.backend.errors import TrimtabError

DEFAULT_LABEL = "python-stdlib"
# characters read per token wanted, before tokenizing the default text (English and code: ~3-4)
_CHARS_PER_TOKEN = 4


def read_text(path: str | None, *, tokens_wanted: int = 0, tokenizer=None) -> tuple[str, str]:
    """→ (text, label). For the default text, `tokens_wanted` (counted with `tokenizer` when given)
    bounds how much is read: twice the usual characters per token, more if the tokenizer needs it."""
    if path is None:
        chars = tokens_wanted * _CHARS_PER_TOKEN * 2
        text = _stdlib_text(chars)
        while tokenizer is not None and chars and len(tokenizer.encode(text, add_special_tokens=False)) < tokens_wanted:
            chars *= 2
            longer = _stdlib_text(chars)
            if len(longer) == len(text):         # the whole library is read: token_rows will say it is short
                break
            text = longer
        return text, DEFAULT_LABEL
    file = Path(path).expanduser()
    if not file.is_file():
        raise TrimtabError(f"{file}: calibration text (-c) not found")
    suffix = file.suffix.lower()
    try:
        if suffix == ".jsonl":
            text = _jsonl_text(file)
        elif suffix == ".parquet":
            text = _parquet_text(file)
        else:
            text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise TrimtabError(f"{file}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not text.strip():
        raise TrimtabError(f"{file}: the calibration text is empty")
    return text, file.name


def fingerprint(text: str) -> str:
    """A short hash that tells whether two measurements saw the same text."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def token_rows(tokenizer, text: str, *, rows: int, length: int, flags: str) -> torch.Tensor:
    """int64 [rows, length]: windows spread evenly over the tokenized text. `flags` names the options
    (e.g. "-r 100 × -l 2048") in the error for a text that is too short."""
    if rows < 1 or length < 2:
        raise TrimtabError(f"{flags}: need at least one row of at least two tokens")
    ids = tokenizer.encode(text, add_special_tokens=False)
    needed = rows * length
    if len(ids) < needed:
        raise TrimtabError(f"the calibration text has {len(ids):,} tokens, but {flags} needs {needed:,}; "
                           "give a longer text (-c) or fewer or shorter rows")
    ids = torch.tensor(ids, dtype=torch.int64)
    last = len(ids) - length
    starts = [round(i * last / (rows - 1)) if rows > 1 else 0 for i in range(rows)]
    return torch.stack([ids[s:s + length] for s in starts])


def _jsonl_text(file: Path) -> str:
    parts = []
    for number, line in enumerate(file.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise TrimtabError(f"{file}: line {number} is not JSON ({e.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise TrimtabError(f"{file}: line {number} has no string field 'text'")
        parts.append(record["text"])
    return "\n\n".join(parts)


def _parquet_text(file: Path) -> str:
    try:
        import pandas
        frame = pandas.read_parquet(file, columns=["text"])
    except ImportError as e:
        raise TrimtabError(f"{file}: reading parquet needs pyarrow (pip install pyarrow): {e}") from None
    except (KeyError, ValueError) as e:
        raise TrimtabError(f"{file}: no 'text' column ({e})") from None
    return "\n\n".join(str(t) for t in frame["text"].tolist())


def _stdlib_text(chars: int) -> str:
    root = Path(sysconfig.get_paths()["stdlib"])
    parts, total = [], 0
    for file in sorted(root.rglob("*.py")):
        if "site-packages" in file.parts or "test" in file.parts[len(root.parts):len(root.parts) + 1]:
            continue
        try:
            part = file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        parts.append(part)
        total += len(part)
        if chars and total >= chars:
            break
    if not parts:
        raise TrimtabError(f"no calibration text given (-c) and no Python source found under {root} to use instead")
    return "\n\n".join(parts)

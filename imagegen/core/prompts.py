"""Prompt text as the encoders see it: weighting syntax and token counts (no torch here).

Weighting follows the syntax people know from AUTOMATIC1111's web UI: ``(word)`` multiplies
the attention to ``word`` by 1.1, ``[word]`` divides it by 1.1, ``(word:1.3)`` sets the factor,
brackets nest (factors multiply), and ``\\(`` ``\\)`` ``\\[`` ``\\]`` are literal brackets. An
opening bracket never closed weights the rest of the prompt, a closing one never opened is
text, as there. A weight may be written in exponent form (``(word:1e1)``), so that a huge one
is refused as out of bounds (``weight_problem``) rather than read as text. The worker turns
the fragments into embeddings with ``compel``; the gateway and the worker both count a
prompt's tokens here, from the fragments, with the model's own tokenizer, so the limit a user
meets is the same wherever it is checked.
"""

from __future__ import annotations

import re
from collections.abc import Callable

ROUND = 1.1
SQUARE = 1 / 1.1
# Bounds on weighting (A1111 has none; an unbounded weight is an all-black image, or inf):
# brackets nest at most this deep, and every fragment's weight, the product of its brackets'
# factors, stays within +-MAX_WEIGHT (ten nested "(...)" are 1.1**10 = 2.6).
MAX_NESTING = 10
MAX_WEIGHT = 10.0

_ATTENTION = re.compile(
    r"""
    \\\(|\\\)|\\\[|\\]|\\\\|\\|\(|\[|:\s*([+-]?[.\d]+(?:[eE][+-]?\d+)?)\s*\)|\)|]|[^\\()\[\]:]+|:
    """,
    re.X,
)

Fragments = list[tuple[str, float]]


def parse_weights(text: str) -> Fragments:
    """``text`` as (fragment, weight) pairs in order; neighbours of equal weight merged."""
    res: list[list[str | float]] = []
    round_open: list[int] = []
    square_open: list[int] = []

    def multiply(start: int, factor: float) -> None:
        for part in res[start:]:
            part[1] = float(part[1]) * factor

    for match in _ATTENTION.finditer(text):
        token, weight = match.group(0), match.group(1)
        if token.startswith("\\"):
            res.append([token[1:] if len(token) > 1 else token, 1.0])
        elif token == "(":
            round_open.append(len(res))
        elif token == "[":
            square_open.append(len(res))
        elif weight is not None and round_open:
            multiply(round_open.pop(), _number(weight))
        elif token == ")" and round_open:
            multiply(round_open.pop(), ROUND)
        elif token == "]" and square_open:
            multiply(square_open.pop(), SQUARE)
        else:
            res.append([token, 1.0])
    for start in round_open:
        multiply(start, ROUND)
    for start in square_open:
        multiply(start, SQUARE)
    merged: Fragments = []
    for part, factor in res:
        assert isinstance(part, str)
        if merged and merged[-1][1] == factor:
            merged[-1] = (merged[-1][0] + part, float(factor))
        else:
            merged.append((part, float(factor)))
    return merged or [("", 1.0)]


def weight_problem(text: str) -> str | None:
    """Why `text`'s weighting is out of bounds (brackets nested past MAX_NESTING, or a
    fragment weighted past +-MAX_WEIGHT), or None. Cost is linear in the text."""
    depth = deepest = 0
    for match in _ATTENTION.finditer(text):
        token = match.group(0)
        if token in ("(", "["):
            depth += 1
            deepest = max(deepest, depth)
        elif depth and (token in (")", "]") or match.group(1) is not None):
            depth -= 1
    if deepest > MAX_NESTING:
        return f"nests weighting brackets {deepest} deep; at most {MAX_NESTING}"
    for part, weight in parse_weights(text):
        if not -MAX_WEIGHT <= weight <= MAX_WEIGHT:  # NaN and inf fail this too
            shown = part if len(part) <= 40 else part[:40] + "..."
            return (
                f"weights {shown!r} by {weight:g}; a weight (the product of its brackets') "
                f"must be within -{MAX_WEIGHT:g}..{MAX_WEIGHT:g}"
            )
    return None


def _number(value: str) -> float:
    try:
        return float(value)
    except ValueError:  # "(word:1.2.3)": A1111 would fail; take the text as written
        return 1.0


def is_weighted(fragments: Fragments) -> bool:
    return any(weight != 1.0 for _, weight in fragments)


def plain_text(fragments: Fragments) -> str:
    """The text the encoder reads, brackets and weights taken out."""
    return "".join(part for part, _ in fragments)


def count_tokens(encode: Callable[[str], list[int]], text: str, weighting: bool) -> int:
    """Tokens the text encoder will read for ``text`` (no start/end markers): each weighted
    fragment is tokenized on its own, as the worker encodes it. ``encode`` is the model's
    tokenizer without special tokens."""
    if not weighting:
        return len(encode(text))
    return sum(len(encode(part)) for part, _ in parse_weights(text) if part)


def max_prompt_tokens(window: int, chunks: int) -> int:
    """The longest prompt, in tokens, that ``chunks`` windows of ``window`` tokens (each with
    its start and end marker) hold."""
    return chunks * (window - 2)


def too_long(tokens: int, limit: int, model: str) -> str:
    """The one message for a text past its model's limit; the gateway's 422 and the worker's
    `invalid_request` failure both put the field's name before it (`prompt: ...`)."""
    return (
        f"{tokens} tokens for model {model!r} is past its limit of {limit} tokens "
        f"(max_prompt_tokens in GET /v1/models); shorten it"
    )

"""Counting a prompt's tokens at the edge, with the model's own tokenizer.

Workers write each model's tokenizer (the `tokenizers` JSON) to Redis under its sha256
(`Keys.tokenizer`) and name it in the model's record; the gateway loads it once per digest and
counts here, so a prompt past the model's `max_prompt_tokens` is a 422 before a job exists.
When the tokenizer cannot be had (not written yet, `tokenizers` missing) the gateway lets the
prompt through and the worker makes the same check when it claims the job (`invalid_request`).
`tokenizers` is Rust with no torch: the gateway stays free of it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import redis.asyncio as aioredis

from imagegen.core.contract import Keys, ModelInfo

log = logging.getLogger("imagegen.gateway")

Encode = Callable[[str], list[int]]


class TokenCounters:
    """Tokenizers by digest, loaded from Redis on first use and kept (a digest never changes
    meaning)."""

    def __init__(self, connection: aioredis.Redis) -> None:
        self.redis = connection
        self._tokenizers: dict[str, Any] = {}

    async def encoder(self, info: ModelInfo) -> Encode | None:
        """The model's tokenizer without special tokens; None when the gateway cannot count."""
        if info.max_prompt_tokens is None:
            return None
        tokenizer = await self._tokenizer(info)
        if tokenizer is None:
            return None

        def encode(text: str) -> list[int]:
            ids: list[int] = tokenizer.encode(text, add_special_tokens=False).ids
            return ids

        return encode

    async def known_word(self, info: ModelInfo, word: str) -> bool | None:
        """Whether the model's tokenizer reads `word` as one token it knows (a trigger word
        must be new); None when the gateway cannot tell."""
        tokenizer = await self._tokenizer(info)
        if tokenizer is None:
            return None
        ids = tokenizer.encode(word, add_special_tokens=False).ids
        unk = getattr(tokenizer.model, "unk_token", None)
        return len(ids) == 1 and ids[0] != (tokenizer.token_to_id(unk) if unk else None)

    async def _tokenizer(self, info: ModelInfo) -> Any | None:
        digest = info.tokenizer
        if digest is None:
            return None
        if digest in self._tokenizers:
            return self._tokenizers[digest]
        try:
            from tokenizers import Tokenizer
        except ImportError:
            return None
        raw = await self.redis.get(Keys.tokenizer(digest))
        if raw is None:
            return None
        try:
            tokenizer = Tokenizer.from_str(raw.decode() if isinstance(raw, bytes) else raw)
            # Saved tokenizers may pad or cut to their window: counting needs neither.
            tokenizer.no_padding()
            tokenizer.no_truncation()
        except Exception as exc:  # a tokenizer this `tokenizers` cannot read
            log.warning("cannot read tokenizer %s of model %s: %s", digest[:12], info.id, exc)
            return None
        self._tokenizers[digest] = tokenizer
        return tokenizer

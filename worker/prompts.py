"""Prompts to embeddings for Stable Diffusion 1.x/2.x and SDXL: weights and long prompts.

A prompt without weighting syntax that fits the text encoder's window goes through the
pipeline's own ``encode_prompt``, exactly as before. A weighted one (``(word:1.3)``,
``(word)``, ``[word]``; parsed in ``imagegen.core.prompts``) or a longer one goes through
``compel``'s embeddings provider: the tokens are cut into windows of ``model_max_length``
(each with its start and end marker), each window encoded on its own and the results
concatenated along the token axis, the way AUTOMATIC1111 and compel do; each token's weight
then scales its embedding's distance from the empty prompt's (a weight below 1 blends toward
the prompt with that fragment masked out). The conditional and unconditional embeddings of a
guided image must be the same length: the shorter is padded with the empty prompt's
embedding, one window at a time, as compel pads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from imagegen.core import prompts
from imagegen.core.contract import JobSpec


class PromptTooLong(ValueError):
    """A prompt past the model's `max_prompt_tokens`; the job fails `invalid_request`."""


@dataclass(frozen=True)
class Prepared:
    """What the encoder reads for one text: the text without weighting syntax, and the
    weighted fragments when the text needs compel (weighted, or longer than one window)."""

    text: str
    fragments: prompts.Fragments | None


@dataclass(frozen=True)
class Encoded:
    """Embeddings of one text: [1, tokens, dim], and SDXL's pooled [1, dim2] (else None)."""

    embeds: torch.Tensor
    pooled: torch.Tensor | None


class PromptEncoder:
    """Encodes prompts for one SD-family pipeline; see the module docstring."""

    def __init__(self, pipe: Any, weighting: bool, max_chunks: int) -> None:
        self.pipe = pipe
        self.weighting = weighting
        self.sdxl = getattr(pipe, "text_encoder_2", None) is not None
        self.window = int(pipe.tokenizer.model_max_length)
        self.limit = prompts.max_prompt_tokens(self.window, max_chunks)
        self._providers: list[Any] | None = None

    # -- counting -----------------------------------------------------------------------------
    def _ids(self, text: str) -> list[int]:
        ids: list[int] = self.pipe.tokenizer(text, add_special_tokens=False).input_ids
        return ids

    def count(self, text: str) -> int:
        return prompts.count_tokens(self._ids, text, self.weighting)

    def check(self, spec: JobSpec) -> None:
        """Raise `PromptTooLong` naming the field if the prompt or negative prompt is past
        the limit (the gateway's check, made here when the gateway could not count)."""
        for field, text in (("prompt", spec.prompt), ("negative_prompt", spec.negative_prompt)):
            tokens = self.count(text)
            if tokens > self.limit:
                message = prompts.too_long(tokens, self.limit, spec.model)
                raise PromptTooLong(f"{field}: {message}")

    # -- encoding -------------------------------------------------------------------------------
    def prepare(self, text: str) -> Prepared:
        fragments = prompts.parse_weights(text) if self.weighting else [(text, 1.0)]
        plain = prompts.plain_text(fragments)
        if not prompts.is_weighted(fragments) and len(self._ids(plain)) <= self.window - 2:
            return Prepared(plain, None)
        return Prepared(plain, fragments)

    def encode(self, prepared: Prepared, device: torch.device) -> Encoded:
        """Embeddings of one text: the pipeline's own `encode_prompt` for a plain text within
        one window, compel otherwise."""
        if prepared.fragments is not None:
            return self.encode_long(prepared, device)
        out = self.pipe.encode_prompt(
            prompt=[prepared.text],
            device=device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=False,
        )
        return Encoded(out[0], out[2] if self.sdxl else None)

    def stock_inputs(self, spec: JobSpec, count: int, device: torch.device) -> dict[str, Any]:
        """The text arguments of a stock pipeline call for `count` images of `spec`: the
        strings themselves when neither text has weights nor runs past one window (the call
        is then exactly what it was before weighting existed), else the embeddings."""
        prompt, negative = self.prepare(spec.prompt), self.prepare(spec.negative_prompt)
        if (
            prompt.fragments is None
            and negative.fragments is None
            and (prompt.text, negative.text) == (spec.prompt, spec.negative_prompt)
        ):
            # None, not "", when empty: SDXL encodes a None negative prompt as zeros
            # (force_zeros_for_empty_prompt); SD 1.x/2.x encode None and "" alike.
            return {
                "prompt": [spec.prompt] * count,
                "negative_prompt": [spec.negative_prompt] * count if spec.negative_prompt else None,
            }
        cond = self.encode(prompt, device)
        embeds, pooled = cond.embeds, cond.pooled
        out: dict[str, Any] = {}
        zero = (
            self.sdxl and not spec.negative_prompt and self.pipe.config.force_zeros_for_empty_prompt
        )
        if spec.guidance_scale > 1 and not zero:
            # Given prompt embeddings, a stock pipeline needs the negative ones too (it would
            # encode "" at the prompt's length, past the encoder's window).
            uncond = self.encode(negative, device)
            negative_embeds = uncond.embeds
            if embeds.shape[1] != negative_embeds.shape[1]:
                empty = self.encode(self.prepare(""), device).embeds
                embeds, negative_embeds = pad_pair(embeds, negative_embeds, empty)
            out["negative_prompt_embeds"] = torch.cat([negative_embeds] * count)
            if uncond.pooled is not None:
                out["negative_pooled_prompt_embeds"] = torch.cat([uncond.pooled] * count)
        out["prompt_embeds"] = torch.cat([embeds] * count)
        if pooled is not None:
            out["pooled_prompt_embeds"] = torch.cat([pooled] * count)
        return out

    def encode_long(self, prepared: Prepared, device: torch.device) -> Encoded:
        """Embeddings of a weighted or long text, window by window (compel)."""
        assert prepared.fragments is not None
        texts = [part for part, _ in prepared.fragments if part] or [""]
        weights = [w for part, w in prepared.fragments if part] or [1.0]
        parts = [_weighted(provider, texts, weights, device) for provider in self.providers(device)]
        embeds = torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0]
        pooled = None
        if self.sdxl:
            # SDXL's pooled embedding reads the first window of the plain text, as the stock
            # pipeline reads a truncated prompt.
            pooled = self.providers(device)[-1].get_pooled_embeddings(
                [prepared.text], device=device
            )
        return Encoded(embeds, pooled)

    def providers(self, device: torch.device) -> list[Any]:
        if self._providers is None:
            from compel import EmbeddingsProvider, ReturnedEmbeddingsType, SplitLongTextMode

            pipe = self.pipe
            pairs = [(pipe.tokenizer, pipe.text_encoder)]
            kind = ReturnedEmbeddingsType.LAST_HIDDEN_STATES_NORMALIZED
            if self.sdxl:
                # SDXL reads both encoders' penultimate hidden states, not normalised.
                pairs = [p for p in pairs if p[1] is not None]
                pairs.append((pipe.tokenizer_2, pipe.text_encoder_2))
                kind = ReturnedEmbeddingsType.PENULTIMATE_HIDDEN_STATES_NON_NORMALIZED
            self._providers = [
                EmbeddingsProvider(
                    tokenizer=tokenizer,
                    text_encoder=encoder,
                    truncate=False,
                    returned_embeddings_type=kind,
                    # Hard cuts every window - 2 tokens: the chunk count, and so the limit,
                    # follows from the token count alone.
                    split_long_text_mode=SplitLongTextMode.BRUTAL,
                    device=device,
                    dtype_for_device_getter=lambda _d, enc=encoder: enc.dtype,
                )
                for tokenizer, encoder in pairs
            ]
        return self._providers


def pad_pair(
    cond: torch.Tensor, uncond: torch.Tensor, empty: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """`cond` and `uncond` ([1, tokens, dim]) made the same length by appending windows of
    `empty` (the empty prompt's embedding, [1, window, dim]; zeros for SDXL's zeroed
    unconditional rows) to the shorter one."""
    return pad_to(cond, uncond.shape[1], empty), pad_to(uncond, cond.shape[1], empty)


def pad_to(embeds: torch.Tensor, tokens: int, empty: torch.Tensor) -> torch.Tensor:
    missing = tokens - embeds.shape[1]
    if missing <= 0:
        return embeds
    window = empty.shape[1]
    fill = torch.cat([empty] * (missing // window + 1), dim=1)[:, :missing]
    return torch.cat([embeds, fill.to(embeds.dtype)], dim=1)


def _weighted(
    provider: Any, texts: list[str], weights: list[float], device: torch.device
) -> torch.Tensor:
    """[1, tokens, dim]: compel tokenizes the fragments, expands their weights to tokens and
    encodes window by window; each window's token embeddings are then multiplied by their
    weights and the window rescaled to its unweighted mean, as AUTOMATIC1111 weights."""
    ids, token_weights, mask = provider.get_token_ids_and_expand_weights(texts, weights, device)
    ones = torch.ones_like(token_weights)
    z = provider.build_weighted_embedding_tensor(ids, ones, mask, device=device)
    if bool((token_weights == 1).all()):
        return z  # type: ignore[no-any-return]
    window = provider.max_token_count
    chunks = []
    for start in range(0, z.shape[1], window):
        chunk = z[:, start : start + window]
        w = token_weights[start : start + window].to(chunk.dtype).view(1, -1, 1)
        weighted = chunk * w
        chunks.append(weighted * (chunk.mean() / weighted.mean()))
    return torch.cat(chunks, dim=1)

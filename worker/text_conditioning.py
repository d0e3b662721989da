"""A batch's text conditioning: each distinct prompt and negative prompt encoded once, as the
stock pipeline encodes it, and each job's pair of embeddings made one length."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from imagegen.core.contract import JobSpec
from worker.prompts import Prepared, PromptEncoder, pad_pair


@dataclass(frozen=True)
class JobText:
    """A job's text embeddings: [1, tokens, dim] each, the unconditional ones None unless
    guided; SDXL's pooled [1, dim2] (else None)."""

    cond: torch.Tensor
    uncond: torch.Tensor | None
    pooled: torch.Tensor | None
    pooled_uncond: torch.Tensor | None


def guided(spec: JobSpec) -> bool:
    """The stock pipeline's rule: guidance <= 1 runs the conditional half only."""
    return spec.guidance_scale > 1


class TextConditioning:
    """Encodes a run's texts (a cache by text: a negative prompt goes through the same
    tokenizer and encoder as a prompt, so one cache serves both roles) and hands out each
    job's embeddings."""

    def __init__(
        self,
        pipe: Any,
        prompts: PromptEncoder | None,
        device: torch.device,
        sdxl: bool,
        invariant: bool,
    ) -> None:
        self.pipe = pipe
        self.prompts = prompts
        self.device = device
        self.sdxl = sdxl
        self.invariant = invariant
        self._embeddings: dict[str, torch.Tensor] = {}  # text -> [1, tokens, dim]
        self._pooled: dict[str, torch.Tensor] = {}  # SDXL: text -> [1, dim2]

    def prepare(self, specs: list[JobSpec]) -> None:
        """Encode what these jobs need that is not encoded yet: their prompts, their guided
        negatives, and the empty prompt when lengths differ (it pads the shorter text)."""
        negatives = [s.negative_prompt for s in specs if guided(s)]
        texts = [s.prompt for s in specs] + [t for t in negatives if not self.zero_negative(t)]
        self.encode(texts)
        if len({self._embeddings[text].shape[1] for text in texts}) > 1:
            self.encode([""])

    def encode(self, texts: list[str]) -> None:
        """Encode the texts not encoded yet.

        A text with weights, or longer than the encoder's window, is encoded window by window
        (worker.prompts, with compel). Every other text goes through the pipeline's own
        `encode_prompt`, as before weighting existed: batch-invariant, one call per text at
        batch 1, as a solo run makes it; otherwise one call for all of them (a batch of
        distinct prompts costs one call, not one each; every text is padded to the window).
        """
        missing = [text for text in dict.fromkeys(texts) if text not in self._embeddings]
        plain: dict[str, str] = {}  # text -> what the encoder reads (weighting syntax out)
        for text in missing:
            prepared = self.prompts.prepare(text) if self.prompts else Prepared(text, None)
            if prepared.fragments is None:
                plain[text] = prepared.text
                continue
            assert self.prompts is not None
            encoded = self.prompts.encode_long(prepared, self.device)
            self._embeddings[text] = encoded.embeds
            if encoded.pooled is not None:
                self._pooled[text] = encoded.pooled
        keys = list(plain)
        groups = [[k] for k in keys] if self.invariant else [keys] if keys else []
        for group in groups:
            out = self.pipe.encode_prompt(
                prompt=[plain[k] for k in group],
                device=self.device,
                num_images_per_prompt=1,
                do_classifier_free_guidance=False,
            )
            embeds = out[0]
            for i, text in enumerate(group):
                self._embeddings[text] = embeds[i : i + 1]
                if self.sdxl:
                    self._pooled[text] = out[2][i : i + 1]

    def zero_negative(self, text: str) -> bool:
        """SDXL, like its stock pipeline given no negative prompt, uses zeros for an empty one
        (`force_zeros_for_empty_prompt`)."""
        return bool(self.sdxl and not text and self.pipe.config.force_zeros_for_empty_prompt)

    def for_job(self, spec: JobSpec) -> JobText:
        """A job's conditional and (guided) unconditional embeddings, the same length: the
        shorter padded with windows of the empty prompt's embedding."""
        cond, pooled = self._embeddings[spec.prompt], self._pooled.get(spec.prompt)
        if not guided(spec):
            return JobText(cond, None, pooled, None)
        if self.zero_negative(spec.negative_prompt):
            assert pooled is not None
            return JobText(cond, torch.zeros_like(cond), pooled, torch.zeros_like(pooled))
        uncond = self._embeddings[spec.negative_prompt]
        if cond.shape[1] != uncond.shape[1]:
            cond, uncond = pad_pair(cond, uncond, self._embeddings[""])
        return JobText(cond, uncond, pooled, self._pooled.get(spec.negative_prompt))

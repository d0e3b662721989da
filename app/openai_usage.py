"""OpenAI's `usage` of an images answer: its token counts. The prompt's tokens are counted with
the model's own tokenizer (the one that bounds prompts, app.prompt_tokens); images carry no
token meter here (fair use counts megapixel-steps), so image tokens are 0."""

from __future__ import annotations

from typing import Any

from app.schemas import JobDocument
from app.service import GenerationService


async def openai_usage(service: GenerationService, job: JobDocument) -> dict[str, Any]:
    """`{"input_tokens", "input_tokens_details": {"text_tokens", "image_tokens"},
    "output_tokens", "total_tokens"}` for a finished job."""
    info = await service.registry.get(job.request.model)
    encode = await service.token_counters.encoder(info) if info is not None else None
    text = 0
    if encode is not None:
        text = len(encode(job.request.prompt))
        if job.request.negative_prompt:
            text += len(encode(job.request.negative_prompt))
    return {
        "input_tokens": text,
        "input_tokens_details": {"text_tokens": text, "image_tokens": 0},
        "output_tokens": 0,
        "total_tokens": text,
    }

"""`GET /v1/webhook-secret`: the secret that verifies the calling key's webhooks."""

from __future__ import annotations

from fastapi import APIRouter, Request

from app.auth import PrincipalDep
from app.schemas import WebhookSecret
from imagegen.core.webhooks import Secrets

router = APIRouter(prefix="/v1", tags=["webhooks"])


@router.get("/webhook-secret", response_model=WebhookSecret)
async def get_webhook_secret(request: Request, principal: PrincipalDep) -> WebhookSecret:
    """The caller's own webhook signing secret (`whsec_` + base64, Standard Webhooks): each
    delivery's `webhook-signature` is `v1,` + base64 HMAC-SHA256 of `{id}.{timestamp}.{body}`
    under it. An open service has one secret."""
    secrets: Secrets = request.app.state.webhook_secrets
    return WebhookSecret(secret=await secrets.afor_key(principal.name))

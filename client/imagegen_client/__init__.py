"""Typed Python client of the imagegen HTTP image-generation API.

from imagegen_client import Client

with Client() as client:  # $IMAGEGEN_BASE_URL, $IMAGEGEN_API_KEY
    result = client.generate("a red circle on a blue square", steps=20, seed=1)
    result.images[0].save("circle.png")
"""

from ._async_client import AsyncClient
from ._base import DEFAULT_BASE_URL, DEFAULT_TIMEOUT, JobRef, RetryPolicy
from ._client import Client
from ._errors import (
    APIError,
    Conflict,
    ImagegenError,
    InternalError,
    InvalidRequest,
    JobCanceled,
    JobError,
    JobFailed,
    NetworkError,
    NotFound,
    PayloadTooLarge,
    QueueFull,
    QuotaExceeded,
    RateLimited,
    RequestTimeout,
    TooManyJobs,
    TooManyStreams,
    TransportError,
    Unauthorized,
    Unavailable,
    WaitTimeout,
)
from ._trainings import (
    AsyncTrainings,
    TrainedAdapter,
    Training,
    TrainingError,
    TrainingProgress,
    Trainings,
)
from ._types import (
    ErrorInfo,
    Event,
    EventName,
    GeneratedImage,
    Generation,
    GenerationParams,
    ImageRef,
    Job,
    JobStatus,
    Model,
    Preview,
    Progress,
    Timings,
    Usage,
)
from ._version import __version__
from ._webhooks import WebhookVerificationError, verify_webhook

__all__ = [
    "DEFAULT_BASE_URL",
    "DEFAULT_TIMEOUT",
    "APIError",
    "AsyncClient",
    "AsyncTrainings",
    "Client",
    "Conflict",
    "ErrorInfo",
    "Event",
    "EventName",
    "GeneratedImage",
    "Generation",
    "GenerationParams",
    "ImageRef",
    "ImagegenError",
    "InternalError",
    "InvalidRequest",
    "Job",
    "JobCanceled",
    "JobError",
    "JobFailed",
    "JobRef",
    "JobStatus",
    "Model",
    "NetworkError",
    "NotFound",
    "PayloadTooLarge",
    "Preview",
    "Progress",
    "QueueFull",
    "QuotaExceeded",
    "RateLimited",
    "RequestTimeout",
    "RetryPolicy",
    "Timings",
    "TooManyJobs",
    "TooManyStreams",
    "TrainedAdapter",
    "Training",
    "TrainingError",
    "TrainingProgress",
    "Trainings",
    "TransportError",
    "Unauthorized",
    "Unavailable",
    "Usage",
    "WaitTimeout",
    "WebhookVerificationError",
    "__version__",
    "verify_webhook",
]

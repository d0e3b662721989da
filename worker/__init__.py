"""The imagegen worker: keeps its models' diffusers pipelines warm and runs generation jobs from
their queues in Redis, through the lifecycle's scripts (`imagegen.core.lifecycle`)."""

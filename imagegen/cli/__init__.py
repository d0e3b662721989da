"""The composition root: the `imagegen` command line, which starts the gateway, workers, the
webhook delivery process and a local Redis, and talks to a running service through the SDK.
It is the one part that may import every other (`app`, `worker`, `builtin_model`)."""

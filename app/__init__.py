"""The imagegen HTTP gateway (FastAPI): validates, enqueues, serves; never imports torch."""

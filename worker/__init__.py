"""The imagegen worker: holds one warm diffusers pipeline and runs generation jobs from RQ."""

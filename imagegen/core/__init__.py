"""The shared core of the service: the job contract, settings, the job lifecycle (Redis's Lua
scripts), the record reader, API-key entries, webhook rules and prompt syntax.

The gateway (`app`) and the worker (`worker`) both build on it, and it imports nothing of the
project (import-linter checks it): pydantic and redis only, no FastAPI, no torch.
"""

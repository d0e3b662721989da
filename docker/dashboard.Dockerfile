# RQ's dashboard, for operators; compose runs it only with `--profile dashboard`.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN pip install rq-dashboard==0.9.0 rq==3.0.0 \
    && useradd --create-home --uid 10001 dashboard
USER 10001
EXPOSE 9181
# rq-dashboard reads RQ_DASHBOARD_REDIS_URL, _USERNAME and _PASSWORD; never serve it open.
CMD ["sh", "-c", "test -n \"$RQ_DASHBOARD_PASSWORD\" || { echo 'set RQ_DASHBOARD_PASSWORD' >&2; exit 1; }; exec rq-dashboard --bind 0.0.0.0 --port 9181"]

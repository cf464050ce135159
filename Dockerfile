# KubeTune operator image: kopf-based operator, no ML dependencies.
#   docker build -t ghcr.io/kubetune/operator:<version> .      (`make images` builds, tags and labels it)
# BASE_IMAGE: any Debian-based CPython 3.11 whose interpreter is /usr/local/bin/python (the official
# python:3.11-slim-bookworm, or the base `make images` bootstraps from Debian packages).
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore

# Dependencies first, pinned to the tested set (constraints.txt): this layer is reused until
# pyproject.toml or constraints.txt change. Wheels only: nothing is compiled, no build tools needed.
COPY pyproject.toml constraints.txt /tmp/kubetune/
RUN --mount=type=cache,target=/root/.cache/pip \
    cd /tmp/kubetune \
 && python -c 'import tomllib; p = tomllib.load(open("pyproject.toml", "rb"))["project"]; \
print("\n".join(p["dependencies"] + p["optional-dependencies"]["operator"]))' > requirements.txt \
 && pip install --only-binary=:all: -c constraints.txt -r requirements.txt \
 && rm -rf /tmp/kubetune

COPY README.md pyproject.toml /tmp/kubetune/
COPY contract/ /tmp/kubetune/contract/
COPY operator/ /tmp/kubetune/operator/
COPY trainer_image/kubetune_trainer/ /tmp/kubetune/trainer_image/kubetune_trainer/
RUN pip install --no-cache-dir --no-deps /tmp/kubetune && rm -rf /tmp/kubetune

# Non-root (matches the chart's runAsUser), read-only root filesystem friendly: no writes at runtime.
# The user has a name (/etc/passwd), as libraries that ask for it expect.
RUN useradd --uid 65532 --user-group --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin kubetune
USER 65532:65532
ENV KUBETUNE_LIVENESS_ENDPOINT=http://0.0.0.0:8080/healthz \
    KUBETUNE_REPORT_LISTEN=0.0.0.0:8081
EXPOSE 8080 8081
ENTRYPOINT ["kubetune", "operator"]

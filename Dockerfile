# KubeTune operator image: kopf-based operator, no ML dependencies.
#   docker build -t ghcr.io/kubetune/operator:0.1.0 .
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY operator/ operator/
COPY trainer_image/kubetune_trainer/ trainer_image/kubetune_trainer/
RUN pip install --no-cache-dir --prefix=/install ".[operator]"

FROM python:3.11-slim
COPY --from=build /install /usr/local
# Non-root (matches the chart's runAsUser), read-only root filesystem friendly: no writes at runtime.
USER 65532:65532
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    KUBETUNE_LIVENESS_ENDPOINT=http://0.0.0.0:8080/healthz \
    KUBETUNE_REPORT_LISTEN=0.0.0.0:8081
EXPOSE 8080 8081
ENTRYPOINT ["kubetune", "operator"]

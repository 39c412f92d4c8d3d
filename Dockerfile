# memsvc image. It installs with `make install`, the same command as a developer machine.
#   docker build -t memsvc .                      (CPU)
#   docker build --build-arg EXTRAS=gpu -t memsvc-gpu .
FROM python:3.11-slim
ARG EXTRAS=dev
RUN apt-get update && apt-get install -y --no-install-recommends make && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY pyproject.toml Makefile README.md ./
COPY memsvc memsvc
COPY lm lm
COPY retrievers retrievers
RUN make install VENV=/opt/venv EXTRAS=$EXTRAS
ENV PATH=/opt/venv/bin:$PATH HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
    MEMSVC_DATA_DIR=/data MEMSVC_HOST=0.0.0.0 MEMSVC_PORT=8000
VOLUME /data
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --retries=5 \
  CMD python -c "import httpx,sys; sys.exit(httpx.get('http://127.0.0.1:8000/v1/health').status_code != 200)"
CMD ["memsvc", "serve", "--host", "0.0.0.0", "--port", "8000", "--data-dir", "/data"]

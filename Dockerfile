# rloop-lightning on CUDA GPUs: QLoRA (bitsandbytes), vLLM rollouts and W&B logging.
#   docker build -t rloop-lightning .
#   docker run --gpus all --ipc=host -v hf-cache:/data -v "$PWD/runs:/workspace/runs" \
#     -e WANDB_API_KEY rloop-lightning grpo fit --config configs/recipes/qlora_gsm8k_grpo.yaml
# The torch and vLLM wheels from PyPI bring their own CUDA libraries: the host driver must support
# the CUDA version of the torch build that vLLM pins (vllm>=0.32, the V1 engine; see vLLM's release notes).
FROM nvidia/cuda:12.4.1-cudnn-runtime-ubuntu22.04

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    HF_HOME=/data/huggingface \
    RLOOP_CACHE=/data/rloop \
    WANDB_DIR=/workspace/runs

# build-essential: Triton (vLLM) compiles small kernels at run time; git: pip installs from VCS pins.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev build-essential git \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv "$VIRTUAL_ENV" \
    && useradd --create-home --uid 1000 --shell /bin/bash rloop \
    && mkdir -p /data /workspace \
    && chown 1000:1000 /data /workspace

WORKDIR /workspace
# the project itself; its version ranges live in pyproject.toml (vLLM pins the matching CUDA torch)
COPY pyproject.toml README.md ./
COPY src ./src
# hadolint ignore=DL3013
RUN pip install ".[qlora,vllm,wandb]"
COPY --chown=1000:1000 configs ./configs

USER 1000:1000
VOLUME ["/data"]
ENTRYPOINT ["rloop"]
CMD ["--help"]

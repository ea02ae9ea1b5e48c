# The Space image. Two stages: llama-cpp-python is compiled in the first (compilers, headers, cmake) and only
# its wheel is carried into the second, which runs the app as the non-root user (uid 1000) Spaces expect.
#
# llama.cpp is built for the CPU, on purpose. The app uses it for two things: quantizing (llama.cpp's
# llama_model_quantize runs on CPU threads whatever the build) and verifying each GGUF, which evaluates a
# 512-token context once, for models up to 2B parameters (merger.pipeline.VERIFY_MAX_PARAMS), next to a
# reference forward pass that runs on the CPU anyway. A CUDA build would only speed up that short
# evaluation, and would cost a CUDA devel image, a build against the driver stub and kernels for five GPU
# architectures (a much longer build and a larger image). The merge itself uses the GPU through torch.

# ---------------------------------------------------------------- build: compile the llama.cpp wheel
FROM ubuntu:24.04 AS build
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update && apt-get install -y --no-install-recommends \
        python3 python3-venv python3-dev build-essential cmake git ca-certificates \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/build-venv
# Portable CPU kernels (no -march=native: the build machine is not the machine the Space runs on).
ENV PATH=/opt/build-venv/bin:$PATH \
    CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF" \
    CMAKE_BUILD_PARALLEL_LEVEL=8
RUN pip wheel --no-deps --wheel-dir /wheels "llama-cpp-python==0.3.36"

# ---------------------------------------------------------------- runtime: the app
FROM ubuntu:24.04
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1
# libgomp1: llama.cpp's CPU kernels use OpenMP. No compilers in this stage.
RUN apt-get update && apt-get install -y --no-install-recommends \
        python3 python3-venv libgomp1 ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && (userdel -r ubuntu 2>/dev/null || true) \
    && useradd -m -u 1000 user \
    && mkdir /opt/venv && chown user:user /opt/venv

# SYSTEM=spaces: gradio treats the process as running on a Space only with it (gradio.utils.get_space), and
# only then serves the real "Sign in with Hugging Face" routes; Docker Spaces do not set it, the image must.
# NVIDIA_*: let the container runtime expose the GPU to a plain (non-CUDA) base image; torch's CUDA wheel
# brings its own CUDA libraries.
ENV SYSTEM=spaces \
    HOME=/home/user \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:/home/user/.local/bin:$PATH \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    GRADIO_ANALYTICS_ENABLED=False \
    HF_HUB_DISABLE_TELEMETRY=1

# USER before WORKDIR: the app folder, the venv and everything installed below belong to the user.
USER user
WORKDIR /home/user/app

COPY --from=build --chown=user:user /wheels /tmp/wheels
COPY --chown=user:user requirements.txt /tmp/requirements.txt
# torch: the version pinned in requirements.txt, as its CUDA 12.6 build (the pinned wheel there is the CPU
# one); then the compiled llama-cpp-python, then the rest of the requirements (already satisfied: skipped).
RUN python3 -m venv /opt/venv \
    && pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cu126 \
    && pip install /tmp/wheels/llama_cpp_python-*.whl \
    && pip install -r /tmp/requirements.txt \
    && rm -rf /tmp/wheels /tmp/requirements.txt

COPY --chown=user:user . /home/user/app
# llama.cpp's converter (the GGUF export's fallback and reference), from the installed version's sources.
RUN python -m quantize.upstream install

EXPOSE 7860
CMD ["python", "app.py"]

# The Space image: CUDA builds of torch and llama-cpp-python, the app as the non-root user Spaces expect.
FROM nvidia/cuda:12.6.3-devel-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1
RUN apt-get update && apt-get install -y --no-install-recommends \
        python3 python3-venv python3-dev git cmake build-essential ca-certificates \
    && rm -rf /var/lib/apt/lists/*

# Spaces run the container as uid 1000 with HOME=/home/user.
RUN userdel -r ubuntu 2>/dev/null || true; useradd -m -u 1000 user
ENV HOME=/home/user \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:/home/user/.local/bin:$PATH \
    GRADIO_ANALYTICS_ENABLED=False \
    HF_HUB_DISABLE_TELEMETRY=1 \
    HF_HUB_ENABLE_HF_TRANSFER=0
RUN python3 -m venv /opt/venv && pip install --upgrade pip

# torch: the same version as requirements.txt, but the CUDA build (the pinned wheel there is the CPU one).
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cu126

# llama-cpp-python with CUDA kernels for T4 (7.5), A10G (8.6), L4 (8.9) and H100 (9.0); linked against the
# driver stub, since the build machine has no GPU.
ENV CMAKE_ARGS="-DGGML_CUDA=on -DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF -DCMAKE_CUDA_ARCHITECTURES=75;86;89;90" \
    CMAKE_BUILD_PARALLEL_LEVEL=8
COPY requirements.txt /tmp/requirements.txt
RUN ln -sf /usr/local/cuda/lib64/stubs/libcuda.so /usr/local/cuda/lib64/stubs/libcuda.so.1 \
    && LD_LIBRARY_PATH=/usr/local/cuda/lib64/stubs:$LD_LIBRARY_PATH \
       pip install "llama-cpp-python==0.3.36" \
    && pip install -r /tmp/requirements.txt

WORKDIR /home/user/app
COPY --chown=user:user . /home/user/app
USER user
EXPOSE 7860
CMD ["python", "app.py"]

# A container image for executor=kubernetes (or any container runtime): the project installed
# exactly as on a workstation, by ./setup.sh, into /opt/falcon-h1-train/.venv.
#   docker build -t falcon-h1-train .
#   docker run --gpus all falcon-h1-train model=falcon_h1_0_5b train=pretrain
# The full (not -slim) image: Triton compiles its kernel launchers with the C compiler it ships.
FROM python:3.12-bookworm

ENV PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1
WORKDIR /opt/falcon-h1-train
COPY . .
RUN ./setup.sh
# falcon-train, torchrun (what the Kubernetes pods run) and python from the project's .venv.
ENV PATH=/opt/falcon-h1-train/.venv/bin:$PATH

ENTRYPOINT ["falcon-train"]

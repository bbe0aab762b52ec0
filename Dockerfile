# The search in a GPU container; results and downloaded weights live on volumes.
#   docker build -t effnet-tuner .
#   docker run --gpus all -v "$PWD/results:/results" -v "$PWD/data:/data:ro" \
#       -e WANDB_API_KEY effnet-tuner --data /data/label.csv --budget 20h
# A chief and one worker per GPU: docker-compose.yml (README, "Scaling out").
FROM tensorflow/tensorflow:2.21.0-gpu

ENV PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    XDG_CACHE_HOME=/cache \
    KERAS_HOME=/cache/keras

WORKDIR /app
COPY pyproject.toml README.md ./
COPY data_tools ./data_tools
COPY tuner ./tuner
COPY search_spaces ./search_spaces
# The install step is README's own.
RUN pip install -e .

VOLUME ["/results", "/cache"]
ENTRYPOINT ["python", "-m", "tuner.search", "--results", "/results"]
CMD ["--budget", "5m"]

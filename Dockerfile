# CPU image serving leanserve's default models. Untested: no Docker engine runs where this
# project is built (see README).
FROM python:3.11-slim
WORKDIR /app
# CPU torch from PyTorch's CPU index first, so the project's range never pulls a CUDA build.
RUN pip install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
COPY pyproject.toml README.md ./
COPY leanserve ./leanserve
RUN pip install --no-cache-dir .
COPY zoo ./zoo
EXPOSE 8000
CMD ["leanserve", "serve", "--host", "0.0.0.0", "--port", "8000"]

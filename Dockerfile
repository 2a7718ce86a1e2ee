# The fanout node image: one node per container, configured by FANOUT_* variables (see README).
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY fanout ./fanout
COPY node ./node
RUN pip install --no-cache-dir ".[all]"
ENV FANOUT_HOST=0.0.0.0 FANOUT_PORT=8765
EXPOSE 8765
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=5s --timeout=2s CMD python -c "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:8765/healthz', timeout=2)" || exit 1
ENTRYPOINT ["fanout-node"]

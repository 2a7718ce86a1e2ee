# The fanout node image: one node per container, configured by FANOUT_* variables (see README and
# docs/deployment.md). Dependencies are pinned by deploy/requirements.txt; it runs as an unprivileged user.
FROM python:3.11-slim AS build
WORKDIR /src
COPY deploy/requirements.txt ./deploy/requirements.txt
# PIP_CONSTRAINT (unlike -c) also pins the build backend pip installs to build the wheel
ENV PIP_CONSTRAINT=/src/deploy/requirements.txt PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
COPY pyproject.toml README.md LICENSE ./
COPY fanout ./fanout
COPY node ./node
RUN python -m venv /opt/fanout && /opt/fanout/bin/pip install ".[all]" \
 && find /opt/fanout -name __pycache__ -prune -exec rm -rf {} + \
 && /opt/fanout/bin/pip uninstall -q -y setuptools pip

FROM python:3.11-slim
COPY --from=build /opt/fanout /opt/fanout
RUN useradd --system --uid 10001 --user-group --no-create-home --home-dir /nonexistent fanout
USER 10001:10001
WORKDIR /tmp
ENV PATH=/opt/fanout/bin:$PATH PYTHONDONTWRITEBYTECODE=1 FANOUT_HOST=0.0.0.0 FANOUT_PORT=8765
EXPOSE 8765
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=5s --timeout=2s CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8765/healthz', timeout=2)" || exit 1
ENTRYPOINT ["fanout-node"]

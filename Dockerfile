# resilgate: build the virtualenv in one stage, run it from a slim, non-root one.
# Every dependency ships wheels for CPython 3.11 (x86_64, aarch64): no compiler in either stage.

FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
WORKDIR /src
COPY pyproject.toml README.md ./
COPY resilgate/ resilgate/
COPY fallbacks/ fallbacks/
RUN /opt/venv/bin/pip install .

# The same base image, so the venv's interpreter link (/usr/local/bin/python3.11) holds.
FROM python:3.11-slim
RUN groupadd --system --gid 10001 resilgate \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin resilgate \
 && mkdir -p /etc/resilgate /var/lib/resilgate \
 && chown 10001:10001 /var/lib/resilgate
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
WORKDIR /var/lib/resilgate
USER 10001
EXPOSE 8080 9090
ENTRYPOINT ["resilgate"]
CMD ["serve", "--config", "/etc/resilgate/resilgate.yaml"]

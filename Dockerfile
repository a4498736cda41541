# metricsd: the streaming metrics daemon (`metricsd run`) and its load generator (`metricsd simulate`).
#
#   docker build -t metricsd .
#   docker run --rm metricsd run --bootstrap-servers kafka:9092
#
# Runtime dependencies only: the development extras (the embedded Tansu broker behind
# `metricsd dev`, test oracles) are not installed, so point the image at a real Kafka cluster
# (see docker-compose.yml). Every flag is also an environment variable METRICSD_<FLAG>.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Source is copied, installed as a regular (non-editable) package, then removed: the image runs
# what `pip install .` installed, exactly as a user would. README.md* tolerates its absence.
COPY pyproject.toml README.md* /src/
COPY daemon /src/daemon
RUN pip install /src \
    && rm -rf /src \
    && groupadd --gid 10001 metricsd \
    && useradd --create-home --uid 10001 --gid 10001 --shell /usr/sbin/nologin metricsd

# numeric, so that orchestrators can verify "runs as non-root" without reading /etc/passwd
USER 10001:10001
WORKDIR /home/metricsd

ENTRYPOINT ["metricsd"]
CMD ["run"]

# geotaxi: UDP ingest of taxi positions into Redis.
#
#   docker build -t geotaxi .
#   docker run -p 8080:8080/udp -e REDIS_HOST=redis -e DISABLE_FLUENT=1 geotaxi
#
# Every option can be set by an environment variable named after it
# (REDIS_HOST for --redis-host); see README.md.
FROM python:3.11-slim

RUN useradd --system --no-create-home geotaxi

WORKDIR /src
COPY setup.py README.md ./
COPY geotaxi ./geotaxi
COPY twisted ./twisted
RUN pip install --no-cache-dir . && rm -rf /src

# In a container the server must listen on all interfaces to be reached.
ENV HOST=0.0.0.0 \
    PORT=8080

USER geotaxi
EXPOSE 8080/udp
STOPSIGNAL SIGTERM
ENTRYPOINT ["geotaxi"]

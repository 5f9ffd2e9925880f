# curvd container image, two stages:
#   build    Debian bookworm with the compilers and -dev packages; builds build/curvd
#   runtime  bookworm-slim with only the shared libraries curvd loads, plus curl
#            for the HEALTHCHECK; runs as the unprivileged user curvd (uid 10001)
# Usage: docker build -t curvd . && docker run --rm -p 8080:8080 curvd
# A token is required (--generate-token): a random one is printed to the log
# (docker logs), or give yours with -e CURVD_TOKEN=...; clients send it as
# `Authorization: Bearer TOKEN` (CURVD_TOKEN for curvctl and the Python client).
# Other hosts than localhost: add --allowed-hosts NAME to the command.
# The package lists are scripts/deps.sh's sets `image` (build stage) and
# `runtime`; tests/e2e_dockerfile.sh (make test) fails when they drift apart.

FROM debian:bookworm-slim AS build
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      build-essential pkg-config libopenblas-dev liblapacke-dev libcjson-dev \
      libmicrohttpd-dev check python3-sklearn \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN make -j"$(nproc)" build/curvd

FROM debian:bookworm-slim AS runtime
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      libopenblas0-pthread liblapacke libcjson1 libmicrohttpd12 curl \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --user-group --no-create-home \
      --home-dir /nonexistent --shell /usr/sbin/nologin curvd
COPY --from=build /src/build/curvd /usr/local/bin/curvd
USER 10001:10001
EXPOSE 8080
# Idle OpenBLAS workers sleep at once (matters with --blas-threads > 1; README, Threads)
ENV OPENBLAS_THREAD_TIMEOUT=4
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
  CMD curl -fsS -o /dev/null http://127.0.0.1:8080/v1/health || exit 1
ENTRYPOINT ["curvd"]
CMD ["serve", "--bind", "0.0.0.0", "--port", "8080", "--generate-token"]

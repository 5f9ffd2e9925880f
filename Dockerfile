# curvd on Debian bookworm-slim: the same Debian packages as `make run`,
# built from this tree, serving on all interfaces.
FROM debian:bookworm-slim
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      build-essential pkg-config libopenblas-dev liblapacke-dev libcjson-dev \
      libmicrohttpd-dev check curl python3-sklearn \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/curvd
COPY . .
RUN make clean && make all
EXPOSE 8080
# Idle OpenBLAS workers sleep at once (matters with --blas-threads > 1; README, Threads)
ENV OPENBLAS_THREAD_TIMEOUT=4
CMD ["/opt/curvd/build/curvd", "serve", "--bind", "0.0.0.0", "--port", "8080"]

#!/bin/sh
# deps.sh - the Debian packages curvd needs, by use; makes sure they are installed.
# Usage: scripts/deps.sh [--check | --list] build|test|run|bench|image|runtime
#   (no option)  as root, missing packages are installed with apt-get; otherwise
#                the exact apt-get line is printed and the script fails
#   --check      never installs: names what is missing and fails (plain `make`)
#   --list       prints the set's packages, one a line
# Sets: build   compilers and -dev packages (`make`)
#       run     build + what `make run` uses
#       test    build + what `make test` uses (OpenMPI included)
#       bench   build + what `make bench` uses (OpenMPI for bench-mpi)
#       mpi     build + OpenMPI (`mpirun -np R curvd ...`)
#       fuzz    build + clang and its sanitizer/libFuzzer runtimes (`make fuzz`:
#               -fsanitize=fuzzer,address,undefined; libclang-rt-dev holds libFuzzer)
#       image   the Dockerfile's build stage: build + the demo's digits data
#       runtime the Dockerfile's runtime stage: the shared libraries build/curvd
#               links (those of the -dev packages in build) + curl (HEALTHCHECK)
# tests/e2e_dockerfile.sh checks that the Dockerfile installs exactly image and
# runtime, and that runtime matches the libraries build/curvd needs.
set -e
MODE=install
case "$1" in
  --check) MODE=check; shift ;;
  --list)  MODE=list; shift ;;
esac
BUILD="build-essential pkg-config libopenblas-dev liblapacke-dev libcjson-dev libmicrohttpd-dev check"
# OpenMPI: optional for the build (curvd never links it; make builds the
# plugin build/curvd-mpi.so when libopenmpi-dev is there), needed by the
# data-parallel tests and benchmarks (mpirun).
MPI="libopenmpi-dev openmpi-bin"
case "${1:-build}" in
  build)   PKGS="$BUILD" ;;
  run)     PKGS="$BUILD curl python3-sklearn" ;;
  test)    PKGS="$BUILD $MPI curl python3 python3-numpy python3-torch python3-sklearn python3-matplotlib python3-pip python3-setuptools mypy chromium chromium-driver clang" ;;
  bench)   PKGS="$BUILD $MPI python3 python3-numpy python3-torch" ;;
  mpi)     PKGS="$BUILD $MPI" ;;
  fuzz)    PKGS="$BUILD clang libclang-rt-dev" ;;
  image)   PKGS="$BUILD python3-sklearn" ;;
  runtime) PKGS="libopenblas0-pthread liblapacke libcjson1 libmicrohttpd12 curl" ;;
  *) echo "deps.sh: unknown set '$1'" >&2; exit 2 ;;
esac
if [ "$MODE" = list ]; then
  for p in $PKGS; do echo "$p"; done
  exit 0
fi
MISSING=""
for p in $PKGS; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    MISSING="$MISSING $p"
  fi
done
[ -z "$MISSING" ] && exit 0
if [ "$MODE" = install ] && [ "$(id -u)" = 0 ]; then
  echo "deps.sh: installing:$MISSING" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends $MISSING >/dev/null
else
  echo "curvd needs these Debian packages. Run:" >&2
  if [ "$(id -u)" = 0 ]; then
    echo "  apt-get install -y$MISSING    (or: make deps)" >&2
  else
    echo "  sudo apt-get install -y$MISSING" >&2
  fi
  exit 1
fi

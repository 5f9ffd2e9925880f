#!/bin/sh
# deps.sh - make sure the Debian packages curvd needs are installed.
# Usage: scripts/deps.sh build|test|run|bench
# As root, missing packages are installed with apt-get; otherwise the exact
# apt-get line is printed and the script fails.
set -e
BUILD="build-essential pkg-config libopenblas-dev liblapacke-dev libcjson-dev libmicrohttpd-dev check"
case "${1:-build}" in
  build) PKGS="$BUILD" ;;
  run)   PKGS="$BUILD curl python3-sklearn" ;;
  test)  PKGS="$BUILD curl python3 python3-numpy python3-torch python3-sklearn python3-matplotlib python3-pip python3-setuptools mypy chromium" ;;
  bench) PKGS="$BUILD python3 python3-numpy python3-torch" ;;
  *) echo "deps.sh: unknown set '$1'" >&2; exit 2 ;;
esac
MISSING=""
for p in $PKGS; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    MISSING="$MISSING $p"
  fi
done
[ -z "$MISSING" ] && exit 0
if [ "$(id -u)" = 0 ]; then
  echo "deps.sh: installing:$MISSING" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends $MISSING >/dev/null
else
  echo "curvd needs these Debian packages. Run:" >&2
  echo "  sudo apt-get install -y$MISSING" >&2
  exit 1
fi

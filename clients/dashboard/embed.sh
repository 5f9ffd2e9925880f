#!/bin/sh
# embed.sh - turns the dashboard's static files into C arrays for server/dashboard.c.
#
# Usage: sh clients/dashboard/embed.sh FILE... > build/gen/dashboard_assets.inc
# Writes one `static const unsigned char` array per file (NUL-terminated; the
# length excludes the NUL) and the table dash_assets[] of {name, data, len}
# keyed by the file's base name.  POSIX sh + od + sed only.
set -e
i=0
for f in "$@"; do
  b=$(basename "$f")
  case $b in
    *[!A-Za-z0-9._-]* | '') echo "embed.sh: unsafe file name '$b'" >&2; exit 1 ;;
  esac
  [ -r "$f" ] || { echo "embed.sh: cannot read $f" >&2; exit 1; }
  printf '/* %s */\nstatic const unsigned char dash_asset_%d[] = {\n' "$b" "$i"
  od -An -v -tx1 "$f" | sed -e 's/[ ]*\([0-9a-f][0-9a-f]\)/0x\1,/g' -e 's/[ ]*$//'
  printf '0x00};\n'
  i=$((i + 1))
done
printf 'static const cv_dashboard_file dash_assets[] = {\n'
i=0
for f in "$@"; do
  printf '    {"%s", dash_asset_%d, sizeof dash_asset_%d - 1, NULL},\n' "$(basename "$f")" "$i" "$i"
  i=$((i + 1))
done
printf '    {NULL, NULL, 0, NULL}\n};\n'

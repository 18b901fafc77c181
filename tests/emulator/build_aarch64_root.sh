#!/usr/bin/env bash
# Build (or reuse) an emulated Raspberry Pi userland: Debian bookworm arm64 python3 3.11,
# numpy 1.24, Pillow 9.4, cffi 1.15 unpacked into ROOT, run under qemu-aarch64 via ROOT/run-python.
#
# Usage: tests/emulator/build_aarch64_root.sh [ROOT]   (default: <repo>/.cache/aarch64-root)
# Env:   EDGEQ_APT_SOURCES: a sources.list file for bookworm arm64 (default: derived from the
#        host's own Debian apt sources, so the same mirror is used),
#        EDGEQ_NO_CROSS_GCC=1 to skip installing gcc-aarch64-linux-gnu.
# Host packages (qemu-user, gcc-aarch64-linux-gnu, debian-archive-keyring) are installed with
# apt-get when missing (needs root or passwordless sudo). The arm64 packages are fetched with a
# private apt configuration: the host's dpkg architectures and apt state are not touched.
# Exit status 77 means "cannot build here" (no apt-get / no root), so tests can skip.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
ROOT=${1:-$REPO/.cache/aarch64-root}
PACKAGES=(python3 python3-numpy python3-pil python3-cffi libstdc++6 libgcc-s1)
STAMP_VALUE="bookworm-arm64 v2: ${PACKAGES[*]}"
KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg

log() { echo "[aarch64-root] $*" >&2; }
skip() { log "SKIP: $*"; exit 77; }

as_root() {
    if [ "$(id -u)" = 0 ]; then "$@"
    elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then sudo "$@"
    else skip "need root or passwordless sudo to run: $*"; fi
}

APT_UPDATED=0
host_install() {  # host_install PACKAGE...
    command -v apt-get >/dev/null || skip "apt-get not found; install $* by hand"
    if [ $APT_UPDATED = 0 ]; then log "apt-get update (host)"; as_root apt-get update -qq; APT_UPDATED=1; fi
    log "installing host packages: $*"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

# 1. Host tools (checked on every run: a cached root may land on a fresh CI machine).
if ! command -v qemu-aarch64 >/dev/null && ! command -v qemu-aarch64-static >/dev/null; then
    host_install qemu-user
fi
cross_gcc_links() { command -v aarch64-linux-gnu-gcc >/dev/null && echo 'int edgeq;' | aarch64-linux-gnu-gcc -shared -fPIC -x c - -o /dev/null 2>/dev/null; }
if [ "${EDGEQ_NO_CROSS_GCC:-0}" != 1 ] && ! cross_gcc_links; then
    host_install gcc-aarch64-linux-gnu libc6-dev-arm64-cross
fi

# 2. The root itself, cached under ROOT (stamp file says which package set it holds).
if [ -f "$ROOT/.edgeq-stamp" ] && [ "$(cat "$ROOT/.edgeq-stamp")" = "$STAMP_VALUE" ] && [ -x "$ROOT/run-python" ]; then
    log "cached root: $ROOT"
    exit 0
fi
[ -f "$KEYRING" ] || host_install debian-archive-keyring
command -v apt-get >/dev/null || skip "apt-get not found"
command -v dpkg-deb >/dev/null || skip "dpkg-deb not found"

START=$(date +%s)
WORK="$ROOT.work"          # private apt state + downloaded .debs (kept to speed up rebuilds)
STAGE="$ROOT.tmp"          # unpacked here, moved to ROOT when complete
mkdir -p "$WORK/lists/partial" "$WORK/archives/partial" "$WORK/etc/preferences.d" "$WORK/etc/trusted.gpg.d"
: > "$WORK/status"
if [ -n "${EDGEQ_APT_SOURCES:-}" ]; then
    cp "$EDGEQ_APT_SOURCES" "$WORK/sources.list"
else
    # The host's Debian sources (one-line and deb822 formats), re-targeted at arm64.
    command -v python3 >/dev/null || skip "python3 is needed to read the host's apt sources"
    python3 - "$KEYRING" > "$WORK/sources.list" <<'PY'
import glob, re, sys
keyring = sys.argv[1]
entries = []
for path in ["/etc/apt/sources.list"] + sorted(glob.glob("/etc/apt/sources.list.d/*.list")):
    try:
        lines = open(path).read().splitlines()
    except OSError:
        continue
    for line in lines:
        line = re.sub(r"\[[^]]*\]", "", line.split("#")[0]).split()
        if len(line) >= 4 and line[0] == "deb":
            entries.append((line[1], line[2], line[3:]))
for path in sorted(glob.glob("/etc/apt/sources.list.d/*.sources")):
    for stanza in open(path).read().split("\n\n"):
        fields = {}
        for line in stanza.splitlines():
            if ":" in line and not line.startswith(("#", " ")):
                key, _, value = line.partition(":")
                fields[key.strip().lower()] = value.split()
        if "deb" in fields.get("types", []) and fields.get("enabled", ["yes"])[0] != "no":
            for uri in fields.get("uris", []):
                for suite in fields.get("suites", []):
                    entries.append((uri, suite, fields.get("components", ["main"])))
for uri, suite, components in entries:
    if suite.startswith("bookworm") and "main" in components:
        print(f"deb [arch=arm64 signed-by={keyring}] {uri} {suite} main")
PY
fi
[ -s "$WORK/sources.list" ] || skip "no Debian bookworm apt source on this host; set EDGEQ_APT_SOURCES to a sources.list for bookworm arm64"
APT_OPTS=(
    -o APT::Architecture=arm64 -o APT::Architectures::=arm64
    -o Dir::State="$WORK" -o Dir::State::Lists="$WORK/lists" -o Dir::State::status="$WORK/status"
    -o Dir::Cache="$WORK" -o Dir::Cache::archives="$WORK/archives"
    -o Dir::Etc::SourceList="$WORK/sources.list" -o Dir::Etc::SourceParts="$WORK/none"
    -o Dir::Etc::Preferences="$WORK/none" -o Dir::Etc::PreferencesParts="$WORK/etc/preferences.d"
    -o Dir::Etc::TrustedParts="$WORK/etc/trusted.gpg.d"
    -o Debug::NoLocking=true -o APT::Install-Recommends=false -o APT::Install-Suggests=false
    -o Acquire::Languages=none
)
log "apt-get update (bookworm arm64, private state in $WORK)"
apt-get "${APT_OPTS[@]}" update -qq
log "resolving and downloading: ${PACKAGES[*]}"
apt-get "${APT_OPTS[@]}" install -y -qq --download-only "${PACKAGES[@]}" >/dev/null

rm -rf "$STAGE"; mkdir -p "$STAGE"
DEBS=("$WORK"/archives/*.deb)
log "unpacking ${#DEBS[@]} packages into $STAGE"
for deb in "${DEBS[@]}"; do dpkg-deb -x "$deb" "$STAGE"; done
for deb in "${DEBS[@]}"; do dpkg-deb -f "$deb" Package Version | paste -sd' '; done | sed 's/^Package: //; s/ Version: / /' > "$STAGE/.edgeq-packages"

rm -rf "$STAGE"/usr/share/{doc,man,info,locale,lintian}   # not needed to run anything
# Alternatives that dpkg would set up in postinst (libblas.so.3, liblapack.so.3).
LIBDIR="$STAGE/usr/lib/aarch64-linux-gnu"
for alt in blas/libblas.so.3 lapack/liblapack.so.3; do
    if [ -e "$LIBDIR/$alt" ] && [ ! -e "$LIBDIR/$(basename "$alt")" ]; then
        ln -s "$alt" "$LIBDIR/$(basename "$alt")"; log "linked $(basename "$alt") -> $alt"
    fi
done

cat > "$STAGE/run-python" <<'WRAP'
#!/bin/sh
# Run the root's arm64 python3 under qemu user-mode emulation.
HERE=$(cd "$(dirname "$0")" && pwd)
QEMU=$(command -v qemu-aarch64 || command -v qemu-aarch64-static) || { echo "qemu-aarch64 not found (apt-get install qemu-user)" >&2; exit 127; }
unset PYTHONHOME
exec "$QEMU" -L "$HERE" "$HERE/usr/bin/python3" "$@"
WRAP
chmod +x "$STAGE/run-python"

# Debian ships no .pyc files (postinst compiles them); writing them for the modules tests use
# cuts each emulated start from ~5 s to ~1.5 s.
log "checking the emulated python (and writing .pyc files for the modules it imports)"
env -u PYTHONDONTWRITEBYTECODE "$STAGE/run-python" -c '
import argparse, ctypes, dataclasses, hashlib, json, logging, pathlib, socket, struct, subprocess
import tempfile, threading, typing, zipfile
import platform, numpy, PIL, PIL.Image, cffi
print("  python", platform.python_version(), platform.machine(), "numpy", numpy.__version__,
      "Pillow", PIL.__version__, "cffi", cffi.__version__)' >&2

echo "$STAMP_VALUE" > "$STAGE/.edgeq-stamp"
rm -rf "$ROOT"; mv "$STAGE" "$ROOT"
log "built $ROOT ($(du -sh "$ROOT" | cut -f1)) in $(( $(date +%s) - START ))s"

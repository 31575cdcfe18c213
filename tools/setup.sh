#!/usr/bin/env bash
# One-command set-up: Debian packages, pinned Python venv, MicroPython from Debian's
# source package (checked by SHA-256), and the three builds (mpy-cross, unix port,
# QEMU MPS2_AN385 firmware with firmware/ frozen in).
#
# Idempotent: every step checks a stamp or the installed state first, so a second
# run with nothing changed takes seconds. Every failure names the step and the fix.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
# shellcheck source=tools/micropython.env
source tools/micropython.env

BUILD_DIR="$ROOT/build"
VENV="$ROOT/.venv"
PYTHON_BIN=${PYTHON:-python3}

step() { printf '\n== setup: %s\n' "$*"; }
fail() {
    printf '\nsetup FAILED at: %s\n  fix: %s\n' "$1" "$2" >&2
    exit 1
}

# ---------------------------------------------------------------- Debian packages
APT_PACKAGES=(
    gcc-arm-none-eabi libnewlib-arm-none-eabi qemu-system-arm   # bare-metal target
    build-essential pkg-config python3                          # unix port + mpy-cross
    dpkg-dev xz-utils                                           # apt-get source, unpack
    postgresql libpq5                           # ETSI 014 store tests on PostgreSQL (psycopg)
)

missing_packages() {
    local pkg
    for pkg in "${APT_PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" \
            || echo "$pkg"
    done
}

step "Debian packages"
mapfile -t MISSING < <(missing_packages)
if [ "${#MISSING[@]}" -gt 0 ]; then
    command -v apt-get >/dev/null || fail "Debian packages (${MISSING[*]})" \
        "this set-up needs a Debian-based machine with apt-get"
    [ "$(id -u)" = 0 ] || fail "Debian packages (${MISSING[*]})" \
        "run as root, or install them first: sudo apt-get install ${MISSING[*]}"
    echo "installing: ${MISSING[*]}"
    apt-get update -q || fail "apt-get update" "check the network and /etc/apt/sources.list*"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${MISSING[@]}" \
        || fail "apt-get install ${MISSING[*]}" "read apt's message above"
else
    echo "all present"
fi
for tool in arm-none-eabi-gcc qemu-system-arm make cc; do
    command -v "$tool" >/dev/null || fail "tool check: $tool not on PATH" \
        "install the Debian package that provides $tool (see APT_PACKAGES in tools/setup.sh)"
done

# ---------------------------------------------------------------- Python venv
step "Python virtual environment (.venv, requirements.lock)"
LOCK_HASH=$(sha256sum requirements.lock pyproject.toml | sha256sum | cut -c1-16)
if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON_BIN" -m venv "$VENV" || fail "python venv" \
        "install python3-venv (Debian) or use a Python >= 3.11 with the venv module"
fi
if [ "$(cat "$VENV/.qkdsat-lock" 2>/dev/null)" != "$LOCK_HASH" ]; then
    "$VENV/bin/python" -m pip install -q --upgrade pip==25.1.1 \
        || fail "pip upgrade" "check access to PyPI"
    "$VENV/bin/python" -m pip install -q -r requirements.lock \
        || fail "pip install -r requirements.lock" "check access to PyPI; read pip's message"
    # the project with its test/lint extra (pytest, ruff, ...): all pinned in the lock
    "$VENV/bin/python" -m pip install -q --no-deps --no-build-isolation -e ".[dev]" \
        || fail "pip install -e .[dev]" "pyproject.toml is broken; read pip's message"
    echo "$LOCK_HASH" > "$VENV/.qkdsat-lock"
else
    echo "up to date"
fi

# ---------------------------------------------------------------- MicroPython source
step "MicroPython $MPY_DEBIAN_VERSION source (Debian source package)"
MPY_SRC="$BUILD_DIR/micropython-$MPY_UPSTREAM_VERSION"
SRC_STAMP="$MPY_SRC/.qkdsat-unpacked-$(sha256sum tools/micropython.env firmware/ports/*.patch | sha256sum | cut -c1-16)"
if [ ! -f "$SRC_STAMP" ]; then
    APT_DIR="$BUILD_DIR/apt"
    mkdir -p "$APT_DIR/lists/partial" "$APT_DIR/sources.list.d" "$BUILD_DIR/download"
    # A private apt configuration adds the deb-src entry without touching the system's.
    cat > "$APT_DIR/sources.list.d/micropython-src.sources" <<EOF
Types: deb-src
URIs: $MPY_DEBIAN_MIRROR
Suites: $MPY_DEBIAN_SUITE
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
    APT_OPTS=(-o "Dir::Etc::SourceList=/dev/null" -o "Dir::Etc::SourceParts=$APT_DIR/sources.list.d"
              -o "Dir::State::Lists=$APT_DIR/lists" -o "APT::Sandbox::User=root")
    ORIG="$BUILD_DIR/download/$MPY_ORIG_TARBALL"
    if ! echo "$MPY_ORIG_SHA256  $ORIG" | sha256sum -c --status 2>/dev/null; then
        apt-get "${APT_OPTS[@]}" update -q \
            || fail "apt-get update for the $MPY_DEBIAN_SUITE deb-src list" "check the network"
        (cd "$BUILD_DIR/download" && apt-get "${APT_OPTS[@]}" source --download-only -q \
            "micropython=$MPY_DEBIAN_VERSION") \
            || fail "apt-get source micropython=$MPY_DEBIAN_VERSION" \
                    "is that version still in Debian $MPY_DEBIAN_SUITE? update tools/micropython.env"
    fi
    echo "$MPY_ORIG_SHA256  $ORIG" | sha256sum -c --status \
        || fail "SHA-256 of $MPY_ORIG_TARBALL" \
                "the download does not match tools/micropython.env; delete build/download and retry"
    rm -rf "$MPY_SRC"
    tar -xJf "$ORIG" -C "$BUILD_DIR" || fail "unpack $ORIG" "delete build/download and retry"
    for patch in firmware/ports/*.patch; do
        patch -d "$MPY_SRC" -p1 --quiet < "$patch" || fail "apply $patch" \
            "the patch no longer fits MicroPython $MPY_UPSTREAM_VERSION; refresh it"
    done
    # Debian strips micropython-lib; the build only needs the folder to exist.
    mkdir -p "$MPY_SRC/lib/micropython-lib" && touch "$MPY_SRC/lib/micropython-lib/README.md"
    touch "$SRC_STAMP"
    echo "unpacked into $MPY_SRC"
else
    echo "already unpacked and checked"
fi

# ---------------------------------------------------------------- builds
step "builds (mpy-cross, unix port, QEMU MPS2_AN385 firmware)"
make -s -C "$ROOT" micropython-builds || fail "MicroPython builds" \
    "read the compiler message above; 'make clean-micropython && make setup' rebuilds from scratch"

# ---------------------------------------------------------------- LDPC codes
# Every code reconciliation can pick, built once per installation: a code first needed
# during a pass is built there (seconds each) and can push the keys past the satellite's
# set (docs/streaming.md, "Provisioning the codes"). Idempotent: cached codes are skipped.
step "LDPC codes (qkdsat codes build: 543 codes, ~12 min on 2 idle cores the first time)"
"$VENV/bin/python" -m host.cli codes build || fail "LDPC code build" \
    "read the message above; 'qkdsat codes build --check' lists what is missing"

# ---------------------------------------------------------------- numba machine code
# The distillation's kernels (decoder, syndromes, authentication hash, Rice coding, PA)
# compiled into numba's cache (host/distil/__pycache__) now, on throw-away bits, not inside
# the first pass's timed stages (a fresh tree's first micius-2017 pass: 27.4 s against ~9 s;
# docs/distillation.md, "Distillation time of a full pass"). After the codes: it decodes.
step "numba machine code of the distillation (~30 s the first time, then ~5 s)"
"$VENV/bin/python" -c "from host.distil.codes import warm_up_machine_code as w; print(f'{w():.1f} s')" \
    || fail "numba warm-up" "read the traceback above"

echo
echo "setup done: $(./build/bin/micropython -c 'import sys; print(sys.implementation.name, sys.version)')"

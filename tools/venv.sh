#!/usr/bin/env bash
# Makes the virtual environment .venv/ in the checkout, or reuses the one there, and
# pip-installs its arguments into it:
#
#     tools/venv.sh .                  # the gateway: .venv/bin/flexvdi-gateway
#     tools/venv.sh -e '.[test]'       # what the tests need
#
# Nothing goes into the system Python: Debian 12 refuses a system-wide pip install
# (EXTERNALLY-MANAGED, PEP 668), and minimal Debian and RHEL/Rocky installs have no pip
# at all. When `python3 -m venv` cannot work yet, the distribution's package manager
# installs what it lacks (as root, or through sudo).
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=.venv
say() { echo "tools/venv.sh: $*" >&2; }

as_root() {
    if [ "$(id -u)" = 0 ]; then
        "$@"
    elif command -v sudo >/dev/null; then
        sudo "$@"
    else
        say "run as root, or install yourself: $*"
        exit 1
    fi
}

install_venv_support() {
    if command -v apt-get >/dev/null; then
        # Debian splits venv off its python3: python3-venv brings ensurepip and the pip
        # and setuptools wheels that it puts into a new venv.
        say "installing python3-venv with apt-get"
        as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
        as_root env DEBIAN_FRONTEND=noninteractive \
            apt-get install -y -qq --no-install-recommends python3 python3-venv >/dev/null
    elif command -v dnf >/dev/null || command -v yum >/dev/null; then
        # RHEL/Rocky: venv is in python3 itself; pip is the separate python3-pip.
        say "installing python3-pip with $(command -v dnf || command -v yum)"
        as_root "$(command -v dnf || command -v yum)" install -y -q python3 python3-pip
    else
        say "no apt-get, dnf or yum here: install Python 3.9+ with its venv module and pip"
        exit 1
    fi
}

if [ $# = 0 ]; then
    say "usage: tools/venv.sh PIP-INSTALL-ARGUMENTS..."
    exit 2
fi

# A venv whose pip runs is reused as it is; a broken one (say, left half-made by an
# earlier run that had no ensurepip) is made again.
if "$VENV/bin/python" -m pip --version >/dev/null 2>&1; then
    say "reusing $VENV ($("$VENV/bin/python" --version 2>&1))"
else
    rm -rf "$VENV"
    installed=no
    if ! command -v python3 >/dev/null || ! python3 -c 'import ensurepip, venv' 2>/dev/null
    then
        install_venv_support
        installed=yes
    fi
    say "creating $VENV with $(command -v python3) ($(python3 --version 2>&1))"
    # ensurepip can be there and still fail for want of the wheels it installs.
    if ! python3 -m venv "$VENV"; then
        [ $installed = no ] || exit 1
        rm -rf "$VENV"
        install_venv_support
        python3 -m venv "$VENV"
    fi
fi

"$VENV/bin/python" -m pip install --disable-pip-version-check "$@"

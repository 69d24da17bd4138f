#!/usr/bin/env bash
# The Prefect server's own virtualenv: the Prefect release the router runs, on Python 3.13
# or newer where the host has one, with uvloop and httptools.
#   deployments/install-server.sh /opt/prefect-server [PYTHON]
#
# Why a Python of its own: on Python 3.11 and 3.12 Prefect's datetimes are pendulum's, and
# the server spends about a fifth of its CPU in them (every timestamp of every event it
# writes); from 3.13 on they are the standard library's. uvicorn runs on uvloop and
# parses HTTP with httptools when they are installed (its `loop="auto"`, which
# `prefect server start` keeps). Figures: bench/README.md (server_python.py).
#
# PYTHON: the interpreter for the server (default: the first Python 3.13 or newer of
# python3.13, python3.14, python3 and pyenv's builds; else the router's, with a warning;
# `--which-python` prints the one it would take). The server gets the Prefect release of
# ROUTER_PYTHON (default: this checkout's .venv, else python3), or PREFECT_VERSION when it
# is set: the workers and the server should run the same one, as the tests do.
# Run again after upgrading the router's Prefect: a venv already current is left alone.
set -euo pipefail
usage="usage: install-server.sh VENV [PYTHON] | install-server.sh --which-python"
venv=${1:?$usage}
python=${2:-}
here=$(cd "$(dirname "$0")/.." && pwd)

usable() { # a Python 3.13 or newer that makes virtualenvs (Debian: python3-venv)
    "$1" -c 'import sys, venv, ensurepip; sys.exit(sys.version_info < (3, 13))' 2>/dev/null
}

router_python=${ROUTER_PYTHON:-}
if [[ -z $router_python ]]; then
    router_python=python3
    [[ -x $here/.venv/bin/python ]] && router_python=$here/.venv/bin/python
fi

if [[ -z $python ]]; then
    # on PATH (Debian 13's python3 is 3.13), then pyenv's builds
    pyenv=${PYENV_ROOT:-$HOME/.pyenv}/versions
    candidates=(python3.13 python3.14 python3 "$pyenv"/3.1[3-9]*/bin/python3)
    for candidate in "${candidates[@]}"; do
        if usable "$candidate"; then
            python=$(command -v "$candidate")
            break
        fi
    done
fi
if [[ -z $python ]]; then
    python=$router_python
    [[ $venv == --which-python ]] ||
        echo "warning: no Python 3.13 or newer found; the server runs on" \
            "$("$python" -c 'import platform; print(platform.python_version())'), where" \
            "Prefect's pendulum datetimes cost it about 0.1 CPU-s more per routed job" >&2
fi
if [[ $venv == --which-python ]]; then
    echo "$python"
    exit 0
fi

version=${PREFECT_VERSION:-}
if [[ -z $version ]]; then
    version=$("$router_python" -c 'import prefect; print(prefect.__version__)') || {
        echo "error: $router_python has no Prefect: install the router first (README)," \
            "or name the release: PREFECT_VERSION=X.Y.Z $0 $venv" >&2
        exit 1
    }
fi
python_version=$("$python" -c 'import platform; print(platform.python_version())')

wanted="$python_version prefect==$version"
if [[ -x $venv/bin/python ]] &&
    [[ $("$venv/bin/python" -c 'import platform, prefect, uvloop, httptools
print(platform.python_version(), "prefect==" + prefect.__version__)' 2>/dev/null) == "$wanted" ]]; then
    echo "$venv: Python $python_version, prefect $version (current)"
    exit 0
fi

"$python" -m venv --clear "$venv" || {
    echo "error: $python could not make the virtualenv $venv (on Debian's Python:" \
        "apt-get install python3-venv)" >&2
    exit 1
}
PIP_ROOT_USER_ACTION=ignore "$venv/bin/python" -m pip install -q --disable-pip-version-check \
    "prefect==$version" uvloop httptools
echo "$venv: Python $python_version, prefect $version, uvloop, httptools"

# The project's Python environment: a virtualenv at .venv with balloond
# installed (editable) and the test tools. Sourced; sets VENV_PY.
# shellcheck shell=bash

ensure_python_env() {
    local repo="$1" base
    base="$(command -v python3 || true)"
    if [ -z "$base" ] || ! "$base" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
        apt_install python3 python3-venv python3-pip
        base=/usr/bin/python3
    fi
    if [ ! -x "$repo/.venv/bin/python" ]; then
        log "creating the virtualenv .venv ($("$base" --version))"
        if ! "$base" -m venv "$repo/.venv" 2>/dev/null; then
            apt_install python3-venv
            "$base" -m venv "$repo/.venv"
        fi
    fi
    VENV_PY="$repo/.venv/bin/python"
    local stamp="$repo/.venv/.balloond-installed" want
    want="$(sha256sum "$repo/pyproject.toml" | cut -c1-16)"
    if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
        log "installing balloond and its test tools into .venv (pip)"
        "$VENV_PY" -m pip install -q --upgrade pip >/dev/null
        "$VENV_PY" -m pip install -q -e "$repo[test]"
        echo "$want" > "$stamp"
    else
        log "Python environment up to date (.venv)"
    fi
    export VENV_PY
}

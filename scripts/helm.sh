#!/usr/bin/env bash
# Helm for the tests, built from the Go module helm.sh/helm/v4 (pinned in tools/helm/go.mod) the way
# scripts/cluster.sh builds the control plane and scripts/prometheus.sh builds Prometheus.
#   scripts/helm.sh build    build .helm/bin/helm from tools/helm (cold: ~430 MB of module sources and
#                            ~4.6 CPU-minutes, 6.5 min on a busy 2-core machine; seconds warm)
#   scripts/helm.sh ensure   build only when the binary is missing or older than tools/helm
#   scripts/helm.sh path     print the folder holding the binary
# CWO_HELM_BIN overrides the folder (a shared, already-built one, for example).
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
tool=helm
bin_dir=${CWO_HELM_BIN:-$root/.helm/bin}
module_dir=$root/tools/helm
binaries=(helm)
# shellcheck source=lib/go-tool.sh
source "$root/scripts/lib/go-tool.sh"

build() {
  require_go
  local version started=$SECONDS
  version=$(pinned_version helm.sh/helm/v4)
  # As Helm's Makefile stamps a release: `helm version` then names the module version built.
  local ldflags="-s -w -X helm.sh/helm/v4/internal/version.version=$version -X helm.sh/helm/v4/internal/version.metadata= -X helm.sh/helm/v4/internal/version.gitTreeState=clean"
  say "building helm $version into $bin_dir"
  mkdir -p "$bin_dir"
  (cd "$module_dir" && CGO_ENABLED=0 GOFLAGS=-buildvcs=false go build -trimpath -ldflags "$ldflags" -o "$bin_dir/" helm.sh/helm/v4/cmd/helm)
  say "built in $((SECONDS - started)) s"
}

go_tool_main "$@"

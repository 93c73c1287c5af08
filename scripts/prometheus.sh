#!/usr/bin/env bash
# Prometheus and promtool for the tests, built from the Go module github.com/prometheus/prometheus
# (pinned in tools/prometheus/go.mod) the way scripts/cluster.sh builds the control plane.
#   scripts/prometheus.sh build    build .prometheus/bin/{prometheus,promtool} from tools/prometheus (cold:
#                                  ~1.1 GB of modules and ~6 CPU-minutes, 3-4 min on 2 idle cores; seconds warm)
#   scripts/prometheus.sh ensure   build only when a binary is missing or older than tools/prometheus
#   scripts/prometheus.sh path     print the folder holding the binaries
# CWO_PROMETHEUS_BIN overrides the folder (a shared, already-built one, for example).
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
tool=prometheus
bin_dir=${CWO_PROMETHEUS_BIN:-$root/.prometheus/bin}
module_dir=$root/tools/prometheus
binaries=(promtool prometheus)
# shellcheck source=lib/go-tool.sh
source "$root/scripts/lib/go-tool.sh"

build() {
  require_go
  local version started=$SECONDS
  version=$(pinned_version github.com/prometheus/prometheus)
  # Module v0.X.Y is Prometheus 3.X.Y; the version shows in `prometheus --version` and build_info.
  local minor_patch=${version#v0.3}
  local release=3.$((10#${minor_patch%%.*})).${minor_patch#*.}
  local ldflags="-s -w -X github.com/prometheus/common/version.Version=$release -X github.com/prometheus/common/version.Branch=module -X github.com/prometheus/common/version.Revision=$version"
  say "building ${binaries[*]} $version into $bin_dir"
  mkdir -p "$bin_dir"
  # remove_all_sd: Prometheus' own build tag leaving out the cloud service discoveries (AWS, Azure, GCE,
  # OCI, OpenStack...): the tests scrape static targets, and those SDKs are the slowest part of the build.
  (cd "$module_dir" && GOFLAGS=-buildvcs=false go build -trimpath -tags remove_all_sd -ldflags "$ldflags" -o "$bin_dir/" \
    github.com/prometheus/prometheus/cmd/promtool github.com/prometheus/prometheus/cmd/prometheus)
  say "built in $((SECONDS - started)) s"
}

go_tool_main "$@"

# Shared by the scripts that build a test tool from a Go module pinned in tools/<name>/go.mod
# (scripts/prometheus.sh, scripts/helm.sh). Source it after setting:
#   tool         the name in messages ("helm")
#   module_dir   tools/<name>, holding go.mod and go.sum
#   bin_dir      where the binaries go
#   binaries     array of the binaries the build leaves in bin_dir
# and defining build(); then `go_tool_main "$@"` runs build|ensure|path.

say() { echo "$tool: $*"; }
fail() { echo "$tool: $*" >&2; exit 1; }

require_go() {
  command -v go >/dev/null || fail "go is not installed; install Go >= 1.26 to build ${binaries[*]}"
}

# The version go.mod pins for a module path.
pinned_version() { # module
  awk -v module="$1" '$1 == module { print $2; exit }' "$module_dir/go.mod"
}

# True when a binary is missing or older than go.mod, go.sum or a .go file of the module folder.
stale() {
  local name
  for name in "${binaries[@]}"; do
    [ -x "$bin_dir/$name" ] || return 0
    [ -z "$(find "$module_dir" -maxdepth 1 \( -name '*.go' -o -name 'go.mod' -o -name 'go.sum' \) -newer "$bin_dir/$name")" ] || return 0
  done
  return 1
}

go_tool_main() {
  case "${1:-}" in
    build) build ;;
    ensure)
      if stale; then build; else say "up to date in $bin_dir"; fi ;;
    path) echo "$bin_dir" ;;
    *) echo "usage: $0 build|ensure|path" >&2; exit 2 ;;
  esac
}

# Shared by the benchmark scripts (sourced, not run).

# bench_workdir DIR: DIR made afresh with a mountpoint DIR/m; at exit,
# whatever is mounted there is unmounted and DIR removed.
bench_workdir() {
  bench_work=$1
  rm -rf "$bench_work"
  mkdir -p "$bench_work/m"
  trap 'fusermount3 -uz "$bench_work/m" 2>/dev/null || true; rm -rf "$bench_work"' EXIT
}

now() { date +%s.%N; }

"""Where a test run's time goes in JAX: tracing, lowering, compiling.

Record (see benchmarks/compile_profile/sitecustomize.py), then summarise:

  JAXSD_COMPILE_PROFILE=/tmp/compiles.tsv \\
    PYTHONPATH=benchmarks/compile_profile \\
    python -m pytest -q -n 2 --dist worksteal tests
  python benchmarks/compile_profile.py /tmp/compiles.tsv --top=25

Prints each event's count and total seconds, compiles by duration, and the
tests (with the subprocesses they started) that spent the most seconds in
tracing + lowering + compiling. Seconds are summed over processes, so they
compare with pytest's test time (the sum of test durations), not with wall
time.
"""
import argparse
import collections

JAX_TIME = ("jaxpr_trace_duration", "jaxpr_to_mlir_module_duration",
            "backend_compile_duration")


def read(path):
  rows = []
  with open(path) as f:
    for line in f:
      parts = line.rstrip("\n").split("\t")
      if len(parts) >= 5:
        rows.append((parts[2], parts[3], float(parts[4])))
  return rows


def summarise(rows, top: int):
  count, total = collections.Counter(), collections.Counter()
  per_test = collections.defaultdict(collections.Counter)
  compiles = []
  for test, event, seconds in rows:
    count[event] += 1
    total[event] += seconds
    if event in JAX_TIME:
      per_test[test][event] += seconds
    if event == "backend_compile_duration":
      compiles.append(seconds)
  print("event                                   count   seconds")
  for event in sorted(total, key=total.get, reverse=True):
    print(f"{event:38s} {count[event]:6d} {total[event]:9.1f}")
  print(f"trace + lower + compile: {sum(total[e] for e in JAX_TIME):.1f} s")
  for low, high in ((5, float("inf")), (1, 5), (0, 1)):
    sel = [c for c in compiles if low < c <= high]
    print(f"compiles in ({low}, {high}] s: {len(sel)}, {sum(sel):.1f} s")
  print(f"\ntests by trace + lower + compile seconds (top {top}):")
  print("  total  trace  lower compile  test")
  ranked = sorted(per_test.items(), key=lambda kv: -sum(kv[1].values()))
  for test, by_event in ranked[:top]:
    print(f"{sum(by_event.values()):7.1f} {by_event[JAX_TIME[0]]:6.1f} "
          f"{by_event[JAX_TIME[1]]:6.1f} {by_event[JAX_TIME[2]]:7.1f}  {test}")


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("path", help="the file JAXSD_COMPILE_PROFILE named")
  parser.add_argument("--top", type=int, default=25)
  args = parser.parse_args()
  summarise(read(args.path), args.top)


if __name__ == "__main__":
  main()

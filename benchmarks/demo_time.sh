#!/bin/bash
# `make demo`'s three commands (train, eval, report), each a separate process timed on its own, with the code of
# CODE_DIR (a checkout or `git worktree` of any commit; the venv of this checkout runs it). Prints one line:
#   LABEL train S eval S report S total S load L
# and keeps each command's output (with its `time:` line) in /tmp/demo-LABEL-{train,eval,report}.log.
# Before/after: alternate the two checkouts, e.g.
#   git worktree add /tmp/before 07429bf
#   for i in 1 2; do bash benchmarks/demo_time.sh /tmp/before before$i; bash benchmarks/demo_time.sh . after$i; done
set -euo pipefail
code=$(cd "$1" && pwd); label=$2
py=$(cd "$(dirname "$0")/.." && pwd)/.venv/bin/python
cd "$code"
export PYTHONPATH=$code
now() { echo "$EPOCHREALTIME"; }
s=$(now); $py -m loratune train --overwrite > "/tmp/demo-$label-train.log" 2>&1; e1=$(now)
$py -m loratune eval runs/demo --samples 4 > "/tmp/demo-$label-eval.log" 2>&1; e2=$(now)
$py -m loratune report runs/demo > "/tmp/demo-$label-report.log" 2>&1; e3=$(now)
awk -v l="$label" -v s="$s" -v a="$e1" -v b="$e2" -v c="$e3" -v load="$(cut -d' ' -f1 /proc/loadavg)" \
  'BEGIN { printf "%s train %.1f eval %.1f report %.1f total %.1f load %s\n", l, a - s, b - a, c - b, c - s, load }'

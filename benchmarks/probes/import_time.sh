#!/usr/bin/env bash
# Where a command's start-up goes: each heavy library imported alone (a fresh process each, so nothing is shared),
# then loratune's training and generation modules, then Python's own per-module import times, sorted.
# Run: bash benchmarks/probes/import_time.sh [python]
PY=${1:-python3}
for mod in torch transformers peft "transformers.models.llama.modeling_llama" loratune.training.recipe \
           loratune.inference.batch; do
  $PY - "$mod" <<'PYEOF'
import importlib, sys, time
t = time.perf_counter()
importlib.import_module(sys.argv[1])
print(f"import {sys.argv[1]:<45} {time.perf_counter() - t:6.2f} s")
PYEOF
done
$PY -X importtime -c "import loratune.training.recipe" 2> /tmp/importtime.txt
echo "top cumulative (us), import loratune.training.recipe:"
sort -t'|' -k2 -n -r /tmp/importtime.txt | head -25

#!/usr/bin/env bash
# Check every CUDA kernel's local memory (ptxas "bytes stack frame") against its budget in
# tools/cuda_local_memory_budget.txt, and print the figures as a table.
#
#   bash tools/check_cuda_local_memory.sh                 # compile csrc/cuda/*.cu with -Xptxas -v
#   bash tools/check_cuda_local_memory.sh LOG...          # parse existing `nvcc -Xptxas -v` logs
#   BUCKETMOO_LOCAL_MEMORY_TABLE=markdown bash tools/check_cuda_local_memory.sh   # docs table
#
# tools/check_cuda_compile.sh calls it with the logs of its own compile. Fails (exit 1) when
# a kernel's stack frame exceeds its budget, when a kernel has no budget line, or when no
# kernel was found at all (a changed ptxas output format must not pass silently).
# Environment: NVCC, BUCKETMOO_CUDA_ARCHS (default "80;90"), as check_cuda_compile.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
budget_file=tools/cuda_local_memory_budget.txt
logs=("$@")
if [ ${#logs[@]} -eq 0 ]; then
  nvcc_bin="${NVCC:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}"
  work="$(mktemp -d "${TMPDIR:-/tmp}/bucketmoo_lmem.XXXXXX")"
  trap 'rm -rf "$work"' EXIT
  gencode=()
  IFS=';' read -ra arch_list <<< "${BUCKETMOO_CUDA_ARCHS:-80;90}"
  for arch in "${arch_list[@]}"; do gencode+=("-gencode" "arch=compute_${arch},code=sm_${arch}"); done
  for src in csrc/cuda/*.cu; do
    log="$work/$(basename "${src%.cu}").ptxas"
    "$nvcc_bin" -std=c++17 "${gencode[@]}" -Icsrc -Xptxas -v -c "$src" -o "$work/x.o" 2> "$log"
    logs+=("$log")
  done
fi
demangle="$(command -v cu++filt || command -v c++filt || echo cat)"

# "<mangled> <arch> <stack> <spill stores> <spill loads>" for every entry function.
rows="$(cat "${logs[@]}" | awk '
  /Compiling entry function/ {
    match($0, /function '"'"'[^'"'"']+'"'"'/); name = substr($0, RSTART + 10, RLENGTH - 11)
    match($0, /for '"'"'sm_[0-9a-z]+'"'"'/); arch = substr($0, RSTART + 5, RLENGTH - 6)
    next
  }
  /bytes stack frame/ && name != "" {
    for (i = 1; i <= NF; ++i) {
      if ($(i + 1) == "bytes" && $(i + 2) == "stack") stack = $i
      if ($(i + 1) == "bytes" && $(i + 2) == "spill" && $(i + 3) == "stores,") st = $i
      if ($(i + 1) == "bytes" && $(i + 2) == "spill" && $(i + 3) == "loads") ld = $i
    }
    print name, arch, stack, st, ld; name = ""
  }' | sort -u)"
if [ -z "$rows" ]; then
  echo "check_cuda_local_memory: no kernel found in the ptxas output (${logs[*]})" >&2
  exit 1
fi

failed=0
table=()
while read -r mangled arch stack stores loads; do
  pretty="$(echo "$mangled" | "$demangle" | sed -E 's/^(void )?bucketmoo::cuda::detail:://; s/\(.*$//')"
  budget=""
  while read -r bytes pattern; do
    case "$bytes" in ''|\#*) continue ;; esac
    if echo "$pretty" | grep -Eq -- "$pattern"; then budget="$bytes"; break; fi
  done < "$budget_file"
  status=ok
  if [ -z "$budget" ]; then
    status="NO BUDGET"; failed=1
  elif [ "$stack" -gt "$budget" ]; then
    status="OVER BUDGET"; failed=1
  fi
  table+=("$(printf '%s|%s|%s|%s|%s|%s|%s' "$pretty" "$arch" "$stack" "$stores" "$loads" "${budget:--}" "$status")")
done <<< "$rows"

if [ "${BUCKETMOO_LOCAL_MEMORY_TABLE:-}" = markdown ]; then
  echo "| kernel | arch | stack frame (B) | spill stores (B) | spill loads (B) | budget (B) |"
  echo "|---|---|---|---|---|---|"
  printf '%s\n' "${table[@]}" | awk -F'|' '{printf "| `%s` | %s | %s | %s | %s | %s |\n", $1, $2, $3, $4, $5, $6}'
else
  printf '%s\n' "${table[@]}" | awk -F'|' '{printf "  %-58s %-6s stack %6s B  spill %4s/%4s B  budget %6s  %s\n", $1, $2, $3, $4, $5, $6, $7}'
fi
n="${#table[@]}"
if [ "$failed" -ne 0 ]; then
  echo "check_cuda_local_memory: FAILED (a kernel over its budget or without one; see $budget_file)" >&2
  exit 1
fi
echo "check_cuda_local_memory: OK ($n kernel instantiations within budget)"

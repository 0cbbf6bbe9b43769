#!/usr/bin/env bash
# The native kernels' instruction paths side by side, outside JAX: bench/kernel_variants.cc
# built as the AVX-512, AVX2 and portable path, run one after another under the bench lock.
# usage (from the project root): bench/kernel_paths.sh
set -euo pipefail
inc=$(.venv/bin/python -c 'import jax; print(jax.ffi.include_dir())')
flags=$(grep -o -w 'avx512f\|avx512_vnni\|avx512_bf16\|avx2\|fma' /proc/cpuinfo | sort -u | tr '\n' ' ')
echo "CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2-) | $flags| load $(cut -d' ' -f1-3 /proc/loadavg)"
declare -A build=([avx512]="-march=x86-64-v4" [avx2]="-march=x86-64-v3" [portable]="-march=native -DHPLLM_PORTABLE")
for path in avx512 avx2 portable; do
  if [[ $path == avx512 && $flags != *avx512f* ]]; then echo "(no AVX-512 here: skipped)"; continue; fi
  # shellcheck disable=SC2086
  g++ -O3 ${build[$path]} -fopenmp -std=c++17 -w -I"$inc" bench/kernel_variants.cc -o "/tmp/kernel_variants_$path"
done
for path in avx512 avx2 portable; do
  [[ -x /tmp/kernel_variants_$path ]] && flock /tmp/hpllm-bench.lock "/tmp/kernel_variants_$path" | grep "$path\|^| variant\|^|---"
done
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)"

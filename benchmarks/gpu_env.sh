# Source on a bare GPU machine (the project's device runs): installs the carried flash-linear-attention wheels
# (.whl/) into /tmp/site and restores the carried compiler caches (.tcache/), so Triton and Inductor do not
# recompile what an earlier run already built.   usage:  source benchmarks/gpu_env.sh
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || return 1
export PYTHONPATH=/tmp/site:$PWD
export TRITON_CACHE_DIR=/tmp/caches/triton TORCHINDUCTOR_CACHE_DIR=/tmp/caches/inductor
mkdir -p "$TRITON_CACHE_DIR" "$TORCHINDUCTOR_CACHE_DIR"
[ -f .tcache/triton_cache.tgz ] && tar xzf .tcache/triton_cache.tgz -C "$TRITON_CACHE_DIR"
[ -f .tcache/caches.tgz ] && tar xzf .tcache/caches.tgz -C /tmp/caches
# save_caches DIR: pack both caches into DIR/caches.tgz to carry into the next run
save_caches() { tar czf "$1/caches.tgz" -C /tmp/caches . ; }

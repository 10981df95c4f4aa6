# Sourced by bench/gpu_check.sh and bench/recipe_bill.sh: the environment both run in on a GPU box.
# Wheels the box lacks travel in .whl/ and are installed into a private folder (/tmp/site), never into the
# system's site-packages; GPU_CHECK_SKIP_WHEELS=1 skips that. PYTHON picks the interpreter (default python3).
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
if [ -d .whl ] && [ -z "${GPU_CHECK_SKIP_WHEELS:-}" ]; then
    $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site:$PWD:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
export HF_HUB_OFFLINE=1 TQDM_DISABLE=1  # no downloads; no progress bars mixed into the output
# AugLy (recipe_bill's views) imports python-magic, which needs libmagic; the GPU box has none. Debian's
# libmagic1 + libmagic-mgc travel as .debs/ (`apt-get download libmagic1 libmagic-mgc` here) and are
# unpacked under /tmp, never into /.
if [ -d .debs ] && ls .debs/*.deb >/dev/null 2>&1; then
    mkdir -p /tmp/debroot && for f in .debs/*.deb; do dpkg -x "$f" /tmp/debroot; done
    export LD_LIBRARY_PATH=/tmp/debroot/usr/lib/x86_64-linux-gnu:${LD_LIBRARY_PATH:-}
    export MAGIC=/tmp/debroot/usr/lib/file/magic.mgc
fi

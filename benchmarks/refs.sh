#!/usr/bin/env bash
# Time several commits side by side in one device call (ratios only compare within one call).
#   bash benchmarks/refs.sh archive main exp/out-fwd-cap~1 exp/out-fwd-cap   # here: out/refs/<ref>/
#   bash benchmarks/refs.sh run benchmarks/quant_sweep.py --qat_launches       # there (carry out/refs)
# `archive` exports robuq/, benchmarks/ and tests/ of each ref (git archive; '/' and '~' become '_').
# `run` runs the script of every archived copy against that copy's own package, in the order archived,
# one log each in $OUT (or ./out): refs_<copy>.log; REF_TIMEOUT (300 s) bounds each, TAIL (8) lines are
# echoed. Installs wheels/*.whl first where diffusers is missing (carry wheels).
set -uo pipefail
REFS=out/refs
case ${1:-} in
    archive)
        shift
        [ $# -gt 0 ] || { echo "refs.sh archive: name at least one git ref" >&2; exit 2; }
        for ref in "$@"; do
            git rev-parse --verify -q "$ref^{commit}" >/dev/null || { echo "refs.sh archive: unknown ref $ref" >&2; exit 2; }
        done
        rm -rf "$REFS" && mkdir -p "$REFS"
        for ref in "$@"; do
            dir=$REFS/$(echo "$ref" | tr '/~' '__')
            mkdir -p "$dir" && git archive "$ref" robuq benchmarks tests | tar -x -C "$dir" || exit 1
            echo "$(basename "$dir")" >> "$REFS/order"
            echo "$ref -> $dir ($(git rev-parse --short "$ref"))"
        done
        ;;
    run)
        shift
        [ $# -gt 0 ] || { echo "refs.sh run: give the script and its arguments" >&2; exit 2; }
        [ -f "$REFS/order" ] || { echo "refs.sh run: no $REFS/order; run 'refs.sh archive REF...' first and carry $REFS" >&2; exit 2; }
        OUT=${OUT:-out}
        mkdir -p "$OUT"
        export PYTHONUNBUFFERED=1
        site=""
        if [ -d wheels ] && ! python3 -c "import diffusers" 2>/dev/null; then  # the device machine lacks it
            python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site wheels/*.whl || exit 1
            site=/tmp/site
        fi
        script=$1
        shift
        rc=0
        while read -r copy; do
            echo "=== $copy ($(date +%T))"
            PYTHONPATH=${site:+$site:}$PWD/$REFS/$copy timeout "${REF_TIMEOUT:-300}" \
                python3 "$REFS/$copy/$script" "$@" > "$OUT/refs_$copy.log" 2>&1 || rc=1
            tail -n "${TAIL:-8}" "$OUT/refs_$copy.log"
        done < "$REFS/order"
        exit $rc
        ;;
    *)
        echo "usage: bash benchmarks/refs.sh archive REF... | run SCRIPT [ARGS...]" >&2
        exit 2
        ;;
esac

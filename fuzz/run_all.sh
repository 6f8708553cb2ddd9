#!/usr/bin/env bash
# Run every fuzz target (or the ones named) for SECONDS each and print a summary line per target.
#
#   fuzz/run_all.sh SECONDS [TARGET...]        e.g.  fuzz/run_all.sh 600   or   fuzz/run_all.sh 60 http sse
#
# FUZZ_JOBS=N runs N targets at a time (default 1; one core each). New inputs the fuzzer finds go
# to a scratch folder (kept in FUZZ_WORK_DIR when set), never into the seed corpora in the repo;
# crash, timeout and out-of-memory inputs go to fuzz/crashes/ (git-ignored). Exit status 1 when
# any target found something. Needs atheris: pip install atheris.
set -uo pipefail
cd "$(dirname "$0")/.."

seconds=${1:?usage: fuzz/run_all.sh SECONDS [TARGET...]}
shift
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    targets=(http openai_parse codec ws predict sse)
fi
jobs=${FUZZ_JOBS:-1}
python=${PYTHON:-python}
work=${FUZZ_WORK_DIR:-$(mktemp -d)}
mkdir -p "$work" fuzz/crashes

run_one() {
    local target=$1
    local dict=()
    if [ -f "fuzz/dicts/$target.dict" ]; then
        dict=("-dict=fuzz/dicts/$target.dict")
    fi
    # The slow targets (a whole engine run per input) get no length ramp-up: at a few dozen
    # runs a second libFuzzer's default would keep their inputs tiny for the whole run.
    local max_len
    case $target in
        ws) max_len=2048 ;;
        predict | sse) max_len=1024 ;;
        *) max_len=4096 ;;
    esac
    mkdir -p "$work/$target"
    "$python" "fuzz/fuzz_$target.py" \
        -max_total_time="$seconds" -timeout=10 -rss_limit_mb=1024 -print_final_stats=1 \
        -max_len="$max_len" -len_control=0 \
        -artifact_prefix="fuzz/crashes/$target-" "${dict[@]}" \
        "$work/$target" "fuzz/corpus/$target" >"$work/$target.log" 2>&1
    local status=$?
    local done_line execs
    done_line=$(grep -E '^#[0-9]+[[:space:]]+DONE' "$work/$target.log" | tail -1)
    execs=$(grep -E '^stat::number_of_executed_units' "$work/$target.log" | awk '{print $2}')
    if [ $status -eq 0 ]; then
        echo "ok       $target: ${seconds}s, ${execs:-?} runs | ${done_line:-no DONE line}"
    else
        echo "FINDING  $target: exit $status, see $work/$target.log and fuzz/crashes/$target-*"
        grep -m1 -A12 -E 'Uncaught Python exception|ERROR: libFuzzer' "$work/$target.log" | sed 's/^/    /'
    fi
    return $status
}

failed=0
running=0
for target in "${targets[@]}"; do
    if [ ! -f "fuzz/fuzz_$target.py" ]; then
        echo "no such target: $target" >&2
        exit 2
    fi
    run_one "$target" &
    running=$((running + 1))
    if [ $running -ge "$jobs" ]; then
        wait -n || failed=1
        running=$((running - 1))
    fi
done
while [ $running -gt 0 ]; do
    wait -n || failed=1
    running=$((running - 1))
done
echo "logs and new inputs: $work"
exit $failed

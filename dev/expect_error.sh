# Sourced by the shell tests: expect_error NAME PATTERN ARGS... runs "$BIN" ARGS and prints one
# ok/FAIL line "$PREFIX$NAME": ok when it exits non-zero with exactly one line on stderr, which
# starts with "error: " and matches PATTERN. Needs $BIN, $PREFIX and a folder $tmp.
expect_error() {
    local name=$1 pattern=$2; shift 2
    "$BIN" "$@" >"$tmp/out" 2>"$tmp/err"
    local rc=$? lines
    lines=$(wc -l <"$tmp/err")
    if [ $rc -ne 0 ] && [ "$lines" -eq 1 ] && grep -q '^error: ' "$tmp/err" && grep -q -- "$pattern" "$tmp/err"; then
        echo "ok   $PREFIX$name exit $rc: $(cat "$tmp/err")"
    else
        echo "FAIL $PREFIX$name exit $rc, $lines stderr lines (want 1 matching '$pattern'): $(head -c 300 "$tmp/err")"
    fi
}

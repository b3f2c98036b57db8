# failures.awk prints one line per failure in a `go test -v` log: the
# test, where it failed and why (testify's Error and Messages, a t.Fatal's
# text, a panic, a timeout), each line cut at 400 characters. CI shows
# only the last lines of what make test printed, far below the logs
# themselves: scripts/kvm-tests.sh and scripts/guest-tests.sh end with
# these lines so that the reason for a failure is among them.
#
# Usage: awk -v prefix='kvm-tests: replicate: ' -f scripts/failures.awk LOG
function trim(s) {
	sub(/^[ \t]+/, "", s)
	sub(/[ \t]+$/, "", s)
	return s
}
function out(s) {
	if (length(s) > 400)
		s = substr(s, 1, 397) "..."
	print prefix s
	printed++
}
# failedBelow says whether a subtest of name has failed already: a
# parent's "--- FAIL" adds nothing to its subtest's line.
function failedBelow(name,    k) {
	for (k in said)
		if (index(k, name "/") == 1)
			return 1
	return 0
}
# value is the text after label on this line: a testify field's value.
function value(label) {
	return trim(substr($0, index($0, label) + length(label)))
}
# flush prints the testify failure being read, if any.
function flush() {
	if (where == "")
		return
	out(test ": " where ": " err (msg != "" ? " (" msg ")" : ""))
	said[test] = 1
	where = err = msg = test = field = last = ""
}
# Lines the test printed (t.Log, t.Fatal) start with 4+ spaces and
# file_test.go:N; the last one before a "--- FAIL" says why a test that
# did not use testify failed.
/^ +[A-Za-z0-9_]+\.go:[0-9]+: / {
	flush()
	last = trim($0)
	next
}
/^[ \t]+Error Trace:/ {
	flush()
	where = value("Error Trace:")
	n = split(where, parts, "/")
	where = parts[n]
	field = "trace"
	next
}
/^[ \t]+Error:[ \t]/ && where != "" {
	err = value("Error:")
	field = "err"
	next
}
/^[ \t]+Test:[ \t]/ && where != "" {
	test = value("Test:")
	field = "test"
	next
}
/^[ \t]+Messages:[ \t]/ && where != "" {
	msg = value("Messages:")
	field = "msg"
	next
}
# testify's continuation lines: more of the field above.
/^[ \t]+\t/ && where != "" {
	if (field == "err")
		err = err " " trim($0)
	else if (field == "msg")
		msg = msg " " trim($0)
	next
}
/^ *--- FAIL: / {
	flush()
	name = $3
	if (last != "" && !(name in said) && !failedBelow(name))
		out(name ": " last)
	said[name] = 1
	last = ""
	next
}
/^panic: |^fatal error: |test timed out after|^WARNING: DATA RACE|^lab: .*(fail|error|crash|timed out|status [1-9])/ {
	flush()
	out(trim($0))
	next
}
{ flush() }
END {
	flush()
	if (printed == 0)
		print prefix "no failure found in the log: see its last lines above"
}

package main

// The command line's front door: flag parsing that reports one line, help
// on stdout with flags written --flag, and the version (the flag values
// that check themselves: flagvalues.go).

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net/netip"
	"os"
	"regexp"
	"runtime"
	"runtime/debug"
	"sort"
	"strconv"
	"strings"
	"sync"

	"govmm/ctlapi"
	"govmm/replicate/stream"
	"govmm/virtio/netback"
)

// usageError is a command line that cannot be run as given: a bad flag, a
// bad value, a missing or extra argument. main prints it as one line,
// with where to find help, and exits with status 2.
type usageError struct {
	cmd string // "run", "ctl replicate"; "" for govmm itself
	msg string
}

func (e *usageError) Error() string {
	if e.cmd == "" {
		return e.msg
	}
	return e.cmd + ": " + e.msg
}

// usagef is a usageError of cmd.
func usagef(cmd, format string, a ...any) error {
	return &usageError{cmd: cmd, msg: fmt.Sprintf(format, a...)}
}

// usageStatus is the exit status of every usage error, as the flag
// package and most Unix tools have it.
const usageStatus = 2

// printUsageError writes e as one line: govmm: CMD: MSG (see 'govmm help CMD').
func printUsageError(w io.Writer, e *usageError) {
	help := "govmm help"
	if e.cmd != "" {
		help += " " + e.cmd
	}
	fmt.Fprintf(w, "govmm: %s (see '%s')\n", e.Error(), help)
}

func newFlagSet(name, usage string) *flag.FlagSet {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.Usage = func() {
		fmt.Fprint(fs.Output(), usage)
		printDefaults(fs)
	}
	return fs
}

// parseFlags parses args into fs. Help (-h, --help) goes to stdout and
// returns flag.ErrHelp; any other failure is a one-line usageError (the
// flag package would print the whole usage).
func parseFlags(fs *flag.FlagSet, args []string) error {
	fs.SetOutput(io.Discard)
	err := fs.Parse(args)
	if errors.Is(err, flag.ErrHelp) {
		fs.SetOutput(os.Stdout)
		fs.Usage()
		return flag.ErrHelp
	}
	if err != nil {
		return usagef(fs.Name(), "%s", flagErrorText(err))
	}
	return nil
}

var invalidValue = regexp.MustCompile(`^invalid value ("(?:[^"\\]|\\.)*") for flag -([^:]+): (.*)$`)

// flagErrorText rewrites the flag package's errors the way govmm writes
// flags: --name, and a bad value as "--name VALUE: why". The flag package
// has no typed errors; these texts have been stable since Go 1.
func flagErrorText(err error) string {
	s := err.Error()
	if m := invalidValue.FindStringSubmatch(s); m != nil {
		v, _ := strconv.Unquote(m[1])
		return fmt.Sprintf("--%s %s: %s", m[2], showArg(v), m[3])
	}
	for _, prefix := range []string{"flag provided but not defined: -", "flag needs an argument: -"} {
		if rest, ok := strings.CutPrefix(s, prefix); ok {
			return prefix + "-" + strings.TrimPrefix(rest, "-")
		}
	}
	if rest, ok := strings.CutPrefix(s, "invalid boolean value "); ok {
		return "invalid boolean value " + strings.Replace(rest, " for -", " for --", 1)
	}
	return s
}

// showArg writes a value as the user would type it: quoted only when
// empty or holding a space.
func showArg(s string) string {
	if s == "" || strings.ContainsAny(s, " \t\n\"'") {
		return strconv.Quote(s)
	}
	return s
}

// shellJoin writes a command line as the user would type it again, each
// argument through showArg.
func shellJoin(args []string) string {
	shown := make([]string, len(args))
	for i, a := range args {
		shown[i] = showArg(a)
	}
	return strings.Join(shown, " ")
}

// printDefaults is fs.PrintDefaults without the hidden and refused flags,
// and with each flag written --name, as the docs and the errors write it.
func printDefaults(fs *flag.FlagSet) {
	w := fs.Output()
	var shown []*flag.Flag
	fs.VisitAll(func(fl *flag.Flag) {
		if _, refused := fl.Value.(refusedFlag); !refused && !hiddenFlags[fl.Name] {
			shown = append(shown, fl)
		}
	})
	sort.Slice(shown, func(i, j int) bool { return shown[i].Name < shown[j].Name })
	for _, fl := range shown {
		name, usage := flag.UnquoteUsage(fl)
		if t, ok := fl.Value.(interface{ typeName() string }); ok && name == "value" {
			name = t.typeName()
		}
		line := "  --" + fl.Name
		if name != "" {
			line += " " + name
		}
		if showDefault(fl) {
			usage += fmt.Sprintf(" (default %s)", showArg(fl.DefValue))
		}
		fmt.Fprintf(w, "%s\n%s", line, wrap(usage, "      ", 78))
	}
}

// showDefault reports whether fl's default says more than "unset".
func showDefault(fl *flag.Flag) bool {
	switch fl.DefValue {
	case "", "0", "false", "0s", "[]":
		return false
	}
	return true
}

// buildCommit is the commit for a build without Go's VCS stamp
// (-buildvcs=false): 'make build' sets it with -ldflags -X from git
// describe --always --dirty.
var buildCommit string

// version is what govmm --version prints: the module's version, the VCS
// revision it was built from (and whether the tree had changes) and the
// Go toolchain, from the build information Go embeds in every binary.
func version() string {
	v := "govmm"
	bi, ok := debug.ReadBuildInfo()
	if !ok {
		return v + " (no build information) " + runtime.Version()
	}
	v += " " + bi.Main.Version
	var rev, modified, when string
	for _, s := range bi.Settings {
		switch s.Key {
		case "vcs.revision":
			rev = s.Value
		case "vcs.modified":
			modified = s.Value
		case "vcs.time":
			when = s.Value
		}
	}
	switch {
	case rev == "" && buildCommit != "":
		v += ", commit " + buildCommit
	case rev != "":
		v += ", commit " + rev[:min(12, len(rev))]
		if modified == "true" {
			v += " with uncommitted changes"
		}
		if when != "" {
			v += " (" + when + ")"
		}
	}
	return v + ", " + bi.GoVersion + " " + runtime.GOOS + "/" + runtime.GOARCH
}

// cliHandler writes slog records the way govmm writes to people, one line
// each: "govmm: warning: MSG key=value ...", as the command's own
// warnings and errors read ("govmm: error: ..." for errors; Info and
// Debug without a level word, but "debug:" on Debug).
type cliHandler struct {
	w      io.Writer
	level  slog.Leveler
	mu     *sync.Mutex // guards w: one record, one write
	prefix string      // attributes from WithAttrs, already formatted
	group  string      // key prefix from WithGroup, "a.b."
}

func newCLIHandler(w io.Writer, level slog.Leveler) *cliHandler {
	return &cliHandler{w: w, level: level, mu: new(sync.Mutex)}
}

func (h *cliHandler) Enabled(_ context.Context, l slog.Level) bool { return l >= h.level.Level() }

func (h *cliHandler) Handle(_ context.Context, r slog.Record) error {
	var b strings.Builder
	b.WriteString("govmm: ")
	switch {
	case r.Level >= slog.LevelError:
		b.WriteString("error: ")
	case r.Level >= slog.LevelWarn:
		b.WriteString("warning: ")
	case r.Level < slog.LevelInfo:
		b.WriteString("debug: ")
	}
	b.WriteString(r.Message)
	b.WriteString(h.prefix)
	r.Attrs(func(a slog.Attr) bool {
		writeAttr(&b, h.group, a)
		return true
	})
	b.WriteByte('\n')
	h.mu.Lock()
	defer h.mu.Unlock()
	_, err := io.WriteString(h.w, b.String())
	return err
}

func (h *cliHandler) WithAttrs(attrs []slog.Attr) slog.Handler {
	var b strings.Builder
	for _, a := range attrs {
		writeAttr(&b, h.group, a)
	}
	c := *h
	c.prefix += b.String()
	return &c
}

func (h *cliHandler) WithGroup(name string) slog.Handler {
	if name == "" {
		return h
	}
	c := *h
	c.group += name + "."
	return &c
}

// writeAttr writes " key=value", quoting a value with spaces as
// slog.TextHandler does.
func writeAttr(b *strings.Builder, group string, a slog.Attr) {
	a.Value = a.Value.Resolve()
	if a.Equal(slog.Attr{}) {
		return
	}
	if a.Value.Kind() == slog.KindGroup {
		g := group
		if a.Key != "" {
			g += a.Key + "."
		}
		for _, ga := range a.Value.Group() {
			writeAttr(b, g, ga)
		}
		return
	}
	v := a.Value.String()
	if v == "" || strings.ContainsAny(v, " \t\n\"=") {
		v = strconv.Quote(v)
	}
	fmt.Fprintf(b, " %s%s=%s", group, a.Key, v)
}

// check refuses, as usage errors, what the command line alone shows to be
// wrong in f (fs parsed it): the values no flag type checks itself, and
// combinations. Run before anything is loaded or opened, so that a typo
// costs no image build and prints no warning first. devices() parses the
// same values again and opens what they name.
func (f *runFlags) check(fs *flag.FlagSet) error {
	cmd := fs.Name()
	switch f.kernelEntry {
	case "auto", "pvh", "bzimage", "":
	default:
		return usagef(cmd, "--kernel-entry %s: want auto, pvh or bzimage", showArg(f.kernelEntry))
	}
	if f.epochMax != 0 && f.epochMax < f.epoch {
		return usagef(cmd, "--epoch-max %v is below --epoch %v", f.epochMax, f.epoch)
	}
	for _, s := range f.disks {
		if _, err := parseDisk(s); err != nil {
			return usagef(cmd, "%v", err)
		}
	}
	if f.mac != "" {
		if _, err := netback.ParseMAC(f.mac); err != nil {
			return usagef(cmd, "--mac %s: want six bytes in hex, xx:xx:xx:xx:xx:xx", showArg(f.mac))
		}
	}
	switch {
	case f.net == "user", f.net == "none":
	case strings.HasPrefix(f.net, "tap:") && len(f.net) > len("tap:"):
	default:
		return usagef(cmd, "--net %s: want user, tap:NAME or none", showArg(f.net))
	}
	for _, s := range f.publish {
		if f.net != "user" {
			return usagef(cmd, "--publish needs --net user")
		}
		if _, err := netback.ParsePublish(s); err != nil {
			return usagef(cmd, "--publish %s: %v", showArg(s), errors.Unwrap(err))
		}
	}
	if f.guestIP != "" {
		if _, err := netip.ParsePrefix(f.guestIP); err != nil {
			return usagef(cmd, "--guest-ip %s: want ADDR/PREFIX", showArg(f.guestIP))
		}
	}
	if f.guestGW != "" {
		if _, err := netip.ParseAddr(f.guestGW); err != nil {
			return usagef(cmd, "--guest-gw %s: not an address", showArg(f.guestGW))
		}
	}
	if f.witness != "" && f.keyFile == "" {
		return usagef(cmd, "--witness %s: --key-file is required: the witness serves only VMMs that share its key", f.witness)
	}
	if f.replicateTo != "" && f.keyFile == "" {
		if err := stream.CheckListenAddr(f.replicateTo, false); err != nil {
			return usagef(cmd, "--replicate-to %s: %v: give --key-file", f.replicateTo, err)
		}
	}
	if f.streamCipher != stream.CipherAuto && f.keyFile == "" {
		return usagef(cmd, "--stream-cipher %s seals a keyed stream: give --key-file (without a key the stream, loopback only, is not sealed)", f.streamCipher)
	}
	if err := f.streamCipher.Check(); err != nil {
		return usagef(cmd, "--stream-cipher %s: %v", f.streamCipher, err)
	}
	return nil
}

// defaultAPISock is where run and restore serve the control API when
// --api-sock is not given: ctlapi.SocketPathFor(--name), so that a VM of
// the default name serves where 'govmm ctl' looks by default and each VM
// of its own --name has a socket of its own. --api-sock ” serves none.
func defaultAPISock(fs *flag.FlagSet, f *runFlags) error {
	if given(fs)["api-sock"] {
		return nil
	}
	if strings.Contains(f.name, "/") || f.name == "." || f.name == ".." {
		return usagef(fs.Name(), "--name %s cannot name the default --api-sock (DIR/NAME.sock): give --api-sock PATH", showArg(f.name))
	}
	f.apiSock = ctlapi.SocketPathFor(f.name)
	f.apiSockDefault = fmt.Sprintf("the default for --name %s: give this VM another --name, or --api-sock PATH, or --api-sock '' for none", f.name)
	if os.Getenv("GOVMM_API_SOCK") != "" {
		f.apiSockDefault = "$GOVMM_API_SOCK: give --api-sock PATH, or --api-sock '' for none"
	}
	return nil
}

// wrap breaks text into lines of at most width columns (longer words stay
// whole), each starting with indent and ending with a newline.
func wrap(text, indent string, width int) string {
	var b strings.Builder
	line := indent
	for _, w := range strings.Fields(text) {
		if line != indent && len(line)+1+len(w) > width {
			b.WriteString(line + "\n")
			line = indent
		}
		if line != indent {
			line += " "
		}
		line += w
	}
	b.WriteString(line + "\n")
	return b.String()
}

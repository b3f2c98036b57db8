package bench

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"time"

	"govmm/guestimg"
	"govmm/vmm"
)

// MigrationGuestConfig parameterises the migration-guest suite: live
// migration of the idle default guest over loopback, govmm beside QEMU,
// where Linux boots (the lab).
type MigrationGuestConfig struct {
	Govmm string // the govmm binary
	// Baseline, if set, is another govmm binary (e.g. a build of main)
	// migrated beside Govmm, as "baseline": a change measured side by
	// side with what it changes.
	Baseline       string
	Kernel, Initrd string // the default guest image (the bzImage: QEMU boots it too)
	QEMU           string // qemu-system-x86_64 (looked up in PATH when empty; none: govmm alone)
	MemMiB         int    // guest RAM (default 256)
	Trials         int    // migrations per VMM, interleaved (default 3)
	// Settle is how long each guest idles after its ready line before it
	// is migrated (default 2s).
	Settle time.Duration
	Out    string
	Log    io.Writer
}

func (cfg *MigrationGuestConfig) defaults() {
	if cfg.MemMiB <= 0 {
		cfg.MemMiB = 256
	}
	if cfg.Trials <= 0 {
		cfg.Trials = 3
	}
	if cfg.Settle <= 0 {
		cfg.Settle = 2 * time.Second
	}
	if cfg.QEMU == "" {
		if p, err := exec.LookPath("qemu-system-x86_64"); err == nil {
			cfg.QEMU = p
		}
	}
	if cfg.Log == nil {
		cfg.Log = io.Discard
	}
}

// MigrationGuestSample is one live migration, as the source reports it
// (govmm: `govmm ctl migrate` and the source's Debug breakdown; QEMU:
// query-migrate).
type MigrationGuestSample struct {
	VMM             string // govmm, baseline or qemu
	Trial           int
	Total, Downtime time.Duration
	BytesSent       uint64 // govmm: the stream's bytes; QEMU: RAM transferred
	// govmm's breakdown (MigrateResult): dial and handshake, pre-copy
	// rounds, the wait for their ack; the rest of Total is setup and the
	// downtime.
	Connect, PreCopy, AckWait time.Duration
	Rounds                    int
}

// MigrationGuestResult is everything the suite measured.
type MigrationGuestResult struct {
	Samples []MigrationGuestSample
	Failed  []string
	Config  MigrationGuestConfig
}

// MigrationGuest boots the default guest with one vCPU and MemMiB of RAM
// under each VMM, lets it idle, and migrates it live over loopback to a
// second process of the same VMM on this host (govmm: `govmm standby`
// and `govmm ctl migrate`, without a key; QEMU: -incoming and QMP's
// migrate, its bandwidth cap lifted), Trials times, the VMMs taking turns.
func MigrationGuest(ctx context.Context, cfg MigrationGuestConfig) (*MigrationGuestResult, error) {
	if cfg.Govmm == "" || cfg.Kernel == "" || cfg.Initrd == "" {
		return nil, errors.New("migration-guest: the govmm binary and the default guest image are needed")
	}
	cfg.defaults()
	if cfg.QEMU == "" {
		fmt.Fprintf(cfg.Log, "migration-guest: qemu-system-x86_64 %v: measuring govmm alone\n", errNoPeer)
	}
	dir, err := os.MkdirTemp("", "govmm-bench-migration-guest-")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(dir)
	res := &MigrationGuestResult{Config: cfg}
	for trial := 1; trial <= cfg.Trials; trial++ {
		for _, v := range []string{"govmm", "baseline", "qemu"} {
			var s MigrationGuestSample
			var err error
			switch {
			case v == "govmm":
				s, err = govmmMigration(ctx, cfg, cfg.Govmm, dir)
			case v == "baseline" && cfg.Baseline != "":
				s, err = govmmMigration(ctx, cfg, cfg.Baseline, dir)
			case v == "qemu" && cfg.QEMU != "":
				s, err = qemuMigration(ctx, cfg, dir)
			default:
				continue
			}
			if ctx.Err() != nil {
				return res, ctx.Err()
			}
			if err != nil {
				f := fmt.Sprintf("%s trial %d: %v", v, trial, err)
				fmt.Fprintf(cfg.Log, "migration-guest: FAILED %s\n", f)
				res.Failed = append(res.Failed, f)
				continue
			}
			s.VMM, s.Trial = v, trial
			fmt.Fprintf(cfg.Log, "migration-guest: %-8s trial %d: total %8.1f ms, downtime %7.1f ms, %6.1f MiB\n",
				v, trial, msOf(s.Total), msOf(s.Downtime), float64(s.BytesSent)/(1<<20))
			res.Samples = append(res.Samples, s)
		}
	}
	if cfg.Out != "" {
		if err := res.write(cfg.Out); err != nil {
			return res, err
		}
	}
	return res, nil
}

// govmmMigration boots the guest under `govmm run` (the binary govmm), and
// migrates it to a `govmm standby` with `govmm ctl migrate`.
func govmmMigration(ctx context.Context, cfg MigrationGuestConfig, govmm, dir string) (MigrationGuestSample, error) {
	var s MigrationGuestSample
	port, err := freeLoopbackPort()
	if err != nil {
		return s, err
	}
	addr, sock := fmt.Sprintf("127.0.0.1:%d", port), filepath.Join(dir, "src.sock")
	_ = os.Remove(sock)
	dst, err := startStandbyProc(ctx, govmm, time.Minute, "--listen", addr, "--net", "none", "--api-sock", "")
	if err != nil {
		return s, err
	}
	defer dst.kill()
	// GOVMM_LOG=debug: the source logs its MigrateResult.
	src, err := startProcEnv([]string{"GOVMM_LOG=debug"}, govmm, "run", "--kernel", cfg.Kernel, "--initrd", cfg.Initrd,
		"--mem", fmt.Sprintf("%dM", cfg.MemMiB), "--cpus", "1", "--net", "none", "--api-sock", sock, "--cmdline-base", vmm.DefaultCmdline)
	if err != nil {
		return s, err
	}
	defer src.kill()
	if err := waitFor(ctx, src.stdout, src.exited, guestimg.ReadyLine, 10*time.Minute); err != nil {
		return s, fmt.Errorf("source: %w", err)
	}
	time.Sleep(cfg.Settle) // the guest idles (scenario, not readiness)
	out, err := exec.CommandContext(ctx, govmm, "ctl", "--api-sock", sock, "migrate", "--to", addr).CombinedOutput()
	if err != nil {
		return s, fmt.Errorf("govmm ctl migrate: %v: %s", err, lastLine(string(out)))
	}
	if err := waitFor(ctx, dst.stderr, dst.exited, "migration received", time.Minute); err != nil {
		return s, fmt.Errorf("destination: %w", err)
	}
	// The source's Debug line holds the whole MigrateResult.
	if err := waitFor(ctx, src.stderr, src.exited, "migration sent", 10*time.Second); err != nil {
		return s, fmt.Errorf("source: %w", err)
	}
	return s, s.parseGovmm(src.stderr.String())
}

var migrationSent = regexp.MustCompile(`migration sent.*`)

// parseGovmm reads the source's "migration sent" Debug line.
func (s *MigrationGuestSample) parseGovmm(log string) error {
	line := migrationSent.FindString(log)
	kv := map[string]string{}
	for _, f := range strings.Fields(line) {
		if k, v, ok := strings.Cut(f, "="); ok {
			kv[k] = v
		}
	}
	var errs []error
	dur := func(k string) time.Duration {
		d, err := time.ParseDuration(kv[k])
		errs = append(errs, err)
		return d
	}
	s.Total, s.Downtime, s.Connect, s.PreCopy, s.AckWait = dur("total"), dur("downtime"), dur("connect"), dur("precopy"), dur("ack_wait")
	var err error
	s.BytesSent, err = strconv.ParseUint(kv["wire_bytes"], 10, 64)
	errs = append(errs, err)
	s.Rounds, err = strconv.Atoi(kv["rounds"])
	errs = append(errs, err)
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("source's breakdown %q: %w", line, err)
	}
	return nil
}

// qemuMigration boots the guest under QEMU, and migrates it to a second
// QEMU started with -incoming, over QMP.
func qemuMigration(ctx context.Context, cfg MigrationGuestConfig, dir string) (MigrationGuestSample, error) {
	var s MigrationGuestSample
	port, err := freeLoopbackPort()
	if err != nil {
		return s, err
	}
	srcQMP, dstQMP := filepath.Join(dir, "src.qmp"), filepath.Join(dir, "dst.qmp")
	args := func(qmp string) []string {
		_ = os.Remove(qmp)
		return []string{"-enable-kvm", "-cpu", "host,-arch-capabilities", "-M", "pc,acpi=off", "-m", strconv.Itoa(cfg.MemMiB),
			"-smp", "1", "-display", "none", "-nodefaults", "-no-user-config", "-serial", "stdio", "-monitor", "none",
			"-no-reboot", "-kernel", cfg.Kernel, "-initrd", cfg.Initrd, "-append", vmm.DefaultCmdline,
			"-qmp", "unix:" + qmp + ",server=on,wait=off"}
	}
	src, err := startProc(cfg.QEMU, args(srcQMP)...)
	if err != nil {
		return s, err
	}
	defer src.kill()
	if err := waitFor(ctx, src.stdout, src.exited, guestimg.ReadyLine, 10*time.Minute); err != nil {
		return s, fmt.Errorf("source: %w", err)
	}
	time.Sleep(cfg.Settle) // the guest idles (scenario, not readiness)
	dst, err := startProc(cfg.QEMU, append(args(dstQMP), "-incoming", fmt.Sprintf("tcp:127.0.0.1:%d", port))...)
	if err != nil {
		return s, err
	}
	defer dst.kill()
	dq, err := dialQMP(ctx, dstQMP, dst)
	if err != nil {
		return s, fmt.Errorf("destination: %w", err)
	}
	defer dq.Close()
	sq, err := dialQMP(ctx, srcQMP, src)
	if err != nil {
		return s, fmt.Errorf("source: %w", err)
	}
	defer sq.Close()
	var st struct{ Status string }
	if err := dq.do("query-status", nil, &st); err != nil || st.Status != "inmigrate" {
		return s, fmt.Errorf("destination not waiting for a migration (%q): %v", st.Status, err)
	}
	// QEMU caps a migration's bandwidth (128 MiB/s by default); lift it,
	// as govmm has no cap.
	if err := sq.do("migrate-set-parameters", map[string]any{"max-bandwidth": int64(1) << 40}, nil); err != nil {
		return s, err
	}
	if err := sq.do("migrate", map[string]any{"uri": fmt.Sprintf("tcp:127.0.0.1:%d", port)}, nil); err != nil {
		return s, err
	}
	var mi struct {
		Status    string
		TotalTime int64 `json:"total-time"`
		Downtime  int64
		RAM       struct{ Transferred uint64 }
	}
	for deadline := time.Now().Add(10 * time.Minute); ; {
		if err := sq.do("query-migrate", nil, &mi); err != nil {
			return s, err
		}
		if mi.Status == "completed" {
			break
		}
		if mi.Status == "failed" || mi.Status == "cancelled" || time.Now().After(deadline) {
			return s, fmt.Errorf("migration %s", mi.Status)
		}
		select {
		case <-ctx.Done():
			return s, ctx.Err()
		case <-time.After(20 * time.Millisecond): // polling QMP
		}
	}
	// The source says "completed" once it has sent the last bytes; the
	// destination may still be loading them, in "inmigrate" for a while
	// (seconds in the lab), before it runs the guest.
	if err := waitRunning(ctx, dq, dst, 2*time.Minute); err != nil {
		return s, fmt.Errorf("destination after the migration: %w", err)
	}
	s.Total, s.Downtime = time.Duration(mi.TotalTime)*time.Millisecond, time.Duration(mi.Downtime)*time.Millisecond
	s.BytesSent = mi.RAM.Transferred
	return s, nil
}

// waitRunning polls QEMU's status over q until the guest runs, for up to
// timeout: a destination that stays "inmigrate" longer, or reaches any
// other state, fails, with the last line QEMU wrote on stderr.
func waitRunning(ctx context.Context, q *qmp, p *proc, timeout time.Duration) error {
	var st struct{ Status string }
	for deadline := time.Now().Add(timeout); ; {
		if err := q.do("query-status", nil, &st); err != nil {
			return fmt.Errorf("query-status: %w (stderr: %s)", err, lastLine(p.stderr.String()))
		}
		switch {
		case st.Status == "running":
			return nil
		case st.Status != "inmigrate":
			return fmt.Errorf("status %q, not running (stderr: %s)", st.Status, lastLine(p.stderr.String()))
		case time.Now().After(deadline):
			return fmt.Errorf("still %q after %v (stderr: %s)", st.Status, timeout, lastLine(p.stderr.String()))
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(20 * time.Millisecond): // polling QMP
		}
	}
}

// startProcEnv is startProc with env added to the process's environment.
func startProcEnv(env []string, prog string, args ...string) (*proc, error) {
	p := &proc{cmd: exec.Command(prog, args...), stdout: &lockedBuffer{}, stderr: &lockedBuffer{}, exited: make(chan struct{})}
	p.cmd.Stdout, p.cmd.Stderr = p.stdout, p.stderr
	p.cmd.Env = append(os.Environ(), env...)
	p.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := p.cmd.Start(); err != nil {
		return nil, err
	}
	go func() { _ = p.cmd.Wait(); close(p.exited) }()
	return p, nil
}

// qmp is a QMP connection (QEMU's JSON control protocol).
type qmp struct {
	conn net.Conn
	dec  *json.Decoder
}

// dialQMP connects to the QMP socket at path (waiting for QEMU to create
// it) and leaves capability negotiation.
func dialQMP(ctx context.Context, path string, p *proc) (*qmp, error) {
	deadline := time.Now().Add(time.Minute)
	for {
		c, err := net.Dial("unix", path)
		if err == nil {
			q := &qmp{conn: c, dec: json.NewDecoder(bufio.NewReader(c))}
			var greeting map[string]any
			if err := q.dec.Decode(&greeting); err != nil {
				c.Close()
				return nil, err
			}
			if err := q.do("qmp_capabilities", nil, nil); err != nil {
				c.Close()
				return nil, err
			}
			return q, nil
		}
		if time.Now().After(deadline) {
			return nil, fmt.Errorf("qmp %s: %w", path, err)
		}
		select {
		case <-p.exited:
			return nil, fmt.Errorf("qemu exited: %s", lastLine(p.stderr.String()))
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-time.After(20 * time.Millisecond): // polling for the socket
		}
	}
}

// do runs a QMP command and decodes its return value into ret (if not
// nil), skipping the events that come between.
func (q *qmp) do(cmd string, args any, ret any) error {
	req := map[string]any{"execute": cmd}
	if args != nil {
		req["arguments"] = args
	}
	if err := json.NewEncoder(q.conn).Encode(req); err != nil {
		return err
	}
	for {
		var r struct {
			Event  string
			Return json.RawMessage
			Error  *struct{ Class, Desc string }
		}
		_ = q.conn.SetReadDeadline(time.Now().Add(time.Minute))
		if err := q.dec.Decode(&r); err != nil {
			return fmt.Errorf("qmp %s: %w", cmd, err)
		}
		switch {
		case r.Event != "":
			continue
		case r.Error != nil:
			return fmt.Errorf("qmp %s: %s: %s", cmd, r.Error.Class, r.Error.Desc)
		case ret != nil:
			return json.Unmarshal(r.Return, ret)
		}
		return nil
	}
}

func (q *qmp) Close() error { return q.conn.Close() }

func (r *MigrationGuestResult) write(dir string) error {
	var rows [][]string
	for _, s := range r.Samples {
		rows = append(rows, []string{s.VMM, strconv.Itoa(s.Trial), ftoa(msOf(s.Total), 1), ftoa(msOf(s.Downtime), 1),
			strconv.FormatUint(s.BytesSent, 10), strconv.Itoa(s.Rounds), ftoa(msOf(s.Connect), 1), ftoa(msOf(s.PreCopy), 1), ftoa(msOf(s.AckWait), 1)})
	}
	return writeCSV(filepath.Join(dir, "migration_guest.csv"), []string{"vmm", "trial", "total_ms", "downtime_ms", "bytes_sent",
		"rounds", "connect_ms", "precopy_ms", "ack_wait_ms"}, rows)
}

// Report renders the migration-guest section of report.md.
func (r *MigrationGuestResult) Report() string {
	var b strings.Builder
	fmt.Fprintf(&b, "%s\n\nGuest: the default image (bzImage and initramfs, `%s`), one vCPU, %d MiB, idle %v after its ready line; "+
		"migrated live over loopback to a second process of the same VMM on this host: govmm with `govmm ctl migrate` to a `govmm standby` "+
		"(no key: the stream's unkeyed session), QEMU with QMP's `migrate` to a QEMU started with `-incoming`, its bandwidth cap lifted. "+
		"%d trials per VMM, taking turns. Times as each source reports them (govmm: MigrateResult; QEMU: query-migrate). "+
		"Raw data `migration_guest.csv`.\n\n", platform(), vmm.DefaultCmdline, r.Config.MemMiB, r.Config.Settle, r.Config.Trials)
	b.WriteString("| VMM | trials | total median ms (min–max) | downtime median ms (min–max) | MiB sent median |\n|---|---|---|---|---|\n")
	med := map[string]float64{}
	for _, v := range []string{"govmm", "baseline", "qemu"} {
		var total, down, mib []float64
		for _, s := range r.Samples {
			if s.VMM == v {
				total, down, mib = append(total, msOf(s.Total)), append(down, msOf(s.Downtime)), append(mib, float64(s.BytesSent)/(1<<20))
			}
		}
		if len(total) == 0 {
			continue
		}
		t, d, m := Summarize(total), Summarize(down), Summarize(mib)
		med[v] = t.Median
		fmt.Fprintf(&b, "| %s | %d | %.0f (%.0f–%.0f) | %.1f (%.1f–%.1f) | %.1f |\n", v, t.N, t.Median, t.Min, t.Max, d.Median, d.Min, d.Max, m.Median)
	}
	if g, q := med["govmm"], med["qemu"]; g > 0 && q > 0 {
		fmt.Fprintf(&b, "\ngovmm / QEMU, total time (medians): **%.2f×**", g/q)
		if bl := med["baseline"]; bl > 0 {
			fmt.Fprintf(&b, "; baseline / QEMU: %.2f×", bl/q)
		}
		b.WriteString("\n")
	}
	if r.Config.Baseline != "" {
		fmt.Fprintf(&b, "\n*baseline* is another govmm binary, `%s`, migrated the same way in the same trials.\n", r.Config.Baseline)
	}
	b.WriteString("\ngovmm's breakdown per trial (MigrateResult): connect is dialing and the handshake, pre-copy the rounds while the guest runs, " +
		"ack wait the wait for the destination to commit them; the rest of the total is setup and the downtime.\n\n" +
		"| VMM | trial | total ms | connect ms | pre-copy ms | ack wait ms | downtime ms | rounds |\n|---|---|---|---|---|---|---|---|\n")
	for _, s := range r.Samples {
		if s.VMM != "qemu" {
			fmt.Fprintf(&b, "| %s | %d | %.0f | %.0f | %.0f | %.0f | %.1f | %d |\n", s.VMM, s.Trial, msOf(s.Total), msOf(s.Connect), msOf(s.PreCopy), msOf(s.AckWait), msOf(s.Downtime), s.Rounds)
		}
	}
	if len(r.Failed) > 0 {
		b.WriteString("\nFailed trials (not in the tables):\n\n")
		for _, f := range r.Failed {
			fmt.Fprintf(&b, "- %s\n", f)
		}
	}
	return b.String()
}

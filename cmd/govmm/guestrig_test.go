package main

// A rig for real-guest tests that move a running guest between machines
// in this process (live migration, replication with a takeover): one
// network namespace with a bridge, the client at the bridge's address,
// a TAP per machine, disk images, and a keep-alive HTTP client that
// checks the demo service's history across the moves.

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"

	"govmm/guestimg"
	"govmm/internal/netns"
	"govmm/lab"
	"govmm/vmm"
	"govmm/vmm/guestmem"
)

// rig is the world the guest lives in for one test.
type rig struct {
	t              *testing.T
	ns             *netns.NS
	dir            string
	kernel, initrd []byte
	guestIP        netip.Prefix
	mem            uint64

	mu   sync.Mutex      // guards taps
	taps map[string]bool // TAPs made in ns, by name
}

func newRig(t *testing.T) *rig {
	t.Helper()
	img, err := guestimg.Build(context.Background(), guestimg.Options{Log: io.Discard})
	require.NoError(t, err, "default guest image (make image builds it)")
	kernel, initrd, err := loadImage(img.Kernel, img.Initrd)
	require.NoError(t, err)
	ns := netns.New(t)
	traceKVM(t)
	p := ns.BridgePrefix()
	return &rig{t: t, ns: ns, dir: t.TempDir(), kernel: kernel, initrd: initrd,
		guestIP: netip.PrefixFrom(p.Addr().Next(), p.Bits()), mem: 256 << 20, taps: map[string]bool{}}
}

// blankDisk makes a sparse disk image of size bytes.
func (r *rig) blankDisk(name string, size int64) string {
	p := filepath.Join(r.dir, name)
	require.NoError(r.t, os.WriteFile(p, nil, 0o644))
	require.NoError(r.t, os.Truncate(p, size))
	return p
}

// guestVM is a machine of this process with the default guest's devices:
// one NIC on a TAP of the rig's bridge, one disk.
type guestVM struct {
	name string
	m    *vmm.Machine
	f    *runFlags
	devs []io.Closer
	con  *consoleLog
	tap  string
	disk string
}

// newVM builds (does not start) a machine on the TAP tap. With
// boot, it is loaded with the default guest; otherwise it is an empty
// machine of the same shape, for a migration or replication to fill.
func (r *rig) newVM(name, tap, disk string, boot bool) *guestVM {
	r.t.Helper()
	g, err := r.buildVM(name, tap, disk, boot)
	require.NoError(r.t, err)
	return g
}

// buildVM is newVM for other goroutines (a standby's Build): it returns
// its error instead of failing the test.
func (r *rig) buildVM(name, tap, disk string, boot bool) (*guestVM, error) {
	r.mu.Lock()
	if !r.taps[tap] {
		if err := r.ns.AddTap(tap); err != nil {
			r.mu.Unlock()
			return nil, err
		}
		r.taps[tap] = true
	}
	r.mu.Unlock()
	f := &runFlags{name: "govmm", net: "tap:" + tap, guestIP: r.guestIP.String(), disks: listFlag{disk}}
	var nics []io.Closer
	var disks []diskSpec
	var guestNet string
	err := r.ns.Run(func() error {
		var err error
		nics, disks, guestNet, err = f.devices()
		return err
	})
	if err != nil {
		return nil, err
	}
	con := &consoleLog{name: name}
	cfg := vmm.Config{MemSize: r.mem, CPUs: 1, Console: con}
	if boot {
		cfg.Kernel, cfg.Initrd = r.kernel, r.initrd
		cfg.Cmdline = vmm.DefaultCmdline + " " + guestNet
	}
	m, devs, err := newMachine(cfg, f, nics, disks)
	if err != nil {
		return nil, err
	}
	g := &guestVM{name: name, m: m, f: f, devs: devs, con: con, tap: tap, disk: disk}
	r.t.Cleanup(func() {
		if r.t.Failed() {
			r.t.Logf("console of %s (last 6 KiB):\n%s", name, con.tail(6<<10))
			select {
			case <-m.Done():
				res, err := m.Wait()
				r.t.Logf("%s had stopped: %s (status %d): %v", name, res.Reason, res.Status, err)
			default:
			}
		}
		g.close()
	})
	return g, nil
}

// close stops the machine and releases its devices. Idempotent.
func (g *guestVM) close() {
	if g.m == nil {
		return
	}
	g.m.Stop()
	_, _ = g.m.Wait()
	closeAll(g.devs)
	g.m.Close()
	g.m = nil
}

// type sends a line to the guest's shell on the console.
func (g *guestVM) typeLine(s string) { g.m.UART().Input([]byte(s + "\n")) }

// consoleLog keeps a machine's console output and tells when a line
// appears.
type consoleLog struct {
	name string
	mu   sync.Mutex
	buf  bytes.Buffer
}

func (c *consoleLog) Write(p []byte) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.buf.Write(p)
}

func (c *consoleLog) contains(s string) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return bytes.Contains(c.buf.Bytes(), []byte(s))
}

func (c *consoleLog) tail(n int) string {
	c.mu.Lock()
	defer c.mu.Unlock()
	b := c.buf.Bytes()
	if len(b) > n {
		b = b[len(b)-n:]
	}
	return string(b)
}

// waitConsole waits for s on the console.
func (g *guestVM) waitConsole(t *testing.T, s string, timeout time.Duration) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !g.con.contains(s) {
		select {
		case <-g.m.Done():
			_, err := g.m.Wait()
			t.Fatalf("%s stopped before %q on its console: %v", g.name, s, err)
		case <-time.After(50 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: no %q on the console within %v", g.name, s, timeout)
		}
	}
}

// kaClient speaks HTTP/1.1 to the demo service over one TCP connection
// for its whole life: a migration or failover that breaks the connection
// fails the test, as a client would notice.
type kaClient struct {
	c  net.Conn
	br *bufio.Reader
}

func (r *rig) dialGuest(t *testing.T) *kaClient {
	t.Helper()
	var c net.Conn
	require.Eventually(t, func() bool {
		var err error
		c, err = r.ns.Dial("tcp", net.JoinHostPort(r.guestIP.Addr().String(), "80"))
		return err == nil
	}, 2*time.Minute, 200*time.Millisecond, "the guest's demo service does not accept connections")
	t.Cleanup(func() { c.Close() })
	return &kaClient{c: c, br: bufio.NewReader(c)}
}

// do sends one request and reads its answer within timeout.
func (k *kaClient) do(method, path, body string, timeout time.Duration) (string, error) {
	_ = k.c.SetDeadline(time.Now().Add(timeout))
	req := fmt.Sprintf("%s %s HTTP/1.1\r\nHost: guest\r\nContent-Length: %d\r\n\r\n%s", method, path, len(body), body)
	if _, err := io.WriteString(k.c, req); err != nil {
		return "", fmt.Errorf("%s %s: %w", method, path, err)
	}
	resp, err := http.ReadResponse(k.br, nil)
	if err != nil {
		return "", fmt.Errorf("%s %s: %w", method, path, err)
	}
	b, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	if err != nil {
		return "", fmt.Errorf("%s %s: body: %w", method, path, err)
	}
	if resp.StatusCode != http.StatusOK {
		return "", fmt.Errorf("%s %s: %s: %s", method, path, resp.Status, b)
	}
	return string(b), nil
}

// history is what one client saw: every counter value and every
// acknowledged line, checked as they come.
type history struct {
	mu      sync.Mutex
	counter int64 // last value seen (0: none yet)
	lines   []string
	answers int
	last    time.Time   // of the last answer
	at      []time.Time // of every answer
	err     error     // the first broken promise or failed request
}

func (h *history) fail(err error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.err == nil {
		h.err = err
	}
}

func (h *history) state() (answers int, last time.Time, err error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.answers, h.last, h.err
}

// answeredAt is when answer i (from 0) came.
func (h *history) answeredAt(i int) time.Time {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.at[i]
}

// drive runs POST /incr and POST /append over k until stop is closed,
// checking that the counter goes up by exactly one each time. tag makes
// the lines unique.
func (h *history) drive(k *kaClient, tag string, stop <-chan struct{}, timeout time.Duration) {
	for i := 0; ; i++ {
		select {
		case <-stop:
			return
		default:
		}
		out, err := k.do("POST", "/incr", "", timeout)
		if err != nil {
			h.fail(err)
			return
		}
		v, err := strconv.ParseInt(strings.TrimSpace(out), 10, 64)
		if err != nil {
			h.fail(fmt.Errorf("incr answered %q", out))
			return
		}
		line := fmt.Sprintf("%s-%d", tag, i)
		if _, err := k.do("POST", "/append", line, timeout); err != nil {
			h.fail(err)
			return
		}
		h.mu.Lock()
		if h.counter != 0 && v != h.counter+1 {
			h.err = fmt.Errorf("counter went from %d to %d", h.counter, v)
		}
		h.counter = v
		h.lines = append(h.lines, line)
		h.answers++
		h.last = time.Now()
		h.at = append(h.at, h.last)
		bad := h.err != nil
		h.mu.Unlock()
		if bad {
			return
		}
	}
}

// waitAnswers waits until the client has n more answers than it had when
// called, or fails the test.
func (h *history) waitAnswers(t *testing.T, n int, timeout time.Duration, what string) {
	t.Helper()
	start, _, _ := h.state()
	deadline := time.Now().Add(timeout)
	for {
		got, _, err := h.state()
		require.NoError(t, err, what)
		if got >= start+n {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: %d answers in %v, want %d", what, got-start, timeout, n)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// keepsAnswering requires the client to keep getting answers for d, with
// no gap of more than 30 s: a guest that dies some seconds after it was
// moved (the lab once saw a taken-over guest triple-fault 14 s later)
// fails it.
func (h *history) keepsAnswering(t *testing.T, d time.Duration, what string) {
	t.Helper()
	for end := time.Now().Add(d); time.Now().Before(end); {
		h.waitAnswers(t, 1, 30*time.Second, what)
	}
}

// checkLog asks for GET /log over k and checks that every acknowledged
// line is there.
func (h *history) checkLog(t *testing.T, k *kaClient) {
	t.Helper()
	out, err := k.do("GET", "/log", "", time.Minute)
	require.NoError(t, err)
	have := map[string]bool{}
	for _, l := range strings.Split(out, "\n") {
		have[l] = true
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	for _, l := range h.lines {
		require.True(t, have[l], "acknowledged line %q is not in GET /log", l)
	}
}

// bulkLoad keeps network and disk busy over its own connection: 2 KiB
// appends (received frames, disk writes and flushes) and now and then
// the whole log back (sent frames), until stop.
func bulkLoad(k *kaClient, h *history, stop <-chan struct{}, timeout time.Duration) {
	pad := strings.Repeat("x", 2048)
	for i := 0; ; i++ {
		select {
		case <-stop:
			return
		default:
		}
		path, body, method := "/append", fmt.Sprintf("bulk-%d-%s", i, pad), "POST"
		if i%16 == 15 {
			path, body, method = "/log", "", "GET"
		}
		if _, err := k.do(method, path, body, timeout); err != nil {
			h.fail(fmt.Errorf("bulk load: %w", err))
			return
		}
	}
}

// guestLoad starts, in the guest's shell, direct block reads of the whole
// disk (device DMA into guest memory) and a memory dirtier.
func (g *guestVM) guestLoad() {
	g.typeLine("(while :; do dd if=/dev/vda of=/dev/null bs=64k iflag=direct 2>/dev/null; done) &")
	g.typeLine("govmm-dirtier --rate 4 --wss 32 >/dev/null &")
}

// pageDiff compares two copies of guest memory page by page and describes
// the pages that differ (at most max of them).
func pageDiff(a, b *guestmem.Memory, max int) (n int, desc []string) {
	for _, ra := range a.Regions() {
		hb, err := b.Slice(ra.GPA, ra.Size)
		if err != nil {
			return -1, []string{err.Error()}
		}
		n1, d := diffPages(uint64(ra.GPA), ra.Host, hb, max-len(desc))
		n += n1
		desc = append(desc, d...)
	}
	return n, desc
}

// diffPages compares two equal-length byte ranges that start at guest
// address base, page by page.
func diffPages(base uint64, a, b []byte, max int) (n int, desc []string) {
	for off := 0; off < len(a); off += guestmem.PageSize {
		pa, pb := a[off:off+guestmem.PageSize], b[off:off+guestmem.PageSize]
		if bytes.Equal(pa, pb) {
			continue
		}
		n++
		if len(desc) >= max {
			continue
		}
		first, count := -1, 0
		for i := range pa {
			if pa[i] != pb[i] {
				if first < 0 {
					first = i
				}
				count++
			}
		}
		end := min(first+16, len(pa))
		desc = append(desc, fmt.Sprintf("page %#x: %d bytes differ from +%#x: want %x got %x",
			base+uint64(off), count, first, pa[first:end], pb[first:end]))
	}
	return n, desc
}

// fileDiff compares two disk images block by block (4 KiB).
func fileDiff(a, b string, max int) (n int, desc []string, err error) {
	da, err := os.ReadFile(a)
	if err != nil {
		return 0, nil, err
	}
	db, err := os.ReadFile(b)
	if err != nil {
		return 0, nil, err
	}
	if len(da) != len(db) {
		return 0, nil, fmt.Errorf("disk sizes %d and %d", len(da), len(db))
	}
	for off := 0; off < len(da); off += 4096 {
		end := min(off+4096, len(da))
		if !bytes.Equal(da[off:end], db[off:end]) {
			n++
			if len(desc) < max {
				desc = append(desc, fmt.Sprintf("disk block at %#x differs", off))
			}
		}
	}
	return n, desc, nil
}

func fileHash(p string) ([32]byte, error) {
	b, err := os.ReadFile(p)
	return sha256.Sum256(b), err
}

// copyFile overwrites to with from's bytes (to keeps its inode: a device
// may have it open).
func copyFile(from, to string) error {
	b, err := os.ReadFile(from)
	if err != nil {
		return err
	}
	return os.WriteFile(to, b, 0o644)
}

// tapSent is the number of frames the VMM has written into a TAP of the
// rig's namespace (the TAP's receive counter, seen from the host side).
func (r *rig) tapSent(tap string) (uint64, error) {
	out, err := exec.Command("ip", "-n", r.ns.Name(), "-s", "-j", "link", "show", "dev", tap).Output()
	if err != nil {
		return 0, fmt.Errorf("ip link show %s: %w", tap, err)
	}
	var links []struct {
		Stats struct {
			RX struct {
				Packets uint64 `json:"packets"`
			} `json:"rx"`
		} `json:"stats64"`
	}
	if err := json.Unmarshal(out, &links); err != nil || len(links) != 1 {
		return 0, fmt.Errorf("ip link show %s: %q: %v", tap, out, err)
	}
	return links[0].Stats.RX.Packets, nil
}

// traceKVM records KVM's exits and injected exceptions (ftrace's kvm
// events) while the test runs in the lab, and prints the last ones if it
// fails: on AMD, KVM resets a vCPU before it reports a triple fault, so the
// trace is where the faulting RIP and the exceptions before it show.
func traceKVM(t *testing.T) {
	t.Helper()
	if !lab.InLab() {
		return
	}
	const dir = "/sys/kernel/tracing"
	if _, err := os.Stat(filepath.Join(dir, "trace")); err != nil {
		if err := unix.Mount("nodev", dir, "tracefs", 0, ""); err != nil {
			t.Logf("no kvm trace: mount tracefs: %v", err)
			return
		}
	}
	write := func(file, v string) error { return os.WriteFile(filepath.Join(dir, file), []byte(v), 0o644) }
	for _, w := range [][2]string{
		{"tracing_on", "0"}, {"trace", ""}, {"buffer_size_kb", "16384"},
		{"events/kvm/kvm_exit/enable", "1"}, {"events/kvm/kvm_inj_exception/enable", "1"},
		{"events/kvm/kvm_userspace_exit/enable", "1"}, {"tracing_on", "1"},
	} {
		if err := write(w[0], w[1]); err != nil {
			t.Logf("no kvm trace: %v", err)
			return
		}
	}
	t.Cleanup(func() {
		_ = write("tracing_on", "0")
		if t.Failed() {
			b, _ := os.ReadFile(filepath.Join(dir, "trace"))
			lines := strings.Split(strings.TrimSpace(string(b)), "\n")
			if len(lines) > 300 {
				lines = lines[len(lines)-300:]
			}
			t.Logf("last KVM events in L1:\n%s", strings.Join(lines, "\n"))
		}
		_ = write("events/kvm/enable", "0")
	})
}

// pageWalk describes how the guest's 4-level page tables rooted at cr3
// translate va, level by level, reading them from mem (for diagnosing a
// guest that died: is the mapping of the faulting address still there?).
func pageWalk(mem *guestmem.Memory, cr3, va uint64) string {
	var b strings.Builder
	table := cr3 &^ 0xfff & (1<<52 - 1)
	for level, shift := range []uint{39, 30, 21, 12} {
		idx := (va >> shift) & 0x1ff
		var e [8]byte
		if err := mem.ReadAt(e[:], guestmem.GPA(table+idx*8)); err != nil {
			fmt.Fprintf(&b, " L%d[%d]@%#x: %v", 4-level, idx, table, err)
			return b.String()
		}
		v := uint64(e[0]) | uint64(e[1])<<8 | uint64(e[2])<<16 | uint64(e[3])<<24 |
			uint64(e[4])<<32 | uint64(e[5])<<40 | uint64(e[6])<<48 | uint64(e[7])<<56
		fmt.Fprintf(&b, " L%d[%d]@%#x=%#x", 4-level, idx, table, v)
		if v&1 == 0 {
			b.WriteString(" (not present)")
			return b.String()
		}
		if level > 0 && level < 3 && v&0x80 != 0 {
			b.WriteString(" (large page)")
			return b.String()
		}
		table = v &^ 0xfff & (1<<52 - 1) &^ (1 << 63)
	}
	return b.String()
}

// Package guestrig is test support for the real-guest tests that move a
// running default guest between machines (live migration, replication and
// failover) and check that its clients do not notice.
//
// It owns the world such a test sets up: a network namespace with a
// bridge (the client sits at the bridge's address, the guest at the next
// one), the TAPs the machines attach to, blank disk images, the default
// guest image, and the clients: a keep-alive HTTP client of the demo
// service that keeps and checks the history of what it was told (the
// counter goes up by exactly one each time, every acknowledged line is in
// GET /log), and a bulk client that keeps network and disk busy. It also
// has the diagnostics used when a moved guest dies: page-by-page memory
// comparison, a page-table walk, what a machine that stopped making
// progress was doing (DescribeMachine), and, in the lab, the last KVM
// exits from L1's ftrace.
//
// It does not own the machines: tests build them (in their own process,
// or as govmm processes) and tell the rig which TAP and disk they use.
//
// Goroutines: the clients run on goroutines StartLoad starts and its stop
// function waits for; History is safe for concurrent use.
package guestrig

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"

	"govmm/guestimg"
	"govmm/internal/democlient"
	"govmm/internal/netns"
	"govmm/lab"
	"govmm/vmm"
	"govmm/vmm/guestmem"
)

// RequestTimeout bounds one request of the test clients: long enough for
// the lab's emulated guest to be migrated or taken over meanwhile.
const RequestTimeout = 3 * time.Minute

// AfterMove is how long a moved guest must keep answering (the lab once
// saw a taken-over guest triple-fault 14 s after the takeover).
const AfterMove = 30 * time.Second

// GuestLoad are shell lines that load the guest from the inside: direct
// block reads of the whole disk (device DMA into guest memory) and a
// memory dirtier.
var GuestLoad = []string{
	"(while :; do dd if=/dev/vda of=/dev/null bs=64k iflag=direct 2>/dev/null; done) &",
	"govmm-dirtier --rate 4 --wss 32 >/dev/null &",
}

// Rig is the world the guest lives in for one test.
type Rig struct {
	t                      *testing.T
	NS                     *netns.NS
	Dir                    string
	KernelPath, InitrdPath string
	Kernel, Initrd         []byte
	GuestIP                netip.Prefix // the guest's eth0; the client is the bridge
	MemSize                uint64

	mu   sync.Mutex      // guards taps
	taps map[string]bool // TAPs made in NS, by name
}

// New builds (or finds) the default guest image, makes the namespace and,
// in the lab, starts recording KVM's exits.
func New(t *testing.T) *Rig {
	t.Helper()
	img, err := guestimg.Build(context.Background(), guestimg.Options{Log: io.Discard})
	require.NoError(t, err, "default guest image (make image builds it)")
	kernel, err := os.ReadFile(img.Vmlinux) // booted through PVH, as govmm run does
	require.NoError(t, err)
	initrd, err := os.ReadFile(img.Initrd)
	require.NoError(t, err)
	ns := netns.New(t)
	TraceKVM(t)
	p := ns.BridgePrefix()
	return &Rig{t: t, NS: ns, Dir: t.TempDir(), KernelPath: img.Vmlinux, InitrdPath: img.Initrd,
		Kernel: kernel, Initrd: initrd, GuestIP: netip.PrefixFrom(p.Addr().Next(), p.Bits()),
		MemSize: 256 << 20, taps: map[string]bool{}}
}

// TAP makes the TAP name on the bridge, once, and returns its name.
func (r *Rig) TAP(name string) (string, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if !r.taps[name] {
		if err := r.NS.AddTap(name); err != nil {
			return "", err
		}
		r.taps[name] = true
	}
	return name, nil
}

// BlankDisk makes a sparse disk image of size bytes under the rig's
// directory.
func (r *Rig) BlankDisk(name string, size int64) string {
	r.t.Helper()
	p := filepath.Join(r.Dir, name)
	require.NoError(r.t, os.MkdirAll(filepath.Dir(p), 0o755))
	require.NoError(r.t, os.WriteFile(p, nil, 0o644))
	require.NoError(r.t, os.Truncate(p, size))
	return p
}

// TAPSent is the number of frames a VMM has written into a TAP of the
// rig's namespace (the TAP's receive counter, seen from the host side).
func (r *Rig) TAPSent(tap string) (uint64, error) {
	out, err := exec.Command("ip", "-n", r.NS.Name(), "-s", "-j", "link", "show", "dev", tap).Output()
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

// ConsoleLog keeps a machine's console output (or a process's stderr)
// and says whether a string appeared. Safe for concurrent use.
type ConsoleLog struct {
	Name string
	mu   sync.Mutex
	buf  bytes.Buffer
}

// Write implements io.Writer.
func (c *ConsoleLog) Write(p []byte) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.buf.Write(p)
}

// Contains reports whether s was written.
func (c *ConsoleLog) Contains(s string) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return bytes.Contains(c.buf.Bytes(), []byte(s))
}

// Tail returns the last n bytes written.
func (c *ConsoleLog) Tail(n int) string {
	c.mu.Lock()
	defer c.mu.Unlock()
	b := c.buf.Bytes()
	if len(b) > n {
		b = b[len(b)-n:]
	}
	return string(b)
}

// Client speaks HTTP/1.1 to the demo service over one TCP connection for
// its whole life (a democlient.Client): a move that breaks the connection
// fails the test, as a client would notice.
type Client struct {
	C  net.Conn
	dc *democlient.Client
}

// Dial connects to the guest's demo service from the namespace, waiting
// for it to accept.
func (r *Rig) Dial(t *testing.T) *Client {
	t.Helper()
	var c net.Conn
	require.Eventually(t, func() bool {
		var err error
		c, err = r.NS.Dial("tcp", net.JoinHostPort(r.GuestIP.Addr().String(), "80"))
		return err == nil
	}, 2*time.Minute, 200*time.Millisecond, "the guest's demo service does not accept connections")
	t.Cleanup(func() { c.Close() })
	return &Client{C: c, dc: democlient.New(c, "guest")}
}

// Do sends one request and reads its answer within timeout.
func (k *Client) Do(method, path, body string, timeout time.Duration) (string, error) {
	k.dc.Timeout = timeout
	return k.dc.Do(method, path, body)
}

// History is what the checked client saw: every counter value and every
// acknowledged line, checked as they come. Safe for concurrent use.
type History struct {
	mu      sync.Mutex
	counter int64 // last value seen (0: none yet)
	lines   []string
	at      []time.Time // of every answer
	err     error       // the first broken promise or failed request
}

// Fail records err unless an earlier failure was recorded.
func (h *History) Fail(err error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.err == nil {
		h.err = err
	}
}

// State says how many answers came, when the last one did, and the first
// failure.
func (h *History) State() (answers int, last time.Time, err error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if len(h.at) > 0 {
		last = h.at[len(h.at)-1]
	}
	return len(h.at), last, h.err
}

// AnsweredAt is when answer i (from 0) came.
func (h *History) AnsweredAt(i int) time.Time {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.at[i]
}

// Drive runs POST /incr and POST /append over k until stop is closed,
// checking that the counter goes up by exactly one each time. tag makes
// the lines unique.
func (h *History) Drive(k *Client, tag string, stop <-chan struct{}, timeout time.Duration) {
	for i := 0; ; i++ {
		select {
		case <-stop:
			return
		default:
		}
		out, err := k.Do("POST", "/incr", "", timeout)
		if err != nil {
			h.Fail(err)
			return
		}
		v, err := strconv.ParseInt(strings.TrimSpace(out), 10, 64)
		if err != nil {
			h.Fail(fmt.Errorf("incr answered %q", out))
			return
		}
		line := fmt.Sprintf("%s-%d", tag, i)
		if _, err := k.Do("POST", "/append", line, timeout); err != nil {
			h.Fail(err)
			return
		}
		h.mu.Lock()
		if h.counter != 0 && v != h.counter+1 && h.err == nil {
			h.err = fmt.Errorf("counter went from %d to %d", h.counter, v)
		}
		h.counter = v
		h.lines = append(h.lines, line)
		h.at = append(h.at, time.Now())
		bad := h.err != nil
		h.mu.Unlock()
		if bad {
			return
		}
	}
}

// WaitAnswers waits until the client has n more answers than when called,
// or fails the test.
func (h *History) WaitAnswers(t *testing.T, n int, timeout time.Duration, what string) {
	t.Helper()
	start, _, _ := h.State()
	deadline := time.Now().Add(timeout)
	for {
		got, _, err := h.State()
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

// KeepsAnswering requires the client to keep getting answers for d, with
// no gap of more than 30 s.
func (h *History) KeepsAnswering(t *testing.T, d time.Duration, what string) {
	t.Helper()
	for end := time.Now().Add(d); time.Now().Before(end); {
		h.WaitAnswers(t, 1, 30*time.Second, what)
	}
}

// CheckLog asks for GET /log over k and checks that every acknowledged
// line is there.
func (h *History) CheckLog(t *testing.T, k *Client) {
	t.Helper()
	out, err := k.Do("GET", "/log", "", time.Minute)
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

// BulkLoad keeps network and disk busy over its own connection until
// stop: 2 KiB appends (received frames, disk writes and flushes) and now
// and then the whole log back (sent frames). A failure is recorded in h.
func BulkLoad(k *Client, h *History, stop <-chan struct{}, timeout time.Duration) {
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
		if _, err := k.Do(method, path, body, timeout); err != nil {
			h.Fail(fmt.Errorf("bulk load: %w", err))
			return
		}
	}
}

// StartLoad starts the checked client on k and the bulk one on kb; the
// returned function stops them and waits. It is idempotent and runs at
// the test's end too. If the test failed, the connections are closed
// first, so that the clients do not wait out their request timeouts.
func StartLoad(t *testing.T, h *History, k, kb *Client) (stop func()) {
	done := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(2)
	go func() { defer wg.Done(); h.Drive(k, "line", done, RequestTimeout) }()
	go func() { defer wg.Done(); BulkLoad(kb, h, done, RequestTimeout) }()
	var once sync.Once
	stop = func() {
		once.Do(func() {
			if t.Failed() {
				k.C.Close()
				kb.C.Close()
			}
			close(done)
			wg.Wait()
		})
	}
	t.Cleanup(stop)
	return stop
}

// PageDiff compares two copies of guest memory of the same layout page by
// page and describes the pages that differ (at most max of them).
func PageDiff(a, b *guestmem.Memory, max int) (n int, desc []string) {
	for _, ra := range a.Regions() {
		hb, err := b.Slice(ra.GPA, ra.Size)
		if err != nil {
			return -1, []string{err.Error()}
		}
		n1, d := DiffPages(uint64(ra.GPA), ra.Host, hb, max-len(desc))
		n += n1
		desc = append(desc, d...)
	}
	return n, desc
}

// DiffPages compares two equal-length byte ranges that start at guest
// address base, page by page: want and got.
func DiffPages(base uint64, want, got []byte, max int) (n int, desc []string) {
	for off := 0; off < len(want); off += guestmem.PageSize {
		pa, pb := want[off:off+guestmem.PageSize], got[off:off+guestmem.PageSize]
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

// FileDiff compares two disk images 4 KiB block by block.
func FileDiff(a, b string, max int) (n int, desc []string, err error) {
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
	n, desc = DiffBlocks(da, db, max)
	return n, desc, nil
}

// DiffBlocks compares two disk contents 4 KiB block by block and
// describes the blocks that differ (at most max of them).
func DiffBlocks(want, got []byte, max int) (n int, desc []string) {
	for off := 0; off < len(want); off += 4096 {
		end := min(off+4096, len(want))
		if !bytes.Equal(want[off:end], got[off:end]) {
			n++
			if len(desc) < max {
				desc = append(desc, fmt.Sprintf("disk block at %#x differs", off))
			}
		}
	}
	return n, desc
}

// FileHash is the SHA-256 of a file's contents.
func FileHash(p string) ([32]byte, error) {
	b, err := os.ReadFile(p)
	return sha256.Sum256(b), err
}

// JoinLines indents and joins lines for a failure message.
func JoinLines(s []string) string {
	var b strings.Builder
	for _, l := range s {
		b.WriteString("  " + l + "\n")
	}
	return b.String()
}

const traceDir = "/sys/kernel/tracing"

// TraceKVM shows, when the test fails in the lab, the last of KVM's exits
// and injected exceptions in L1 (ftrace's kvm events): on AMD, KVM resets
// a vCPU before it reports a triple fault, so the trace is where the
// faulting RIP and the event being delivered show. Only when the lab was
// asked for them (govmm lab --trace-kvm, GOVMM_LAB_TRACE_KVM=1 for
// scripts/guest-tests.sh): L1's init then turns the events on before any
// VM exists and never off (turning them on or off rewrites L1's kernel
// code, which QEMU's emulation gets wrong under a running guest); this
// only empties the buffer at the start.
func TraceKVM(t *testing.T) {
	t.Helper()
	if !lab.InLab() {
		return
	}
	if _, err := os.Stat(filepath.Join(traceDir, "trace")); err != nil {
		if err := unix.Mount("nodev", traceDir, "tracefs", 0, ""); err != nil {
			t.Logf("no kvm trace: mount tracefs: %v", err)
			return
		}
	}
	if b, err := os.ReadFile(filepath.Join(traceDir, "events/kvm/kvm_exit/enable")); err != nil || strings.TrimSpace(string(b)) != "1" {
		return // not asked for
	}
	if err := os.WriteFile(filepath.Join(traceDir, "trace"), nil, 0o644); err != nil {
		t.Logf("no kvm trace: %v", err)
		return
	}
	t.Cleanup(func() {
		if !t.Failed() {
			return
		}
		b, _ := os.ReadFile(filepath.Join(traceDir, "trace"))
		lines := strings.Split(strings.TrimSpace(string(b)), "\n")
		if len(lines) > 300 {
			lines = lines[len(lines)-300:]
		}
		t.Logf("last KVM events in L1:\n%s", strings.Join(lines, "\n"))
	})
}

// describePause is how long DescribeMachine waits for a pause.
var describePause = 20 * time.Second

// describeEnded is called when DescribeMachine's pausing goroutine ends
// (for its test, which must not close the machine before).
var describeEnded = func() {}

// DescribeMachine says what a machine that is still running was doing,
// for a test that gave up waiting on its guest: each vCPU's count of VM
// exits, read twice a second apart (a guest that no longer exits at all
// is stuck in KVM or halted for good), then each vCPU's position and
// local APIC from a state saved at a pause (vmm.MachineState
// DescribeVCPUs). A pause that does not come within 20 s (a vCPU thread
// or a cut stuck in the VMM) is said so, with every goroutine's stack.
// Empty for a machine that has stopped.
func DescribeMachine(m *vmm.Machine) string {
	select {
	case <-m.Done():
		return ""
	default:
	}
	var b strings.Builder
	for i := range 2 {
		if i > 0 {
			time.Sleep(time.Second)
			b.WriteString(", then ")
		}
		if n, ok := m.KVMExits(); ok {
			fmt.Fprintf(&b, "KVM exits %v", n)
		} else {
			b.WriteString("KVM exits unknown")
		}
	}
	b.WriteString("; ")
	type saved struct {
		st  *vmm.MachineState
		err error
	}
	wait := describePause
	got := make(chan saved, 1)
	var gaveUp atomic.Bool
	go func() {
		defer describeEnded()
		ctx, cancel := context.WithTimeout(context.Background(), wait)
		defer cancel()
		var s saved
		s.err = m.WithPaused(ctx, func() error {
			if gaveUp.Load() {
				// The caller has gone on (to close the machine, say):
				// nothing is read from it any more.
				return nil
			}
			var err error
			s.st, err = m.SaveState()
			return err
		})
		got <- s
	}()
	select {
	case s := <-got:
		if s.err != nil {
			fmt.Fprintf(&b, "no state: %v", s.err)
		} else {
			b.WriteString(s.st.DescribeVCPUs())
		}
	case <-time.After(wait):
		gaveUp.Store(true)
		// A vCPU thread or the cut is stuck in the VMM: where.
		stacks := make([]byte, 256<<10)
		stacks = stacks[:runtime.Stack(stacks, true)]
		fmt.Fprintf(&b, "no state: no pause within %v; this process's goroutines:\n%s", wait, stacks)
	}
	return b.String()
}

package main

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"govmm/guestimg"
	"govmm/internal/kvmtest"
	"govmm/replicate"
	"govmm/replicate/stream"
	"govmm/vmm"
)

// The booted default guest is replicated under the same load as
// TestGuestMigrateUnderLoad; at a cut the test copies the primary's memory
// and disk, and once that checkpoint is acknowledged the primary dies (the
// link to the standby is cut, its guest stopped, its devices closed). The
// standby takes over from exactly that checkpoint: its memory equals the
// copy page by page and its disk equals the primary's disk at the cut;
// the client's keep-alive connection carries on against it, the counter
// going up by exactly one each time and every acknowledged line in GET /log.
func TestGuestTakeoverEqualsPrimaryAtCut(t *testing.T) {
	kvmtest.RequireLinuxBoot(t)
	r := newRig(t)
	diskP, diskS := r.blankDisk("p.img", 64<<20), r.blankDisk("s.img", 64<<20)
	df, err := os.OpenFile(diskS, os.O_RDWR, 0)
	require.NoError(t, err)
	defer df.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Minute)
	defer cancel()

	// The cut the primary dies after.
	var (
		mu       sync.Mutex
		trigger  bool
		cutEpoch uint64
		cutMem   [][]byte // per region, in order
		cutDisk  []byte
		chk      cutCheck
		rep      atomic.Pointer[replicate.Replicator]
		dead     = make(chan struct{})
	)
	var stby *guestVM
	sb, err := replicate.NewStandby(replicate.StandbyConfig{Listen: "127.0.0.1:0", Insecure: true, Disks: []*os.File{df},
		Build: func(stream.Identity) (*vmm.Machine, error) {
			g, err := r.buildVM("standby", "gvs", diskS, false)
			if err != nil {
				return nil, err
			}
			stby = g
			return g.m, nil
		},
		BeforeStart: func(m *vmm.Machine, _ *vmm.MachineState) error {
			mu.Lock()
			defer mu.Unlock()
			for i, rg := range m.Memory().Regions() {
				n, d := diffPages(uint64(rg.GPA), cutMem[i], rg.Host, 20-len(chk.memDesc))
				chk.memDiff += n
				chk.memDesc = append(chk.memDesc, d...)
			}
			got, err := os.ReadFile(diskS)
			if err != nil {
				chk.err = err
				return nil
			}
			for off := 0; off < len(got); off += 4096 {
				if !bytes.Equal(got[off:off+4096], cutDisk[off:off+4096]) {
					chk.diskDiff++
					if len(chk.diskDesc) < 20 {
						chk.diskDesc = append(chk.diskDesc, fmt.Sprintf("disk block at %#x differs", off))
					}
				}
			}
			return nil
		}})
	require.NoError(t, err)
	defer sb.Close()
	type takeover struct {
		m   *vmm.Machine
		tk  replicate.Takeover
		err error
	}
	took := make(chan takeover, 1)
	go func() {
		m, tk, err := sb.ReceiveReplication(ctx, 10*time.Second)
		took <- takeover{m, tk, err}
	}()
	link := newLink(t, sb.Addr())

	prim := r.newVM("primary", "gvp", diskP, true)
	atCut := func(epoch uint64) {
		mu.Lock()
		defer mu.Unlock()
		switch {
		case trigger && cutEpoch == 0:
			cutEpoch = epoch
			for _, rg := range prim.m.Memory().Regions() {
				cutMem = append(cutMem, bytes.Clone(rg.Host))
			}
			var err error
			if cutDisk, err = os.ReadFile(diskP); err != nil {
				chk.err = err
			}
		case cutEpoch != 0 && epoch == cutEpoch+1:
			// The primary dies once the cut's checkpoint is acknowledged,
			// before this one leaves: the standby resumes from the cut.
			deadline := time.Now().Add(2 * time.Minute)
			for rep.Load().Stats().Acked < cutEpoch && time.Now().Before(deadline) {
				time.Sleep(time.Millisecond)
			}
			link.kill()
			_ = prim.m.Pause() // held for good
			closeAll(prim.devs)
			prim.devs = nil
			close(dead)
		}
	}
	require.NoError(t, prim.m.Start())
	var outs []*replicate.OutputBuffer
	for _, n := range prim.f.nics {
		outs = append(outs, n.out)
	}
	rp, err := replicate.StartReplication(ctx, prim.m, replicate.ReplicateConfig{To: link.addr(), Insecure: true, Name: prim.f.name,
		Epoch: 50 * time.Millisecond, FailoverTimeout: 10 * time.Second, Outputs: outs, Disks: prim.f.diskLogs, AtCut: atCut})
	require.NoError(t, err)
	rep.Store(rp)
	t.Cleanup(rp.Stop)
	prim.waitConsole(t, guestimg.ReadyLine, 10*time.Minute)
	prim.guestLoad()

	k, kb := r.dialGuest(t), r.dialGuest(t)
	h := &history{}
	stopLoad := startLoad(t, h, k, kb)
	h.waitAnswers(t, 10, 3*time.Minute, "replicated, before the takeover")
	st := rp.Stats()
	t.Logf("replicating: epoch %d, %d acked, pause p50 %v p99 %v", st.Epoch, st.Acked, st.PauseP50, st.PauseP99)

	mu.Lock()
	trigger = true
	mu.Unlock()
	select {
	case <-dead:
	case <-time.After(3 * time.Minute):
		t.Fatal("the primary never reached the cut after the trigger")
	}
	killed := time.Now()
	tk := <-took
	require.NoError(t, tk.err, "takeover")
	failover := time.Since(killed)
	announce(stby.f.nics, r.guestIP.String())
	answers, _, _ := h.state()
	h.waitAnswers(t, 3, 3*time.Minute, "after the takeover")
	h.keepsAnswering(t, afterMove, "the guest taken over keeps answering")
	t.Logf("took over at checkpoint %d (%v after the primary died, the memory check included; resume took %v); the client had %d answers before",
		tk.tk.Epoch, failover.Round(time.Millisecond), tk.tk.Took, answers)

	mu.Lock()
	defer mu.Unlock()
	require.NoError(t, chk.err)
	require.Equal(t, cutEpoch, tk.tk.Epoch, "the standby resumes from the cut's checkpoint")
	require.Zero(t, chk.memDiff, "pages of the replica that differ from the primary's at the cut:\n%s", joinLines(chk.memDesc))
	require.Zero(t, chk.diskDiff, "disk blocks of the replica that differ from the primary's at the cut:\n%s", joinLines(chk.diskDesc))
	stopLoad()
	h.checkLog(t, k)
}

// link forwards the replication stream so a test can cut it as a dying
// host would (both ends see the connection go, with no goodbye).
type link struct {
	ln     net.Listener
	target string
	mu     sync.Mutex
	conns  []net.Conn
	killed bool
}

func newLink(t *testing.T, target string) *link {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	l := &link{ln: ln, target: target}
	go l.serve()
	t.Cleanup(l.kill)
	return l
}

func (l *link) addr() string { return l.ln.Addr().String() }

func (l *link) serve() {
	for {
		c, err := l.ln.Accept()
		if err != nil {
			return
		}
		u, err := net.Dial("tcp", l.target)
		if err != nil {
			c.Close()
			continue
		}
		l.mu.Lock()
		if l.killed {
			l.mu.Unlock()
			c.Close()
			u.Close()
			return
		}
		l.conns = append(l.conns, c, u)
		l.mu.Unlock()
		go pipe(u, c)
		go pipe(c, u)
	}
}

func pipe(dst, src net.Conn) {
	buf := make([]byte, 64<<10)
	for {
		n, err := src.Read(buf)
		if n > 0 {
			if _, werr := dst.Write(buf[:n]); werr != nil {
				return
			}
		}
		if err != nil {
			return
		}
	}
}

// kill closes the listener and every connection. Idempotent.
func (l *link) kill() {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.killed = true
	l.ln.Close()
	for _, c := range l.conns {
		c.Close()
	}
}

package replicate

import (
	"bytes"
	"context"
	"encoding/binary"
	"fmt"
	"io"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"govmm/dirtylog"
	"govmm/internal/kvmtest"
	"govmm/internal/tinyguest"
	"govmm/vmm"
	"govmm/vmm/guestmem"
)

// markGPA and preGPA are pages the tests below write through the VMM
// (guestmem), away from the Dirtier's pages and the tiny guest's code.
const markGPA, preGPA = 0x3000000, 0x3001000

// preHarvestProbe writes pages on both sides of each checkpoint's
// pre-harvest and keeps, per epoch, what the pre-harvest saw.
type preHarvestProbe struct {
	m        *vmm.Machine
	mu       sync.Mutex
	err      error
	atPre    map[uint64][]byte // the Dirtier's pages right after the pre-harvest
	mark     map[uint64]uint64 // markGPA's value at the cut
	preCount map[uint64]int
	passes   map[uint64][2]uint64 // the pass counter as atPre was taken, and after the wait
	// stopped is set when the test ends the run (cuts the link, then
	// pauses the primary): a probe running then or later records nothing
	// and does not wait for a guest that no longer runs.
	stopped atomic.Bool
}

func (p *preHarvestProbe) fail(err error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.err == nil {
		p.err = err
	}
}

func (p *preHarvestProbe) writeMark(gpa guestmem.GPA, v uint64) {
	var b [8]byte
	binary.LittleEndian.PutUint64(b[:], v)
	if err := p.m.Memory().WriteAt(b[:], gpa); err != nil {
		p.fail(err)
	}
}

// before the pre-harvest: the guest makes a full pass since the last cut
// (so that the pre-harvest must report every page of the Dirtier's, how
// ever slow the host), and the VMM writes markGPA, which the pre-harvest
// must then report, and preGPA, which only the pre-harvest reports.
func (p *preHarvestProbe) preHarvest(epoch uint64) {
	p.fullPass(epoch)
	p.writeMark(markGPA, 2*epoch)
	p.writeMark(preGPA, epoch)
}

// fullPass waits, the guest running, until the Dirtier has made a full
// pass (its pass counter moved by two) or the test has stopped the run.
func (p *preHarvestProbe) fullPass(epoch uint64) bool {
	host := p.m.Memory().Regions()[0].Host
	start := binary.LittleEndian.Uint64(host[passGPA:])
	exits, _ := p.m.KVMExits()
	deadline := time.Now().Add(10 * time.Second)
	for binary.LittleEndian.Uint64(host[passGPA:]) < start+2 {
		if p.stopped.Load() {
			return false
		}
		if time.Now().After(deadline) {
			now, _ := p.m.KVMExits()
			p.fail(fmt.Errorf("epoch %d: the guest made no full pass in 10 s: pass counter %d -> %d, paused %v, KVM exits per vCPU %v -> %v, VMM exits %v",
				epoch, start, binary.LittleEndian.Uint64(host[passGPA:]), p.m.Paused(), exits, now, p.m.ExitCounts()))
			return false
		}
		time.Sleep(100 * time.Microsecond)
	}
	return true
}

// after it, the guest running: markGPA is written again through the VMM,
// and every page of the Dirtier through KVM (a full pass of the guest's),
// all of them pages the pre-harvest reported. The cut must hold the new
// bytes, not the pre-harvest's.
func (p *preHarvestProbe) beforePause(epoch uint64, pre *dirtylog.Set) {
	if pre == nil {
		p.fail(fmt.Errorf("epoch %d: no pre-harvest", epoch))
		return
	}
	if !pre.Contains(markGPA) || !pre.Contains(preGPA) {
		p.fail(fmt.Errorf("epoch %d: the pre-harvest misses the VMM's write before it", epoch))
	}
	host := p.m.Memory().Regions()[0].Host
	passAtPre := binary.LittleEndian.Uint64(host[passGPA:])
	atPre := append([]byte(nil), host[dirtyBase:dirtyBase+dirtyPages*guestmem.PageSize]...)
	p.writeMark(markGPA, 2*epoch+1)
	if !p.fullPass(epoch) {
		return
	}
	passAfter := binary.LittleEndian.Uint64(host[passGPA:])
	p.mu.Lock()
	defer p.mu.Unlock()
	p.atPre[epoch], p.mark[epoch], p.preCount[epoch] = atPre, 2*epoch+1, pre.Count()
	p.passes[epoch] = [2]uint64{passAtPre, passAfter}
}

// The pre-harvest takes most of the dirty log before the pause; pages it
// reported that are written again before the cut (by the guest through
// KVM, and by the VMM) reach the standby with their bytes at the cut: the
// standby's memory at takeover equals the primary's at the committed cut
// page by page, and that cut differs from memory at the pre-harvest in
// every page the Dirtier wrote; a page written only before the
// pre-harvest reaches the standby too (the union). Copying on write (the pre-harvested pages
// armed, the writes let through and the pages protected again in the
// pause) and stopping to copy, with the dirty bitmap and the dirty ring.
func TestPreHarvestCutHoldsLaterWrites(t *testing.T) {
	for _, tc := range []struct {
		copy     CopyMode
		tracking string
	}{{CopyCoW, vmm.DirtyBitmap}, {CopyStop, vmm.DirtyBitmap}, {CopyCoW, vmm.DirtyRing}} {
		t.Run(fmt.Sprintf("copy=%s/%s", tc.copy, tc.tracking), func(t *testing.T) { testPreHarvest(t, tc.copy, tc.tracking) })
	}
}

func testPreHarvest(t *testing.T, copyMode CopyMode, tracking string) {
	kvmtest.Require(t)
	prim, err := vmm.New(vmm.Config{MemSize: 64 << 20, CPUs: 2, Kernel: tinyguest.Kernel(tinyguest.Dirtier(dirtyBase, dirtyPages, passGPA)),
		Initrd: []byte("x"), Cmdline: "x", Console: io.Discard, DirtyTracking: tracking})
	require.NoError(t, err)
	t.Cleanup(func() { prim.Close() })
	require.Equal(t, tracking, prim.DirtyTracking())
	require.NoError(t, prim.Start())
	rec := &cutRecorder{m: prim, cuts: map[uint64][]byte{}}
	probe := &preHarvestProbe{m: prim, atPre: map[uint64][]byte{}, mark: map[uint64]uint64{}, preCount: map[uint64]int{}, passes: map[uint64][2]uint64{}}

	var lastCommitted uint64
	var compared, differ int
	sb := newStandby(t, nil)
	sb.onCheckpoint = func(e uint64) { lastCommitted = e }
	sb.beforeStart = func(m *vmm.Machine, _ *vmm.MachineState) error {
		want := rec.get(lastCommitted)
		if want == nil {
			return fmt.Errorf("no recorded cut for epoch %d", lastCommitted)
		}
		got := m.Memory().Regions()[0].Host
		for off := 0; off < len(got); off += guestmem.PageSize {
			compared++
			if !bytes.Equal(got[off:off+guestmem.PageSize], want[off:off+guestmem.PageSize]) {
				differ++
			}
		}
		return nil
	}
	done := make(chan takeover, 1)
	go func() {
		m, tk, err := sb.ReceiveReplication(context.Background())
		done <- takeover{m, tk, err}
	}()
	px := newProxy(t, sb.Addr())
	rep, err := startReplication(context.Background(), prim, ReplicateConfig{To: px.addr(), Insecure: true, Name: "tiny",
		Epoch: 20 * time.Millisecond, FailoverTimeout: 10 * time.Second, Copy: copyMode},
		testHooks{atCut: rec.at, preHarvest: probe.preHarvest, beforePause: probe.beforePause})
	require.NoError(t, err)
	t.Cleanup(rep.Stop)
	require.Eventually(t, func() bool { return rep.Stats().Epochs >= 8 }, 60*time.Second, time.Millisecond)
	st := rep.Stats()
	require.Equal(t, string(copyMode), st.Last.CopyMode)
	require.Positive(t, st.Last.PreHarvest)
	if copyMode == CopyCoW {
		require.Positive(t, rep.cow.Stats().ArmedWrites, "writes after the pre-harvest hit armed pages")
	}

	// The link first, so that no checkpoint cut after the probe stops
	// reaches the standby; then the primary stops. The replicator's loop
	// may still be in the probe meanwhile, or enter it again.
	px.kill()
	probe.stopped.Store(true)
	require.NoError(t, prim.Pause())
	r := <-done
	require.NoError(t, r.err)
	defer r.m.Close()
	<-rep.Done()

	probe.mu.Lock()
	defer probe.mu.Unlock()
	require.NoError(t, probe.err)
	e := r.tk.Epoch
	require.Equal(t, lastCommitted, e)
	require.Equal(t, 64<<20/guestmem.PageSize, compared)
	require.Zero(t, differ, "standby memory equals the primary's at the cut of epoch %d", e)
	cut, atPre := rec.get(e), probe.atPre[e]
	require.NotNil(t, atPre, "epoch %d went through the probe", e)
	require.Equal(t, probe.mark[e], binary.LittleEndian.Uint64(cut[markGPA:]), "the VMM's write after the pre-harvest is in the cut")
	require.Equal(t, e, binary.LittleEndian.Uint64(cut[preGPA:]), "the VMM's write before the pre-harvest is in the cut")
	// The Dirtier adds one to a byte of each page per pass, so a page's
	// byte at the cut is the pass counter's low byte, or one more in the
	// pages the pass it was paused in had reached (a prefix of them): the
	// cut holds pages and counter of one instant. The counter moved by at
	// least two after atPre was copied (the probe waited for it), so each
	// page was written since; but a byte wraps after 256 passes, which the
	// lab's guest can make between the pre-harvest and the cut (258 seen),
	// so a page equal at both is evidence only while fewer passes than
	// that fit in between.
	n := binary.LittleEndian.Uint64(cut[passGPA:])
	require.GreaterOrEqual(t, n, probe.passes[e][1], "the cut comes after the probe's wait")
	var off []string
	prev := byte(1)
	for pg := 0; pg < dirtyPages; pg++ {
		d := cut[dirtyBase+pg*guestmem.PageSize] - byte(n)
		if d > prev {
			off = append(off, fmt.Sprintf("%#x (byte %d)", dirtyBase+pg*guestmem.PageSize, cut[dirtyBase+pg*guestmem.PageSize]))
		}
		prev = d
	}
	require.Empty(t, off, "the Dirtier's pages at the cut of epoch %d agree with its pass counter %d (each byte its low byte, or one more in a prefix)", e, n)
	var same []string
	for pg := 0; pg < dirtyPages; pg++ {
		off := dirtyBase + pg*guestmem.PageSize
		if bytes.Equal(atPre[pg*guestmem.PageSize:(pg+1)*guestmem.PageSize], cut[off:off+guestmem.PageSize]) {
			same = append(same, fmt.Sprintf("%#x (byte %d)", off, cut[off]))
		}
	}
	if n-probe.passes[e][0] < 255 {
		require.Empty(t, same, "pages not written between the pre-harvest and the cut of epoch %d, though the pass counter went %d -> %d -> %d (at the pre-harvest, after the wait, at the cut); page 0's byte at the pre-harvest %d",
			e, probe.passes[e][0], probe.passes[e][1], n, atPre[0])
	} else {
		t.Logf("epoch %d: %d passes between the pre-harvest and the cut, enough for a byte to wrap: %d pages equal at both not counted", e, n-probe.passes[e][0], len(same))
	}
	// The guest made a full pass between the last cut and this
	// pre-harvest (the probe waited for it): it reports every page.
	require.GreaterOrEqual(t, probe.preCount[e], dirtyPages, "the pre-harvest took the Dirtier's pages")
}

package replicate

import (
	"context"
	"encoding/binary"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"govmm/internal/kvmtest"
	"govmm/internal/tinyguest"
	"govmm/lab"
	"govmm/vmm/guestmem"
)

// stepGPA holds the number of pages stepGuest dirties per pass; the test
// writes it (through WriteAt, which marks the page dirty like any VMM
// write) to step the dirty rate up and down.
const stepGPA = 0x3ff000

// stepGuest is Dirtier with the page count read from stepGPA at every
// pass (0: only the pass counter is written):
//
//	again: mov rbx, dirtyBase
//	       mov ecx, [stepGPA]
//	       test ecx, ecx
//	       jz done
//	loop:  inc byte [rbx]
//	       add rbx, 4096
//	       dec ecx
//	       jnz loop
//	done:  inc qword [passGPA]
//	       jmp again
func stepGuest() []byte {
	code := tinyguest.Cat(
		tinyguest.MovRBX(dirtyBase),
		binary.LittleEndian.AppendUint32([]byte{0x8b, 0x0c, 0x25}, stepGPA), // mov ecx, [stepGPA]
		[]byte{0x85, 0xc9, 0x74, 0x0d},                                      // test ecx, ecx; jz done
		[]byte{0xfe, 0x03},                                                  // loop: inc byte [rbx]
		[]byte{0x48, 0x81, 0xc3, 0x00, 0x10, 0, 0},                          // add rbx, 4096
		[]byte{0xff, 0xc9},                                                  // dec ecx
		[]byte{0x75, 0xf3},                                                  // jnz loop
		tinyguest.IncQwordAbs(passGPA),                                      // done:
	)
	return append(code, 0xeb, byte(-(len(code) + 2))) // jmp again
}

// Adaptive epochs on a guest whose dirty rate steps up and down,
// replicated over loopback to a real standby: while it dirties 8,192
// pages a pass the epoch grows (checkpoints of that size take longer to
// stream than a 10 ms epoch; 50 ms in the lab), never beyond MaxEpoch; once it dirties
// nothing again the epoch comes back down to Epoch. The series of epoch
// lengths and pauses is logged.
func TestReplicationAdaptiveEpochs(t *testing.T) {
	kvmtest.Require(t)
	const heavy = 8192
	epoch, maxEpoch := 10*time.Millisecond, 80*time.Millisecond
	if lab.InLab() {
		// Everything emulated: an idle tiny guest's checkpoint alone
		// takes about 10 ms there, so the floor and the cap are five
		// times as long.
		epoch, maxEpoch = 50*time.Millisecond, 400*time.Millisecond
	}
	prim := newTiny(t, stepGuest())
	// In the lab the emulated guest dirties only ~1,400 pages a second
	// (every first write after a harvest is a nested page fault, all
	// emulated): a few hundred pages an epoch, whose checkpoint sits
	// between the marks that grow and shrink the epoch, so the test
	// would read noise. There, while the guest is loaded, the test also
	// writes labPages pages at the same addresses as a device would
	// (through WriteAt, dirty-logged like the guest's own writes), so
	// that the load is what the test says it is.
	const labPages = 2048
	var stopWriter func()
	setPages := func(n uint32) {
		require.NoError(t, prim.Memory().WriteAt(binary.LittleEndian.AppendUint32(nil, n), stepGPA))
		if stopWriter != nil {
			stopWriter()
			stopWriter = nil
		}
		if n == 0 || !lab.InLab() {
			return
		}
		done, stopped := make(chan struct{}), make(chan struct{})
		stopWriter = func() { close(done); <-stopped }
		go func() {
			defer close(stopped)
			for pass := byte(1); ; pass++ {
				for i := range uint64(labPages) {
					if prim.Memory().WriteAt([]byte{pass}, guestmem.GPA(dirtyBase+i*4096+8)) != nil {
						return
					}
				}
				select {
				case <-done:
					return
				case <-time.After(2 * time.Millisecond):
				}
			}
		}()
	}
	t.Cleanup(func() {
		if stopWriter != nil {
			stopWriter()
		}
	})
	setPages(0)
	require.NoError(t, prim.Start())
	sb := newStandby(t, nil)
	go func() {
		m, _, err := sb.ReceiveReplication(context.Background())
		if err == nil {
			m.Close()
		}
	}()
	rep, err := StartReplication(context.Background(), prim, ReplicateConfig{To: sb.Addr(), Insecure: true, Name: "tiny",
		Epoch: epoch, MaxEpoch: maxEpoch, FailoverTimeout: 10 * time.Second})
	require.NoError(t, err)
	t.Cleanup(rep.Stop)

	epochs := func() uint64 { return rep.Stats().Epochs }
	waitEpochs := func(n uint64) {
		start := epochs()
		require.Eventually(t, func() bool { return epochs() >= start+n }, 30*time.Second, time.Millisecond)
	}
	// targets are the epoch lengths aimed at from checkpoint from on.
	targets := func(from uint64) []time.Duration {
		var out []time.Duration
		for _, es := range rep.Recent() {
			if es.Epoch >= from {
				out = append(out, es.Target)
			}
		}
		return out
	}
	median := func(d []time.Duration) time.Duration {
		require.NotEmpty(t, d)
		d = slices.Clone(d)
		slices.Sort(d)
		return d[len(d)/2]
	}

	// The series of epochs is logged at the end, also when an assertion
	// failed: it is what says why.
	var idle, busy, calm uint64
	t.Cleanup(func() {
		var b strings.Builder
		for _, es := range rep.Recent() {
			fmt.Fprintf(&b, "\n%d\t%v\t%v\t%v\t%v\t%d", es.Epoch, es.Target, es.Length.Round(100*time.Microsecond),
				es.Pause.Round(10*time.Microsecond), es.AckTime.Round(10*time.Microsecond), es.DirtyPages)
		}
		t.Logf("idle from epoch %d, 8,192 pages a pass from %d (grown), idle again from %d (back at %v)\nepoch\ttarget\tlength\tpause\tack\tdirty pages%s",
			idle, busy, calm, epoch, b.String())
	})

	// Idle: the epoch stays at its floor (a lone slow ack on a busy host
	// may lengthen one epoch; the next brings it back).
	idle = rep.Stats().Epoch + 1
	waitEpochs(20)
	require.Equal(t, epoch, median(targets(idle)), "an idle guest keeps the configured epoch")

	// Step up: the epoch grows, to the cap.
	setPages(heavy)
	require.Eventually(t, func() bool { return rep.Stats().EpochLength >= 4*epoch }, 30*time.Second, time.Millisecond,
		"under 8,192 dirty pages a pass the epoch must grow")
	busy = rep.Stats().Epoch + 1
	waitEpochs(15)
	require.GreaterOrEqual(t, median(targets(busy)), 4*epoch, "it stays long while the load lasts")
	require.Equal(t, maxEpoch, slices.Max(targets(busy)), "8,192 pages a pass take the epoch to its cap")

	// Step down: back to the floor.
	setPages(0)
	require.Eventually(t, func() bool { return rep.Stats().EpochLength == epoch }, 30*time.Second, time.Millisecond,
		"once the guest is idle again the epoch comes back down")
	calm = rep.Stats().Epoch + 1
	waitEpochs(15)
	require.Equal(t, epoch, median(targets(calm)), "and stays there")

	for _, es := range rep.Recent() {
		require.LessOrEqual(t, es.Target, maxEpoch, "epoch %d", es.Epoch)
		require.GreaterOrEqual(t, es.Target, epoch, "epoch %d", es.Epoch)
	}
}

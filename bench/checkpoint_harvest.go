package bench

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"time"

	"govmm/dirtylog"
	"govmm/internal/tinyguest"
	"govmm/vmm"
	"govmm/vmm/guestmem"
)

// HarvestSample is one cycle of the harvest runs: the vCPU pause, one
// dirty-log harvest with every vCPU stopped, and the resume, timed apart,
// after the guest wrote exactly its working set once.
type HarvestSample struct {
	Tracking             string // vmm.DirtyBitmap or vmm.DirtyRing
	Nominal              int    // pages the guest wrote
	Pause, Harvest, Resu time.Duration
	DirtyPages           int
	// Err, when set, is why the run stopped early (e.g. the ring
	// overflowed on kvm_pvm): a row of its own, with no times.
	Err string
}

// gateGPA is where the harvest guest waits for the next pass: a page
// below the working set, away from its code, stack and page tables.
const gateGPA = dirtyBase - guestmem.PageSize

// gatedDirtier writes one byte in each of pages pages from dirtyBase and
// bumps its pass counter, then spins until the qword at gateGPA reaches
// the counter, so that each pass is released by the VMM and writes each
// page exactly once:
//
//	again: (one pass of the Dirtier)
//	wait:  mov rax, [gate]
//	       cmp rax, [counter]
//	       jb wait
//	       jmp again
func gatedDirtier(pages int) []byte {
	code := tinyguest.DirtierPass(dirtyBase, uint32(pages), passGPA)
	wait := len(code)
	code = append(code, 0x48, 0x8b, 0x04, 0x25)
	code = binary.LittleEndian.AppendUint32(code, uint32(gateGPA))
	code = append(code, 0x48, 0x3b, 0x04, 0x25)
	code = binary.LittleEndian.AppendUint32(code, passGPA)
	code = append(code, 0x72, byte(int8(wait-(len(code)+2))))
	code = append(code, 0xe9)
	return binary.LittleEndian.AppendUint32(code, uint32(int32(-(len(code) + 4))))
}

// harvestAll times the harvest for each tracking mode and dirty set.
func (res *CheckpointResult) harvestAll(ctx context.Context) error {
	cfg := res.Config
	for _, n := range cfg.HarvestPages {
		for _, tracking := range cfg.Trackings {
			hs, err := harvestRun(ctx, tracking, n, cfg.HarvestCycles)
			if err != nil {
				return fmt.Errorf("harvest %d pages with the %s: %w", n, tracking, err)
			}
			res.Harvests = append(res.Harvests, hs...)
			var h []float64
			for _, s := range hs {
				if s.Err == "" {
					h = append(h, usOf(s.Harvest))
				}
			}
			fmt.Fprintf(cfg.Log, "checkpoint: harvest %6d pages, %s: %d cycles, median %.1f µs\n", n, tracking, len(h), Summarize(h).Median)
		}
	}
	return nil
}

// harvestRun runs the gated Dirtier over pages pages on a machine tracking
// with tracking, and times cycles harvests (after two dropped), each after
// one released pass. A ring that KVM lacks, or that overflows (kvm_pvm
// lets it), ends the run with a sample that says so rather than failing
// the suite.
func harvestRun(ctx context.Context, tracking string, pages, cycles int) ([]HarvestSample, error) {
	m, err := vmm.New(vmm.Config{MemSize: memFor(pages), CPUs: 1, Kernel: tinyguest.Kernel(gatedDirtier(pages)),
		Initrd: []byte("x"), Cmdline: "x", Console: io.Discard, DirtyTracking: tracking})
	if errors.Is(err, vmm.ErrNoDirtyRing) {
		return []HarvestSample{{Tracking: tracking, Nominal: pages, Err: "kvm lacks the ring"}}, nil
	}
	if err != nil {
		return nil, err
	}
	defer m.Close()
	tr, err := m.TrackDirty(dirtylog.Options{ManualProtect: true})
	if err != nil {
		return nil, err
	}
	defer tr.Close()
	if err := m.Start(); err != nil {
		return nil, err
	}
	var out []HarvestSample
	for i := 0; i < cycles+2; i++ {
		s, err := harvestCycle(ctx, m, tr)
		if errors.Is(err, vmm.ErrStopped) {
			// The machine stopped under the cycle: its own error says
			// why (an overflowed ring stops it).
			select {
			case <-m.Done():
				if _, werr := m.Wait(); werr != nil {
					err = fmt.Errorf("%w: %w", err, werr)
				}
			case <-time.After(time.Second):
			}
		}
		if errors.Is(err, vmm.ErrDirtyRingOverflow) {
			return append(out, HarvestSample{Tracking: tracking, Nominal: pages, Err: "ring overflowed"}), nil
		}
		if err != nil {
			return out, err
		}
		if i >= 2 {
			s.Tracking, s.Nominal = tracking, pages
			out = append(out, s)
		}
	}
	return out, nil
}

// harvestCycle waits for the guest's current pass, pauses it, harvests,
// resumes, and releases the next pass.
func harvestCycle(ctx context.Context, m *vmm.Machine, tr *dirtylog.Tracker) (HarvestSample, error) {
	if err := waitPassDone(ctx, m); err != nil {
		return HarvestSample{}, err
	}
	t0 := time.Now()
	if err := m.Pause(); err != nil {
		return HarvestSample{}, err
	}
	t1 := time.Now()
	set, err := tr.Harvest()
	if err != nil {
		_ = m.Resume()
		return HarvestSample{}, err
	}
	t2 := time.Now()
	if err := m.Resume(); err != nil {
		return HarvestSample{}, err
	}
	s := HarvestSample{Pause: t1.Sub(t0), Harvest: t2.Sub(t1), Resu: time.Since(t2), DirtyPages: set.Count()}
	var gate [8]byte
	binary.LittleEndian.PutUint64(gate[:], passes(m))
	return s, m.Memory().WriteAt(gate[:], gateGPA)
}

// waitPassDone waits until the gated guest has finished the pass it was
// released for (its counter passed the gate) or the machine stopped.
func waitPassDone(ctx context.Context, m *vmm.Machine) error {
	gate, err := m.Memory().Slice(gateGPA, 8)
	if err != nil {
		return err
	}
	deadline := time.Now().Add(time.Minute)
	for passes(m) <= binary.LittleEndian.Uint64(gate) {
		select {
		case <-m.Done():
			_, err := m.Wait()
			if err == nil {
				err = errors.New("the guest stopped")
			}
			return err
		case <-ctx.Done():
			return ctx.Err()
		default:
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("the guest made no pass in a minute")
		}
		time.Sleep(50 * time.Microsecond)
	}
	return nil
}

package bench

import (
	"context"
	"fmt"
	"math"
	"os"
	"time"

	"govmm/replicate"
	"govmm/vmm"
	"govmm/vmm/guestmem"
)

// replicationRun is one replication run of the checkpoint suite.
type replicationRun struct {
	pages   int
	epoch   time.Duration
	copy    string
	mode    StreamMode
	content string
	fit     bool // lengthen epoch to the working set first (fitEpoch)
}

func (r replicationRun) String() string {
	return fmt.Sprintf("%6d %s pages, epoch %v, copy %s, stream %v", r.pages, r.content, r.epoch, r.copy, r.mode)
}

// checkpointCopies are the copy modes each working set runs with:
// stop-and-copy, copy-on-write (an error where the host lacks userfaultfd
// write-protection) and auto (per checkpoint by its dirty set, with the
// default threshold; each epoch's EpochStats.CopyMode says what it
// used).
func checkpointCopies() []string { return []string{CopyStop, CopyCoW, CopyAuto} }

// setCopy asks rc for copy mode cp.
func setCopy(rc *replicate.ReplicateConfig, cp string) error {
	m, err := replicate.ParseCopyMode(cp)
	if err != nil {
		return err
	}
	rc.Copy = m
	return nil
}

// checkpointRun replicates one guest for warm-up plus cfg.Epochs epochs
// and returns the epochs kept, each with the epoch length it ran with
// (r.epoch, or longer: fitEpoch).
func checkpointRun(ctx context.Context, cfg CheckpointConfig, r replicationRun) ([]CheckpointSample, error) {
	m, err := startDirtier(ctx, r.pages, r.content)
	if err != nil {
		return nil, err
	}
	defer m.Close()
	if r.fit {
		if r.epoch, err = fitEpoch(ctx, m, r.epoch); err != nil {
			return nil, err
		}
	}
	sb, err := startStandbyWith(ctx, nil, r.mode.Deltas)
	if err != nil {
		return nil, err
	}
	defer sb.stop()
	rc := replicate.ReplicateConfig{To: sb.addr, Insecure: true, Name: "bench", Epoch: r.epoch,
		FailoverTimeout: 10 * time.Second, Compression: r.mode.Compression, Deltas: r.mode.Deltas, Logger: quietLogger()}
	if err := setCopy(&rc, r.copy); err != nil {
		return nil, err
	}
	rep, err := replicate.StartReplication(ctx, m, rc)
	if err != nil {
		return nil, err
	}
	defer rep.Stop()
	want := uint64(cfg.Warmup + cfg.Epochs)
	// One more, so the last kept has its ack.
	if err := waitEpochs(ctx, rep, want+1, time.Duration(want)*r.epoch*4+2*time.Minute); err != nil {
		return nil, err
	}
	time.Sleep(r.epoch) // acks in flight arrive
	recent := rep.Recent()
	var out []CheckpointSample
	for _, es := range recent {
		if len(out) == cfg.Epochs {
			break
		}
		if es.Epoch <= recent[0].Epoch+uint64(cfg.Warmup)-1 {
			continue
		}
		out = append(out, CheckpointSample{Nominal: r.pages, Epoch: r.epoch, Copy: r.copy, Mode: r.mode, Content: r.content, Stats: es})
	}
	return out, nil
}

// fitEpoch returns epoch, or an epoch long enough for the running
// Dirtier m to write its whole working set in it when it cannot in epoch:
// twice its pass time unreplicated (copy-on-write's first write to each
// page faults, and the pause stops it), rounded up to 10 ms. With a fixed
// 50 ms the Dirtier on an emulating KVM (kvm_pvm) wrote only ~15k pages
// of a 64k working set per epoch, so "64k" measured 15k, while
// compressed runs reached 64k only by backpressure stretching epochs.
func fitEpoch(ctx context.Context, m *vmm.Machine, epoch time.Duration) (time.Duration, error) {
	// The mean pass over at least 4 passes and 200 ms: one slow pass on a
	// busy host does not stretch every epoch.
	start, p0 := time.Now(), passes(m)
	deadline := start.Add(time.Minute)
	for passes(m) < p0+4 || time.Since(start) < 200*time.Millisecond {
		if time.Now().After(deadline) {
			return 0, fmt.Errorf("guest made %d passes in a minute", passes(m)-p0)
		}
		if err := ctx.Err(); err != nil {
			return 0, err
		}
		time.Sleep(time.Millisecond)
	}
	want := 2 * time.Since(start) / time.Duration(passes(m)-p0)
	if want <= epoch {
		return epoch, nil
	}
	return (want + 10*time.Millisecond - 1).Truncate(10 * time.Millisecond), nil
}

// startDirtier builds and starts the Dirtier over pages pages holding
// content, and waits for its first pass.
func startDirtier(ctx context.Context, pages int, content string) (*vmm.Machine, error) {
	m, err := newTinyMachine(pages, memFor(pages))
	if err != nil {
		return nil, err
	}
	if content == ContentBinary {
		ws, err := m.Memory().Slice(dirtyBase, uint64(pages)*guestmem.PageSize)
		if err == nil {
			err = fillBinary(ws)
		}
		if err != nil {
			m.Close()
			return nil, err
		}
	}
	if err := m.Start(); err != nil {
		m.Close()
		return nil, err
	}
	if err := waitPasses(ctx, m, 1, time.Minute); err != nil {
		m.Close()
		return nil, err
	}
	return m, nil
}

// bytesPerPage is what one checkpoint put on the wire (pages, state,
// framing, tags) per dirty page.
func bytesPerPage(es replicate.EpochStats) float64 {
	if es.DirtyPages == 0 {
		return math.NaN()
	}
	return float64(es.Bytes) / float64(es.DirtyPages)
}

// fillBinary fills b with copies of this program's executable: x86 code
// and data, page-like contents for the codecs to work on.
func fillBinary(b []byte) error {
	exe, err := os.Executable()
	if err != nil {
		return err
	}
	src, err := os.ReadFile(exe)
	if err != nil {
		return err
	}
	if len(src) == 0 {
		return fmt.Errorf("executable %s is empty", exe)
	}
	for off := 0; off < len(b); off += copy(b[off:], src) {
	}
	return nil
}

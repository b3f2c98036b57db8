package replicate

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"slices"
	"testing"
	"time"

	"govmm/internal/kvmtest"
	"govmm/internal/tinyguest"
	"govmm/vmm"
)

// BenchmarkEpochState replicates a 1-vCPU tiny dirtier (64 and 1,024
// pages an epoch) to the null transport at 2 ms epochs (6 ms at 1,024
// pages) for b.N epochs, and reports the medians of the checkpoints'
// steps in µs: stop, harvest, copy, state (what the state save, the disk
// writes and sealing output add after the copy: the vCPUs read their
// registers while the harvest and copy run) and pause; and of the dirty
// pages (an emulated guest may write fewer in an epoch than its working
// set). It is the state save as a checkpoint pays it, caches cold from
// the guest's run. It fails if the replication ends early (a guest the
// lab's emulation killed).
func BenchmarkEpochState(b *testing.B) {
	for _, pages := range []uint32{64, 1024} {
		b.Run(fmt.Sprintf("pages=%d", pages), func(b *testing.B) { benchEpochState(b, pages) })
	}
}

func benchEpochState(b *testing.B, pages uint32) {
	kvmtest.Require(b)
	m, err := vmm.New(vmm.Config{MemSize: 64 << 20, CPUs: 1, Kernel: tinyguest.Kernel(tinyguest.Dirtier(dirtyBase, pages, passGPA)),
		Initrd: []byte("x"), Cmdline: "x", Console: io.Discard})
	if err != nil {
		b.Fatal(err)
	}
	defer m.Close()
	if err := m.Start(); err != nil {
		b.Fatal(err)
	}
	rep, err := StartReplication(context.Background(), m, ReplicateConfig{Transport: NewNullTransport(), Name: "tiny",
		Epoch: time.Duration(2+pages/256) * time.Millisecond, Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		b.Fatal(err)
	}
	defer rep.Stop()
	start := rep.Stats().Epochs
	b.ResetTimer()
	for rep.Stats().Epochs < start+uint64(b.N)+1 {
		select {
		case <-rep.Done(): // the guest or the replication died (the lab's SVM emulation kills guests now and then)
			var merr error
			select {
			case <-m.Done():
				_, merr = m.Wait()
			default:
			}
			b.Fatalf("replication ended after %d epochs: %v (machine: %v)", rep.Stats().Epochs-start, rep.Err(), merr)
		case <-time.After(time.Millisecond):
		}
	}
	b.StopTimer()
	var state, stop, pause, harvest, cp, dirty []float64
	for _, es := range rep.Recent() {
		if es.Epoch <= start+1 {
			continue
		}
		state = append(state, float64(es.State.Nanoseconds())/1e3)
		stop = append(stop, float64(es.Stop.Nanoseconds())/1e3)
		pause = append(pause, float64(es.Pause.Nanoseconds())/1e3)
		harvest = append(harvest, float64(es.Harvest.Nanoseconds())/1e3)
		cp = append(cp, float64(es.Copy.Nanoseconds())/1e3)
		dirty = append(dirty, float64(es.DirtyPages))
	}
	med := func(x []float64) float64 {
		if len(x) == 0 {
			return 0
		}
		slices.Sort(x)
		return x[len(x)/2]
	}
	b.ReportMetric(med(state), "state-µs")
	b.ReportMetric(med(stop), "stop-µs")
	b.ReportMetric(med(pause), "pause-µs")
	b.ReportMetric(med(harvest), "harvest-µs")
	b.ReportMetric(med(cp), "copy-µs")
	b.ReportMetric(med(dirty), "dirty-pages")
	b.ReportMetric(0, "ns/op")
}

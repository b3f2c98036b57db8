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
	"govmm/vmm/guestmem"
)

// BenchmarkCheckpointCopy compares the pause of stop-and-copy and
// copy-on-write checkpoints side by side, with the pre-harvest and
// without (pre=false: the whole harvest in the pause), on the Dirtier
// over 100, 4096 and 65536 pages, checkpoints going to the null
// transport. Each run
// reports the medians over its epochs (after a warm-up) as metrics;
// `govmm bench checkpoint` is where the numbers are kept, this is the
// quick look while working on the copy:
//
//	go test -run '^$' -bench CheckpointCopy -benchtime 1x ./replicate
func BenchmarkCheckpointCopy(b *testing.B) {
	kvmtest.Require(b)
	for _, pages := range []int{100, 4096, 65536} {
		for _, mode := range []CopyMode{CopyStop, CopyCoW} {
			for _, pre := range []bool{false, true} {
				b.Run(fmt.Sprintf("pages=%d/copy=%s/pre=%v", pages, mode, pre), func(b *testing.B) {
					for range b.N {
						benchCheckpointCopy(b, pages, mode, pre)
					}
				})
			}
		}
	}
}

func benchCheckpointCopy(b *testing.B, pages int, mode CopyMode, pre bool) {
	const warmup, epochs = 3, 15
	mem := uint64(64 << 20)
	for mem < dirtyBase+uint64(pages)*guestmem.PageSize+1<<20 {
		mem *= 2
	}
	m, err := vmm.New(vmm.Config{MemSize: mem, CPUs: 1, Kernel: tinyguest.Kernel(tinyguest.Dirtier(dirtyBase, uint32(pages), passGPA)),
		Initrd: []byte("x"), Cmdline: "x", Console: io.Discard})
	if err != nil {
		b.Fatal(err)
	}
	defer m.Close()
	if err := m.Start(); err != nil {
		b.Fatal(err)
	}
	// Long enough for the Dirtier to write every page once per epoch (it
	// is emulated: about 10 µs a page).
	epoch := 50 * time.Millisecond
	if pages > 4096 {
		epoch = time.Second
	}
	rep, err := StartReplication(context.Background(), m, ReplicateConfig{Transport: NewNullTransport(), Name: "bench",
		Epoch: epoch, Copy: mode, NoPreHarvest: !pre, Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		b.Fatal(err)
	}
	defer rep.Stop()
	deadline := time.Now().Add(5 * time.Minute)
	for rep.Stats().Epochs < warmup+epochs+1 {
		if time.Now().After(deadline) {
			b.Fatal("too slow")
		}
		time.Sleep(10 * time.Millisecond)
	}
	recent := rep.Recent()[warmup : warmup+epochs]
	med := func(f func(EpochStats) time.Duration) float64 {
		var ds []time.Duration
		for _, es := range recent {
			ds = append(ds, f(es))
		}
		slices.Sort(ds)
		return float64(ds[len(ds)/2].Microseconds())
	}
	var dirty []int
	for _, es := range recent {
		dirty = append(dirty, es.DirtyPages)
	}
	slices.Sort(dirty)
	b.ReportMetric(float64(dirty[len(dirty)/2]), "dirty-pages")
	b.ReportMetric(med(func(es EpochStats) time.Duration { return es.Pause }), "pause-µs")
	b.ReportMetric(med(func(es EpochStats) time.Duration { return es.Stop }), "stop-µs")
	b.ReportMetric(med(func(es EpochStats) time.Duration { return es.Harvest }), "harvest-µs")
	b.ReportMetric(med(func(es EpochStats) time.Duration { return es.PreHarvest }), "preharvest-µs")
	b.ReportMetric(med(func(es EpochStats) time.Duration { return es.Copy }), "copy-µs")
	b.ReportMetric(med(func(es EpochStats) time.Duration { return es.State }), "state-µs")
	b.ReportMetric(med(func(es EpochStats) time.Duration { return es.Background }), "background-µs")
	b.ReportMetric(med(func(es EpochStats) time.Duration { return es.Length }), "epoch-µs")
	if mode == CopyCoW {
		if recent[0].CopyMode != string(CopyCoW) {
			b.Fatalf("copied %s, not cow", recent[0].CopyMode)
		}
		st := rep.cow.Stats()
		b.ReportMetric(float64(st.Faults), "faults")
		b.ReportMetric(float64(st.ArmedWrites), "armed-writes")
	}
}

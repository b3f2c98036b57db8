package main

import (
	"context"
	"fmt"
	"os"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"govmm/guestimg"
	"govmm/internal/kvmtest"
	"govmm/replicate"
	"govmm/replicate/stream"
	"govmm/vmm"
)

// reqTimeout bounds one request of the test clients: long enough for the
// lab's emulated guest to be migrated or taken over meanwhile.
const reqTimeout = 3 * time.Minute

// migrations is how many times TestGuestMigrateUnderLoad moves the guest:
// a few in CI, more with GOVMM_SOAK_MIGRATIONS (make soak).
func migrations(t *testing.T) int {
	if s := os.Getenv("GOVMM_SOAK_MIGRATIONS"); s != "" {
		n, err := strconv.Atoi(s)
		require.NoError(t, err, "GOVMM_SOAK_MIGRATIONS")
		return n
	}
	return 3
}

// The booted default guest is live-migrated back and forth between two
// machines on one bridge, under network and disk load: a client holds one
// keep-alive HTTP connection and drives POST /incr and POST /append over
// it before, during and after each move, a second connection appends 2 KiB
// lines and reads the log back, and inside the guest dd reads the raw disk
// with O_DIRECT (device DMA into guest memory) while a dirtier writes
// memory. At every cut the destination's memory equals the source's page
// by page and its disk equals the source's; the source never sends a frame
// or writes its disk after the cut; the counter goes up by exactly one
// each time and every acknowledged line is in GET /log.
func TestGuestMigrateUnderLoad(t *testing.T) {
	kvmtest.RequireLinuxBoot(t)
	r := newRig(t)
	n := migrations(t)
	disks := [2]string{r.blankDisk("a.img", 64<<20), r.blankDisk("b.img", 64<<20)}
	taps := [2]string{"gva", "gvb"}
	src := r.newVM("vm0", taps[0], disks[0], true)
	require.NoError(t, src.m.Start())
	src.waitConsole(t, guestimg.ReadyLine, 5*time.Minute)
	src.guestLoad()

	k, kb := r.dialGuest(t), r.dialGuest(t)
	h := &history{}
	stopLoad := startLoad(t, h, k, kb)
	h.waitAnswers(t, 5, 2*time.Minute, "before migrating")

	for i := 1; i <= n; i++ {
		side := i % 2
		start := time.Now()
		dst := r.migrate(t, src, fmt.Sprintf("vm%d", i), taps[side], disks[side])
		h.waitAnswers(t, 3, 2*time.Minute, fmt.Sprintf("after migration %d", i))
		// The console works too: the shell runs a command typed there.
		dst.typeLine(fmt.Sprintf("echo $((%d+1))-after-move", 1000*i))
		dst.waitConsole(t, fmt.Sprintf("%d-after-move", 1000*i+1), 2*time.Minute)
		answers, _, _ := h.state()
		t.Logf("migration %d/%d: the client has %d answers, 3 of them after the move (%v since it started)",
			i, n, answers, time.Since(start).Round(time.Millisecond))
		src = dst
	}
	stopLoad()
	h.checkLog(t, k)
}

// startLoad starts the two clients (the checked one on k, the bulk one on
// kb); the returned function stops them and waits. It is idempotent. If
// the test fails, the connections are closed first, so that the clients
// do not wait out their request timeouts.
func startLoad(t *testing.T, h *history, k, kb *kaClient) (stop func()) {
	done := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(2)
	go func() { defer wg.Done(); h.drive(k, "line", done, reqTimeout) }()
	go func() { defer wg.Done(); bulkLoad(kb, h, done, reqTimeout) }()
	var once sync.Once
	stop = func() {
		once.Do(func() {
			if t.Failed() {
				k.c.Close()
				kb.c.Close()
			}
			close(done)
			wg.Wait()
		})
	}
	t.Cleanup(stop)
	return stop
}

// cutCheck is what a migration's cut looked like from both sides.
type cutCheck struct {
	err                error
	memDiff, diskDiff  int
	memDesc, diskDesc  []string
	srcSent, srcAfter  uint64   // frames the source had put on its TAP at the cut, and once it closed
	srcDisk, srcClosed [32]byte // the source's disk at the cut and once it closed
}

// migrate moves the running guest of src to a new machine on tap with
// disk (the destination's copy: the source's disk is copied there after
// the migration's disk log is armed, and the writes made meanwhile travel
// in the final checkpoint), checks the cut, and returns the destination
// once it runs. src is closed.
func (r *rig) migrate(t *testing.T, src *guestVM, name, tap, disk string) *guestVM {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	require.NoError(t, copyFile(src.disk, disk))
	df, err := os.OpenFile(disk, os.O_RDWR, 0)
	require.NoError(t, err)
	defer df.Close()

	var (
		dst  *guestVM
		chk  cutCheck
		once sync.Once
	)
	fail := func(err error) { once.Do(func() { chk.err = err }) }
	sb, err := replicate.NewStandby(replicate.StandbyConfig{Listen: "127.0.0.1:0", Insecure: true, Disks: []*os.File{df},
		Build: func(stream.Identity) (*vmm.Machine, error) {
			g, err := r.buildVM(name, tap, disk, false)
			if err != nil {
				return nil, err
			}
			dst = g
			return g.m, nil
		},
		BeforeStart: func(m *vmm.Machine, _ *vmm.MachineState) error {
			// The source stays paused at the cut for good.
			chk.memDiff, chk.memDesc = pageDiff(src.m.Memory(), m.Memory(), 20)
			var err error
			chk.diskDiff, chk.diskDesc, err = fileDiff(src.disk, disk, 20)
			if err != nil {
				fail(err)
			}
			return nil
		}})
	require.NoError(t, err)
	defer sb.Close()
	type received struct {
		m   *vmm.Machine
		err error
	}
	recv := make(chan received, 1)
	go func() {
		m, err := sb.ReceiveMigration(ctx)
		recv <- received{m, err}
	}()

	res, err := replicate.Migrate(ctx, src.m, replicate.MigrateConfig{To: sb.Addr(), Insecure: true, Name: src.f.name,
		Disks: src.f.diskLogs, Progress: func(p replicate.Progress) {
			switch {
			case p.Phase == "precopy" && p.Round == 1:
				// The disk log is armed: the copy and the log together
				// give the destination the source's disk at the cut.
				if err := copyFile(src.disk, disk); err != nil {
					fail(err)
				}
			case p.Phase == "stop-and-copy":
				// Paused and quiesced: this is the cut.
				var err error
				if chk.srcSent, err = r.tapSent(src.tap); err != nil {
					fail(err)
				}
				if chk.srcDisk, err = fileHash(src.disk); err != nil {
					fail(err)
				}
			}
		}})
	require.NoError(t, err, "migrate")
	got := <-recv
	require.NoError(t, got.err, "receive migration")
	announce(dst.f.nics, r.guestIP.String())
	t.Logf("%s -> %s: %d rounds, %d pages, %d MiB, downtime %v, total %v", src.name, name,
		res.Rounds, res.PagesSent, res.BytesSent>>20, res.Downtime.Round(time.Millisecond), res.TotalTime.Round(time.Millisecond))

	// What the source did after the cut, once it is gone. The pause gives
	// a source that still runs its devices time to show it.
	time.Sleep(500 * time.Millisecond)
	src.close()
	chk.srcAfter, err = r.tapSent(src.tap)
	require.NoError(t, err)
	chk.srcClosed, err = fileHash(src.disk)
	require.NoError(t, err)

	require.NoError(t, chk.err)
	require.Zero(t, chk.memDiff, "pages of the destination that differ from the source's at the cut:\n%s", joinLines(chk.memDesc))
	require.Zero(t, chk.diskDiff, "disk blocks of the destination that differ from the source's at the cut:\n%s", joinLines(chk.diskDesc))
	require.Equal(t, chk.srcSent, chk.srcAfter, "frames the source sent after the cut")
	require.Equal(t, chk.srcDisk, chk.srcClosed, "the source's disk changed after the cut")
	return dst
}

func joinLines(s []string) string {
	out := ""
	for _, l := range s {
		out += "  " + l + "\n"
	}
	return out
}

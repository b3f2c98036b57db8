package witness

import (
	"errors"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

const L = time.Second

func acq(holder string) *request { return &request{op: opAcquire, vm: "vm0", holder: holder, lease: L} }
func claim(holder string, base uint64) *request {
	return &request{op: opAcquire, base: true, gen: base, vm: "vm0", holder: holder, lease: L}
}
func renew(holder string, gen uint64) *request {
	return &request{op: opRenew, gen: gen, vm: "vm0", holder: holder}
}
func resign(holder string, gen uint64) *request {
	return &request{op: opResign, gen: gen, vm: "vm0", holder: holder}
}

// step is one request at a witness time, and what it must answer.
type step struct {
	at     time.Duration
	q      *request
	result result
	gen    uint64 // generation in the answer
	holder string // holder in the answer
}

func TestTableRules(t *testing.T) {
	tests := []struct {
		name  string
		steps []step
	}{
		{"first acquire is generation 1", []step{
			{0, acq("P"), resultOK, 1, "P"},
		}},
		{"acquire while another lease is valid is held", []step{
			{0, acq("P"), resultOK, 1, "P"},
			{L - 1, acq("Q"), resultHeld, 1, "P"},
		}},
		{"acquire after the lease ran out is the next generation", []step{
			{0, acq("P"), resultOK, 1, "P"},
			{L, acq("Q"), resultOK, 2, "Q"},
		}},
		{"a retried acquire finds its own grant", []step{
			{0, acq("P"), resultOK, 1, "P"},
			{L / 2, acq("P"), resultOK, 1, "P"},
		}},
		{"renew extends from its arrival", []step{
			{0, acq("P"), resultOK, 1, "P"},
			{L / 2, renew("P", 1), resultOK, 1, "P"},
			{L + L/4, claim("S", 1), resultHeld, 1, "P"},
			{L + L/2, claim("S", 1), resultOK, 2, "S"},
		}},
		{"claim refused while the lease is valid", []step{
			{0, acq("P"), resultOK, 1, "P"},
			{L - 1, claim("S", 1), resultHeld, 1, "P"},
		}},
		{"claim of a newer generation is superseded", []step{
			{0, acq("P"), resultOK, 1, "P"},
			{L, claim("S", 1), resultOK, 2, "S"},
			{L, claim("T", 1), resultSuperseded, 2, "S"},
		}},
		{"claim of an unknown VM", []step{
			{0, claim("S", 1), resultUnknown, 0, ""},
		}},
		{"claim beyond the current generation is unknown", []step{
			{0, acq("P"), resultOK, 1, "P"},
			{L, claim("S", 5), resultUnknown, 1, "P"},
		}},
		{"a retried claim finds its own grant", []step{
			{0, acq("P"), resultOK, 1, "P"},
			{L, claim("S", 1), resultOK, 2, "S"},
			{L + 1, claim("S", 1), resultOK, 2, "S"},
		}},
		{"the holder advances while its lease is valid", []step{
			{0, acq("P"), resultOK, 1, "P"},
			{L / 2, claim("P", 1), resultOK, 2, "P"},
			{2 * L, claim("S", 1), resultSuperseded, 2, "P"},
		}},
		{"renew of a superseded generation", []step{
			{0, acq("P"), resultOK, 1, "P"},
			{L, claim("S", 1), resultOK, 2, "S"},
			{L, renew("P", 1), resultSuperseded, 2, "S"},
		}},
		{"renew after expiry with nobody claiming", []step{
			{0, acq("P"), resultOK, 1, "P"},
			{5 * L, renew("P", 1), resultOK, 1, "P"},
			{5*L + L/2, claim("S", 1), resultHeld, 1, "P"},
		}},
		{"renew by another holder of the same generation", []step{
			{0, acq("P"), resultOK, 1, "P"},
			{0, renew("Q", 1), resultSuperseded, 1, "P"},
		}},
		{"renew of a generation the witness never granted", []step{
			{0, acq("P"), resultOK, 1, "P"},
			{0, renew("P", 2), resultUnknown, 1, "P"},
		}},
		{"resign lets a claim in at once", []step{
			{0, acq("P"), resultOK, 1, "P"},
			{L / 4, resign("P", 1), resultOK, 1, "P"},
			{L / 4, claim("S", 1), resultOK, 2, "S"},
		}},
		{"resign by a stranger is superseded", []step{
			{0, acq("P"), resultOK, 1, "P"},
			{0, resign("Q", 1), resultSuperseded, 1, "P"},
			{L / 2, claim("S", 1), resultHeld, 1, "P"},
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var saved []durable
			tab := newTable(nil, 0, func(d []durable) error { saved = d; return nil }, time.Minute, 10)
			for i, s := range tt.steps {
				rep, g := tab.apply(s.at, s.q)
				assert.Equal(t, s.result, rep.result, "step %d: %v by %s", i, s.q.op, s.q.holder)
				assert.Equal(t, s.gen, rep.gen, "step %d: generation", i)
				assert.Equal(t, s.holder, rep.holder, "step %d: holder", i)
				if g != nil {
					require.Equal(t, resultOK, rep.result)
					require.Equal(t, g.Generation, saved[0].Generation, "step %d: a grant is saved", i)
				}
			}
		})
	}
}

func TestTableSaveFailureGrantsNothing(t *testing.T) {
	fail := errors.New("disk full")
	tab := newTable(nil, 0, func([]durable) error { return fail }, time.Minute, 10)
	rep, g := tab.apply(0, acq("P"))
	require.Nil(t, g)
	require.Equal(t, resultError, rep.result)
	require.Contains(t, rep.message, "disk full")
	require.Empty(t, tab.recs)

	// A save that may have reached the disk breaks the table: it grants
	// and renews nothing more (a restart reads what the disk holds).
	tab.save = func([]durable) error { return nil }
	rep, _ = tab.apply(0, acq("P"))
	require.Equal(t, resultOK, rep.result)
	tab.save = func([]durable) error { return errSaveUncertain }
	rep, g = tab.apply(L, acq("Q"))
	require.Equal(t, resultError, rep.result)
	require.Nil(t, g)
	require.ErrorIs(t, tab.broken, errSaveUncertain)
	for _, q := range []*request{renew("P", 1), acq("Q"), claim("Q", 1)} {
		rep, _ = tab.apply(L, q)
		require.Equal(t, resultError, rep.result)
		require.Contains(t, rep.message, "must be restarted")
	}
}

func TestTableRestartWaitsOneLease(t *testing.T) {
	tab := newTable([]durable{{VM: "vm0", Generation: 7, Holder: "P", Lease: L}}, 100*L,
		func([]durable) error { return nil }, time.Minute, 10)
	rep, _ := tab.apply(100*L+L-1, claim("S", 7))
	require.Equal(t, resultHeld, rep.result)
	rep, _ = tab.apply(100*L+L, claim("S", 7))
	require.Equal(t, resultOK, rep.result)
	require.Equal(t, uint64(8), rep.gen)
}

func TestTableLimits(t *testing.T) {
	tab := newTable(nil, 0, func([]durable) error { return nil }, 5*time.Second, 1)
	q := acq("P")
	q.lease = time.Hour
	rep, _ := tab.apply(0, q)
	require.Equal(t, 5*time.Second, rep.lease, "lease capped at the witness's maximum")
	q = acq("P")
	q.vm = "vm1"
	rep, _ = tab.apply(0, q)
	require.Equal(t, resultError, rep.result)
	require.Contains(t, rep.message, "witness full")
}

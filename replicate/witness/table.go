package witness

import (
	"errors"
	"fmt"
	"maps"
	"slices"
	"time"
)

// durable is the part of a VM's record that survives a restart of the
// witness: which generation is current and who holds it. Lease expiries
// are not durable: after a restart the witness counts every lease as
// freshly renewed (see newTable).
type durable struct {
	VM         string
	Generation uint64
	Holder     string
	Lease      time.Duration
}

type entry struct {
	durable
	expires  time.Duration // witness clock; the lease holds while now < expires
	renewals uint64        // of this generation, since the witness started
}

// grant is a generation handed out (for the log, and for tests).
type grant struct {
	VM         string
	Generation uint64
	Holder     string
	Previous   string // the holder of the generation before, if any
}

// table is the witness's state machine, kept apart from the network so
// that it can be driven by a simulation. The server serializes calls to
// apply; table has no lock of its own.
type table struct {
	recs     map[string]*entry
	save     func([]durable) error // makes a new generation durable before it is granted
	maxLease time.Duration
	maxVMs   int
	// broken is set when a save may or may not have reached the disk;
	// from then on the table answers nothing but errors, and the server
	// stops.
	broken error
}

// newTable loads recs at witness time now. The witness does not know when
// a lease it granted before its restart runs out, so it treats every one
// as renewed at now: a claim must wait a full lease after the restart.
// That is never shorter than the real remainder: the last renewal reached
// the witness before it stopped, so before now.
func newTable(recs []durable, now time.Duration, save func([]durable) error, maxLease time.Duration, maxVMs int) *table {
	t := &table{recs: make(map[string]*entry, len(recs)), save: save, maxLease: maxLease, maxVMs: maxVMs}
	for _, d := range recs {
		t.recs[d.VM] = &entry{durable: d, expires: now + d.Lease}
	}
	return t
}

func (t *table) durables() []durable {
	out := make([]durable, 0, len(t.recs))
	for _, k := range slices.Sorted(maps.Keys(t.recs)) {
		out = append(out, t.recs[k].durable)
	}
	return out
}

func (t *table) record(vm string, now time.Duration) Record {
	e := t.recs[vm]
	if e == nil {
		return Record{VM: vm}
	}
	return Record{VM: vm, Generation: e.Generation, Holder: e.Holder, Lease: e.Lease,
		Remaining: max(e.expires-now, 0), Renewals: e.renewals}
}

func (t *table) records(now time.Duration) []Record {
	out := make([]Record, 0, len(t.recs))
	for _, k := range slices.Sorted(maps.Keys(t.recs)) {
		out = append(out, t.record(k, now))
	}
	return out
}

func (t *table) clampLease(d time.Duration) time.Duration {
	switch {
	case d == 0:
		return min(DefaultLease, t.maxLease)
	case d < MinLease:
		return MinLease
	case d > t.maxLease:
		return t.maxLease
	}
	return d
}

// apply answers one request at witness time now. Its rules are the
// protocol (docs/FENCING.md):
//
//   - acquire, no base: a new generation (current+1, or 1) once no lease
//     is valid; the asker gets its lease from now.
//   - acquire with base b: generation b+1 if b is current and either its
//     lease ran out (a standby's claim) or the asker holds b (the holder
//     advancing its own generation).
//   - renew g: extends the lease of g if the asker holds g, which is
//     current; a lower g is superseded (the asker is fenced).
//   - resign g: ends the lease of g now.
//   - status: the record.
//
// A retried acquire whose grant was made (its reply lost) finds the asker
// holding the generation it asked for and counts as a renewal, so retries
// are harmless. A new generation is saved before it is granted; if saving
// fails nothing changes and the asker is refused. If the save may have
// reached the disk (renamed, directory not synced), the table breaks:
// see broken. (Long, on purpose: these rules are the argument of
// docs/FENCING.md, one case per request, and read best in one place.)
func (t *table) apply(now time.Duration, q *request) (reply, *grant) {
	e := t.recs[q.vm]
	answer := func(r result, msg string) reply {
		rec := t.record(q.vm, now)
		return reply{id: q.id, result: r, lease: rec.Lease, gen: rec.Generation, remaining: rec.Remaining,
			renewals: rec.Renewals, holder: rec.Holder, message: msg}
	}
	if t.broken != nil {
		return reply{id: q.id, result: resultError, message: fmt.Sprintf("witness state uncertain, it must be restarted: %v", t.broken)}, nil
	}
	renew := func() reply {
		e.expires = max(e.expires, now+e.Lease)
		e.renewals++
		return answer(resultOK, "")
	}
	switch q.op {
	case opStatus:
		if e == nil {
			return answer(resultUnknown, ""), nil
		}
		return answer(resultOK, ""), nil
	case opRenew, opResign:
		switch {
		case e == nil || q.gen > e.Generation:
			return answer(resultUnknown, ""), nil
		case q.gen < e.Generation || q.holder != e.Holder:
			return answer(resultSuperseded, ""), nil
		case q.op == opRenew:
			return renew(), nil
		default:
			e.expires = min(e.expires, now)
			return answer(resultOK, ""), nil
		}
	case opAcquire:
	default:
		return answer(resultError, fmt.Sprintf("unknown operation %v", q.op)), nil
	}

	mine := e != nil && e.Holder == q.holder
	if q.base {
		switch {
		case e == nil || q.gen > e.Generation:
			return answer(resultUnknown, ""), nil
		case mine && e.Generation == q.gen+1:
			return renew(), nil // our own grant, its reply lost
		case e.Generation != q.gen:
			return answer(resultSuperseded, ""), nil
		case !mine && now < e.expires:
			return answer(resultHeld, ""), nil
		}
	} else {
		switch {
		case mine:
			return renew(), nil
		case e != nil && now < e.expires:
			return answer(resultHeld, ""), nil
		}
	}
	if e == nil && len(t.recs) >= t.maxVMs {
		return answer(resultError, fmt.Sprintf("witness full: it protects %d VMs already", len(t.recs))), nil
	}
	next := durable{VM: q.vm, Generation: 1, Holder: q.holder, Lease: t.clampLease(q.lease)}
	g := &grant{VM: q.vm, Holder: q.holder}
	if e != nil {
		next.Generation = e.Generation + 1
		g.Previous = e.Holder
	}
	g.Generation = next.Generation
	all := t.durables()
	if i := slices.IndexFunc(all, func(d durable) bool { return d.VM == q.vm }); i >= 0 {
		all[i] = next
	} else {
		all = append(all, next)
		slices.SortFunc(all, func(a, b durable) int {
			switch {
			case a.VM < b.VM:
				return -1
			case a.VM > b.VM:
				return 1
			}
			return 0
		})
	}
	if err := t.save(all); err != nil {
		if errors.Is(err, errSaveUncertain) {
			// The disk may hold the new generation or the old one: the
			// memory can follow neither safely (ahead of the disk, a
			// restart would forget a grant; behind it, the next save
			// would). Stop answering; a restart reads the disk.
			t.broken = err
		}
		return answer(resultError, fmt.Sprintf("state not saved, nothing granted: %v", err)), nil
	}
	t.recs[q.vm] = &entry{durable: next, expires: now + next.Lease}
	return answer(resultOK, ""), g
}

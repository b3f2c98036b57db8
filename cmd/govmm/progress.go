package main

import (
	"fmt"
	"io"
	"sync"
	"time"
)

// transferBar shows bytes moving toward a known total: the initial sync of
// replication, the image build's package download. On a terminal it
// redraws one line at most every ctlBarEvery, with a bar, the bytes, the
// total and the rate (as ctlBar does for a migration); elsewhere it prints
// a plain line every transferLineEvery, which reads well in a log. finish
// ends it with one line of what was moved, in how long. Its methods may be
// called from any goroutine.
type transferBar struct {
	w    io.Writer
	tty  bool
	what string // e.g. "initial sync"

	mu                  sync.Mutex // guards the rest
	start, last         time.Time  // the first update, the last line drawn
	done, total         uint64
	note                string // e.g. "round 3"
	drawn, finished     bool
	lineOpen            bool // on a terminal: the bar's line awaits its newline
	pending, anyUpdates bool // an update arrived since the last draw; at all
}

// transferLineEvery is how often a transferBar that is not on a terminal
// prints a line.
const transferLineEvery = 2 * time.Second

func newTransferBar(w io.Writer, tty bool, what string) *transferBar {
	return &transferBar{w: w, tty: tty, what: what}
}

// update records that done of total bytes have moved; note says more (or
// is empty).
func (b *transferBar) update(done, total uint64, note string) {
	b.mu.Lock()
	defer b.mu.Unlock()
	now := time.Now()
	if !b.anyUpdates {
		b.start, b.last, b.anyUpdates = now, now, true
	}
	b.done, b.total, b.note, b.pending = done, total, note, true
	every := transferLineEvery
	if b.tty {
		every = ctlBarEvery
	}
	if now.Sub(b.last) >= every || (b.tty && !b.drawn) {
		b.draw(now)
	}
}

// finish draws the last state without its note (which told what was
// going on) and ends the bar's line: on a terminal the bar stays, with a
// newline; elsewhere one line says what moved in how long. It is
// idempotent, and says nothing if no update came.
func (b *transferBar) finish() {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.finished || !b.anyUpdates {
		return
	}
	b.finished, b.note = true, ""
	now := time.Now()
	if b.tty {
		b.draw(now)
		fmt.Fprintln(b.w)
		return
	}
	took := now.Sub(b.start)
	fmt.Fprintf(b.w, "govmm: %s: %s in %s (%s)\n", b.what, ctlBytes(b.done), ctlDuration(took), rate(b.done, took))
}

func (b *transferBar) noteSuffix() string {
	if b.note == "" {
		return ""
	}
	return ", " + b.note
}

// draw writes the current state; b.mu is held.
func (b *transferBar) draw(now time.Time) {
	frac := 1.0
	if b.total > 0 {
		frac = float64(min(b.done, b.total)) / float64(b.total)
	}
	took := now.Sub(b.start)
	if b.tty {
		// \r returns to the line's start and \x1b[K clears what a longer
		// earlier line left.
		fmt.Fprintf(b.w, "\r%s [%s] %3d%%  %s / %s  %s%s\x1b[K", b.what, barText(frac), int(frac*100),
			ctlBytes(b.done), ctlBytes(b.total), rate(b.done, took), b.noteSuffix())
	} else {
		fmt.Fprintf(b.w, "govmm: %s: %d%% (%s of %s, %s)%s\n", b.what, int(frac*100),
			ctlBytes(b.done), ctlBytes(b.total), rate(b.done, took), b.noteSuffix())
	}
	b.drawn, b.last, b.pending, b.lineOpen = true, now, false, b.tty
}

// interleave returns a writer for log lines that share b's output: on a
// terminal, each write first ends the bar's line, which the next update
// draws anew below the log line.
func (b *transferBar) interleave() io.Writer { return interleaved{b} }

type interleaved struct{ b *transferBar }

func (l interleaved) Write(p []byte) (int, error) {
	l.b.mu.Lock()
	defer l.b.mu.Unlock()
	if l.b.lineOpen {
		fmt.Fprintln(l.b.w)
		l.b.lineOpen = false
	}
	return l.b.w.Write(p)
}

// rate is n bytes over d, per second, in binary units.
func rate(n uint64, d time.Duration) string {
	if d <= 0 {
		return "- /s"
	}
	return ctlBytes(uint64(float64(n)/d.Seconds())) + "/s"
}

package main

// Progress for a person who waits: transferBar for bytes toward a total
// (initial sync, downloads), ctlBar for a migration's rounds.

import (
	"fmt"
	"io"
	"os"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"govmm/ctlapi"
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

// ctlBar draws a migration's progress. On a terminal it redraws one line
// (at most every ctlBarEvery, and at each new round or phase); elsewhere it
// prints one line per round or phase, which reads well in a log. Each
// round's bar fills as its remaining pages drain; the largest remaining
// count seen in a round stands for the round's size.
type ctlBar struct {
	w            io.Writer
	tty          bool
	round        int
	phase        string
	roundPages   uint64
	last         ctlapi.Progress
	drawn        bool
	lastDraw     time.Time
	lastProgress bool // an update arrived since the last draw
}

const (
	ctlBarWidth = 30
	ctlBarEvery = 100 * time.Millisecond
)

func newCtlBar(w io.Writer, tty bool) *ctlBar { return &ctlBar{w: w, tty: tty, round: -1} }

func (b *ctlBar) update(p ctlapi.Progress) {
	changed := p.Round != b.round || p.Phase != b.phase
	if changed {
		b.round, b.phase, b.roundPages = p.Round, p.Phase, 0
	}
	b.roundPages = max(b.roundPages, p.RemainingPages)
	b.last, b.lastProgress = p, true
	switch {
	case !b.tty && changed:
		fmt.Fprintf(b.w, "migrate: %s round %d: %s sent, %d pages dirty, %d to send\n",
			p.Phase, p.Round, ctlBytes(p.BytesSent), p.DirtyPages, p.RemainingPages)
	case b.tty && (changed || time.Since(b.lastDraw) >= ctlBarEvery):
		b.draw()
	}
}

// finish draws the last state and ends the bar's line.
func (b *ctlBar) finish() {
	if !b.tty || !b.drawn {
		return
	}
	if b.lastProgress {
		b.draw()
	}
	fmt.Fprintln(b.w)
}

func (b *ctlBar) draw() {
	p := b.last
	frac := 1.0
	if p.Phase != ctlapi.PhaseDone && b.roundPages > 0 {
		frac = float64(b.roundPages-min(p.RemainingPages, b.roundPages)) / float64(b.roundPages)
	}
	// \r returns to the line's start and \x1b[K clears what a longer
	// earlier line left.
	fmt.Fprintf(b.w, "\r%-13s round %-3d [%s] %3d%%  %s sent, %d dirty\x1b[K",
		p.Phase, p.Round, barText(frac), int(frac*100), ctlBytes(p.BytesSent), p.DirtyPages)
	b.drawn, b.lastDraw, b.lastProgress = true, time.Now(), false
}

// barText is a progress bar ctlBarWidth wide, frac (0..1) of it filled:
// "=====>    ".
func barText(frac float64) string {
	fill := int(frac * ctlBarWidth)
	bar := strings.Repeat("=", fill)
	if fill < ctlBarWidth {
		bar += ">" + strings.Repeat(" ", ctlBarWidth-fill-1)
	}
	return bar
}

// ctlIsTerminal reports whether f is a terminal.
func ctlIsTerminal(f *os.File) bool {
	_, err := unix.IoctlGetTermios(int(f.Fd()), unix.TCGETS)
	return err == nil
}

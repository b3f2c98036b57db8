package vmm

import (
	"context"
	"fmt"
	"io"
	"sync"
	"time"

	"govmm/vmm/devstate"
)

// COM1 and its ISA interrupt.
const (
	COM1Base = 0x3f8
	COM1IRQ  = 4
)

// 8250/16550A registers (offsets from the base) and bits.
const (
	uartRBR = 0 // read: receive buffer; write: THR; DLL when DLAB
	uartIER = 1 // DLM when DLAB
	uartIIR = 2 // read: interrupt id; write: FCR
	uartLCR = 3
	uartMCR = 4
	uartLSR = 5
	uartMSR = 6
	uartSCR = 7

	ierRDI  = 0x01 // received data available
	ierTHRI = 0x02 // transmitter holding register empty
	ierRLSI = 0x04
	ierMSI  = 0x08

	iirNoInt   = 0x01
	iirTHRI    = 0x02
	iirRDI     = 0x04
	iirFIFOsOn = 0xc0

	fcrEnable = 0x01
	fcrClrRx  = 0x02

	lcrDLAB = 0x80

	mcrLoop = 0x10

	lsrDR   = 0x01
	lsrTHRE = 0x20
	lsrTEMT = 0x40

	msrCTS = 0x10
	msrDSR = 0x20
	msrDCD = 0x80

	uartRxMax = 64 << 10
)

// UART is a 16550A on COM1: output goes to a writer, input comes from
// Input, interrupts through an IRQ line. Transmission is instantaneous.
type UART struct {
	irq func(level bool) // drives the interrupt line

	mu         sync.Mutex // guards the registers and rx
	ier, lcr   uint8
	mcr, scr   uint8
	dll, dlm   uint8
	fifo       bool
	thrPending bool // THR-empty interrupt pending
	rx         []byte
	line       bool // current level of the interrupt line

	out *consoleWriter
}

var _ Device = (*UART)(nil)

// NewUART returns a UART writing to out; irq drives its interrupt line.
func NewUART(out io.Writer, irq func(level bool)) *UART {
	return &UART{irq: irq, out: newConsoleWriter(out), dll: 12}
}

// Name implements Device.
func (u *UART) Name() string { return "uart-com1" }

// Input queues bytes for the guest to read. Bytes beyond a 64 KiB backlog
// are dropped, as a real line would overrun.
func (u *UART) Input(b []byte) {
	u.mu.Lock()
	room := uartRxMax - len(u.rx)
	if len(b) > room {
		b = b[:room]
	}
	u.rx = append(u.rx, b...)
	u.updateLocked()
	u.mu.Unlock()
}

// Flush writes out any buffered console output.
func (u *UART) Flush() { u.out.Flush() }

func (u *UART) iirLocked() uint8 {
	id := uint8(iirNoInt)
	switch {
	case u.ier&ierRDI != 0 && len(u.rx) > 0:
		id = iirRDI
	case u.ier&ierTHRI != 0 && u.thrPending:
		id = iirTHRI
	}
	if u.fifo {
		id |= iirFIFOsOn
	}
	return id
}

// updateLocked drives the interrupt line to match the pending state.
func (u *UART) updateLocked() {
	level := u.iirLocked()&iirNoInt == 0
	if level != u.line {
		u.line = level
		u.irq(level)
	}
}

// Read implements Device.
func (u *UART) Read(off uint64, data []byte) {
	u.mu.Lock()
	defer u.mu.Unlock()
	var v uint8
	switch off {
	case uartRBR:
		if u.lcr&lcrDLAB != 0 {
			v = u.dll
		} else if len(u.rx) > 0 {
			v = u.rx[0]
			u.rx = u.rx[1:]
			if len(u.rx) == 0 {
				u.rx = nil
			}
		}
	case uartIER:
		if u.lcr&lcrDLAB != 0 {
			v = u.dlm
		} else {
			v = u.ier
		}
	case uartIIR:
		v = u.iirLocked()
		if v&^iirFIFOsOn == iirTHRI {
			u.thrPending = false // reading IIR acknowledges THRE
		}
	case uartLCR:
		v = u.lcr
	case uartMCR:
		v = u.mcr
	case uartLSR:
		v = lsrTHRE | lsrTEMT
		if len(u.rx) > 0 {
			v |= lsrDR
		}
	case uartMSR:
		if u.mcr&mcrLoop != 0 {
			// Loopback: DTR->DSR, RTS->CTS, OUT1->RI, OUT2->DCD.
			m := u.mcr
			v = (m&1)<<5 | (m&2)<<3 | (m&4)<<4 | (m&8)<<4
		} else {
			v = msrDCD | msrDSR | msrCTS
		}
	case uartSCR:
		v = u.scr
	}
	for i := range data {
		data[i] = v
	}
	u.updateLocked()
}

// Write implements Device.
func (u *UART) Write(off uint64, data []byte) {
	if len(data) == 0 {
		return
	}
	v := data[0]
	u.mu.Lock()
	defer u.mu.Unlock()
	switch off {
	case uartRBR:
		if u.lcr&lcrDLAB != 0 {
			u.dll = v
			break
		}
		if u.mcr&mcrLoop != 0 {
			if len(u.rx) < uartRxMax {
				u.rx = append(u.rx, v)
			}
		} else {
			u.out.put(v)
		}
		u.thrPending = true // sent at once: THR is empty again
	case uartIER:
		if u.lcr&lcrDLAB != 0 {
			u.dlm = v
			break
		}
		old := u.ier
		u.ier = v & (ierRDI | ierTHRI | ierRLSI | ierMSI)
		if old&ierTHRI == 0 && u.ier&ierTHRI != 0 {
			u.thrPending = true // THR is always empty
		}
	case uartIIR: // FCR
		u.fifo = v&fcrEnable != 0
		if v&fcrClrRx != 0 {
			u.rx = nil
		}
	case uartLCR:
		u.lcr = v
	case uartMCR:
		u.mcr = v & 0x1f
	case uartSCR:
		u.scr = v
	}
	u.updateLocked()
}

// consoleWriter batches console bytes: a line goes out when it ends, a
// partial line (a prompt, an echoed key) a moment later.
type consoleWriter struct {
	w     io.Writer
	mu    sync.Mutex
	buf   []byte
	timer *time.Timer
}

const consoleFlushDelay = 2 * time.Millisecond

func newConsoleWriter(w io.Writer) *consoleWriter {
	c := &consoleWriter{w: w}
	c.timer = time.AfterFunc(time.Hour, c.Flush)
	c.timer.Stop()
	return c
}

func (c *consoleWriter) put(b byte) {
	c.mu.Lock()
	c.buf = append(c.buf, b)
	if b == '\n' || len(c.buf) >= 4096 {
		c.flushLocked()
	} else if len(c.buf) == 1 {
		c.timer.Reset(consoleFlushDelay)
	}
	c.mu.Unlock()
}

func (c *consoleWriter) Flush() {
	c.mu.Lock()
	c.flushLocked()
	c.mu.Unlock()
}

func (c *consoleWriter) flushLocked() {
	if len(c.buf) == 0 {
		return
	}
	_, _ = c.w.Write(c.buf) // the console has nowhere to report to
	c.buf = c.buf[:0]
}

const (
	uartKind         = "uart-16550a"
	uartStateVersion = 1
)

var _ devstate.Stateful = (*UART)(nil)

// uartState is the UART's saved state, version 1.
type uartState struct {
	IER, LCR, MCR, SCR, DLL, DLM uint8
	FIFO, THRPending             bool
	Line                         bool // the interrupt line's level
	RX                           []byte
}

func (s *uartState) walk(c *devstate.Codec) {
	for _, r := range []*uint8{&s.IER, &s.LCR, &s.MCR, &s.SCR, &s.DLL, &s.DLM} {
		c.U8(r)
	}
	c.Bool(&s.FIFO)
	c.Bool(&s.THRPending)
	c.Bool(&s.Line)
	c.Bytes(&s.RX, uartRxMax)
}

// StateID implements devstate.Stateful.
func (u *UART) StateID() string { return u.Name() }

// StateKind implements devstate.Stateful.
func (u *UART) StateKind() string { return uartKind }

// Quiesce implements devstate.Stateful: the UART never has a request in
// flight, and input arriving while quiesced waits in rx like any other.
func (u *UART) Quiesce(ctx context.Context) error { return nil }

// Resume implements devstate.Stateful.
func (u *UART) Resume() error { return nil }

// SaveState implements devstate.Stateful.
func (u *UART) SaveState() (devstate.State, error) {
	u.mu.Lock()
	s := uartState{IER: u.ier, LCR: u.lcr, MCR: u.mcr, SCR: u.scr, DLL: u.dll, DLM: u.dlm,
		FIFO: u.fifo, THRPending: u.thrPending, Line: u.line, RX: u.rx}
	data := devstate.Encode(s.walk)
	u.mu.Unlock()
	return devstate.State{ID: u.StateID(), Kind: uartKind, Version: uartStateVersion, Data: data}, nil
}

// RestoreState implements devstate.Stateful.
func (u *UART) RestoreState(st devstate.State) error {
	if st.Kind != uartKind || st.Version != uartStateVersion {
		return fmt.Errorf("uart: restore %s version %d: not a %s version %d state", st.Kind, st.Version, uartKind, uartStateVersion)
	}
	var s uartState
	if err := devstate.Decode(st.Data, s.walk); err != nil {
		return fmt.Errorf("uart: restore: %w", err)
	}
	u.mu.Lock()
	defer u.mu.Unlock()
	u.ier, u.lcr, u.mcr, u.scr, u.dll, u.dlm = s.IER, s.LCR, s.MCR, s.SCR, s.DLL, s.DLM
	u.fifo, u.thrPending = s.FIFO, s.THRPending
	u.rx = s.RX
	// The interrupt line lives in the restored IOAPIC/PIC; drive ours to
	// the same level so the next change is an edge.
	u.line = s.Line
	return nil
}

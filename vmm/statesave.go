package vmm

import (
	"bytes"
	"fmt"
	"sync"

	"govmm/kvmapi"
	"govmm/vmm/container"
)

// stateSaver is what EncodeState keeps from one save to the next: the
// state struct with its slices, one XSAVE buffer per vCPU, the section
// scratch and the output buffer. Nothing in it is read back as state:
// every field is saved afresh at every cut, so the bytes are those of a
// full save (TestEncodeStateMatchesFullSave).
type stateSaver struct {
	mu      sync.Mutex // guards the fields below
	st      MachineState
	xsave   [][]uint64
	scratch []byte
	out     bytes.Buffer
}

// EncodeState is SaveState then MarshalBinary, as a checkpoint takes them
// every epoch, with the same result byte for byte, cheaper: buffers are
// reused from call to call (no allocation but the returned copy), and the
// guest's TSC rate, which only a restore changes, is read once. The
// machine must be paused with its devices quiesced. The bytes returned
// are the caller's.
func (m *Machine) EncodeState() ([]byte, error) { return m.EncodeStateWhile(nil) }

// EncodeStateWhile is EncodeState that runs meanwhile (if not nil) on the
// calling goroutine while the vCPU threads read their own state, so that
// the work of a cut that is not the state (a checkpoint's harvest and
// copy) overlaps the vCPUs' ioctls instead of coming before them. The
// machine must be paused with its devices quiesced, and stays so
// throughout: meanwhile runs at the same cut. It must not pause, resume or
// run anything on the vCPUs (the pause lock is held; that would deadlock).
// On this goroutine meanwhile runs first, then the machine-level state
// (chips, clock, devices) is read, then the vCPUs' answers are awaited.
// If meanwhile fails, no state is returned, and the error wraps
// meanwhile's (joined with any vCPU's).
func (m *Machine) EncodeStateWhile(meanwhile func() error) ([]byte, error) {
	s := &m.saver
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(s.xsave) != len(m.vcpus) {
		s.xsave = make([][]uint64, len(m.vcpus))
		for i := range s.xsave {
			s.xsave[i] = make([]uint64, kvmapi.XsaveWords(m.xsave))
		}
	}
	if err := m.saveState(&s.st, s.xsave, meanwhile); err != nil {
		return nil, err
	}
	s.out.Reset()
	if err := s.st.marshalTo(&s.out, &s.scratch); err != nil {
		return nil, err
	}
	return bytes.Clone(s.out.Bytes()), nil
}

// marshalTo writes the state's encoding to b, encoding each section in
// *scratch (grown as needed and kept).
func (s *MachineState) marshalTo(b *bytes.Buffer, scratch *[]byte) error {
	w, err := container.NewWriter(b, container.MagicState, StateVersion)
	if err != nil {
		return err
	}
	c := &sectionCodec{w: w, scratch: scratch}
	s.sections(c)
	if c.err != nil {
		return fmt.Errorf("machine state: %w", c.err)
	}
	if err := w.Close(); err != nil {
		return err
	}
	if b.Len() > MaxStateSize {
		return fmt.Errorf("machine state of %d bytes, at most %d: %w", b.Len(), MaxStateSize, container.ErrTooLarge)
	}
	return nil
}

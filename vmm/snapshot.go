package vmm

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"hash"
	"hash/crc32"
	"io"
	"os"
	"path/filepath"

	"govmm/vmm/container"
	"govmm/vmm/devstate"
	"govmm/vmm/guestmem"
)

// A snapshot file (docs/FORMATS.md) is a GOVMMSNP container: a state
// section holding the encoded MachineState, a config section holding the
// writer's SnapshotConfig (version 3 on), then page sections holding the
// non-zero pages (a new machine's memory is zero, so zero pages are left
// out), then the end section with the CRC32C of all of it. Version 2
// files (no config section) are still read, and so are version 1 files,
// of an older layout of their own (readSnapshotV1).
const snapVersion = 3

// snapFormat is what ReadSnapshot accepts of a version 2 or 3 file.
var snapFormat = container.Format{
	Magic:      container.MagicSnapshot,
	MinVersion: 2, MaxVersion: snapVersion,
	Caps: map[container.Type]int{
		container.TypeState:  MaxStateSize,
		container.TypeConfig: maxConfigSize,
		container.TypePages:  container.MaxPagesPayload,
	},
}

// Setting is one entry of a SnapshotConfig.
type Setting struct {
	Name, Value string
}

// SnapshotConfig is how the snapshot's VM was configured, in the words
// of whoever wrote it: govmm's command records the device flags of
// 'govmm run' ({"net", "none"}, {"disk", "/abs/path,ro"}, ...), so that
// restore can rebuild the same devices without being told again. vmm
// stores the settings in order and never interprets them.
type SnapshotConfig []Setting

// Limits of a config section (docs/FORMATS.md), checked before anything
// is allocated when reading and before anything is written when writing.
const (
	maxConfigSettings = 256
	maxSettingName    = 64
	maxSettingValue   = 4096
	maxConfigSize     = 4 + maxConfigSettings*(4+maxSettingName+4+maxSettingValue)
)

// walk encodes or decodes the config section's payload: u32 count, then
// each setting's name and value as strings.
func (c *SnapshotConfig) walk(codec *devstate.Codec) {
	n := uint32(len(*c))
	codec.U32(&n)
	if n > maxConfigSettings {
		codec.Fail(fmt.Errorf("%d settings, at most %d: %w", n, maxConfigSettings, container.ErrTooLarge))
		return
	}
	if codec.Decoding() {
		*c = make(SnapshotConfig, n)
	}
	for i := range *c {
		codec.String(&(*c)[i].Name, maxSettingName)
		codec.String(&(*c)[i].Value, maxSettingValue)
	}
}

// check refuses a config that a reader would refuse.
func (c SnapshotConfig) check() error {
	if len(c) > maxConfigSettings {
		return fmt.Errorf("config: %d settings, at most %d", len(c), maxConfigSettings)
	}
	for _, s := range c {
		if s.Name == "" || len(s.Name) > maxSettingName || len(s.Value) > maxSettingValue {
			return fmt.Errorf("config: setting %.64q: name of 1..%d bytes and value of at most %d wanted", s.Name, maxSettingName, maxSettingValue)
		}
	}
	return nil
}

// ErrSnapshot marks a snapshot file that is not one, or is damaged.
var ErrSnapshot = errors.New("bad snapshot file")

// SnapshotStats says what a snapshot wrote.
type SnapshotStats struct {
	Bytes      int64
	Pages      uint64 // pages written
	ZeroPages  uint64 // pages elided
	StateBytes int
}

// WriteSnapshot writes st, cfg and the non-zero pages of mem to path
// atomically: a temporary file, fsync, rename. The machine must stay
// paused (or mem otherwise frozen) while it runs.
func WriteSnapshot(path string, st *MachineState, cfg SnapshotConfig, mem *guestmem.Memory) (SnapshotStats, error) {
	var stats SnapshotStats
	if err := cfg.check(); err != nil {
		return stats, fmt.Errorf("snapshot: %w", err)
	}
	state, err := st.MarshalBinary()
	if err != nil {
		return stats, err
	}
	stats.StateBytes = len(state)
	dir := filepath.Dir(path)
	tmp, err := os.CreateTemp(dir, ".snapshot-*")
	if err != nil {
		return stats, fmt.Errorf("snapshot: %w", err)
	}
	defer os.Remove(tmp.Name()) // no-op after the rename
	if stats, err = writeSnapshot(tmp, state, devstate.Encode(cfg.walk), mem, stats); err != nil {
		tmp.Close()
		return stats, fmt.Errorf("snapshot: %w", err)
	}
	if err := tmp.Sync(); err != nil {
		tmp.Close()
		return stats, fmt.Errorf("snapshot: fsync: %w", err)
	}
	if err := tmp.Close(); err != nil {
		return stats, fmt.Errorf("snapshot: %w", err)
	}
	if err := os.Rename(tmp.Name(), path); err != nil {
		return stats, fmt.Errorf("snapshot: %w", err)
	}
	if d, err := os.Open(dir); err == nil {
		_ = d.Sync() // make the rename durable
		d.Close()
	}
	return stats, nil
}

// writeSnapshot writes the container: the state, the config, then the
// non-zero pages in sections of up to container.MaxPagesPerSection.
func writeSnapshot(f *os.File, state, config []byte, mem *guestmem.Memory, stats SnapshotStats) (SnapshotStats, error) {
	bw := bufio.NewWriterSize(f, 1<<20)
	w, err := container.NewWriter(bw, container.MagicSnapshot, snapVersion)
	if err != nil {
		return stats, err
	}
	if err := w.Section(container.TypeState, state); err != nil {
		return stats, err
	}
	if err := w.Section(container.TypeConfig, config); err != nil {
		return stats, err
	}
	var pages container.PageSection
	flush := func() error {
		if pages.Len() == 0 {
			return nil
		}
		err := w.Section(container.TypePages, pages.Payload())
		pages.Reset()
		return err
	}
	var zero [guestmem.PageSize]byte
	for _, r := range mem.Regions() {
		for p := uint64(0); p < r.Pages(); p++ {
			page := r.Host[p*guestmem.PageSize : (p+1)*guestmem.PageSize]
			if string(page) == string(zero[:]) {
				stats.ZeroPages++
				continue
			}
			pages.Add(uint64(r.GPA)+p*guestmem.PageSize, page)
			stats.Pages++
			if pages.Len() == container.MaxPagesPerSection {
				if err := flush(); err != nil {
					return stats, err
				}
			}
		}
	}
	if err := flush(); err != nil {
		return stats, err
	}
	if err := w.Close(); err != nil {
		return stats, err
	}
	stats.Bytes = w.Len()
	return stats, bw.Flush()
}

// SnapshotHeader is what a snapshot file holds before its pages.
type SnapshotHeader struct {
	Version uint16 // the file's format version
	State   *MachineState
	Config  SnapshotConfig // nil before version 3
}

// ReadSnapshotHeader reads a snapshot's machine state and config but not
// its pages, so the caller can build a machine of the right shape with
// the right devices. The state carries its own checksum; the file's,
// which covers the config, is verified by ReadSnapshot.
func ReadSnapshotHeader(path string) (SnapshotHeader, error) {
	var h SnapshotHeader
	f, err := os.Open(path)
	if err != nil {
		return h, err
	}
	defer f.Close()
	br := bufio.NewReader(f)
	if isSnapshotV1(br) {
		h.Version = 1
		h.State, _, err = readSnapHeaderV1(br, nil)
		return h, err
	}
	r, err := container.NewReader(br, snapFormat)
	if err != nil {
		return h, fmt.Errorf("%w: %w", ErrSnapshot, err)
	}
	h.Version = r.Header().Version
	if h.State, err = readSnapState(r); err != nil {
		return h, err
	}
	h.Config, err = readSnapConfig(r)
	return h, err
}

// ReadSnapshotState reads only the machine state of a snapshot
// (ReadSnapshotHeader without the config).
func ReadSnapshotState(path string) (*MachineState, error) {
	h, err := ReadSnapshotHeader(path)
	return h.State, err
}

// readSnapConfig reads the config section, which follows the state from
// version 3 on; before, there is none (nil).
func readSnapConfig(r *container.Reader) (SnapshotConfig, error) {
	if r.Header().Version < 3 {
		return nil, nil
	}
	s, err := r.Next()
	if errors.Is(err, io.EOF) {
		err = fmt.Errorf("no config section: %w", container.ErrFormat)
	}
	if err == nil && s.Type != container.TypeConfig {
		err = fmt.Errorf("%v section where the config belongs: %w", s.Type, container.ErrFormat)
	}
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrSnapshot, err)
	}
	cfg := SnapshotConfig{}
	if err := devstate.Decode(s.Payload, cfg.walk); err != nil {
		return nil, fmt.Errorf("%w: config: %w (%w)", ErrSnapshot, container.ErrFormat, err)
	}
	return cfg, nil
}

// readSnapState reads the state section, which comes first.
func readSnapState(r *container.Reader) (*MachineState, error) {
	s, err := r.Next()
	if err == nil && s.Type != container.TypeState {
		err = fmt.Errorf("%v section where the state belongs: %w", s.Type, container.ErrFormat)
	}
	if errors.Is(err, io.EOF) {
		err = fmt.Errorf("no state section: %w", container.ErrFormat)
	}
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrSnapshot, err)
	}
	var st MachineState
	if err := st.UnmarshalBinary(s.Payload); err != nil {
		return nil, fmt.Errorf("%w: %w", ErrSnapshot, err)
	}
	return &st, nil
}

// isSnapshotV1 peeks at the header: a version 1 file has the same magic
// and its version (then a u32) in the same place.
func isSnapshotV1(br *bufio.Reader) bool {
	b, _ := br.Peek(container.HeaderSize)
	h, err := container.PeekHeader(b)
	// Anything else is the container reader's to refuse, and name.
	return err == nil && h.Magic == container.MagicSnapshot && h.Version == 1 && h.Flags == 0
}

// ReadSnapshot reads a snapshot into mem (a new machine's memory, all
// zero) and returns its machine state. Every page is bounds-checked
// against mem; the file's checksum is verified before returning. On
// error, mem holds garbage and the machine must be discarded, never
// started.
func ReadSnapshot(path string, mem *guestmem.Memory) (*MachineState, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	br := bufio.NewReaderSize(f, 1<<20)
	if isSnapshotV1(br) {
		return readSnapshotV1(br, mem)
	}
	r, err := container.NewReader(br, snapFormat)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrSnapshot, err)
	}
	st, err := readSnapState(r)
	if err != nil {
		return nil, err
	}
	if _, err := readSnapConfig(r); err != nil {
		return nil, err
	}
	if st.Memory.MemSize != mem.Size() {
		return nil, fmt.Errorf("%w: snapshot has %d MiB of memory, machine %d MiB", ErrStateMismatch, st.Memory.MemSize>>20, mem.Size()>>20)
	}
	if err := readSnapPages(r, mem); err != nil {
		return nil, fmt.Errorf("%w: %w", ErrSnapshot, err)
	}
	return st, nil
}

// readSnapPages fills mem from the page sections, up to the end section,
// where the reader verifies the file's checksum.
func readSnapPages(r *container.Reader, mem *guestmem.Memory) error {
	var pages []container.Page
	for {
		s, err := r.Next()
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return err
		}
		if s.Type != container.TypePages {
			return fmt.Errorf("%v section among the pages: %w", s.Type, container.ErrFormat)
		}
		if pages, err = container.ParsePages(s.Payload, pages); err != nil {
			return err
		}
		for _, p := range pages {
			err := mem.Fill(guestmem.GPA(p.GPA), guestmem.PageSize, func(dst []byte) error {
				if p.Data == nil {
					clear(dst)
				} else {
					copy(dst, p.Data)
				}
				return nil
			})
			if err != nil {
				return fmt.Errorf("page %#x: %w", p.GPA, err)
			}
		}
	}
}

// Version 1 files: magic "GOVMMSNP", version (u32), the encoded
// MachineState (u64 length + bytes), then page runs — GPA (u64), page
// count (u32), the pages — with zero pages left out, ended by a run of
// count 0 at GPA ^0, and a CRC32C (u32) of everything before it. Read
// only.
const (
	snapV1End         = ^uint64(0)
	snapV1MaxRunPages = 1 << 16
)

func readSnapHeaderV1(r io.Reader, crc hash.Hash32) (*MachineState, []byte, error) {
	var hdr [20]byte
	if _, err := io.ReadFull(r, hdr[:]); err != nil {
		return nil, nil, fmt.Errorf("%w: version 1 header: %w", ErrSnapshot, container.ErrTruncated)
	}
	n := binary.LittleEndian.Uint64(hdr[12:])
	if n > MaxStateSize {
		return nil, nil, fmt.Errorf("%w: state of %d bytes: %w", ErrSnapshot, n, container.ErrTooLarge)
	}
	state := make([]byte, n)
	if _, err := io.ReadFull(r, state); err != nil {
		return nil, nil, fmt.Errorf("%w: machine state: %w", ErrSnapshot, container.ErrTruncated)
	}
	if crc != nil {
		crc.Write(hdr[:])
		crc.Write(state)
	}
	var st MachineState
	if err := st.UnmarshalBinary(state); err != nil {
		return nil, nil, fmt.Errorf("%w: %w", ErrSnapshot, err)
	}
	return &st, state, nil
}

func readSnapshotV1(br *bufio.Reader, mem *guestmem.Memory) (*MachineState, error) {
	crc := crc32.New(castagnoli)
	st, _, err := readSnapHeaderV1(br, crc)
	if err != nil {
		return nil, err
	}
	if st.Memory.MemSize != mem.Size() {
		return nil, fmt.Errorf("%w: snapshot has %d MiB of memory, machine %d MiB", ErrStateMismatch, st.Memory.MemSize>>20, mem.Size()>>20)
	}
	truncated := fmt.Errorf("%w: page data: %w", ErrSnapshot, container.ErrTruncated)
	r := io.TeeReader(br, crc)
	for {
		var rh [12]byte
		if _, err := io.ReadFull(r, rh[:]); err != nil {
			return nil, truncated
		}
		gpa := binary.LittleEndian.Uint64(rh[:])
		count := uint64(binary.LittleEndian.Uint32(rh[8:]))
		if gpa == snapV1End {
			break
		}
		if count == 0 || count > snapV1MaxRunPages || gpa%guestmem.PageSize != 0 {
			return nil, fmt.Errorf("%w: bad page run at %#x (%d pages): %w", ErrSnapshot, gpa, count, container.ErrFormat)
		}
		err := mem.Fill(guestmem.GPA(gpa), count*guestmem.PageSize, func(dst []byte) error {
			_, err := io.ReadFull(r, dst)
			return err
		})
		if errors.Is(err, guestmem.ErrOutOfRange) {
			return nil, fmt.Errorf("%w: page run %#x+%d: %w", ErrSnapshot, gpa, count, err)
		}
		if err != nil {
			return nil, truncated
		}
	}
	want := crc.Sum32()
	var sum [4]byte
	if _, err := io.ReadFull(br, sum[:]); err != nil {
		return nil, fmt.Errorf("%w: checksum: %w", ErrSnapshot, container.ErrTruncated)
	}
	if binary.LittleEndian.Uint32(sum[:]) != want {
		return nil, fmt.Errorf("%w: %w", ErrSnapshot, container.ErrChecksum)
	}
	if n, _ := br.Read(sum[:1]); n != 0 {
		return nil, fmt.Errorf("%w: data after the checksum: %w", ErrSnapshot, container.ErrFormat)
	}
	return st, nil
}

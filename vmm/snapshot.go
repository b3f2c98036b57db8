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

	"govmm/vmm/guestmem"
)

// Snapshot file layout (docs/STATE.md): magic "GOVMMSNP", version (u32),
// the encoded MachineState (u64 length + bytes), then page runs — GPA
// (u64), page count (u32), the pages — with zero pages left out, ended by
// a run of count 0 at GPA ^0, and a CRC32C (u32) of everything before it.
const (
	snapMagic   = "GOVMMSNP"
	snapVersion = 1
	snapEnd     = ^uint64(0)
	maxRunPages = 1 << 16
)

// ErrSnapshot marks a snapshot file that is not one, or is damaged.
var ErrSnapshot = errors.New("bad snapshot file")

// SnapshotStats says what a snapshot wrote.
type SnapshotStats struct {
	Bytes      int64
	Pages      uint64 // pages written
	ZeroPages  uint64 // pages elided
	StateBytes int
}

// WriteSnapshot writes st and the non-zero pages of mem to path
// atomically: a temporary file, fsync, rename. The machine must stay
// paused (or mem otherwise frozen) while it runs.
func WriteSnapshot(path string, st *MachineState, mem *guestmem.Memory) (SnapshotStats, error) {
	var stats SnapshotStats
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
	crc := crc32.New(castagnoli)
	w := bufio.NewWriterSize(io.MultiWriter(tmp, crc), 1<<20)
	var hdr [20]byte
	copy(hdr[:], snapMagic)
	binary.LittleEndian.PutUint32(hdr[8:], snapVersion)
	binary.LittleEndian.PutUint64(hdr[12:], uint64(len(state)))
	w.Write(hdr[:])
	w.Write(state)
	var zero [guestmem.PageSize]byte
	for _, r := range mem.Regions() {
		for p := uint64(0); p < r.Pages(); {
			// A run of non-zero pages.
			for p < r.Pages() && isZero(r.Host[p*guestmem.PageSize:(p+1)*guestmem.PageSize], zero[:]) {
				stats.ZeroPages++
				p++
			}
			start := p
			for p < r.Pages() && p-start < maxRunPages && !isZero(r.Host[p*guestmem.PageSize:(p+1)*guestmem.PageSize], zero[:]) {
				p++
			}
			if p == start {
				continue
			}
			var rh [12]byte
			binary.LittleEndian.PutUint64(rh[:], uint64(r.GPA)+start*guestmem.PageSize)
			binary.LittleEndian.PutUint32(rh[8:], uint32(p-start))
			w.Write(rh[:])
			w.Write(r.Host[start*guestmem.PageSize : p*guestmem.PageSize])
			stats.Pages += p - start
		}
	}
	var end [12]byte
	binary.LittleEndian.PutUint64(end[:], snapEnd)
	w.Write(end[:])
	if err := w.Flush(); err != nil {
		tmp.Close()
		return stats, fmt.Errorf("snapshot: write: %w", err)
	}
	var sum [4]byte
	binary.LittleEndian.PutUint32(sum[:], crc.Sum32())
	if _, err := tmp.Write(sum[:]); err != nil {
		tmp.Close()
		return stats, fmt.Errorf("snapshot: write: %w", err)
	}
	if err := tmp.Sync(); err != nil {
		tmp.Close()
		return stats, fmt.Errorf("snapshot: fsync: %w", err)
	}
	info, _ := tmp.Stat()
	if err := tmp.Close(); err != nil {
		return stats, fmt.Errorf("snapshot: %w", err)
	}
	if err := os.Rename(tmp.Name(), path); err != nil {
		return stats, fmt.Errorf("snapshot: %w", err)
	}
	if info != nil {
		stats.Bytes = info.Size()
	}
	if d, err := os.Open(dir); err == nil {
		_ = d.Sync() // make the rename durable
		d.Close()
	}
	return stats, nil
}

func isZero(b, zero []byte) bool { return string(b) == string(zero) }

// ReadSnapshotState reads only the machine state of a snapshot, so the
// caller can build a machine of the right shape.
func ReadSnapshotState(path string) (*MachineState, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	st, _, err := readSnapHeader(bufio.NewReader(f), nil)
	return st, err
}

func readSnapHeader(r io.Reader, crc hash.Hash32) (*MachineState, []byte, error) {
	var hdr [20]byte
	if _, err := io.ReadFull(r, hdr[:]); err != nil {
		return nil, nil, fmt.Errorf("%w: header: %v", ErrSnapshot, err)
	}
	if string(hdr[:8]) != snapMagic {
		return nil, nil, fmt.Errorf("%w: not a govmm snapshot", ErrSnapshot)
	}
	if v := binary.LittleEndian.Uint32(hdr[8:]); v != snapVersion {
		return nil, nil, fmt.Errorf("%w: version %d, this govmm reads %d", ErrStateVersion, v, snapVersion)
	}
	n := binary.LittleEndian.Uint64(hdr[12:])
	if n > MaxStateSize+stateHeaderLen {
		return nil, nil, fmt.Errorf("%w: state of %d bytes", ErrStateTooLarge, n)
	}
	state := make([]byte, n)
	if _, err := io.ReadFull(r, state); err != nil {
		return nil, nil, fmt.Errorf("%w: truncated machine state", ErrSnapshot)
	}
	if crc != nil {
		crc.Write(hdr[:])
		crc.Write(state)
	}
	var st MachineState
	if err := st.UnmarshalBinary(state); err != nil {
		return nil, nil, err
	}
	return &st, state, nil
}

// ReadSnapshot reads a snapshot into mem (a new machine's memory, all
// zero) and returns its machine state. Every run is bounds-checked against
// mem; the trailing checksum is verified before returning. On error, mem
// holds garbage and the machine must be discarded, never started.
func ReadSnapshot(path string, mem *guestmem.Memory) (*MachineState, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	crc := crc32.New(castagnoli)
	br := bufio.NewReaderSize(f, 1<<20)
	st, _, err := readSnapHeader(br, crc)
	if err != nil {
		return nil, err
	}
	if st.Memory.MemSize != mem.Size() {
		return nil, fmt.Errorf("%w: snapshot has %d MiB of memory, machine %d MiB", ErrStateMismatch, st.Memory.MemSize>>20, mem.Size()>>20)
	}
	r := io.TeeReader(br, crc)
	for {
		var rh [12]byte
		if _, err := io.ReadFull(r, rh[:]); err != nil {
			return nil, fmt.Errorf("%w: truncated page data", ErrSnapshot)
		}
		gpa := binary.LittleEndian.Uint64(rh[:])
		count := uint64(binary.LittleEndian.Uint32(rh[8:]))
		if gpa == snapEnd {
			break
		}
		if count == 0 || count > maxRunPages || gpa%guestmem.PageSize != 0 {
			return nil, fmt.Errorf("%w: bad page run at %#x (%d pages)", ErrSnapshot, gpa, count)
		}
		if !mem.Contains(guestmem.GPA(gpa), count*guestmem.PageSize) {
			return nil, fmt.Errorf("%w: page run %#x+%d: %v", ErrSnapshot, gpa, count, guestmem.ErrOutOfRange)
		}
		err := mem.Fill(guestmem.GPA(gpa), count*guestmem.PageSize, func(dst []byte) error {
			_, err := io.ReadFull(r, dst)
			return err
		})
		if err != nil {
			return nil, fmt.Errorf("%w: truncated page data", ErrSnapshot)
		}
	}
	want := crc.Sum32()
	var sum [4]byte
	if _, err := io.ReadFull(br, sum[:]); err != nil {
		return nil, fmt.Errorf("%w: missing checksum", ErrSnapshot)
	}
	if binary.LittleEndian.Uint32(sum[:]) != want {
		return nil, fmt.Errorf("%w: %w", ErrSnapshot, ErrStateChecksum)
	}
	if n, _ := br.Read(sum[:1]); n != 0 {
		return nil, fmt.Errorf("%w: data after the checksum", ErrSnapshot)
	}
	return st, nil
}

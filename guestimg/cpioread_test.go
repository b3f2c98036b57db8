package guestimg

import (
	"fmt"
	"strconv"
)

// cpioEntry is one member read back by readCPIO.
type cpioEntry struct {
	Name         string
	Mode         uint32 // type and permission bits
	RMajor       uint32
	RMinor       uint32
	Data         []byte // file contents or symlink target
	ArchiveIndex int    // which of the concatenated archives it came from
}

// readCPIO parses one or more concatenated newc archives, as the kernel
// does: zero bytes between archives are skipped, and each archive must end
// with a trailer. The tests read built images back with it.
func readCPIO(b []byte) ([]cpioEntry, error) {
	var out []cpioEntry
	off, archive := 0, 0
	inArchive := false
	for {
		for !inArchive && off < len(b) && b[off] == 0 {
			off++
		}
		if off >= len(b) {
			if inArchive {
				return out, fmt.Errorf("cpio archive %d: missing %s", archive, cpioTrailer)
			}
			return out, nil
		}
		if off%4 != 0 {
			return out, fmt.Errorf("cpio header at offset %d: not 4-byte aligned", off)
		}
		if len(b)-off < cpioHdrLen || string(b[off:off+6]) != cpioMagic {
			return out, fmt.Errorf("cpio header at offset %d: bad magic", off)
		}
		var f [13]uint32
		for i := range f {
			s := string(b[off+6+8*i : off+14+8*i])
			v, err := strconv.ParseUint(s, 16, 32)
			if err != nil {
				return out, fmt.Errorf("cpio header at offset %d: field %d: %w", off, i, err)
			}
			f[i] = uint32(v)
		}
		mode, size, rmaj, rmin, namesize := f[1], f[6], f[9], f[10], f[11]
		p := off + cpioHdrLen
		if namesize == 0 || uint64(len(b)-p) < uint64(namesize) {
			return out, fmt.Errorf("cpio header at offset %d: bad name size %d", off, namesize)
		}
		name := string(b[p : p+int(namesize)-1])
		p = align4(p + int(namesize))
		if uint64(len(b)-min(p, len(b))) < uint64(size) {
			return out, fmt.Errorf("cpio member %q: truncated data", name)
		}
		data := b[p : p+int(size)]
		off = align4(p + int(size))
		if name == cpioTrailer {
			inArchive = false
			archive++
			continue
		}
		inArchive = true
		out = append(out, cpioEntry{Name: name, Mode: mode, RMajor: rmaj, RMinor: rmin, Data: data, ArchiveIndex: archive})
		if off > len(b) {
			return out, fmt.Errorf("cpio member %q: missing padding", name)
		}
	}
}

func align4(n int) int { return (n + 3) &^ 3 }

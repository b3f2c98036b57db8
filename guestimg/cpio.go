package guestimg

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"strconv"
	"strings"
)

// The initramfs is a "newc" cpio archive (Linux
// Documentation/driver-api/early-userspace/buffer-format.rst): each member is
// a 110-byte ASCII header ("070701" and 13 eight-digit hex fields), the NUL
// terminated name, padding to a multiple of 4, the data, padding to a
// multiple of 4. An archive ends with a member named "TRAILER!!!". The kernel
// accepts several archives back to back, with zero padding between them, which
// is how the VMM appends the command archive to a cached initrd.

const (
	cpioMagic   = "070701"
	cpioTrailer = "TRAILER!!!"
	cpioHdrLen  = 110

	// Mode type bits as in <linux/stat.h>; cpio stores them raw.
	cpioModeDir     = 0o040000
	cpioModeFile    = 0o100000
	cpioModeSymlink = 0o120000
	cpioModeChar    = 0o020000
	cpioModeType    = 0o170000
)

// errCPIOClosed is returned by writes after Close.
var errCPIOClosed = errors.New("cpio archive already closed")

// cpioWriter writes one newc archive. Every member has mtime 0, uid and gid 0,
// so the same input gives the same bytes.
type cpioWriter struct {
	w      io.Writer
	n      int64  // bytes written so far, for padding
	ino    uint32 // next inode number
	closed bool
}

func newCPIOWriter(w io.Writer) *cpioWriter {
	return &cpioWriter{w: w, ino: 1}
}

// Dir adds a directory. name has no leading slash ("lib/modules").
func (c *cpioWriter) Dir(name string, perm fs.FileMode) error {
	return c.member(name, cpioModeDir|uint32(perm.Perm()), 0, 0, nil)
}

// File adds a regular file holding data.
func (c *cpioWriter) File(name string, perm fs.FileMode, data []byte) error {
	return c.member(name, cpioModeFile|uint32(perm.Perm()), 0, 0, data)
}

// Symlink adds a symbolic link to target.
func (c *cpioWriter) Symlink(name, target string) error {
	return c.member(name, cpioModeSymlink|0o777, 0, 0, []byte(target))
}

// CharDev adds a character device node, such as dev/console (5, 1), which
// the kernel opens for /init before any devtmpfs is mounted.
func (c *cpioWriter) CharDev(name string, perm fs.FileMode, major, minor uint32) error {
	return c.member(name, cpioModeChar|uint32(perm.Perm()), major, minor, nil)
}

// Close writes the trailer and pads the archive to a multiple of 4 bytes,
// so another archive can follow directly. It does not close the underlying
// writer.
func (c *cpioWriter) Close() error {
	if c.closed {
		return nil
	}
	if err := c.member(cpioTrailer, 0, 0, 0, nil); err != nil {
		return err
	}
	c.closed = true
	return nil
}

func (c *cpioWriter) member(name string, mode, rmajor, rminor uint32, data []byte) error {
	if c.closed {
		return errCPIOClosed
	}
	if name == "" || strings.HasPrefix(name, "/") || strings.Contains(name, "\x00") {
		return fmt.Errorf("cpio member %q: name must be relative and non-empty", name)
	}
	if uint64(len(data)) > 0xffffffff {
		return fmt.Errorf("cpio member %q: %d bytes is too large for newc", name, len(data))
	}
	ino := uint32(0)
	nlink := uint32(1)
	if name != cpioTrailer {
		ino = c.ino
		c.ino++
		if mode&cpioModeType == cpioModeDir {
			nlink = 2
		}
	}
	var hdr bytes.Buffer
	hdr.Grow(cpioHdrLen + len(name) + 4)
	hdr.WriteString(cpioMagic)
	for _, v := range []uint32{
		ino, mode, 0 /* uid */, 0 /* gid */, nlink, 0, /* mtime */
		uint32(len(data)), 0, 0 /* dev major, minor */, rmajor, rminor,
		uint32(len(name) + 1), 0, /* check */
	} {
		fmt.Fprintf(&hdr, "%08x", v)
	}
	hdr.WriteString(name)
	hdr.WriteByte(0)
	if err := c.write(hdr.Bytes()); err != nil {
		return err
	}
	if err := c.pad(); err != nil {
		return err
	}
	if err := c.write(data); err != nil {
		return err
	}
	return c.pad()
}

func (c *cpioWriter) write(b []byte) error {
	n, err := c.w.Write(b)
	c.n += int64(n)
	if err != nil {
		return fmt.Errorf("write cpio: %w", err)
	}
	return nil
}

func (c *cpioWriter) pad() error {
	var zero [4]byte
	return c.write(zero[:(4-c.n%4)%4])
}

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
// with a trailer. It is used by tests and to inspect built images.
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

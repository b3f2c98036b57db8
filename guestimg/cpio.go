package guestimg

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
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

// writeArchive writes t as a newc cpio archive to path, synced.
func writeArchive(path string, t *tree) error {
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	bw := bufio.NewWriterSize(f, 1<<20)
	werr := t.write(newCPIOWriter(bw))
	if werr == nil {
		werr = bw.Flush()
	}
	if werr == nil {
		werr = f.Sync()
	}
	if cerr := f.Close(); werr == nil {
		werr = cerr
	}
	return werr
}

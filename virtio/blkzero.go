package virtio

import (
	"encoding/binary"
	"os"

	"golang.org/x/sys/unix"
)

// virtio-blk DISCARD and WRITE_ZEROES (virtio 1.2 §5.2.6): each request
// carries, after its header, an array of 16-byte segments (sector,
// sectors, flags). A discard punches a hole in the image where it can
// (the guest's fstrim, or mkfs, hands the host its space back) and is a
// no-op where it cannot, as the spec allows; a write-zeroes punches a
// hole or writes zeros. Either way a range the device changed reads as
// zeros afterwards, and OnZero tells replication so.
const (
	blkFDiscard     = 1 << 13 // VIRTIO_BLK_F_DISCARD
	blkFWriteZeroes = 1 << 14 // VIRTIO_BLK_F_WRITE_ZEROES

	blkTDiscard     = 11 // VIRTIO_BLK_T_DISCARD
	blkTWriteZeroes = 13 // VIRTIO_BLK_T_WRITE_ZEROES

	blkZeroSegSize = 16 // struct virtio_blk_discard_write_zeroes
	blkZeroFUnmap  = 1  // VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP

	// blkZeroMaxSectors (1 GiB) bounds one segment and blkZeroMaxSegs
	// (Linux's own cap) the segments of one request.
	blkZeroMaxSectors = 1 << 21
	blkZeroMaxSegs    = 256
	// blkZeroAlign (4 KiB, in sectors) is the discard granularity the
	// guest is told: a hole in a file is made of whole file system blocks.
	blkZeroAlign = 8
)

// Offsets in the config space of the discard and write-zeroes fields.
const (
	cfgMaxDiscardSectors  = 36
	cfgMaxDiscardSeg      = 40
	cfgDiscardAlign       = 44
	cfgMaxWriteZeroesSect = 48
	cfgMaxWriteZeroesSeg  = 52
	cfgWriteZeroesUnmap   = 56
)

// putZeroConfig fills the discard and write-zeroes fields of c; unmap
// says whether a write-zeroes may punch a hole.
func putZeroConfig(c []byte, unmap bool) {
	le := binary.LittleEndian
	le.PutUint32(c[cfgMaxDiscardSectors:], blkZeroMaxSectors)
	le.PutUint32(c[cfgMaxDiscardSeg:], blkZeroMaxSegs)
	le.PutUint32(c[cfgDiscardAlign:], blkZeroAlign)
	le.PutUint32(c[cfgMaxWriteZeroesSect:], blkZeroMaxSectors)
	le.PutUint32(c[cfgMaxWriteZeroesSeg:], blkZeroMaxSegs)
	if unmap {
		c[cfgWriteZeroesUnmap] = 1
	}
}

// zeroSeg is one segment of a discard or write-zeroes request.
type zeroSeg struct {
	off, n int64 // bytes
}

// zero handles a discard (discard true) or write-zeroes request: every
// segment is checked before any is applied, so a malformed request
// changes nothing.
func (b *Block) zero(discard bool) byte {
	switch {
	case b.cfg.ReadOnly:
		return blkSIOErr
	case discard && b.cfg.NoDiscard:
		return blkSUnsupp // not offered
	}
	b.dataSegs(false)
	var size uint64
	for _, s := range b.segs {
		size += uint64(s.Len)
	}
	if size == 0 || size%blkZeroSegSize != 0 || size/blkZeroSegSize > blkZeroMaxSegs {
		return blkSIOErr
	}
	if cap(b.zbuf) < int(size) {
		b.zbuf = make([]byte, size)
	}
	raw := b.zbuf[:size]
	for p := raw; len(b.segs) > 0; b.segs = b.segs[1:] {
		s := b.segs[0]
		if err := b.mem.ReadAt(p[:s.Len], s.GPA); err != nil {
			return blkSIOErr
		}
		p = p[s.Len:]
	}
	b.zsegs = b.zsegs[:0]
	for ; len(raw) > 0; raw = raw[blkZeroSegSize:] {
		sector := binary.LittleEndian.Uint64(raw)
		n := uint64(binary.LittleEndian.Uint32(raw[8:]))
		flags := binary.LittleEndian.Uint32(raw[12:])
		switch {
		case discard && flags != 0, !discard && flags&^blkZeroFUnmap != 0:
			return blkSUnsupp // §5.2.6.2: unmap on a discard, or unknown flags
		case n > blkZeroMaxSectors || sector > b.capacity || n > b.capacity-sector:
			return blkSIOErr
		}
		if n > 0 {
			b.zsegs = append(b.zsegs, zeroSeg{off: int64(sector * sectorSize), n: int64(n * sectorSize)})
		}
	}
	if b.cfg.AllowWrite != nil {
		if err := b.cfg.AllowWrite(); err != nil {
			b.log.Debug("virtio-blk discard or write-zeroes refused", "err", err)
			return blkSIOErr
		}
	}
	for _, s := range b.zsegs {
		changed, err := b.zeroRange(s, discard)
		if err != nil {
			b.log.Warn("virtio-blk discard or write-zeroes failed", "offset", s.off, "bytes", s.n, "err", err)
			return blkSIOErr
		}
		if changed && b.cfg.OnZero != nil {
			if err := b.cfg.OnZero(s.off, s.n); err != nil {
				return blkSIOErr
			}
		}
	}
	return blkSOK
}

// zeroRange makes s read as zeros, and says whether the image changed:
// a discard leaves an image that cannot punch holes as it was.
func (b *Block) zeroRange(s zeroSeg, discard bool) (bool, error) {
	if discard {
		punched, err := b.zeroer.Punch(s.off, s.n)
		if err == nil {
			return punched, nil
		}
		// The punch failed, maybe part way: make the range zeros.
	}
	return true, b.zeroer.Zero(s.off, s.n)
}

// ImageZeroer makes ranges of a raw disk image (a file or a block device)
// read as zeros: by punching a hole (FALLOC_FL_PUNCH_HOLE|KEEP_SIZE),
// which keeps a sparse file sparse and lets a block device zero a range
// without writing it, or, once the image has refused to punch, by writing
// zeros. An image kept allocated is never punched: its ranges are zeroed
// in place (FALLOC_FL_ZERO_RANGE, which leaves the blocks allocated), or
// written with zeros where the image cannot. One goroutine uses it at a
// time.
type ImageZeroer struct {
	F *os.File
	// NoPunch says the image cannot punch holes: set after the first
	// punch it refuses (or by a caller that knows), and from then on
	// Punch does not try and Zero writes zeros.
	NoPunch bool
	// KeepAllocated says the image must stay allocated (--disk
	// ...,nodiscard): Punch never punches and Zero zeros in place, so
	// that a write after it cannot fail for lack of space.
	KeepAllocated bool

	noZeroRange bool // the image refused FALLOC_FL_ZERO_RANGE
}

// zeroFill is what an image that cannot punch holes is written with.
var zeroFill [1 << 20]byte

// Punch punches a hole of n bytes at off. false with a nil error means
// the image cannot punch holes (its file system, a block device that
// cannot promise zeros) or must stay allocated, and is unchanged; any
// other failure is an error, after which the range may be partly punched.
func (z *ImageZeroer) Punch(off, n int64) (bool, error) {
	if z.NoPunch || z.KeepAllocated {
		return false, nil
	}
	err := unix.Fallocate(int(z.F.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off, n)
	switch err {
	case nil:
		return true, nil
	case unix.EOPNOTSUPP, unix.ENODEV, unix.EINVAL, unix.ENOSYS:
		z.NoPunch = true
		return false, nil
	}
	return false, err
}

// Zero makes n bytes at off read as zeros: a hole punched, or zeroed in
// place where the image must stay allocated, or zeros written where
// neither works (a disk that cannot write fails there, with its own
// error).
func (z *ImageZeroer) Zero(off, n int64) error {
	if ok, _ := z.Punch(off, n); ok {
		return nil
	}
	if z.KeepAllocated && !z.noZeroRange {
		err := unix.Fallocate(int(z.F.Fd()), unix.FALLOC_FL_ZERO_RANGE|unix.FALLOC_FL_KEEP_SIZE, off, n)
		switch err {
		case nil:
			return nil
		case unix.EOPNOTSUPP, unix.ENODEV, unix.EINVAL, unix.ENOSYS:
			z.noZeroRange = true
		default:
			return err
		}
	}
	for n > 0 {
		c := min(n, int64(len(zeroFill)))
		if _, err := z.F.WriteAt(zeroFill[:c], off); err != nil {
			return err
		}
		off, n = off+c, n-c
	}
	return nil
}

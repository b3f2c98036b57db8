package virtio

import (
	"encoding/binary"
	"fmt"
	"io"
	"log/slog"
	"os"

	"golang.org/x/sys/unix"

	"govmm/vmm/devstate"
	"govmm/vmm/guestmem"
	"govmm/vmm/pci"
)

// virtio-blk (virtio 1.x §5.2).
const (
	blkFSizeMax = 1 << 1 // VIRTIO_BLK_F_SIZE_MAX
	blkFSegMax  = 1 << 2 // VIRTIO_BLK_F_SEG_MAX
	blkFRO      = 1 << 5 // VIRTIO_BLK_F_RO
	blkFBlkSize = 1 << 6 // VIRTIO_BLK_F_BLK_SIZE
	blkFFlush   = 1 << 9 // VIRTIO_BLK_F_FLUSH

	blkTIn    = 0 // VIRTIO_BLK_T_IN
	blkTOut   = 1 // VIRTIO_BLK_T_OUT
	blkTFlush = 4 // VIRTIO_BLK_T_FLUSH
	blkTGetID = 8 // VIRTIO_BLK_T_GET_ID

	blkSOK     = 0 // VIRTIO_BLK_S_OK
	blkSIOErr  = 1 // VIRTIO_BLK_S_IOERR
	blkSUnsupp = 2 // VIRTIO_BLK_S_UNSUPP

	sectorSize = 512
	blkHdrSize = 16 // struct virtio_blk_req header: type, reserved, sector
	blkIDLen   = 20 // VIRTIO_BLK_ID_BYTES

	// blkSizeMax and blkSegMax bound one request to 254 * 64 KiB, well
	// under MaxChainBytes.
	blkSizeMax = 64 << 10
	blkSegMax  = MaxQueueSize - 2

	// capacity, size_max, seg_max, geometry, blk_size, topology, wce,
	// num_queues, then discard and write-zeroes limits (blkzero.go)
	blkConfigSize = 60
)

// BlockConfig configures a virtio-blk device.
type BlockConfig struct {
	ID           string // device state ID, e.g. "virtio-blk0"
	Path         string // raw disk image (a regular file or a block device)
	ReadOnly     bool   // offer VIRTIO_BLK_F_RO and fail writes with IOERR
	UseIOEventFD bool   // let KVM signal queue kicks without a vCPU exit
	Serial       string // GET_ID answer (at most 20 bytes); "" means ID
	// NoDiscard keeps the image allocated: DISCARD is not offered (a
	// guest that sends one anyway gets UNSUPP) and a WRITE_ZEROES zeros
	// its range in place (FALLOC_FL_ZERO_RANGE, or zeros written), never
	// punching a hole, so a fully allocated image stays so.
	NoDiscard bool

	// OnWrite, if set, is called on the device worker after each
	// successful write of guest data to the image, with the image offset
	// and the bytes written (a private copy, valid only during the call,
	// so it matches what reached the image even if the guest changes its
	// buffer meanwhile). Replication mirrors disk writes through it. An
	// error fails the request with VIRTIO_BLK_S_IOERR.
	OnWrite func(off int64, p []byte) error
	// OnZero, if set, is called on the device worker after a discard or
	// write-zeroes request made n bytes at off read as zeros (a discard
	// the image cannot honour changes nothing and calls nothing).
	// Replication mirrors them through it as zero runs. An error fails
	// the request with VIRTIO_BLK_S_IOERR.
	OnZero func(off, n int64) error
	// AllowWrite, if set, is asked on the device worker before each write,
	// discard or write-zeroes request touches the image: an error fails the request with
	// VIRTIO_BLK_S_IOERR and leaves the image as it was. A fenced VMM
	// refuses every write through it (replicate.DiskLog.AllowWrite).
	AllowWrite func() error
	// OnFlush, if set, is called after each successful flush of the image
	// (fdatasync), before the guest sees the flush complete. An error
	// fails the flush with VIRTIO_BLK_S_IOERR.
	OnFlush func() error

	Logger *slog.Logger // nil: slog.Default()
}

// Block is a virtio-blk PCI function backed by a raw image file. It
// implements pci.Device, pci.BARMapper and devstate.Stateful (through its
// transport): quiesced, requests still in the ring stay there until
// Resume; its state restores onto a device built with the same
// BlockConfig (capacity and read-only must match).
type Block struct {
	*transport
	cfg      BlockConfig
	f        *os.File
	capacity uint64 // in 512-byte sectors
	serial   [blkIDLen]byte

	// Used by the worker only.
	chain  Chain
	segs   []Buffer
	wbuf   []byte
	zbuf   []byte    // a discard or write-zeroes request's segments
	zsegs  []zeroSeg // the same, decoded
	zeroer ImageZeroer
	warned bool
}

var (
	_ pci.Device        = (*Block)(nil)
	_ pci.BARMapper     = (*Block)(nil)
	_ devstate.Stateful = (*Block)(nil)
)

// NewBlock opens the image at cfg.Path and returns the device. The image's
// size, rounded down to whole sectors, is the capacity.
func NewBlock(mem *guestmem.Memory, host pci.Host, cfg BlockConfig) (*Block, error) {
	if cfg.ID == "" {
		return nil, fmt.Errorf("virtio-blk: empty device id")
	}
	if len(cfg.Serial) > blkIDLen {
		return nil, fmt.Errorf("virtio-blk %s: serial %q longer than %d bytes", cfg.ID, cfg.Serial, blkIDLen)
	}
	flag := os.O_RDWR
	if cfg.ReadOnly {
		flag = os.O_RDONLY
	}
	f, err := os.OpenFile(cfg.Path, flag, 0)
	if err != nil {
		return nil, fmt.Errorf("virtio-blk %s: open disk image: %w", cfg.ID, err)
	}
	size, err := f.Seek(0, io.SeekEnd)
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("virtio-blk %s: size of disk image %s: %w", cfg.ID, cfg.Path, err)
	}
	b := &Block{cfg: cfg, f: f, capacity: uint64(size) / sectorSize, zeroer: ImageZeroer{F: f, KeepAllocated: cfg.NoDiscard}}
	serial := cfg.Serial
	if serial == "" {
		serial = cfg.ID
	}
	copy(b.serial[:], serial)
	b.transport, err = newTransport(cfg.ID, mem, host, b, cfg.UseIOEventFD, cfg.Logger)
	if err != nil {
		f.Close()
		return nil, err
	}
	return b, nil
}

// Close stops the device and closes the image. Idempotent.
func (b *Block) Close() error {
	b.transport.close()
	b.mu.Lock()
	f := b.f
	b.f = nil
	b.mu.Unlock()
	if f == nil {
		return nil
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("virtio-blk %s: close disk image: %w", b.cfg.ID, err)
	}
	return nil
}

func (b *Block) kind() string              { return "virtio-blk" }
func (b *Block) deviceType() uint16        { return 2 }
func (b *Block) class() (uint8, uint8)     { return 0x01, 0x00 }
func (b *Block) numQueues() int            { return 1 }
func (b *Block) configSize() int           { return blkConfigSize }
func (b *Block) checkFeatures(uint64) bool { return true }
func (b *Block) writeConfig(int, []byte)   {} // writeback toggle not offered
func (b *Block) activate(uint64)           {}
func (b *Block) reset()                    {}

func (b *Block) features() uint64 {
	f := uint64(FeatureVersion1 | FeatureIndirectDesc | blkFSizeMax | blkFSegMax | blkFBlkSize | blkFFlush)
	if b.cfg.ReadOnly {
		f |= blkFRO
	} else {
		f |= blkFWriteZeroes
		if !b.cfg.NoDiscard {
			f |= blkFDiscard
		}
	}
	return f
}

func (b *Block) readConfig(off int, data []byte) {
	var c [blkConfigSize]byte
	binary.LittleEndian.PutUint64(c[0:], b.capacity)
	binary.LittleEndian.PutUint32(c[8:], blkSizeMax)
	binary.LittleEndian.PutUint32(c[12:], blkSegMax)
	binary.LittleEndian.PutUint32(c[20:], sectorSize)
	putZeroConfig(c[:], !b.cfg.NoDiscard)
	for i := range data {
		if off+i < len(c) {
			data[i] = c[off+i]
		}
	}
}

// blkState is virtio-blk's own part of the transport state: the disk's
// shape, which restore checks the device against. The disk contents are
// not part of it (replication mirrors writes through OnWrite).
type blkState struct {
	Capacity uint64 // sectors
	ReadOnly bool
}

func (s *blkState) walk(c *devstate.Codec) {
	c.U64(&s.Capacity)
	c.Bool(&s.ReadOnly)
}

func (b *Block) saveDevice() []byte {
	s := blkState{Capacity: b.capacity, ReadOnly: b.cfg.ReadOnly}
	return devstate.Encode(s.walk)
}

func (b *Block) checkDevice(saved []byte) error {
	var s blkState
	if err := devstate.Decode(saved, s.walk); err != nil {
		return err
	}
	if s.Capacity != b.capacity || s.ReadOnly != b.cfg.ReadOnly {
		return fmt.Errorf("disk of %d sectors (read-only %v) saved, this one has %d (%v)",
			s.Capacity, s.ReadOnly, b.capacity, b.cfg.ReadOnly)
	}
	return nil
}

// process handles one request (§5.2.6): a 16-byte readable header, data,
// and a final writable status byte. A chain too short to hold a header
// and a status byte cannot be answered; it is returned unused.
func (b *Block) process(qi int) (bool, error) {
	q := b.ring(qi)
	ok, err := q.Pop(&b.chain)
	if !ok || err != nil {
		return false, err
	}
	c := &b.chain
	if c.ReadLen < blkHdrSize || c.WriteLen < 1 {
		if !b.warned {
			b.warned = true
			b.log.Warn("virtio-blk request without header or status byte", "head", c.Head)
		}
		return true, q.Push(c.Head, 0)
	}
	var hdr [blkHdrSize]byte
	if err := b.gather(hdr[:]); err != nil {
		return true, q.Push(c.Head, 0)
	}
	typ := binary.LittleEndian.Uint32(hdr[0:])
	sector := binary.LittleEndian.Uint64(hdr[8:])

	// The status byte is the last byte of the last writable buffer.
	last := c.Bufs[len(c.Bufs)-1]
	statusGPA := last.GPA + guestmem.GPA(last.Len-1)

	var status byte
	written := uint32(0)
	switch typ {
	case blkTIn:
		b.dataSegs(true)
		var n uint64
		status, n = b.read(sector)
		written = uint32(n)
	case blkTOut:
		b.dataSegs(false)
		status = b.write(sector)
	case blkTFlush:
		status = b.flush()
	case blkTGetID:
		b.dataSegs(true)
		status, written = b.getID()
	case blkTDiscard, blkTWriteZeroes:
		status = b.zero(typ == blkTDiscard)
	default:
		status = blkSUnsupp
	}
	if err := b.mem.WriteAt([]byte{status}, statusGPA); err != nil {
		return true, &ChainError{Reason: ErrBufferRange, Head: c.Head}
	}
	return true, q.Push(c.Head, written+1)
}

// gather copies the first len(p) readable bytes of the chain into p.
func (b *Block) gather(p []byte) error {
	for _, buf := range b.chain.Bufs {
		if len(p) == 0 || buf.Write {
			break
		}
		n := min(uint64(buf.Len), uint64(len(p)))
		if err := b.mem.ReadAt(p[:n], buf.GPA); err != nil {
			return err
		}
		p = p[n:]
	}
	return nil
}

// dataSegs fills b.segs with the data part of the chain: the writable
// buffers minus the status byte (in), or the readable buffers minus the
// header (out).
func (b *Block) dataSegs(in bool) {
	b.segs = b.segs[:0]
	if in {
		for _, buf := range b.chain.Bufs {
			if buf.Write {
				b.segs = append(b.segs, buf)
			}
		}
		last := &b.segs[len(b.segs)-1]
		last.Len--
		if last.Len == 0 {
			b.segs = b.segs[:len(b.segs)-1]
		}
		return
	}
	skip := uint32(blkHdrSize)
	for _, buf := range b.chain.Bufs {
		if buf.Write {
			break
		}
		if skip >= buf.Len {
			skip -= buf.Len
			continue
		}
		buf.GPA += guestmem.GPA(skip)
		buf.Len -= skip
		skip = 0
		b.segs = append(b.segs, buf)
	}
}

// span checks that the data segments cover whole sectors inside the disk
// and returns the byte offset.
func (b *Block) span(sector uint64) (int64, bool) {
	var n uint64
	for _, s := range b.segs {
		n += uint64(s.Len)
	}
	if n%sectorSize != 0 || sector > b.capacity || n/sectorSize > b.capacity-sector {
		return 0, false
	}
	return int64(sector * sectorSize), true
}

func (b *Block) read(sector uint64) (byte, uint64) {
	off, ok := b.span(sector)
	if !ok {
		return blkSIOErr, 0
	}
	var done uint64
	for _, s := range b.segs {
		// Straight from the image into guest memory; Fill marks the
		// pages dirty once the read is complete (invariant 3).
		err := b.mem.Fill(s.GPA, uint64(s.Len), func(dst []byte) error {
			_, err := b.f.ReadAt(dst, off)
			return err
		})
		if err != nil {
			return blkSIOErr, done
		}
		off += int64(s.Len)
		done += uint64(s.Len)
	}
	return blkSOK, done
}

func (b *Block) write(sector uint64) byte {
	if b.cfg.ReadOnly {
		return blkSIOErr
	}
	if b.cfg.AllowWrite != nil {
		if err := b.cfg.AllowWrite(); err != nil {
			b.log.Debug("virtio-blk write refused", "err", err)
			return blkSIOErr
		}
	}
	off, ok := b.span(sector)
	if !ok {
		return blkSIOErr
	}
	for _, s := range b.segs {
		src, err := b.mem.Slice(s.GPA, uint64(s.Len))
		if err != nil {
			return blkSIOErr
		}
		if b.cfg.OnWrite != nil {
			// Copy first so the image and the mirror get the same bytes.
			if cap(b.wbuf) < len(src) {
				b.wbuf = make([]byte, len(src))
			}
			p := b.wbuf[:len(src)]
			copy(p, src)
			src = p
		}
		if _, err := b.f.WriteAt(src, off); err != nil {
			b.log.Warn("virtio-blk write failed", "offset", off, "bytes", len(src), "err", err)
			return blkSIOErr
		}
		if b.cfg.OnWrite != nil {
			if err := b.cfg.OnWrite(off, src); err != nil {
				return blkSIOErr
			}
		}
		off += int64(s.Len)
	}
	return blkSOK
}

func (b *Block) flush() byte {
	if b.cfg.ReadOnly {
		return blkSOK
	}
	if err := unix.Fdatasync(int(b.f.Fd())); err != nil {
		b.log.Warn("virtio-blk flush failed", "err", err)
		return blkSIOErr
	}
	if b.cfg.OnFlush != nil {
		if err := b.cfg.OnFlush(); err != nil {
			return blkSIOErr
		}
	}
	return blkSOK
}

// getID writes the serial into the data buffers (up to 20 bytes, not
// NUL-terminated when it is exactly 20 long, §5.2.6.1).
func (b *Block) getID() (byte, uint32) {
	p := b.serial[:]
	var done uint32
	for _, s := range b.segs {
		if len(p) == 0 {
			break
		}
		n := min(int(s.Len), len(p))
		if err := b.mem.WriteAt(p[:n], s.GPA); err != nil {
			return blkSIOErr, done
		}
		p = p[n:]
		done += uint32(n)
	}
	return blkSOK, done
}

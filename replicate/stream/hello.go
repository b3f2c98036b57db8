package stream

import (
	"encoding/binary"
	"fmt"
	"time"
)

// The Hello payload: its decoder, with every count and length checked
// against its cap before use, and its encoder.

// decodeHello decodes a Hello payload into h. (Long, on purpose: it reads
// the fields in wire order, each checked before use, as docs/STREAM.md
// lists them.)
func decodeHello(h *hello, p []byte) error {
	le := binary.LittleEndian
	if len(p) < len(helloMagic) || string(p[:len(helloMagic)]) != helloMagic {
		return fmt.Errorf("hello: no govmm stream magic: %w", ErrVersion)
	}
	if len(p) < helloFixed {
		return fmt.Errorf("hello: %d bytes: %w", len(p), ErrFrame)
	}
	h.version = le.Uint16(p[8:])
	if h.version != Version {
		// Nothing after the version is trusted to have our layout.
		return fmt.Errorf("peer speaks version %d, this side %d: %w", h.version, Version, ErrVersion)
	}
	flags := le.Uint16(p[10:])
	if flags&^(helloFlagKeyed|helloCodecFlags|helloFlagDeltas|helloFlagAEGIS|helloFlagAEGISX2) != 0 {
		return fmt.Errorf("hello: unknown flags %#x: %w", flags, ErrFrame)
	}
	h.keyed = flags&helloFlagKeyed != 0
	h.codecs = flags & helloCodecFlags
	h.deltas = flags&helloFlagDeltas != 0
	h.aegis = flags&helloFlagAEGIS != 0
	h.aegisX2 = flags&helloFlagAEGISX2 != 0
	if (h.aegis || h.aegisX2) && !h.keyed {
		return fmt.Errorf("hello: offers a cipher without a key (flags %#x): %w", flags, ErrFrame)
	}
	h.role = role(p[12])
	if h.role != roleSender && h.role != roleReceiver {
		return fmt.Errorf("hello: unknown role %d: %w", h.role, ErrFrame)
	}
	if h.role == roleSender && h.codecs&(h.codecs-1) != 0 {
		return fmt.Errorf("hello: sender wants more than one codec (flags %#x): %w", flags, ErrFrame)
	}
	if !allZero(p[13:16]) {
		return fmt.Errorf("hello: reserved bytes set: %w", ErrFrame)
	}
	copy(h.nonce[:], p[16:16+nonceSize])
	hb, to := le.Uint64(p[16+nonceSize:]), le.Uint64(p[24+nonceSize:])
	// hb > to/2, not to < 2*hb: twice a heartbeat of 2^63 ns or more
	// wraps to a small number (found by FuzzDecodeFrame).
	if hb == 0 || hb > to/2 || to > uint64(MaxTimeout) {
		return fmt.Errorf("hello: heartbeat %v and timeout %v (want 0 < 2×heartbeat ≤ timeout ≤ %v): %w",
			time.Duration(hb), time.Duration(to), MaxTimeout, ErrFrame)
	}
	h.heartbeat, h.timeout = time.Duration(hb), time.Duration(to)
	r := p[helloFixed:]
	name, r, err := takeString(r, MaxNameLen, "vm name")
	if err != nil {
		return err
	}
	if len(r) < 8 {
		return fmt.Errorf("hello: truncated identity: %w", ErrFrame)
	}
	vcpus := le.Uint32(r)
	nreg := int(le.Uint16(r[4:]))
	if r[6] != 0 || r[7] != 0 {
		return fmt.Errorf("hello: reserved bytes set: %w", ErrFrame)
	}
	r = r[8:]
	if nreg > MaxRegions {
		return fmt.Errorf("hello: %d memory regions, at most %d: %w", nreg, MaxRegions, ErrTooLarge)
	}
	if len(r) < 16*nreg {
		return fmt.Errorf("hello: truncated memory layout: %w", ErrFrame)
	}
	var regions []Region
	if nreg > 0 {
		regions = make([]Region, nreg)
		for i := range regions {
			regions[i] = Region{GPA: GPA(le.Uint64(r)), Size: le.Uint64(r[8:])}
			r = r[16:]
		}
	}
	devices, r, err := takeDevices(r)
	if err != nil {
		return err
	}
	if len(r) < 8 {
		return fmt.Errorf("hello: truncated witness generation: %w", ErrFrame)
	}
	gen := le.Uint64(r)
	holder, r, err := takeString(r[8:], MaxHolderLen, "witness holder")
	if err != nil {
		return err
	}
	if len(r) != 0 {
		return fmt.Errorf("hello: %d trailing bytes: %w", len(r), ErrFrame)
	}
	h.id = Identity{Name: name, Regions: regions, VCPUs: vcpus, Devices: devices, Generation: gen, Holder: holder}
	// A sender must describe a real VM; a receiver may leave it empty to
	// accept any.
	if h.role == roleSender || !h.id.IsZero() {
		if err := h.id.Validate(); err != nil {
			return fmt.Errorf("hello identity: %w", err)
		}
	}
	return nil
}

func takeDevices(r []byte) ([]Device, []byte, error) {
	if len(r) < 2 {
		return nil, nil, fmt.Errorf("hello: truncated device list: %w", ErrFrame)
	}
	n := int(binary.LittleEndian.Uint16(r))
	r = r[2:]
	if n > MaxDevices {
		return nil, nil, fmt.Errorf("hello: %d devices, at most %d: %w", n, MaxDevices, ErrTooLarge)
	}
	var devs []Device
	for range n {
		var d Device
		var err error
		if d.ID, r, err = takeString(r, MaxDeviceID, "device id"); err != nil {
			return nil, nil, err
		}
		if len(r) < 2 {
			return nil, nil, fmt.Errorf("hello: truncated device %s: %w", d.ID, ErrFrame)
		}
		na := int(binary.LittleEndian.Uint16(r))
		r = r[2:]
		if na > MaxAttrs {
			return nil, nil, fmt.Errorf("hello: device %s: %d attributes, at most %d: %w", d.ID, na, MaxAttrs, ErrTooLarge)
		}
		for range na {
			var a Attr
			if a.Key, r, err = takeString(r, MaxAttrKey, "attribute key"); err != nil {
				return nil, nil, err
			}
			if a.Value, r, err = takeString(r, MaxAttrValue, "attribute value"); err != nil {
				return nil, nil, err
			}
			d.Attrs = append(d.Attrs, a)
		}
		devs = append(devs, d)
	}
	return devs, r, nil
}

func appendString(b []byte, s string) []byte {
	b = binary.LittleEndian.AppendUint16(b, uint16(len(s)))
	return append(b, s...)
}

func takeString(r []byte, max int, what string) (string, []byte, error) {
	if len(r) < 2 {
		return "", nil, fmt.Errorf("hello: truncated %s: %w", what, ErrFrame)
	}
	n := int(binary.LittleEndian.Uint16(r))
	if n > max {
		return "", nil, fmt.Errorf("hello: %s of %d bytes, at most %d: %w", what, n, max, ErrTooLarge)
	}
	if len(r)-2 < n {
		return "", nil, fmt.Errorf("hello: truncated %s: %w", what, ErrFrame)
	}
	return string(r[2 : 2+n]), r[2+n:], nil
}

func appendHello(b []byte, h *hello) []byte {
	le := binary.LittleEndian
	b = append(b, helloMagic...)
	b = le.AppendUint16(b, h.version)
	var flags uint16
	if h.keyed {
		flags |= helloFlagKeyed
	}
	flags |= h.codecs & helloCodecFlags
	if h.deltas {
		flags |= helloFlagDeltas
	}
	if h.aegis {
		flags |= helloFlagAEGIS
	}
	if h.aegisX2 {
		flags |= helloFlagAEGISX2
	}
	b = le.AppendUint16(b, flags)
	b = append(b, byte(h.role), 0, 0, 0)
	b = append(b, h.nonce[:]...)
	b = le.AppendUint64(b, uint64(h.heartbeat))
	b = le.AppendUint64(b, uint64(h.timeout))
	b = appendString(b, h.id.Name)
	b = le.AppendUint32(b, h.id.VCPUs)
	b = le.AppendUint16(b, uint16(len(h.id.Regions)))
	b = append(b, 0, 0)
	for _, r := range h.id.Regions {
		b = le.AppendUint64(b, uint64(r.GPA))
		b = le.AppendUint64(b, r.Size)
	}
	b = le.AppendUint16(b, uint16(len(h.id.Devices)))
	for _, d := range h.id.Devices {
		b = appendString(b, d.ID)
		b = le.AppendUint16(b, uint16(len(d.Attrs)))
		for _, a := range d.Attrs {
			b = appendString(b, a.Key)
			b = appendString(b, a.Value)
		}
	}
	b = le.AppendUint64(b, h.id.Generation)
	return appendString(b, h.id.Holder)
}

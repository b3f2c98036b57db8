package bench

import "encoding/binary"

// TinyReadyLine is what the tiny guest prints, the same line the default
// guest's init prints when it is ready.
const TinyReadyLine = "govmm-guest: ready"

// TinyKernel returns the smallest bzImage that both govmm and QEMU boot:
// a boot protocol 2.15 setup header whose real-mode entry (QEMU's path,
// through its firmware) and 64-bit entry (govmm's path, no firmware) each
// print TinyReadyLine on COM1 and write 0 to the exit port at 0x600
// (govmm's exit device; QEMU's isa-debug-exit placed there). It measures
// what the VMM itself costs to reach the first guest output, and is what
// the boot suite runs where KVM cannot run a real kernel at hardware speed.
// With exit false the guest halts after the ready line instead, so the
// VMM stays up to be measured.
func TinyKernel(exit bool) []byte {
	const setupSects = 1
	const setupLen = (setupSects + 1) * 512
	img := make([]byte, setupLen+0x400)
	le := binary.LittleEndian
	img[0x1f1] = setupSects
	le.PutUint16(img[0x1fe:], 0xaa55)
	img[0x200], img[0x201] = 0xeb, 0x6a // jmp to 0x26c, past the header
	copy(img[0x202:], "HdrS")
	le.PutUint16(img[0x206:], 0x020f)
	img[0x211] = 0x01                             // loadflags: LOADED_HIGH
	le.PutUint32(img[0x214:], 0x100000)           // code32_start
	le.PutUint32(img[0x22c:], 0x7fffffff)         // initrd_addr_max
	le.PutUint16(img[0x236:], 0x01)               // xloadflags: 64-bit entry
	le.PutUint32(img[0x238:], 2047)               // cmdline_size
	le.PutUint32(img[0x260:], 1<<20)              // init_size
	img[0x1f4] = byte((len(img) - setupLen) / 16) // syssize, in 16-byte units

	line := TinyReadyLine + "\n"
	// Real mode (operand size 16): mov dx, imm16 is BA; out dx, al is EE.
	rm := []byte{0xba, 0xf8, 0x03}
	for i := 0; i < len(line); i++ {
		rm = append(rm, 0xb0, line[i], 0xee)
	}
	if exit {
		rm = append(rm, 0xba, 0x00, 0x06, 0xb0, 0x00, 0xee)
	}
	rm = append(rm, 0xfa, 0xf4, 0xeb, 0xfd) // cli; hlt; jmp hlt
	copy(img[0x26c:], rm)

	// Long mode: the same with a 66 prefix on mov dx.
	lm := []byte{0x66, 0xba, 0xf8, 0x03}
	for i := 0; i < len(line); i++ {
		lm = append(lm, 0xb0, line[i], 0xee)
	}
	if exit {
		lm = append(lm, 0x66, 0xba, 0x00, 0x06, 0xb0, 0x00, 0xee)
	}
	lm = append(lm, 0xfa, 0xf4, 0xeb, 0xfd)
	copy(img[setupLen+0x200:], lm)
	return img
}

package vmm

import "encoding/binary"

// testKernel builds the smallest file ParseBzImage accepts: a setup
// header for boot protocol 2.15 with a 64-bit entry point, and code at
// the 64-bit entry (payload offset 0x200).
func testKernel(code []byte) []byte {
	const setupSects = 1
	img := make([]byte, (setupSects+1)*512+0x200+len(code))
	img[hdrSetupSects] = setupSects
	binary.LittleEndian.PutUint16(img[hdrBootFlag:], 0xaa55)
	img[hdrJump] = 0xeb
	img[hdrJump+1] = 0x6a // header ends at 0x26c
	copy(img[hdrMagic:], "HdrS")
	binary.LittleEndian.PutUint16(img[hdrVersion:], 0x020f)
	img[hdrLoadFlags] = loadedHigh
	binary.LittleEndian.PutUint32(img[hdrInitrdAddrMax:], 0x7fffffff)
	binary.LittleEndian.PutUint16(img[hdrXLoadFlags:], xlfKernel64)
	binary.LittleEndian.PutUint32(img[hdrCmdlineSize:], 2047)
	binary.LittleEndian.PutUint32(img[hdrInitSize:], 1<<20)
	copy(img[(setupSects+1)*512+0x200:], code)
	return img
}

// Hand-assembled x86-64 snippets for the tiny test guests.
var (
	// outSerial writes al to COM1: mov dx, 0x3f8; out dx, al.
	asmOutSerial = []byte{0x66, 0xba, 0xf8, 0x03, 0xee}
	// exitAL writes al to the exit port: mov dx, 0x600; out dx, al; hlt.
	asmExitAL = []byte{0x66, 0xba, 0x00, 0x06, 0xee, 0xf4}
)

// asmMovAL is mov al, v.
func asmMovAL(v byte) []byte { return []byte{0xb0, v} }

// asmPrint writes s to COM1 one byte at a time.
func asmPrint(s string) []byte {
	var b []byte
	for i := 0; i < len(s); i++ {
		b = append(b, asmMovAL(s[i])...)
		b = append(b, asmOutSerial...)
	}
	return b
}

func cat(parts ...[]byte) []byte {
	var b []byte
	for _, p := range parts {
		b = append(b, p...)
	}
	return b
}

// Package tinyguest builds tiny hand-assembled guests for tests that need
// real KVM but not Linux: a bzImage whose 64-bit entry point runs a few
// instructions (long mode, identity-mapped 4 GiB, as govmm's boot path
// leaves it), and the x86-64 snippets to write them.
//
// They exist because some hosts (kvm_pvm sandboxes) emulate every guest
// instruction: a Linux boot takes hours there, a tiny guest milliseconds.
package tinyguest

import "encoding/binary"

// Kernel returns the smallest file vmm.ParseBzImage accepts: a boot
// protocol 2.15 setup header with a 64-bit entry point, and code at the
// 64-bit entry (payload offset 0x200, guest address 0x100200).
func Kernel(code []byte) []byte {
	const setupSects = 1
	img := make([]byte, (setupSects+1)*512+0x200+len(code))
	le := binary.LittleEndian
	img[0x1f1] = setupSects
	le.PutUint16(img[0x1fe:], 0xaa55)
	img[0x200], img[0x201] = 0xeb, 0x6a // header ends at 0x26c
	copy(img[0x202:], "HdrS")
	le.PutUint16(img[0x206:], 0x020f)
	img[0x211] = 0x01 // LOADED_HIGH
	le.PutUint32(img[0x22c:], 0x7fffffff)
	le.PutUint16(img[0x236:], 0x01) // XLF_KERNEL_64
	le.PutUint32(img[0x238:], 2047)
	le.PutUint32(img[0x260:], 1<<20)
	copy(img[(setupSects+1)*512+0x200:], code)
	return img
}

// EntryAddr is the guest-physical address of the first byte of code.
const EntryAddr = 0x100200

// Cat concatenates snippets.
func Cat(parts ...[]byte) []byte {
	var b []byte
	for _, p := range parts {
		b = append(b, p...)
	}
	return b
}

// MovAL is mov al, v.
func MovAL(v byte) []byte { return []byte{0xb0, v} }

// OutSerial writes al to COM1: mov dx, 0x3f8; out dx, al.
func OutSerial() []byte { return []byte{0x66, 0xba, 0xf8, 0x03, 0xee} }

// ExitAL writes al to govmm's exit port (the machine stops with status
// al): mov dx, 0x600; out dx, al; hlt.
func ExitAL() []byte { return []byte{0x66, 0xba, 0x00, 0x06, 0xee, 0xf4} }

// Exit stops the machine with status v.
func Exit(v byte) []byte { return Cat(MovAL(v), ExitAL()) }

// Print writes s to COM1, one byte at a time.
func Print(s string) []byte {
	var b []byte
	for i := 0; i < len(s); i++ {
		b = append(b, MovAL(s[i])...)
		b = append(b, OutSerial()...)
	}
	return b
}

// MovRBX is mov rbx, imm64.
func MovRBX(v uint64) []byte {
	b := []byte{0x48, 0xbb}
	return binary.LittleEndian.AppendUint64(b, v)
}

// IncQwordAbs is inc qword [addr] for addr below 2 GiB.
func IncQwordAbs(addr uint32) []byte {
	return binary.LittleEndian.AppendUint32([]byte{0x48, 0xff, 0x04, 0x25}, addr)
}

// Counter is a guest that increments the 64-bit counter at addr forever:
// loop: inc qword [addr]; jmp loop.
func Counter(addr uint32) []byte {
	return Cat(IncQwordAbs(addr), []byte{0xeb, 0xf6})
}

// Dirtier is a guest that writes one byte in each of pages pages starting
// at base, over and over, bumping the 64-bit pass counter at counter after
// each pass. It dirties every page of the range continuously, for dirty
// logging, migration and replication tests.
//
//	again: mov rbx, base
//	       mov ecx, pages
//	loop:  inc byte [rbx]
//	       add rbx, 4096
//	       dec ecx
//	       jnz loop
//	       inc qword [counter]
//	       jmp again
func Dirtier(base uint64, pages uint32, counter uint32) []byte {
	code := DirtierPass(base, pages, counter)
	return append(code, 0xeb, byte(-(len(code) + 2))) // jmp again
}

// DirtierPass is one pass of Dirtier without the jump back: the code that
// follows it runs once the pass is done.
func DirtierPass(base uint64, pages uint32, counter uint32) []byte {
	return Cat(
		MovRBX(base), // 10 bytes
		binary.LittleEndian.AppendUint32([]byte{0xb9}, pages), // mov ecx, imm32: 5
		[]byte{0xfe, 0x03},                         // loop: inc byte [rbx]: 2
		[]byte{0x48, 0x81, 0xc3, 0x00, 0x10, 0, 0}, // add rbx, 4096: 7
		[]byte{0xff, 0xc9},                         // dec ecx: 2
		[]byte{0x75, 0xf3},                         // jnz loop: -(2+7+2+2)
		IncQwordAbs(counter),                       // 8
	)
}

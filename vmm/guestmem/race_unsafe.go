//go:build race

package guestmem

import (
	"runtime"
	"unsafe"
)

// raceRead and raceWrite tell the race detector about accesses it cannot
// see (an assembly copy's, copyNT). Sound: the bytes are only described
// to the detector, not accessed.
func raceRead(b []byte) {
	if len(b) > 0 {
		runtime.RaceReadRange(unsafe.Pointer(unsafe.SliceData(b)), len(b))
	}
}

func raceWrite(b []byte) {
	if len(b) > 0 {
		runtime.RaceWriteRange(unsafe.Pointer(unsafe.SliceData(b)), len(b))
	}
}

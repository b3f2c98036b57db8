//go:build !amd64 || purego

package guestmem

// copyNTUnfenced is copy(dst, src) where there is no non-temporal copy,
// and ntFence does nothing.
func copyNTUnfenced(dst, src []byte) { copy(dst, src) }

func ntFence() {}

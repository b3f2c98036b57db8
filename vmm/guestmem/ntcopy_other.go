//go:build !amd64 || purego

package guestmem

// copyNT is copy(dst, src) where there is no non-temporal copy.
func copyNT(dst, src []byte) { copy(dst, src) }

// copyNTUnfenced is copy(dst, src) too, and ntFence does nothing.
func copyNTUnfenced(dst, src []byte) { copy(dst, src) }

func ntFence() {}

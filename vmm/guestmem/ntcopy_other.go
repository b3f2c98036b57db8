//go:build !amd64 || purego

package guestmem

// copyNT is copy(dst, src) where there is no non-temporal copy.
func copyNT(dst, src []byte) { copy(dst, src) }

//go:build !amd64 || purego

package guestmem

// pageSumVector is false where there is no vector loop: CopyPageSummed
// copies, then reads the page again to sum it.
const pageSumVector = false

func copyPageSummedVector(dst, src []byte, ps *PageSum) { panic("unreachable") }

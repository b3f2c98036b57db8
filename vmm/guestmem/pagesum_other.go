//go:build !amd64 || purego

package guestmem

// PageSumFast is false where there is no vector loop: CopyPageSummed
// copies, then reads the page again to sum it.
var PageSumFast = false

var pageSumVector = false

func copyPageSummedVector(dst, src []byte, ps *PageSum) { panic("unreachable") }

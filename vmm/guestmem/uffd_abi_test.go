//go:build cgo

package guestmem

import (
	"testing"
	"unsafe"

	"github.com/stretchr/testify/assert"

	"govmm/vmm/guestmem/internal/uabi"
)

// TestUffdABI pins the userfaultfd mirrors, ioctl numbers and flags to
// what the C compiler computes from <linux/userfaultfd.h>.
func TestUffdABI(t *testing.T) {
	k := uabi.Values()
	var (
		msg uffdMsg
		api uffdioAPIArg
		reg uffdioRegisterArg
		wp  uffdioWriteprotectArg
	)
	want := map[string]uint64{
		"uffd_msg":                          uint64(unsafe.Sizeof(msg)),
		"uffdio_api":                        uint64(unsafe.Sizeof(api)),
		"uffdio_range":                      uint64(unsafe.Sizeof(uffdioRange{})),
		"uffdio_register":                   uint64(unsafe.Sizeof(reg)),
		"uffdio_writeprotect":               uint64(unsafe.Sizeof(wp)),
		"uffd_msg.event":                    uint64(unsafe.Offsetof(msg.Event)),
		"uffd_msg.arg.pagefault.flags":      uint64(unsafe.Offsetof(msg.Flags)),
		"uffd_msg.arg.pagefault.address":    uint64(unsafe.Offsetof(msg.Address)),
		"uffdio_api.features":               uint64(unsafe.Offsetof(api.Features)),
		"uffdio_api.ioctls":                 uint64(unsafe.Offsetof(api.Ioctls)),
		"uffdio_register.mode":              uint64(unsafe.Offsetof(reg.Mode)),
		"uffdio_register.ioctls":            uint64(unsafe.Offsetof(reg.Ioctls)),
		"uffdio_writeprotect.mode":          uint64(unsafe.Offsetof(wp.Mode)),
		"UFFD_API":                          uffdAPI,
		"UFFDIO_API":                        uffdioAPI,
		"UFFDIO_REGISTER":                   uffdioRegister,
		"UFFDIO_UNREGISTER":                 uffdioUnregister,
		"UFFDIO_WAKE":                       uffdioWake,
		"UFFDIO_WRITEPROTECT":               uffdioWriteprotect,
		"USERFAULTFD_IOC_NEW":               userfaultfdIocNew,
		"UFFD_FEATURE_PAGEFAULT_FLAG_WP":    uffdFeaturePagefaultFlagWP,
		"UFFDIO_REGISTER_MODE_WP":           uffdioRegisterModeWP,
		"UFFDIO_WRITEPROTECT_MODE_WP":       uffdioWriteprotectModeWP,
		"UFFDIO_WRITEPROTECT_MODE_DONTWAKE": uffdioWriteprotectModeDontwake,
		"UFFD_EVENT_PAGEFAULT":              uffdEventPagefault,
		"UFFD_PAGEFAULT_FLAG_WRITE":         uffdPagefaultFlagWrite,
		"UFFD_PAGEFAULT_FLAG_WP":            uffdPagefaultFlagWP,
		"_UFFDIO_WRITEPROTECT":              uffdioWriteprotectBit,
	}
	for name, v := range want {
		got, ok := k[name]
		if assert.True(t, ok, "%s not reported by uabi", name) {
			assert.Equal(t, got, v, name)
		}
	}
	assert.Len(t, k, len(want), "every value uabi reports is checked")
}

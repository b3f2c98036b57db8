package netback

import (
	"crypto/sha256"
	"errors"
	"fmt"
	"net"
)

// ParseMAC parses a guest MAC address such as "52:54:00:12:34:56". It accepts
// only 6-byte unicast addresses that are not all zero: a guest NIC cannot own
// a multicast or broadcast address.
func ParseMAC(s string) (net.HardwareAddr, error) {
	mac, err := net.ParseMAC(s)
	if err != nil {
		return nil, fmt.Errorf("parse mac %q: not of the form xx:xx:xx:xx:xx:xx", s)
	}
	if err := checkMAC(mac); err != nil {
		return nil, fmt.Errorf("parse mac %q: %w", s, err)
	}
	return mac, nil
}

// checkMAC tells why mac cannot be a guest NIC's address.
func checkMAC(mac net.HardwareAddr) error {
	switch {
	case len(mac) != 6:
		return fmt.Errorf("%d bytes, want 6", len(mac))
	case mac[0]&1 != 0:
		return errors.New("multicast address (low bit of the first byte set), want unicast")
	case allZero(mac):
		return errors.New("all-zero address")
	}
	return nil
}

func allZero(b []byte) bool {
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}

// DefaultMAC derives a stable MAC address from a VM's name, so a guest keeps
// its address across restarts and on its standby without configuration. It
// is 52:54:00 (QEMU's prefix: locally administered, unicast) followed by the
// first three bytes of the SHA-256 of the name.
func DefaultMAC(vmName string) net.HardwareAddr {
	sum := sha256.Sum256([]byte(vmName))
	return net.HardwareAddr{0x52, 0x54, 0x00, sum[0], sum[1], sum[2]}
}

package netback

import (
	"net"
	"testing"

	"github.com/stretchr/testify/assert"
)

func TestGARP(t *testing.T) {
	mac := net.HardwareAddr{0x52, 0x54, 0x00, 0x12, 0x34, 0x56}
	want := []byte{
		0xff, 0xff, 0xff, 0xff, 0xff, 0xff, // dst: broadcast
		0x52, 0x54, 0x00, 0x12, 0x34, 0x56, // src
		0x08, 0x06, // ARP
		0x00, 0x01, // Ethernet
		0x08, 0x00, // IPv4
		6, 4, // address lengths
		0x00, 0x01, // request
		0x52, 0x54, 0x00, 0x12, 0x34, 0x56, // sender MAC
		10, 0, 2, 15, // sender IP
		0, 0, 0, 0, 0, 0, // target MAC: unknown
		10, 0, 2, 15, // target IP: the same, so it is gratuitous
	}
	want = append(want, make([]byte, 60-len(want))...) // padding
	assert.Equal(t, want, GARP(mac, net.ParseIP("10.0.2.15")))
	assert.Equal(t, want, GARP(mac, net.IPv4(10, 0, 2, 15).To4()), "4-byte form")

	assert.Nil(t, GARP(mac, net.ParseIP("::1")), "IPv6")
	assert.Nil(t, GARP(mac, nil), "no IP")
	assert.Nil(t, GARP(mac[:5], net.ParseIP("10.0.2.15")), "short MAC")
}

func TestRARP(t *testing.T) {
	mac := net.HardwareAddr{0x52, 0x54, 0x00, 0x12, 0x34, 0x56}
	want := []byte{
		0xff, 0xff, 0xff, 0xff, 0xff, 0xff, // dst: broadcast
		0x52, 0x54, 0x00, 0x12, 0x34, 0x56, // src
		0x80, 0x35, // RARP
		0x00, 0x01, // Ethernet
		0x08, 0x00, // IPv4
		6, 4, // address lengths
		0x00, 0x03, // reverse request
		0x52, 0x54, 0x00, 0x12, 0x34, 0x56, // sender MAC
		0, 0, 0, 0, // sender IP
		0x52, 0x54, 0x00, 0x12, 0x34, 0x56, // target MAC: ourselves
		0, 0, 0, 0, // target IP
	}
	want = append(want, make([]byte, 60-len(want))...) // padding
	assert.Equal(t, want, RARP(mac))
	assert.Nil(t, RARP(mac[:4]))
}

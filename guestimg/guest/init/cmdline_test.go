package main

import (
	"net/netip"
	"testing"

	"github.com/stretchr/testify/assert"
)

func TestParseCmdline(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name    string
		in      string
		want    bootConfig
		wantErr int
	}{
		{name: "empty", in: "", want: bootConfig{}},
		{
			name: "ip and gateway",
			in:   "console=ttyS0 reboot=k govmm.ip=10.0.2.15/24 govmm.gw=10.0.2.2 quiet\n",
			want: bootConfig{IP: netip.MustParsePrefix("10.0.2.15/24"), GW: netip.MustParseAddr("10.0.2.2")},
		},
		{name: "quoted", in: `govmm.ip="192.168.1.9/16"`, want: bootConfig{IP: netip.MustParsePrefix("192.168.1.9/16")}},
		{name: "debug flag", in: "govmm.debug", want: bootConfig{Debug: true}},
		{name: "debug=1", in: "govmm.debug=1", want: bootConfig{Debug: true}},
		{name: "no prefix", in: "govmm.ip=10.0.0.1", wantErr: 1},
		{name: "ipv6", in: "govmm.ip=fd00::1/64", wantErr: 1},
		{name: "bad gateway", in: "govmm.ip=10.0.0.2/8 govmm.gw=nope", want: bootConfig{IP: netip.MustParsePrefix("10.0.0.2/8")}, wantErr: 1},
		{name: "gateway alone", in: "govmm.gw=10.0.0.1", wantErr: 1},
		{name: "unrelated params", in: "root=/dev/vda govmm.mac=52:54:00:12:34:56 ip=dhcp", want: bootConfig{}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, errs := parseCmdline(tt.in)
			assert.Equal(t, tt.want, got)
			assert.Len(t, errs, tt.wantErr)
		})
	}
}

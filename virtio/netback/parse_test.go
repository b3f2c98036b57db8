package netback

import (
	"net"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"govmm/virtio"
)

func TestParsePublish(t *testing.T) {
	tests := []struct {
		name    string
		in      string
		want    Publish
		wantErr string
	}{
		{"ports only", "8080:80", Publish{HostPort: 8080, GuestPort: 80}, ""},
		{"ipv4 host", "0.0.0.0:8080:80", Publish{HostAddr: "0.0.0.0", HostPort: 8080, GuestPort: 80}, ""},
		{"ipv6 host", "[::1]:8080:80", Publish{HostAddr: "::1", HostPort: 8080, GuestPort: 80}, ""},
		{"max ports", "65535:65535", Publish{HostPort: 65535, GuestPort: 65535}, ""},
		{"one port", "8080", Publish{}, `parse publish "8080": want HOSTPORT:GUESTPORT or HOSTIP:HOSTPORT:GUESTPORT`},
		{"empty", "", Publish{}, `parse publish "": want HOSTPORT:GUESTPORT or HOSTIP:HOSTPORT:GUESTPORT`},
		{"guest port zero", "8080:0", Publish{}, `parse publish "8080:0": guest port "0" is not a number from 1 to 65535`},
		{"host port zero", "0:80", Publish{}, `parse publish "0:80": host port "0" is not a number from 1 to 65535`},
		{"host port too big", "65536:80", Publish{}, `parse publish "65536:80": host port "65536" is not a number from 1 to 65535`},
		{"guest port not a number", "8080:http", Publish{}, `parse publish "8080:http": guest port "http" is not a number from 1 to 65535`},
		{"empty guest port", "8080:", Publish{}, `parse publish "8080:": guest port "" is not a number from 1 to 65535`},
		{"hostname", "localhost:8080:80", Publish{}, `parse publish "localhost:8080:80": host address "localhost" is not an IP address`},
		{"bare ipv6", "::1:8080:80", Publish{}, `parse publish "::1:8080:80": want HOSTIP:HOSTPORT:GUESTPORT (IPv6 in brackets)`},
		{"too many fields", "1.2.3.4:1:2:3", Publish{}, `parse publish "1.2.3.4:1:2:3": want HOSTIP:HOSTPORT:GUESTPORT (IPv6 in brackets)`},
		{"negative", "-1:80", Publish{}, `parse publish "-1:80": host port "-1" is not a number from 1 to 65535`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := ParsePublish(tt.in)
			if tt.wantErr != "" {
				require.EqualError(t, err, tt.wantErr)
				return
			}
			require.NoError(t, err)
			assert.Equal(t, tt.want, got)
			// String gives back a form ParsePublish accepts.
			again, err := ParsePublish(got.String())
			require.NoError(t, err)
			if got.HostAddr == "" {
				got.HostAddr = DefaultPublishAddr
			}
			assert.Equal(t, got, again)
		})
	}
}

func TestParseMAC(t *testing.T) {
	tests := []struct {
		name    string
		in      string
		want    net.HardwareAddr
		wantErr string
	}{
		{"qemu style", "52:54:00:12:34:56", net.HardwareAddr{0x52, 0x54, 0x00, 0x12, 0x34, 0x56}, ""},
		{"upper case dashes", "02-AB-CD-EF-01-02", net.HardwareAddr{0x02, 0xab, 0xcd, 0xef, 0x01, 0x02}, ""},
		{"global unicast", "00:16:3e:00:00:01", net.HardwareAddr{0x00, 0x16, 0x3e, 0x00, 0x00, 0x01}, ""},
		{"garbage", "hello", nil, `parse mac "hello": not of the form xx:xx:xx:xx:xx:xx`},
		{"short", "52:54:00:12:34", nil, `parse mac "52:54:00:12:34": not of the form xx:xx:xx:xx:xx:xx`},
		{"eui64", "52:54:00:12:34:56:78:9a", nil, `parse mac "52:54:00:12:34:56:78:9a": 8 bytes, want 6`},
		{"multicast", "01:00:5e:00:00:01", nil, `parse mac "01:00:5e:00:00:01": multicast address (low bit of the first byte set), want unicast`},
		{"broadcast", "ff:ff:ff:ff:ff:ff", nil, `parse mac "ff:ff:ff:ff:ff:ff": multicast address (low bit of the first byte set), want unicast`},
		{"zero", "00:00:00:00:00:00", nil, `parse mac "00:00:00:00:00:00": all-zero address`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := ParseMAC(tt.in)
			if tt.wantErr != "" {
				require.EqualError(t, err, tt.wantErr)
				return
			}
			require.NoError(t, err)
			assert.Equal(t, tt.want, got)
		})
	}
}

func TestDefaultMAC(t *testing.T) {
	a := DefaultMAC("vm1")
	assert.Equal(t, a, DefaultMAC("vm1"), "stable")
	assert.NotEqual(t, a, DefaultMAC("vm2"), "differs by name")
	assert.Equal(t, net.HardwareAddr{0x52, 0x54, 0x00}, a[:3])
	_, err := ParseMAC(a.String())
	assert.NoError(t, err, "a valid guest MAC")
	assert.NotZero(t, a[0]&0x02, "locally administered")
	// Pinned: a change here changes every guest's address.
	assert.Equal(t, "52:54:00:c3:39:e6", DefaultMAC("govmm").String())
}

func TestTunOffloads(t *testing.T) {
	tests := []struct {
		name string
		in   virtio.Offloads
		want int
	}{
		{"none", virtio.Offloads{}, 0},
		{"csum", virtio.Offloads{Csum: true}, tunFCsum},
		{"all", virtio.Offloads{Csum: true, TSO4: true, TSO6: true, ECN: true, UFO: true}, tunFCsum | tunFTSO4 | tunFTSO6 | tunFTSOECN | tunFUFO},
		{"tso without csum is dropped", virtio.Offloads{TSO4: true, TSO6: true, ECN: true, UFO: true}, 0},
		{"ecn without tso is dropped", virtio.Offloads{Csum: true, ECN: true}, tunFCsum},
		{"tso4 only", virtio.Offloads{Csum: true, TSO4: true}, tunFCsum | tunFTSO4},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			assert.Equal(t, tt.want, tunOffloads(tt.in))
		})
	}
}

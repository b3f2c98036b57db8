package netback

import (
	"fmt"
	"net"
	"net/netip"
	"strconv"
	"strings"
)

// DefaultPublishAddr is the host address a published port listens on when
// none is given: loopback, so publishing never exposes a guest by accident.
const DefaultPublishAddr = "127.0.0.1"

// Publish forwards a host TCP port to a guest TCP port, like docker's and
// podman's --publish.
type Publish struct {
	HostAddr  string // IP address to listen on; "" means DefaultPublishAddr
	HostPort  uint16 // 0 picks a free port (see User.PublishedAddrs)
	GuestPort uint16
}

// hostAddr is the address to listen on.
func (p Publish) hostAddr() string {
	h := p.HostAddr
	if h == "" {
		h = DefaultPublishAddr
	}
	return net.JoinHostPort(h, strconv.Itoa(int(p.HostPort)))
}

// String formats p as ParsePublish accepts it.
func (p Publish) String() string {
	return fmt.Sprintf("%s:%d", p.hostAddr(), p.GuestPort)
}

// ParsePublish parses a --publish value: HOSTPORT:GUESTPORT, or
// HOSTIP:HOSTPORT:GUESTPORT (an IPv6 HOSTIP in brackets, e.g.
// [::1]:8080:80). Ports are 1 to 65535.
func ParsePublish(s string) (Publish, error) {
	p, err := parsePublish(s)
	if err != nil {
		return Publish{}, fmt.Errorf("parse publish %q: %w", s, err)
	}
	return p, nil
}

func parsePublish(s string) (Publish, error) {
	i := strings.LastIndexByte(s, ':')
	if i < 0 {
		return Publish{}, fmt.Errorf("want HOSTPORT:GUESTPORT or HOSTIP:HOSTPORT:GUESTPORT")
	}
	rest, guest := s[:i], s[i+1:]
	guestPort, err := parsePort("guest", guest)
	if err != nil {
		return Publish{}, err
	}
	var host, hostPortStr string
	if strings.Contains(rest, ":") {
		host, hostPortStr, err = net.SplitHostPort(rest)
		if err != nil {
			return Publish{}, fmt.Errorf("want HOSTIP:HOSTPORT:GUESTPORT (IPv6 in brackets)")
		}
		addr, err := netip.ParseAddr(host)
		if err != nil || addr.Zone() != "" {
			return Publish{}, fmt.Errorf("host address %q is not an IP address", host)
		}
	} else {
		hostPortStr = rest
	}
	hostPort, err := parsePort("host", hostPortStr)
	if err != nil {
		return Publish{}, err
	}
	return Publish{HostAddr: host, HostPort: hostPort, GuestPort: guestPort}, nil
}

func parsePort(which, s string) (uint16, error) {
	n, err := strconv.ParseUint(s, 10, 16)
	if err != nil || n == 0 {
		return 0, fmt.Errorf("%s port %q is not a number from 1 to 65535", which, s)
	}
	return uint16(n), nil
}

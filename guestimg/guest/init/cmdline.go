package main

import (
	"fmt"
	"net/netip"
	"strings"
)

// bootConfig is what /init takes from the kernel command line.
type bootConfig struct {
	IP    netip.Prefix // govmm.ip=ADDR/PREFIX: eth0's address; invalid if unset
	GW    netip.Addr   // govmm.gw=ADDR: default route; invalid if unset
	Debug bool         // govmm.debug=1: print how long each step took
}

// parseCmdline reads the govmm.* parameters of /proc/cmdline. Bad values
// are reported and ignored, so a typo never stops the boot.
func parseCmdline(s string) (bootConfig, []error) {
	var c bootConfig
	var errs []error
	for _, f := range strings.Fields(s) {
		k, v, _ := strings.Cut(f, "=")
		v = strings.Trim(v, `"`)
		switch k {
		case "govmm.ip":
			p, err := netip.ParsePrefix(v)
			if err != nil || !p.Addr().Is4() {
				errs = append(errs, fmt.Errorf("govmm.ip=%q: want an IPv4 ADDR/PREFIX", v))
				continue
			}
			c.IP = p
		case "govmm.gw":
			a, err := netip.ParseAddr(v)
			if err != nil || !a.Is4() {
				errs = append(errs, fmt.Errorf("govmm.gw=%q: want an IPv4 address", v))
				continue
			}
			c.GW = a
		case "govmm.debug":
			c.Debug = v == "" || v == "1" || v == "true"
		}
	}
	if c.GW.IsValid() && !c.IP.IsValid() {
		errs = append(errs, fmt.Errorf("govmm.gw=%s without govmm.ip: ignored", c.GW))
		c.GW = netip.Addr{}
	}
	return c, errs
}
